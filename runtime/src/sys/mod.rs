//! The syscall layer: the only place in joblet where `unsafe` is allowed.
//!
//! Everything here is a thin, documented wrapper over one kernel interface that has no safe
//! wrapper in `rustix`: clone3 with a private stack, raw signal dispositions, `close_range`,
//! `mount_setattr`, `execve`, `seccomp`, a loopback ioctl, io_uring submissions, the `Pod` impls of the structs shared
//! with the eBPF probes. Callers stay in safe code.
#![allow(
    unsafe_code,
    reason = "the syscall layer is the one place unsafe code lives"
)]

pub(crate) mod bpf;
pub(crate) mod clone3;
pub(crate) mod misc;
pub(crate) mod seccomp;
pub(crate) mod signal;
pub(crate) mod uring;
