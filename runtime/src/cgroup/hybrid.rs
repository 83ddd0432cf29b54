//! Hybrid driver: cgroup v1 controllers under `<root>/NAME` plus a controller-less cgroup v2
//! hierarchy at `<root>/unified`.
//!
//! A job is born in its v2 cgroup (`<root>/unified/joblet/<job>`: the id the eBPF probes key on,
//! and the source of CPU time through `cpu.stat`), then joins its v1 cgroups from the child before
//! exec by writing `0` to `tasks` fds opened here (see `JOIN_FILE`). Only the v1 cgroups a job needs are
//! made: `memory` always (peak memory and OOM kills are always reported), `cpu`, `cpuset`, `pids`
//! and `blkio` only for the limits that are set, since every directory costs a `mkdir`, some
//! writes, a join in the child and an `rmdir`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fs::{Backing, Dir};
use super::pool::Pool;
use super::{
    CgroupDriver, CgroupError, CreateGuard, JobCgroup, Layout, MemoryFiles, MemoryVersion,
    PARENT_NAME, check_name, check_values, merged_io, parse_cpus,
};
use crate::job::{CpuList, IoLimit, Limits};

/// The v1 file the child writes `0` to, joining with its only thread.
///
/// Not `cgroup.procs`: moving a whole thread group takes the global
/// `cgroup_threadgroup_rwsem` for writing, whose `percpu_down_write` waits for an RCU grace
/// period whenever no other migration happened in the last one, which is every time for a
/// one-shot `joblet run` (5 to 18 ms measured on the hybrid CI host, kernel 6.18). A thread
/// moving itself through `tasks` skips that lock (kernels with "cgroup: Optimize single thread
/// migration", around 6.0; older ones take it either way): ~50 us. The result is the same: the
/// child is a new thread group with one thread, and every thread or process the job starts later
/// is born in the cgroups of its creator.
pub(crate) const JOIN_FILE: &str = "tasks";

/// A v1 controller joblet uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V1Controller {
    /// `memory`: limit, peak, OOM kills.
    Memory,
    /// `cpu`: CFS bandwidth.
    Cpu,
    /// `cpuset`: pinning.
    Cpuset,
    /// `pids`: process count.
    Pids,
    /// `blkio`: IO throttling.
    Blkio,
}

impl V1Controller {
    /// Every controller joblet uses.
    pub const ALL: [V1Controller; 5] = [
        V1Controller::Memory,
        V1Controller::Cpu,
        V1Controller::Cpuset,
        V1Controller::Pids,
        V1Controller::Blkio,
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The controller's name, as in mount options.
    pub fn name(self) -> &'static str {
        match self {
            V1Controller::Memory => "memory",
            V1Controller::Cpu => "cpu",
            V1Controller::Cpuset => "cpuset",
            V1Controller::Pids => "pids",
            V1Controller::Blkio => "blkio",
        }
    }
}

/// Where each v1 controller joblet uses is mounted under `root`, from the text of
/// `/proc/self/mountinfo`. Co-mounted controllers (`cpu,cpuacct`) share a mount point.
pub fn v1_mounts(mountinfo: &str, root: &Path) -> Vec<(V1Controller, PathBuf)> {
    let mut found: Vec<(V1Controller, PathBuf)> = Vec::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut right = right.split(' ');
        if right.next() != Some("cgroup") {
            continue;
        }
        let super_options = right.nth(1).unwrap_or("");
        let mut left = left.split(' ');
        let (Some(fs_root), Some(mount_point)) = (left.nth(3), left.next()) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape_mountinfo(mount_point));
        // A bind mount of a subtree is not a hierarchy joblet can put its parent in.
        if fs_root != "/" || !mount_point.starts_with(root) {
            continue;
        }
        for option in super_options.split(',') {
            if let Some(c) = V1Controller::ALL.iter().find(|c| c.name() == option)
                && !found.iter().any(|(f, _)| f == c)
            {
                found.push((*c, mount_point.clone()));
            }
        }
    }
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Picks the read or write rate of an [`IoLimit`].
type IoField = fn(&IoLimit) -> Option<u64>;

/// joblet's parent in the v1 memory hierarchy and what it supports.
#[derive(Debug)]
struct V1Memory {
    dir: Arc<Dir>,
    /// `memory.memsw.limit_in_bytes` exists (swap accounting on).
    has_memsw: bool,
    /// `memory.max_usage_in_bytes` exists.
    has_max_usage: bool,
    /// Without memsw, swap is kept off with `memory.swappiness` 0; this is the parent's value a
    /// reused cgroup goes back to.
    parent_swappiness: Option<String>,
}

/// joblet's parent in the v1 cpuset hierarchy and what it holds.
#[derive(Debug)]
struct V1Cpuset {
    dir: Arc<Dir>,
    /// The parent's `cpuset.cpus`.
    cpus: CpuList,
    /// The parent's `cpuset.mems`, written to each job's cpuset unless inherited.
    mems: String,
    /// `cgroup.clone_children` is set on the parent, so a new job cpuset starts with the parent's
    /// cpus and mems (a v1 cpuset with empty mems refuses tasks with `ENOSPC`).
    inherits: bool,
}

/// The hybrid driver.
#[derive(Debug)]
pub struct HybridDriver {
    /// `<root>/unified/joblet`.
    unified: Arc<Dir>,
    memory: Option<V1Memory>,
    cpu: Option<Arc<Dir>>,
    cpuset: Option<V1Cpuset>,
    pids: Option<Arc<Dir>>,
    blkio: Option<Arc<Dir>>,
    sys_dev_block: PathBuf,
    pool: Option<Arc<Pool>>,
}

impl HybridDriver {
    /// A driver for the v2 hierarchy mounted at `unified` and the v1 hierarchies in `v1`,
    /// creating joblet's parent in each. `sys_dev_block` is normally [`super::SYS_DEV_BLOCK`].
    /// Does not probe the mounts: [`super::detect`] does.
    pub fn new(
        unified: &Path,
        v1: &[(V1Controller, PathBuf)],
        sys_dev_block: &Path,
    ) -> Result<HybridDriver, CgroupError> {
        HybridDriver::with_backing(unified, v1, sys_dev_block, Backing::Kernel)
    }

    pub(crate) fn with_backing(
        unified: &Path,
        v1: &[(V1Controller, PathBuf)],
        sys_dev_block: &Path,
        backing: Backing,
    ) -> Result<HybridDriver, CgroupError> {
        let mut driver = HybridDriver {
            unified: Arc::new(Dir::open(unified, backing)?.ensure_child(PARENT_NAME)?),
            memory: None,
            cpu: None,
            cpuset: None,
            pids: None,
            blkio: None,
            sys_dev_block: sys_dev_block.to_owned(),
            pool: None,
        };
        for (controller, mount) in v1 {
            let root = Dir::open(mount, backing)?;
            let dir = Arc::new(root.ensure_child(PARENT_NAME)?);
            match controller {
                V1Controller::Memory => {
                    let has_memsw = dir.exists("memory.memsw.limit_in_bytes");
                    let parent_swappiness = if has_memsw {
                        None
                    } else {
                        dir.read("memory.swappiness")
                            .ok()
                            .map(|s| s.trim().to_owned())
                    };
                    driver.memory = Some(V1Memory {
                        has_memsw,
                        has_max_usage: dir.exists("memory.max_usage_in_bytes"),
                        parent_swappiness,
                        dir,
                    });
                }
                V1Controller::Cpu => driver.cpu = Some(dir),
                V1Controller::Cpuset => driver.cpuset = Some(setup_cpuset(&root, dir)?),
                V1Controller::Pids => driver.pids = Some(dir),
                V1Controller::Blkio => driver.blkio = Some(dir),
            }
        }
        Ok(driver)
    }

    /// Every limit set has its v1 controller mounted.
    fn check_mounted(&self, limits: &Limits) -> Result<(), CgroupError> {
        if limits.memory_bytes.is_some() && self.memory.is_none() {
            return Err(self.unmounted(V1Controller::Memory, "--memory"));
        }
        if limits.cpu_percent.is_some() && self.cpu.is_none() {
            return Err(self.unmounted(V1Controller::Cpu, "--cpu"));
        }
        if limits.cores.is_some() && self.cpuset.is_none() {
            return Err(self.unmounted(V1Controller::Cpuset, "--cores"));
        }
        if limits.pids.is_some() && self.pids.is_none() {
            return Err(self.unmounted(V1Controller::Pids, "--pids"));
        }
        if !limits.io.is_empty() && self.blkio.is_none() {
            return Err(self.unmounted(V1Controller::Blkio, "--io"));
        }
        Ok(())
    }

    fn unmounted(&self, c: V1Controller, option: &str) -> CgroupError {
        let _ = self;
        CgroupError::Unsupported(format!(
            "{option} needs the cgroup v1 {} controller, which is not mounted on this host",
            c.name()
        ))
    }

    /// Writes the limit files of controller `c` whose value differs between `old` (what the
    /// job's directory holds; all `None` for a new one) and `new`. The directory is `name`
    /// under the controller's parent.
    fn write_limits(
        &self,
        c: V1Controller,
        name: &str,
        old: &Limits,
        new: &Limits,
    ) -> Result<(), CgroupError> {
        let file = |f: &str| format!("{name}/{f}");
        match c {
            V1Controller::Memory => {
                let Some(m) = &self.memory else { return Ok(()) };
                if old.memory_bytes == new.memory_bytes {
                    return Ok(());
                }
                let value = new
                    .memory_bytes
                    .map_or_else(|| "-1".to_owned(), |b| b.to_string());
                // The kernel keeps memsw >= limit at every step: raise memsw first, lower it last.
                let raising = match (old.memory_bytes, new.memory_bytes) {
                    (_, None) => true,
                    (None, Some(_)) => false,
                    (Some(a), Some(b)) => b > a,
                };
                if m.has_memsw && raising {
                    m.dir.write(&file("memory.memsw.limit_in_bytes"), &value)?;
                }
                m.dir.write(&file("memory.limit_in_bytes"), &value)?;
                if m.has_memsw && !raising {
                    m.dir.write(&file("memory.memsw.limit_in_bytes"), &value)?;
                }
                if let Some(parent) = &m.parent_swappiness
                    && old.memory_bytes.is_some() != new.memory_bytes.is_some()
                {
                    let value = if new.memory_bytes.is_some() {
                        "0"
                    } else {
                        parent
                    };
                    m.dir.write(&file("memory.swappiness"), value)?;
                }
            }
            V1Controller::Cpu => {
                let Some(dir) = &self.cpu else { return Ok(()) };
                if old.cpu_percent != new.cpu_percent {
                    // cfs_period_us starts at the kernel's default of 100 ms in every new cpu
                    // cgroup and joblet never changes it, so only the quota is written.
                    let quota = new
                        .cpu_percent
                        .map_or_else(|| "-1".to_owned(), |p| (u64::from(p) * 1000).to_string());
                    dir.write(&file("cpu.cfs_quota_us"), &quota)?;
                }
            }
            V1Controller::Cpuset => {
                let Some(cs) = &self.cpuset else {
                    return Ok(());
                };
                if old.cores != new.cores {
                    let cpus = new.cores.as_ref().unwrap_or(&cs.cpus).to_string();
                    cs.dir.write(&file("cpuset.cpus"), &cpus)?;
                }
            }
            V1Controller::Pids => {
                let Some(dir) = &self.pids else { return Ok(()) };
                if old.pids != new.pids {
                    let value = new.pids.map_or_else(|| "max".to_owned(), |n| n.to_string());
                    dir.write(&file("pids.max"), &value)?;
                }
            }
            V1Controller::Blkio => {
                let Some(dir) = &self.blkio else {
                    return Ok(());
                };
                if old.io == new.io {
                    return Ok(());
                }
                let old_io = merged_io(&old.io);
                let new_io = merged_io(&new.io);
                let rules: [(&str, IoField); 2] = [
                    ("blkio.throttle.read_bps_device", |l| l.read_bps),
                    ("blkio.throttle.write_bps_device", |l| l.write_bps),
                ];
                for (rule, get) in rules {
                    let was = |dev| old_io.iter().find(|l| l.device == dev).and_then(get);
                    for l in &new_io {
                        if get(l) != was(l.device) {
                            // 0 deletes the device's rule.
                            let v = get(l).unwrap_or(0);
                            dir.write(&file(rule), &format!("{} {v}", l.device))?;
                        }
                    }
                    for l in &old_io {
                        if get(l).is_some() && !new_io.iter().any(|n| n.device == l.device) {
                            dir.write(&file(rule), &format!("{} 0", l.device))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The v1 controllers a job with `limits` gets a directory in, with that directory's parent.
    fn job_controllers(&self, limits: &Limits) -> Vec<(V1Controller, Arc<Dir>)> {
        let mut out = Vec::with_capacity(5);
        if let Some(m) = &self.memory {
            out.push((V1Controller::Memory, Arc::clone(&m.dir)));
        }
        if limits.cores.is_some()
            && let Some(cs) = &self.cpuset
        {
            out.push((V1Controller::Cpuset, Arc::clone(&cs.dir)));
        }
        if limits.cpu_percent.is_some()
            && let Some(d) = &self.cpu
        {
            out.push((V1Controller::Cpu, Arc::clone(d)));
        }
        if limits.pids.is_some()
            && let Some(d) = &self.pids
        {
            out.push((V1Controller::Pids, Arc::clone(d)));
        }
        if !limits.io.is_empty()
            && let Some(d) = &self.blkio
        {
            out.push((V1Controller::Blkio, Arc::clone(d)));
        }
        out
    }
}

/// Makes joblet's cpuset parent usable: a new v1 cpuset has no CPUs and no memory nodes, and
/// tasks cannot join it until it has both.
fn setup_cpuset(root: &Dir, dir: Arc<Dir>) -> Result<V1Cpuset, CgroupError> {
    let mut cpus_text = dir.read("cpuset.cpus")?.trim().to_owned();
    if cpus_text.is_empty() {
        cpus_text = root.read("cpuset.cpus")?.trim().to_owned();
        dir.write("cpuset.cpus", &cpus_text)?;
    }
    let mut mems = dir.read("cpuset.mems")?.trim().to_owned();
    if mems.is_empty() {
        mems = root.read("cpuset.mems")?.trim().to_owned();
        dir.write("cpuset.mems", &mems)?;
    }
    let inherits = dir.write("cgroup.clone_children", "1").is_ok();
    Ok(V1Cpuset {
        cpus: parse_cpus(&cpus_text, &dir.path_of("cpuset.cpus"))?,
        mems,
        inherits,
        dir,
    })
}

impl CgroupDriver for HybridDriver {
    fn layout(&self) -> Layout {
        Layout::Hybrid
    }

    fn check(&self, limits: &Limits) -> Result<(), CgroupError> {
        self.check_mounted(limits)?;
        let cpus = self
            .cpuset
            .as_ref()
            .map(|cs| (&cs.cpus, cs.dir.path_of("cpuset.cpus")));
        check_values(
            limits,
            cpus.as_ref().map(|(c, p)| (*c, p.as_path())),
            &self.sys_dev_block,
        )
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<JobCgroup, CgroupError> {
        // A limit silently dropped would be worse than a failed job.
        self.check_mounted(limits)?;
        let Some(pool) = &self.pool else {
            return self.create_new(name, limits);
        };
        let controllers = self.job_controllers(limits);
        let key = controllers.iter().fold(0, |k, (c, _)| k | c.bit());
        let reused = pool.acquire(key, limits, |cg, old| {
            controllers
                .iter()
                .try_for_each(|(c, _)| self.write_limits(*c, &cg.name, old, limits))
        });
        match reused {
            Some(cg) => Ok(cg),
            None => Ok(pool.adopt(self.create_new(&pool.name(), limits)?, key, limits)),
        }
    }

    fn set_pool(&mut self, capacity: usize) -> Result<(), CgroupError> {
        self.pool = (capacity > 0).then(|| Pool::new(capacity));
        Ok(())
    }

    fn parents(&self) -> super::stale::Parents {
        let v1 = [
            self.memory.as_ref().map(|m| &m.dir),
            self.cpu.as_ref(),
            self.cpuset.as_ref().map(|c| &c.dir),
            self.pids.as_ref(),
            self.blkio.as_ref(),
        ];
        super::stale::Parents {
            v2: Arc::clone(&self.unified),
            v1: v1.into_iter().flatten().cloned().collect(),
        }
    }
}

impl HybridDriver {
    fn create_new(&self, name: &str, limits: &Limits) -> Result<JobCgroup, CgroupError> {
        check_name(&self.unified, name)?;
        self.unified.mkdir(name)?;
        let mut guard = CreateGuard {
            name,
            made: vec![Arc::clone(&self.unified)],
        };
        let v2 = self.unified.open_child(name)?;
        let id = v2.inode()?;
        let none = Limits::default();
        let controllers = self.job_controllers(limits);
        let mut join_procs = Vec::with_capacity(controllers.len());
        for (c, dir) in &controllers {
            dir.mkdir(name)?;
            guard.made.push(Arc::clone(dir));
            if *c == V1Controller::Cpuset
                && let Some(cs) = &self.cpuset
                && !cs.inherits
            {
                cs.dir.write(&format!("{name}/cpuset.mems"), &cs.mems)?;
            }
            self.write_limits(*c, name, &none, limits)?;
            join_procs.push(dir.open_write(&format!("{name}/{JOIN_FILE}"))?);
        }
        let memory = self.memory.as_ref().map(|m| MemoryFiles {
            dir: Arc::clone(&m.dir),
            version: MemoryVersion::V1,
            has_peak: m.has_max_usage,
        });
        // The v2 directory last: it is where the job is born, so it is the last to go.
        let mut parents = guard.defuse();
        parents.rotate_left(1);
        Ok(JobCgroup {
            name: name.to_owned(),
            v2,
            join_procs,
            parents,
            id,
            memory,
            reuse: None,
        })
    }
}
