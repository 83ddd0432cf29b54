//! The system-call layer: the only code allowed to be `unsafe`. Each submodule allows it back
//! for itself, with its reason.

pub(crate) mod seccomp;
