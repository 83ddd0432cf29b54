//! Cleaning up after a supervisor that died: joblet's parent directories in every hierarchy
//! ([`Parents`], from [`CgroupDriver::parents`](super::CgroupDriver::parents)), the names of
//! the cgroups under them, and the removal of one stale job's cgroup set.
//!
//! Only joblet's own cgroups are ever touched: a name is always one direct child of joblet's
//! parents, which only joblet creates. Which names are stale (a job of this state dir whose
//! supervisor is dead, a pool set of a dead process) is decided by the caller (`crate::gc`).
//!
//! Processes are killed only inside the stale job's own v2 cgroup: every task of a job is born
//! there (`CLONE_INTO_CGROUP`) and cannot leave it, so it holds the whole job, and nothing else.
//! `cgroup.kill` is used only on a set removed right after: on Linux 6.18 every later
//! `CLONE_INTO_CGROUP` into a cgroup that was killed this way is killed at once.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fs::Dir;
use super::{CgroupError, check_name, remove_dirs};

/// How long [`Parents::reap`] waits for killed tasks to leave their cgroup.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// joblet's parent cgroup in every hierarchy a driver uses.
#[derive(Clone, Debug)]
pub struct Parents {
    /// The v2 parent: where jobs are born.
    pub(crate) v2: Arc<Dir>,
    /// The v1 parents (hybrid hosts), empty on pure v2.
    pub(crate) v1: Vec<Arc<Dir>>,
}

/// What [`Parents::reap`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Processes that were still in the job's v2 cgroup and were killed.
    pub killed: usize,
    /// Cgroup directories removed (one per hierarchy the job had a cgroup in).
    pub removed: usize,
}

impl Parents {
    /// The v2 parent's path (`.../joblet`): a job record's `cgroup_path` is a child of it.
    pub fn v2_path(&self) -> &Path {
        self.v2.path()
    }

    /// The names of the child cgroups of joblet's parents, in any hierarchy, sorted, each once.
    pub fn children(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = Vec::new();
        for parent in std::iter::once(&self.v2).chain(&self.v1) {
            let entries = std::fs::read_dir(parent.path()).map_err(|source| CgroupError::Read {
                path: parent.path().to_owned(),
                source,
            })?;
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir())
                    && let Ok(name) = entry.file_name().into_string()
                {
                    names.push(name);
                }
            }
        }
        names.sort_unstable();
        names.dedup();
        Ok(names)
    }

    /// Whether `name` exists under any of joblet's parents.
    pub fn exists(&self, name: &str) -> bool {
        std::iter::once(&self.v2)
            .chain(&self.v1)
            .any(|p| p.exists(name))
    }

    /// Kills every process left in the v2 cgroup `name` (`cgroup.kill`, or SIGKILL to each
    /// listed pid through a pidfd on kernels without it), waits up to [`KILL_WAIT`] for them to
    /// go, then removes `name` in every hierarchy. The caller must know that `name` is a stale
    /// job's set: its supervisor is dead and nothing will ever spawn into it again.
    pub fn reap(&self, name: &str) -> Result<Reaped, CgroupError> {
        check_name(&self.v2, name)?;
        let mut reaped = Reaped::default();
        if self.v2.exists(name) {
            let procs = self.procs(name)?;
            if !procs.is_empty() {
                reaped.killed = procs.len();
                if self.v2.exists(&format!("{name}/cgroup.kill")) {
                    self.v2.write(&format!("{name}/cgroup.kill"), "1")?;
                } else {
                    self.kill_each(name)?;
                }
                self.wait_empty(name)?;
            }
        }
        // v1 first, the v2 directory (where the job was born) last, as a live job's set.
        let parents: Vec<Arc<Dir>> = self
            .v1
            .iter()
            .chain(std::iter::once(&self.v2))
            .filter(|p| p.exists(name))
            .cloned()
            .collect();
        reaped.removed = parents.len();
        remove_dirs(name, &parents)?;
        Ok(reaped)
    }

    /// Removes `name` in every hierarchy if no process is in it; never kills. For the pool sets
    /// of a dead process, which belong to no recorded job.
    pub fn remove_if_empty(&self, name: &str) -> Result<bool, CgroupError> {
        check_name(&self.v2, name)?;
        if self.v2.exists(name) && !self.procs(name)?.is_empty() {
            return Ok(false);
        }
        let parents: Vec<Arc<Dir>> = self
            .v1
            .iter()
            .chain(std::iter::once(&self.v2))
            .filter(|p| p.exists(name))
            .cloned()
            .collect();
        remove_dirs(name, &parents)?;
        Ok(true)
    }

    /// The pids in the v2 cgroup `name` (empty when it is gone).
    fn procs(&self, name: &str) -> Result<Vec<u32>, CgroupError> {
        match self.v2.read(&format!("{name}/cgroup.procs")) {
            Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
            Err(CgroupError::Read { source, .. }) | Err(CgroupError::Open { source, .. })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// SIGKILL to each process of the v2 cgroup `name`, for kernels without `cgroup.kill`
    /// (< 5.14). Each pid is pinned with a pidfd first, then checked to still be listed in the
    /// cgroup: if the process exited and its pid went to another process in between, the
    /// signal goes to the pinned (dead) process and fails with `ESRCH`, never to the newcomer.
    /// Repeated until the cgroup is empty, since a job can fork while it is being killed.
    pub(crate) fn kill_each(&self, name: &str) -> Result<(), CgroupError> {
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let procs = self.procs(name)?;
            if procs.is_empty() || Instant::now() >= deadline {
                return Ok(());
            }
            for pid in procs {
                let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
                    continue;
                };
                let Ok(pidfd) =
                    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
                else {
                    continue;
                };
                if self.procs(name)?.contains(&pid) {
                    let _ =
                        rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until the v2 cgroup `name` has no process left.
    fn wait_empty(&self, name: &str) -> Result<(), CgroupError> {
        let deadline = Instant::now() + KILL_WAIT;
        let mut pause = Duration::from_micros(200);
        loop {
            if self.procs(name)?.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Remove {
                    path: self.v2.path_of(name),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        "processes were still in it after SIGKILL",
                    ),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
impl Parents {
    /// Parents on plain directories standing in for cgroupfs (unit tests).
    pub(crate) fn plain(v2: &Path, v1: &[&Path]) -> Parents {
        use super::fs::Backing;
        let open = |p: &Path| Arc::new(Dir::open(p, Backing::Plain).expect("open fake parent"));
        Parents {
            v2: open(v2),
            v1: v1.iter().map(|p| open(p)).collect(),
        }
    }
}
