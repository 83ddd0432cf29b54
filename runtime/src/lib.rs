//! joblet's runtime: spawns one isolated, resource-limited job and supervises it.
//!
//! The map of the code and its invariants is in `docs/ARCHITECTURE.md`.

pub mod capture;
pub mod cgroup;
pub mod gc;
pub mod init;
pub mod job;
pub mod parse;
mod rootfs;
mod seccomp;
pub mod spawn;
pub mod store;
mod sys;
pub mod telemetry;
#[doc(hidden)]
pub mod testsupport;

pub use rootfs::RootfsError;
pub use seccomp::SeccompError;
pub use spawn::{
    ExitStatus, Job, Runtime, RuntimeConfig, SignalForwarder, SpawnError, Stdio, StopReason,
};
