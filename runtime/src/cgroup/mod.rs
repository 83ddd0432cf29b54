//! Cgroups: one [`CgroupDriver`] interface with two implementations, picked by probing the host
//! at startup ([`detect`]):
//!
//! - [`v2::V2Driver`], pure cgroup v2 (most production hosts): limits and accounting in the job's
//!   own v2 cgroup;
//! - [`hybrid::HybridDriver`], cgroup v2 mounted at `unified/` with no controllers plus the v1
//!   controllers under `/sys/fs/cgroup/NAME`: the job is born in a controller-less v2 cgroup (whose
//!   id the eBPF probes see) and joins its v1 cgroups from the child, through fds opened here.
//!
//! All of joblet's cgroups live under one parent named `joblet` in each hierarchy; a job's cgroup
//! set is removed when the job ends. Nothing outside those parents is ever written.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::job::Limits;

pub mod hybrid;
pub mod v2;

/// The name of joblet's parent cgroup in every hierarchy.
pub const PARENT_NAME: &str = "joblet";

/// Errors of the cgroup layer. Messages name the path.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The host's cgroup layout could not be recognised.
    #[error("unsupported cgroup layout at {path}: {reason}")]
    Detect {
        /// The cgroup root that was probed.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// A cgroup directory could not be created.
    #[error("failed to create cgroup {path}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A limit or control file could not be written.
    #[error("failed to write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An accounting or control file could not be read or parsed.
    #[error("failed to read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file or directory could not be opened.
    #[error("failed to open {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be removed.
    #[error("failed to remove cgroup {path}")]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A requested limit cannot be enforced on this host (missing controller, CPU not present...).
    #[error("{0}")]
    Unsupported(String),
}

/// Which layout a driver manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Pure cgroup v2.
    V2,
    /// v1 controllers plus a controller-less v2 hierarchy.
    Hybrid,
}

impl Layout {
    /// `v2` or `hybrid`, as in the job record.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::V2 => "v2",
            Layout::Hybrid => "hybrid",
        }
    }
}

/// Resource use of a job, read from its cgroups when it ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// User CPU time, ns.
    pub cpu_user_ns: u64,
    /// System CPU time, ns.
    pub cpu_system_ns: u64,
    /// Peak memory, when the kernel reports it (v2 `memory.peak` needs 5.19).
    pub memory_peak_bytes: Option<u64>,
    /// Number of OOM kills in the job's memory cgroup.
    pub oom_kills: u64,
}

/// Creates per-job cgroups with limits applied.
pub trait CgroupDriver: Send + Sync + std::fmt::Debug {
    /// The layout this driver manages.
    fn layout(&self) -> Layout;

    /// Checks that `limits` can be enforced here (controllers present, CPUs online...), without
    /// creating anything. Called before a job is spawned so bad limits fail early.
    fn check(&self, limits: &Limits) -> Result<(), CgroupError>;

    /// Creates the cgroup set of job `name` (a [`crate::job::JobId`]) under joblet's parents, with
    /// `limits` written. Nothing is left behind on error.
    fn create(&self, name: &str, limits: &Limits) -> Result<JobCgroup, CgroupError>;
}

/// The cgroup set of one job. Dropping it does not remove the cgroups: call
/// [`JobCgroup::remove`] once the job's processes are gone.
#[derive(Debug)]
pub struct JobCgroup {
    /// The job's v2 directory, opened `O_RDONLY | O_DIRECTORY`: the fd for `CLONE_INTO_CGROUP`.
    pub(crate) v2_dir: OwnedFd,
    /// Path of the v2 directory.
    pub(crate) v2_path: PathBuf,
    /// `cgroup.procs` files (opened `O_WRONLY`) the child writes `0` to before exec: the v1
    /// cgroups on a hybrid host. Empty on pure v2.
    pub(crate) join_procs: Vec<OwnedFd>,
    /// Every directory of the set, in removal order (deepest first).
    pub(crate) dirs: Vec<PathBuf>,
    /// The v2 cgroup id (inode number of the v2 directory).
    pub(crate) id: u64,
    /// Where usage is read from.
    pub(crate) accounting: Accounting,
}

/// Files usage is read from.
#[derive(Debug, Clone)]
pub(crate) struct Accounting {
    /// v2 `cpu.stat` (present in every v2 cgroup, with or without the cpu controller).
    pub(crate) cpu_stat: PathBuf,
    /// Peak memory: v2 `memory.peak` or v1 `memory.max_usage_in_bytes`.
    pub(crate) memory_peak: Option<PathBuf>,
    /// OOM kill counter: v2 `memory.events` or v1 `memory.oom_control` (both have `oom_kill N`).
    pub(crate) oom_events: Option<PathBuf>,
}

impl JobCgroup {
    /// The v2 cgroup id: what `bpf_get_current_cgroup_id()` returns for the job's tasks.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The v2 directory's path.
    pub fn path(&self) -> &Path {
        &self.v2_path
    }

    /// The directory fd for `CLONE_INTO_CGROUP`.
    pub(crate) fn clone_into_fd(&self) -> BorrowedFd<'_> {
        self.v2_dir.as_fd()
    }

    /// The `cgroup.procs` fds the child joins before exec.
    pub(crate) fn join_procs(&self) -> &[OwnedFd] {
        &self.join_procs
    }

    /// Opens the v2 `cgroup.procs` (for kernels without `CLONE_INTO_CGROUP`).
    pub(crate) fn open_v2_procs(&self) -> Result<OwnedFd, CgroupError> {
        Err(CgroupError::Unsupported("not implemented yet".into()))
    }

    /// Reads the job's CPU time, peak memory and OOM kills.
    pub fn usage(&self) -> Result<Usage, CgroupError> {
        read_usage(&self.accounting)
    }

    /// Removes every directory of the set, retrying briefly while the kernel finishes releasing
    /// exited tasks (`EBUSY`). Returns the first error after trying them all.
    pub fn remove(self) -> Result<(), CgroupError> {
        remove_dirs(&self.dirs)
    }
}

fn read_usage(acc: &Accounting) -> Result<Usage, CgroupError> {
    let _ = acc;
    Err(CgroupError::Unsupported(
        "read_usage not implemented yet".into(),
    ))
}

fn remove_dirs(dirs: &[PathBuf]) -> Result<(), CgroupError> {
    let _ = dirs;
    Err(CgroupError::Unsupported(
        "remove not implemented yet".into(),
    ))
}

/// Probes the cgroup layout under `root` (normally `/sys/fs/cgroup`) and returns the matching
/// driver. Creates joblet's parent cgroups if they are missing.
pub fn detect(root: &Path) -> Result<Box<dyn CgroupDriver>, CgroupError> {
    Err(CgroupError::Detect {
        path: root.to_owned(),
        reason: "not implemented yet".into(),
    })
}
