//! Cgroups: one [`CgroupDriver`] interface with two implementations, picked by probing the host
//! at startup ([`detect`]):
//!
//! - [`v2::V2Driver`], pure cgroup v2 (most production hosts): limits and accounting in the job's
//!   own v2 cgroup;
//! - [`hybrid::HybridDriver`], cgroup v2 mounted at `unified/` with no controllers plus the v1
//!   controllers under `/sys/fs/cgroup/NAME`: the job is born in a controller-less v2 cgroup (whose
//!   id the eBPF probes see, and whose `cpu.stat` gives its CPU time) and joins its v1 cgroups from
//!   the child, through `tasks` fds opened here.
//!
//! All of joblet's cgroups live under one parent named `joblet` in each hierarchy; a job's cgroup
//! set is removed when the job ends (or, with a pool, kept for the next job: see [`pool`]).
//! Nothing outside those parents is ever written, in particular not the root's
//! `cgroup.subtree_control`: a limit whose controller the host does not delegate is refused by
//! [`CgroupDriver::check`] with the command that would enable it.
//!
//! Cost: a new cgroup set is dominated by the kernel (`mkdir` allocates each controller's state
//! and creates every interface file; the first `open` of a file instantiates its inode), so the
//! drivers learn everything they compare against once at startup, open joblet's parents once and
//! reach every file with `*at` calls, write only the limits that are set, and make on hybrid hosts
//! only the v1 cgroups a job's limits need.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::FsWord;

use crate::job::{CpuList, DevNum, IoLimit, Limits};

use fs::Dir;

mod fs;
pub mod hybrid;
pub mod pool;
pub mod stale;
#[cfg(test)]
mod tests;
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

    /// Checks that `limits` can be enforced here (controllers present, CPUs available, device
    /// present...), without creating anything and without reading cgroupfs: what it compares
    /// against was learnt when the driver was built. Called before a job is spawned so bad
    /// limits fail early with a message saying what to change.
    fn check(&self, limits: &Limits) -> Result<(), CgroupError>;

    /// Creates the cgroup set of job `name` (a [`crate::job::JobId`]) under joblet's parents, with
    /// `limits` written. Nothing is left behind on error.
    ///
    /// With a pool ([`CgroupDriver::set_pool`]) the set may be a reused one, named after the pool
    /// rather than the job; it is indistinguishable from a new one in limits and usage.
    fn create(&self, name: &str, limits: &Limits) -> Result<JobCgroup, CgroupError>;

    /// Keeps up to `capacity` emptied cgroup sets for reuse by later [`CgroupDriver::create`]
    /// calls, saving the `mkdir`/`rmdir` and first-open costs; 0 turns reuse off. Fails when the
    /// kernel cannot reset what a reused set must reset (v2 `memory.peak` before Linux 6.12).
    ///
    /// A reused set keeps its cgroup id, so per-job state keyed by id (eBPF maps) must be reset
    /// between jobs; and the job must not be stopped with `cgroup.kill`, after which the kernel
    /// kills every later task spawned into that cgroup (see [`JobCgroup::reusable`]).
    fn set_pool(&mut self, capacity: usize) -> Result<(), CgroupError>;

    /// joblet's parent directories in every hierarchy this driver uses, for cleaning up the
    /// cgroups of jobs whose supervisor died (see [`stale`]).
    fn parents(&self) -> stale::Parents;
}

/// The cgroup set of one job. Dropping it does not remove the cgroups: call
/// [`JobCgroup::remove`] once the job's processes are gone.
#[derive(Debug)]
pub struct JobCgroup {
    /// The set's directory name in every hierarchy (the job id, or a pool name).
    pub(crate) name: String,
    /// The job's v2 directory, opened `O_RDONLY | O_DIRECTORY`: the fd for `CLONE_INTO_CGROUP`.
    pub(crate) v2: Dir,
    /// `tasks` files (opened `O_WRONLY`) the child writes `0` to before exec: the v1 cgroups on
    /// a hybrid host (see [`hybrid::JOIN_FILE`]). Empty on pure v2.
    #[allow(dead_code, reason = "read by spawn, developed on another branch")]
    pub(crate) join_procs: Vec<OwnedFd>,
    /// The parents under which `name` was created, in removal order. The job's directories are
    /// all direct children of joblet's parents, so there is no nesting to order by.
    pub(crate) parents: Vec<Arc<Dir>>,
    /// The v2 cgroup id (inode number of the v2 directory).
    pub(crate) id: u64,
    /// The job's memory cgroup, where peak memory and OOM kills are read.
    pub(crate) memory: Option<MemoryFiles>,
    /// Set when the set came from, and goes back to, a pool.
    pub(crate) reuse: Option<pool::Reuse>,
}

/// Which memory controller a job's memory files belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemoryVersion {
    V1,
    V2,
}

/// A job's memory cgroup: `name` under `dir` (joblet's memory parent).
#[derive(Debug, Clone)]
pub(crate) struct MemoryFiles {
    pub(crate) dir: Arc<Dir>,
    pub(crate) version: MemoryVersion,
    /// The peak file exists (v2 `memory.peak` needs 5.19).
    pub(crate) has_peak: bool,
}

impl MemoryFiles {
    /// Peak usage: resettable in v1 by writing 0, in v2 per open file by writing (6.12).
    pub(crate) fn peak(&self) -> Option<&'static str> {
        self.has_peak.then_some(match self.version {
            MemoryVersion::V1 => "memory.max_usage_in_bytes",
            MemoryVersion::V2 => "memory.peak",
        })
    }

    /// The file with the `oom_kill N` line.
    pub(crate) fn events(&self) -> &'static str {
        match self.version {
            MemoryVersion::V1 => "memory.oom_control",
            MemoryVersion::V2 => "memory.events",
        }
    }

    /// Current usage.
    pub(crate) fn current(&self) -> &'static str {
        match self.version {
            MemoryVersion::V1 => "memory.usage_in_bytes",
            MemoryVersion::V2 => "memory.current",
        }
    }

    pub(crate) fn read(&self, job: &str, file: &str) -> Result<String, CgroupError> {
        self.dir.read(&format!("{job}/{file}"))
    }

    pub(crate) fn read_u64(&self, job: &str, file: &str) -> Result<u64, CgroupError> {
        let rel = format!("{job}/{file}");
        self.dir
            .read(&rel)?
            .trim()
            .parse()
            .map_err(|_| invalid_data(self.dir.path_of(&rel), "not a number"))
    }

    pub(crate) fn oom_kills(&self, job: &str) -> Result<u64, CgroupError> {
        let file = self.events();
        parse_oom_kill(&self.read(job, file)?).ok_or_else(|| {
            invalid_data(
                self.dir.path_of(&format!("{job}/{file}")),
                "no oom_kill line",
            )
        })
    }
}

#[allow(
    dead_code,
    reason = "the fd accessors are for spawn, developed on another branch; drop this once merged"
)]
impl JobCgroup {
    /// The v2 cgroup id: what `bpf_get_current_cgroup_id()` returns for the job's tasks.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The v2 directory's path.
    pub fn path(&self) -> &Path {
        self.v2.path()
    }

    /// Whether the set goes back to a pool on [`JobCgroup::remove`]: the job must then not be
    /// stopped with `cgroup.kill` (after it, every task spawned into the cgroup is killed).
    pub fn reusable(&self) -> bool {
        self.reuse.is_some()
    }

    /// The directory fd for `CLONE_INTO_CGROUP`.
    pub(crate) fn clone_into_fd(&self) -> BorrowedFd<'_> {
        self.v2.fd()
    }

    /// The `tasks` fds (`O_WRONLY | O_CLOEXEC`) of the v1 cgroups the child joins by writing `0`
    /// before exec. Empty on pure v2.
    pub(crate) fn join_procs(&self) -> &[OwnedFd] {
        &self.join_procs
    }

    /// Opens the v2 `cgroup.procs` (`O_WRONLY | O_CLOEXEC`), for kernels without
    /// `CLONE_INTO_CGROUP` (< 5.7) where the child joins its v2 cgroup like the v1 ones.
    pub(crate) fn open_v2_procs(&self) -> Result<OwnedFd, CgroupError> {
        self.v2.open_write("cgroup.procs")
    }

    /// The raw counters: CPU time and OOM kills since the cgroup was made, memory peak since it
    /// was made or reset.
    pub(crate) fn counters(&self) -> Result<Usage, CgroupError> {
        let cpu_stat = self.v2.read("cpu.stat")?;
        let (cpu_user_ns, cpu_system_ns) = parse_cpu_stat(&cpu_stat).ok_or_else(|| {
            invalid_data(
                self.v2.path_of("cpu.stat"),
                "no user_usec/system_usec lines",
            )
        })?;
        let Some(memory) = &self.memory else {
            return Ok(Usage {
                cpu_user_ns,
                cpu_system_ns,
                memory_peak_bytes: None,
                oom_kills: 0,
            });
        };
        let peak_fd = self.reuse.as_ref().and_then(|r| r.peak_fd.as_ref());
        let memory_peak_bytes = match (memory.peak(), peak_fd) {
            (Some(file), Some(fd)) => {
                let path = || memory.dir.path_of(&format!("{}/{file}", self.name));
                let text = fs::read_fd(fd).map_err(|source| CgroupError::Read {
                    path: path(),
                    source,
                })?;
                Some(
                    text.trim()
                        .parse()
                        .map_err(|_| invalid_data(path(), "not a number"))?,
                )
            }
            (Some(file), None) => Some(memory.read_u64(&self.name, file)?),
            (None, _) => None,
        };
        Ok(Usage {
            cpu_user_ns,
            cpu_system_ns,
            memory_peak_bytes,
            oom_kills: memory.oom_kills(&self.name)?,
        })
    }

    /// Reads the job's CPU time, peak memory and OOM kills. For a reused set these are what
    /// this job used: counters as deltas from their values when the set was handed out, and
    /// peak memory less what earlier jobs left charged (see [`pool`]).
    pub fn usage(&self) -> Result<Usage, CgroupError> {
        let now = self.counters()?;
        Ok(match &self.reuse {
            Some(reuse) => reuse.base.since(now),
            None => now,
        })
    }

    /// Removes every directory of the set, retrying for up to [`REMOVE_RETRY`] while the
    /// kernel finishes releasing exited tasks (`EBUSY`). Returns the first error after trying
    /// them all. A reusable set whose cgroups are empty goes back to its pool instead.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        match self.reuse.take() {
            Some(reuse) => pool::release(self, reuse),
            None => remove_dirs(&self.name, &self.parents),
        }
    }
}

fn invalid_data(path: PathBuf, what: &str) -> CgroupError {
    CgroupError::Read {
        path,
        source: io::Error::new(io::ErrorKind::InvalidData, what.to_owned()),
    }
}

/// How long [`JobCgroup::remove`] retries a busy directory. A task that has exited and been
/// reaped can still hold its cgroup for a moment (v1 especially), which `rmdir` reports as
/// `EBUSY`.
pub const REMOVE_RETRY: Duration = Duration::from_millis(100);

/// `user_usec` and `system_usec` of a v2 `cpu.stat`, in nanoseconds.
pub(crate) fn parse_cpu_stat(text: &str) -> Option<(u64, u64)> {
    let mut user = None;
    let mut system = None;
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("user_usec", v)) => user = v.trim().parse::<u64>().ok(),
            Some(("system_usec", v)) => system = v.trim().parse::<u64>().ok(),
            _ => {}
        }
    }
    Some((user?.saturating_mul(1000), system?.saturating_mul(1000)))
}

/// The `oom_kill N` line of a v2 `memory.events` or v1 `memory.oom_control`.
pub(crate) fn parse_oom_kill(text: &str) -> Option<u64> {
    text.lines().find_map(|line| match line.split_once(' ') {
        Some(("oom_kill", v)) => v.trim().parse().ok(),
        _ => None,
    })
}

/// Removes `name` under each parent; see [`JobCgroup::remove`].
pub(crate) fn remove_dirs(name: &str, parents: &[Arc<Dir>]) -> Result<(), CgroupError> {
    let deadline = Instant::now() + REMOVE_RETRY;
    let mut first_err = None;
    for parent in parents {
        let mut pause = Duration::from_micros(100);
        loop {
            match parent.rmdir(name) {
                Ok(()) => break,
                // Already gone: removal is idempotent.
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(5));
                }
                Err(e) => {
                    first_err.get_or_insert(CgroupError::Remove {
                        path: parent.path_of(name),
                        source: e,
                    });
                    break;
                }
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Removes what a failed `create` made; errors are dropped because the create error is the one
/// worth reporting.
#[derive(Debug)]
pub(crate) struct CreateGuard<'a> {
    pub(crate) name: &'a str,
    pub(crate) made: Vec<Arc<Dir>>,
}

impl CreateGuard<'_> {
    /// Keeps what was made.
    pub(crate) fn defuse(mut self) -> Vec<Arc<Dir>> {
        std::mem::take(&mut self.made)
    }
}

impl Drop for CreateGuard<'_> {
    fn drop(&mut self) {
        if !self.made.is_empty() {
            let _ = remove_dirs(self.name, &self.made);
        }
    }
}

/// Rejects job names that are not a single plain path component.
pub(crate) fn check_name(parent: &Dir, name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::Create {
            path: parent.path_of(name),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "a job cgroup name must be one path component",
            ),
        })
    }
}

/// Below this a job cannot even exec a shell; a lower `--memory` is surely a unit mistake.
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;

/// The checks that do not depend on the layout.
pub(crate) fn check_values(
    limits: &Limits,
    cpus: Option<(&CpuList, &Path)>,
    sys_dev_block: &Path,
) -> Result<(), CgroupError> {
    if let Some(bytes) = limits.memory_bytes
        && bytes < MIN_MEMORY_BYTES
    {
        return Err(CgroupError::Unsupported(format!(
            "memory limit of {bytes} bytes is below joblet's minimum of 1 MiB"
        )));
    }
    if limits.pids == Some(0) {
        return Err(CgroupError::Unsupported(
            "a pids limit of 0 would not even let the job start: use at least 1".into(),
        ));
    }
    if let (Some(wanted), Some((available, source))) = (&limits.cores, cpus) {
        if wanted.cpus().is_empty() {
            return Err(CgroupError::Unsupported("the CPU list is empty".into()));
        }
        let missing: Vec<u32> = wanted
            .cpus()
            .iter()
            .copied()
            .filter(|c| available.cpus().binary_search(c).is_err())
            .collect();
        if !missing.is_empty() {
            return Err(CgroupError::Unsupported(format!(
                "CPU {} is not available to joblet's cgroup: available CPUs are {} ({})",
                CpuList::new(missing),
                available,
                source.display()
            )));
        }
    }
    for io in &limits.io {
        check_block_device(io.device, sys_dev_block)?;
    }
    Ok(())
}

/// IO throttling applies to whole disks only: both v2 `io.max` and v1 `blkio.throttle.*` reject
/// a partition with `EINVAL`, which would otherwise surface only at spawn time.
fn check_block_device(dev: DevNum, sys_dev_block: &Path) -> Result<(), CgroupError> {
    let dir = sys_dev_block.join(dev.to_string());
    if !dir.exists() {
        return Err(CgroupError::Unsupported(format!(
            "block device {dev} does not exist (no {})",
            dir.display()
        )));
    }
    if dir.join("partition").exists() {
        let disk = std::fs::canonicalize(dir.join(".."))
            .ok()
            .and_then(|p| std::fs::read_to_string(p.join("dev")).ok())
            .map(|d| format!(": limit its disk {} instead", d.trim()))
            .unwrap_or_default();
        return Err(CgroupError::Unsupported(format!(
            "block device {dev} is a partition and IO limits apply to whole disks only{disk}"
        )));
    }
    Ok(())
}

/// Parses a kernel CPU list file (`0-3,5`, possibly empty).
pub(crate) fn parse_cpus(text: &str, path: &Path) -> Result<CpuList, CgroupError> {
    if text.trim().is_empty() {
        return Ok(CpuList::new(Vec::new()));
    }
    crate::parse::cpu_list(text.trim()).map_err(|e| CgroupError::Read {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    })
}

/// The IO limits per device: several `--io-*` entries on one device merge, a later value
/// winning.
pub(crate) fn merged_io(io: &[IoLimit]) -> Vec<IoLimit> {
    let mut out: Vec<IoLimit> = Vec::with_capacity(io.len());
    for l in io {
        match out.iter_mut().find(|o| o.device == l.device) {
            Some(o) => {
                o.read_bps = l.read_bps.or(o.read_bps);
                o.write_bps = l.write_bps.or(o.write_bps);
            }
            None => out.push(*l),
        }
    }
    out
}

/// `CGROUP2_SUPER_MAGIC` of `statfs(2)`.
const CGROUP2_SUPER_MAGIC: FsWord = 0x6367_7270;
/// `CGROUP_SUPER_MAGIC` (v1) of `statfs(2)`.
const CGROUP_SUPER_MAGIC: FsWord = 0x0027_e0eb;

/// Where the kernel lists block devices by number.
pub const SYS_DEV_BLOCK: &str = "/sys/dev/block";

fn fs_magic(path: &Path) -> Result<FsWord, CgroupError> {
    rustix::fs::statfs(path)
        .map(|st| st.f_type)
        .map_err(|e| CgroupError::Open {
            path: path.to_owned(),
            source: e.into(),
        })
}

/// Probes the cgroup layout under `root` (normally `/sys/fs/cgroup`) and returns the matching
/// driver. Creates joblet's parent cgroups if they are missing.
///
/// - `root` is a cgroup2 mount: pure v2 ([`v2::V2Driver`]).
/// - `root/unified` is a cgroup2 mount: hybrid ([`hybrid::HybridDriver`]), with whichever v1
///   controllers `/proc/self/mountinfo` shows mounted under `root`.
/// - anything else (v1 only, no cgroup at all) is refused: joblet needs a v2 hierarchy to spawn
///   into and to key its probes on.
pub fn detect(root: &Path) -> Result<Box<dyn CgroupDriver>, CgroupError> {
    let magic = fs_magic(root)?;
    if magic == CGROUP2_SUPER_MAGIC {
        return Ok(Box::new(v2::V2Driver::new(root, Path::new(SYS_DEV_BLOCK))?));
    }
    let unified = root.join("unified");
    let unified_magic = fs_magic(&unified).ok();
    if unified_magic == Some(CGROUP2_SUPER_MAGIC) {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
            CgroupError::Read {
                path: "/proc/self/mountinfo".into(),
                source,
            }
        })?;
        let v1 = hybrid::v1_mounts(&mountinfo, root);
        return Ok(Box::new(hybrid::HybridDriver::new(
            &unified,
            &v1,
            Path::new(SYS_DEV_BLOCK),
        )?));
    }
    let reason = if magic == CGROUP_SUPER_MAGIC
        || std::fs::read_dir(root).is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| fs_magic(&e.path()).ok() == Some(CGROUP_SUPER_MAGIC)))
        }) {
        "only cgroup v1 is mounted and there is no cgroup2 hierarchy at unified/: boot with \
         systemd.unified_cgroup_hierarchy=1 (pure v2) or mount cgroup2 at unified/ (hybrid)"
            .to_owned()
    } else {
        format!("not a cgroup mount (filesystem magic {magic:#x}) and no cgroup2 at unified/")
    };
    Err(CgroupError::Detect {
        path: root.to_owned(),
        reason,
    })
}

/// Current memory use of a job, from its v2 directory `v2_path` (as in the job record): v2
/// `memory.current`, or on a hybrid host (`.../unified/joblet/X`) the v1
/// `.../memory/joblet/X/memory.usage_in_bytes`. For live views (`joblet top`); `None` when
/// the cgroup is gone or has no memory accounting.
pub fn memory_current(v2_path: &Path) -> Option<u64> {
    let read = |p: PathBuf| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    if let Some(v) = read(v2_path.join("memory.current")) {
        return Some(v);
    }
    let s = v2_path.to_str()?;
    let (root, rest) = s.split_once("/unified/")?;
    read(
        Path::new(root)
            .join("memory")
            .join(rest)
            .join("memory.usage_in_bytes"),
    )
}

/// CPU time (user + system) used so far by a job, from its v2 directory's `cpu.stat` (present in
/// every v2 cgroup, hybrid hosts included). For live views (`joblet top`): unlike on-CPU time
/// from the probes, it includes the slice a task is running right now.
pub fn cpu_time_ns(v2_path: &Path) -> Option<u64> {
    let (user, system) = parse_cpu_stat(&std::fs::read_to_string(v2_path.join("cpu.stat")).ok()?)?;
    Some(user + system)
}
