//! Pure cgroup v2 driver: each job gets one directory under `<root>/joblet`, in which it is born
//! (`CLONE_INTO_CGROUP`), is limited and is accounted.
//!
//! joblet never writes the root's `cgroup.subtree_control`: it enables, in its own parent, the
//! controllers the root already delegates to it, and [`V2Driver::check`] names any controller a
//! requested limit needs but the host does not delegate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fs::{Backing, Dir};
use super::pool::Pool;
use super::{
    CgroupDriver, CgroupError, CreateGuard, JobCgroup, Layout, MemoryFiles, MemoryVersion,
    PARENT_NAME, check_name, check_values, merged_io, parse_cpus,
};
use crate::job::{CpuList, Limits};

/// A v2 controller joblet uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Controller {
    Cpu,
    Cpuset,
    Io,
    Memory,
    Pids,
}

impl Controller {
    const ALL: [Controller; 5] = [
        Controller::Cpu,
        Controller::Cpuset,
        Controller::Io,
        Controller::Memory,
        Controller::Pids,
    ];

    fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuset => "cpuset",
            Controller::Io => "io",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of [`Controller`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ControllerFlags(u8);

impl ControllerFlags {
    /// The controllers joblet uses named in a `cgroup.controllers` / `cgroup.subtree_control`
    /// text (space separated, possibly `+`-prefixed); others are ignored.
    fn parse(text: &str) -> ControllerFlags {
        let mut set = ControllerFlags::default();
        for word in text.split_whitespace() {
            let word = word.trim_start_matches('+');
            if let Some(c) = Controller::ALL.iter().find(|c| c.name() == word) {
                set.0 |= c.bit();
            }
        }
        set
    }

    fn contains(self, c: Controller) -> bool {
        self.0 & c.bit() != 0
    }

    fn iter(self) -> impl Iterator<Item = Controller> {
        Controller::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }
}

/// The pure v2 driver.
#[derive(Debug)]
pub struct V2Driver {
    /// The hierarchy's root (for messages).
    root: PathBuf,
    /// `<root>/joblet`.
    parent: Arc<Dir>,
    /// Controllers the root delegates to joblet (`joblet/cgroup.controllers`).
    available: ControllerFlags,
    /// Controllers enabled for the jobs (`joblet/cgroup.subtree_control`).
    enabled: ControllerFlags,
    /// CPUs the jobs may use (`joblet/cpuset.cpus.effective`), when cpuset is enabled.
    cpus: Option<CpuList>,
    /// `memory.swap.max` exists (swap accounting compiled in and enabled).
    has_swap_max: bool,
    /// `memory.peak` exists (5.19+).
    has_memory_peak: bool,
    /// `memory.peak` can be reset per open file (6.12+), which reusing a cgroup needs.
    peak_resettable: bool,
    sys_dev_block: PathBuf,
    pool: Option<Arc<Pool>>,
}

impl V2Driver {
    /// A driver for the v2 hierarchy mounted at `root`, creating `root/joblet` and enabling the
    /// delegated controllers in it. `sys_dev_block` is normally [`super::SYS_DEV_BLOCK`]. Does not
    /// probe that `root` is a cgroup2 mount: [`super::detect`] does.
    pub fn new(root: &Path, sys_dev_block: &Path) -> Result<V2Driver, CgroupError> {
        V2Driver::with_backing(root, sys_dev_block, Backing::Kernel)
    }

    pub(crate) fn with_backing(
        root: &Path,
        sys_dev_block: &Path,
        backing: Backing,
    ) -> Result<V2Driver, CgroupError> {
        let parent = Dir::open(root, backing)?.ensure_child(PARENT_NAME)?;
        let available = ControllerFlags::parse(&parent.read("cgroup.controllers")?);
        let mut enabled = ControllerFlags::parse(&parent.read("cgroup.subtree_control")?);
        let missing: Vec<&str> = available
            .iter()
            .filter(|c| !enabled.contains(*c))
            .map(|c| c.name())
            .collect();
        if !missing.is_empty() {
            let all = missing
                .iter()
                .map(|c| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(" ");
            if parent.write("cgroup.subtree_control", &all).is_err() {
                // One refusal (e.g. a controller the kernel will not enable in this position)
                // must not cost the others: enable what can be, `check` reports the rest.
                for c in &missing {
                    let _ = parent.write("cgroup.subtree_control", &format!("+{c}"));
                }
            }
            enabled = ControllerFlags::parse(&parent.read("cgroup.subtree_control")?);
        }
        let cpus = if enabled.contains(Controller::Cpuset) {
            let text = parent.read("cpuset.cpus.effective")?;
            Some(parse_cpus(&text, &parent.path_of("cpuset.cpus.effective"))?)
        } else {
            None
        };
        let memory = enabled.contains(Controller::Memory);
        let has_memory_peak = memory && parent.exists("memory.peak");
        Ok(V2Driver {
            root: root.to_owned(),
            has_swap_max: memory && parent.exists("memory.swap.max"),
            has_memory_peak,
            // Before 6.12 memory.peak is read-only. Opening it for writing is not a reliable probe
            // (seen succeeding on 6.1 in the VM lane, where the reset write then fails), so the
            // kernel version is checked as well.
            peak_resettable: has_memory_peak
                && (backing == Backing::Plain || kernel_at_least(6, 12))
                && parent.open_rw("memory.peak").is_ok(),
            pool: None,
            parent: Arc::new(parent),
            available,
            enabled,
            cpus,
            sys_dev_block: sys_dev_block.to_owned(),
        })
    }

    fn need(&self, c: Controller, option: &str) -> Result<(), CgroupError> {
        if self.enabled.contains(c) {
            return Ok(());
        }
        let name = c.name();
        let why = if self.available.contains(c) {
            format!(
                "it could not be enabled in {}",
                self.parent.path_of("cgroup.subtree_control").display()
            )
        } else {
            format!(
                "the host does not delegate it to joblet: enable it with \
                 `echo +{name} > {}` (and in every cgroup between the root and joblet)",
                self.root.join("cgroup.subtree_control").display()
            )
        };
        Err(CgroupError::Unsupported(format!(
            "{option} needs the cgroup v2 {name} controller, but {why}"
        )))
    }

    /// Writes the limit files whose value differs between `old` (what the directory holds; all
    /// `None` for a new one, which has the kernel's defaults) and `new`.
    pub(crate) fn write_limits(
        &self,
        dir: &Dir,
        old: &Limits,
        new: &Limits,
    ) -> Result<(), CgroupError> {
        if old.memory_bytes != new.memory_bytes {
            dir.write("memory.max", &max_or(new.memory_bytes))?;
            if self.has_swap_max && old.memory_bytes.is_some() != new.memory_bytes.is_some() {
                // A limited job gets no swap, so its limit is a limit on RAM.
                let swap = if new.memory_bytes.is_some() {
                    "0"
                } else {
                    "max"
                };
                dir.write("memory.swap.max", swap)?;
            }
        }
        if old.cpu_percent != new.cpu_percent {
            let quota = max_or(new.cpu_percent.map(|p| u64::from(p) * 1000));
            dir.write("cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
        }
        if old.cores != new.cores {
            // An empty cpuset.cpus means "the parent's CPUs" in v2. A zero-length write is
            // not delivered to the kernel's handler, so the empty value is sent as a newline.
            let cpus = new.cores.as_ref().map(ToString::to_string);
            dir.write("cpuset.cpus", cpus.as_deref().unwrap_or("\n"))?;
        }
        if old.pids != new.pids {
            dir.write("pids.max", &max_or(new.pids))?;
        }
        if old.io != new.io {
            let old_io = merged_io(&old.io);
            let new_io = merged_io(&new.io);
            for l in &new_io {
                if !old_io.contains(l) {
                    let value = format!(
                        "{} rbps={} wbps={}",
                        l.device,
                        max_or(l.read_bps),
                        max_or(l.write_bps)
                    );
                    dir.write("io.max", &value)?;
                }
            }
            for l in &old_io {
                if !new_io.iter().any(|n| n.device == l.device) {
                    dir.write("io.max", &format!("{} rbps=max wbps=max", l.device))?;
                }
            }
        }
        Ok(())
    }
}

/// The CFS period joblet uses: 100 ms, the kernel's default, so that a percentage maps to a
/// quota in µs by multiplying by 1000.
pub(crate) const CPU_PERIOD_US: u64 = 100_000;

fn max_or(v: Option<u64>) -> String {
    v.map_or_else(|| "max".to_owned(), |v| v.to_string())
}

impl CgroupDriver for V2Driver {
    fn layout(&self) -> Layout {
        Layout::V2
    }

    fn check(&self, limits: &Limits) -> Result<(), CgroupError> {
        if limits.memory_bytes.is_some() {
            self.need(Controller::Memory, "--memory")?;
        }
        if limits.cpu_percent.is_some() {
            self.need(Controller::Cpu, "--cpu")?;
        }
        if limits.cores.is_some() {
            self.need(Controller::Cpuset, "--cores")?;
        }
        if limits.pids.is_some() {
            self.need(Controller::Pids, "--pids")?;
        }
        if !limits.io.is_empty() {
            self.need(Controller::Io, "--io")?;
        }
        let cpus_path = self.parent.path_of("cpuset.cpus.effective");
        let cpus = self.cpus.as_ref().map(|c| (c, cpus_path.as_path()));
        check_values(limits, cpus, &self.sys_dev_block)
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<JobCgroup, CgroupError> {
        let Some(pool) = &self.pool else {
            return self.create_new(name, limits);
        };
        // Every job cgroup has every enabled controller: one kind of set only.
        let reused = pool.acquire(0, limits, |cg, old| self.write_limits(&cg.v2, old, limits));
        match reused {
            Some(cg) => Ok(cg),
            None => Ok(pool.adopt(self.create_new(&pool.name(), limits)?, 0, limits)),
        }
    }

    fn set_pool(&mut self, capacity: usize) -> Result<(), CgroupError> {
        if capacity > 0 && self.has_memory_peak && !self.peak_resettable {
            return Err(CgroupError::Unsupported(
                "reusing cgroups needs a resettable memory.peak (Linux 6.12)".into(),
            ));
        }
        self.pool = (capacity > 0).then(|| Pool::new(capacity));
        Ok(())
    }

    fn parents(&self) -> super::stale::Parents {
        super::stale::Parents {
            v2: Arc::clone(&self.parent),
            v1: Vec::new(),
        }
    }
}

impl V2Driver {
    fn create_new(&self, name: &str, limits: &Limits) -> Result<JobCgroup, CgroupError> {
        check_name(&self.parent, name)?;
        self.parent.mkdir(name)?;
        let guard = CreateGuard {
            name,
            made: vec![Arc::clone(&self.parent)],
        };
        let dir = self.parent.open_child(name)?;
        let id = dir.inode()?;
        self.write_limits(&dir, &Limits::default(), limits)?;
        let memory = self
            .enabled
            .contains(Controller::Memory)
            .then(|| MemoryFiles {
                dir: Arc::clone(&self.parent),
                version: MemoryVersion::V2,
                has_peak: self.has_memory_peak,
            });
        Ok(JobCgroup {
            name: name.to_owned(),
            v2: dir,
            join_procs: Vec::new(),
            parents: guard.defuse(),
            id,
            memory,
            reuse: None,
        })
    }
}

/// Whether the running kernel's version is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}
