//! joblet's runtime: spawns one isolated, resource-limited job and supervises it.
//!
//! The map of the code and its invariants is in `docs/ARCHITECTURE.md`.

pub mod capture;
pub mod cgroup;
pub mod job;
pub mod parse;
pub mod store;
mod sys;
#[doc(hidden)]
pub mod testsupport;
