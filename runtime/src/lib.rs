//! joblet's runtime: spawns one isolated, resource-limited job and supervises it.
//!
//! The map of the code and its invariants is in `docs/ARCHITECTURE.md`.

pub mod cgroup;
pub mod job;
pub mod parse;
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "spawn, in a parallel branch, is the caller")
)]
mod seccomp;
mod sys;
#[doc(hidden)]
pub mod testsupport;
