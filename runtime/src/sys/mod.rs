//! The syscall layer: the only place in joblet allowed to contain `unsafe`. Every unsafe block
//! carries a `// SAFETY:` comment naming the invariant it relies on.
#![allow(
    unsafe_code,
    reason = "the syscall layer is where joblet's unsafe code is confined"
)]

pub(crate) mod bpf;
