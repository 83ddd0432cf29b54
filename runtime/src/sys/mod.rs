//! The syscall layer: the only place in joblet allowed to contain `unsafe`. Each module wraps one
//! kernel interface behind a safe API whose types uphold the kernel's contract.
#![allow(
    unsafe_code,
    reason = "the syscall layer wraps raw kernel interfaces (io_uring) behind safe APIs"
)]

pub(crate) mod uring;
