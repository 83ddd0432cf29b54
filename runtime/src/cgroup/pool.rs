//! Reuse of job cgroup sets ([`CgroupDriver::set_pool`](super::CgroupDriver::set_pool)).
//!
//! A new cgroup set costs a `mkdir` per hierarchy (the kernel allocates the controllers' state
//! and creates every interface file), a first `open` of each file written (which instantiates its
//! inode) and an `rmdir` later: more than all of a job's namespaces together. A pool keeps emptied
//! sets, with their directory and join (`tasks`) fds still open, and hands them to later jobs.
//!
//! A job must not see anything of the jobs that used its set before, so:
//! - limits: every limit file whose value differs from what the next job wants is rewritten,
//!   unset limits back to "unlimited" (the pool remembers what each set holds, so identical
//!   limits cost no write at all); on a hybrid host only sets with the same v1 controllers are
//!   matched, so no v1 cgroup a job does not need is joined;
//! - counters (CPU time, OOM kills): reported as deltas from their values at hand-out;
//! - peak memory: reset at hand-out (v1 `memory.max_usage_in_bytes` by writing 0; v2
//!   `memory.peak` by writing to an fd kept open, Linux 6.12+), then reported less the memory
//!   still charged to the set at hand-out;
//! - leftovers: a set goes back to the pool only when no task is left in it (v2 `populated 0`),
//!   no child cgroup was made in it (link count 2), and no more than [`MAX_LEFTOVER_BYTES`] stays
//!   charged to it (kernel objects such as the dentries of files the job created stay charged to
//!   a memory cgroup until memory pressure frees them). Otherwise it is removed, without trying to
//!   reclaim first: see [`MAX_LEFTOVER_BYTES`].
//!
//! What stays visible: the cgroup id (the v2 directory is the same, so per-id state such as
//! eBPF maps must be reset per job), the directory name (`pool-PID-N`, not the job id) and up to
//! [`MAX_LEFTOVER_BYTES`] of charge counting against the next job's memory limit until reclaimed.
//! And `cgroup.kill` must never be used on a pooled cgroup: on this kernel every task later
//! spawned into it with `CLONE_INTO_CGROUP` is killed at once.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{
    CgroupError, JobCgroup, MemoryVersion, Usage, fs, invalid_data, parse_cpu_stat, remove_dirs,
};
use crate::job::Limits;

/// The most memory an emptied set may still have charged and go back to the pool. A trivial job
/// leaves 0.2-0.5 MiB of kernel objects behind (namespaces, mounts, tmpfs inodes freed after an
/// RCU grace period), now and then more.
///
/// A set over this is removed rather than reclaimed: v1 `memory.force_empty` retries until the
/// charge is zero, which kernel objects never let it reach (2 to 72 ms per call measured on the
/// hybrid CI host, against ~130 us for a new set), and v2 `memory.reclaim` retries the same way
/// when it cannot free what it is asked.
pub const MAX_LEFTOVER_BYTES: u64 = 1 << 20;

/// What a lent-out set needs to go back to its pool and report usage as deltas.
#[derive(Debug)]
pub(crate) struct Reuse {
    pool: Arc<Pool>,
    /// Which v1 controllers the set has (hybrid), 0 on pure v2.
    key: u8,
    /// The limits in the set's files.
    applied: Limits,
    pub(super) base: Baseline,
    /// v2 `memory.peak` opened read-write and reset: its peak is per open file.
    pub(super) peak_fd: Option<OwnedFd>,
}

/// Counter values when a set was handed out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Baseline {
    cpu_user_ns: u64,
    cpu_system_ns: u64,
    oom_kills: u64,
    /// Memory charged to the set at hand-out (earlier jobs' leftovers).
    memory_bytes: u64,
}

impl Baseline {
    pub(super) fn since(&self, now: Usage) -> Usage {
        Usage {
            cpu_user_ns: now.cpu_user_ns.saturating_sub(self.cpu_user_ns),
            cpu_system_ns: now.cpu_system_ns.saturating_sub(self.cpu_system_ns),
            memory_peak_bytes: now
                .memory_peak_bytes
                .map(|p| p.saturating_sub(self.memory_bytes)),
            oom_kills: now.oom_kills.saturating_sub(self.oom_kills),
        }
    }
}

/// An emptied set waiting in the pool.
#[derive(Debug)]
struct Idle {
    cg: JobCgroup,
    key: u8,
    applied: Limits,
}

/// A pool of emptied cgroup sets of one driver.
#[derive(Debug)]
pub(crate) struct Pool {
    capacity: usize,
    idle: Mutex<Vec<Idle>>,
    /// `pool-PID-`: names must not collide with another joblet process's pool.
    prefix: String,
    next: AtomicU64,
}

impl Pool {
    pub(crate) fn new(capacity: usize) -> Arc<Pool> {
        Arc::new(Pool {
            capacity,
            idle: Mutex::new(Vec::with_capacity(capacity)),
            prefix: format!("pool-{}-", std::process::id()),
            next: AtomicU64::new(0),
        })
    }

    /// A name for a new pooled set.
    pub(crate) fn name(&self) -> String {
        format!(
            "{}{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// How many sets are waiting.
    pub(crate) fn idle(&self) -> usize {
        self.idle.lock().map_or(0, |v| v.len())
    }

    /// Marks a new set (made with [`Pool::name`]) as coming back here.
    pub(crate) fn adopt(
        self: &Arc<Self>,
        mut cg: JobCgroup,
        key: u8,
        limits: &Limits,
    ) -> JobCgroup {
        cg.reuse = Some(Reuse {
            pool: Arc::clone(self),
            key,
            applied: limits.clone(),
            base: Baseline::default(),
            peak_fd: None,
        });
        cg
    }

    /// Hands out a waiting set with controllers `key`, after `rewrite(set, old_limits)` made its
    /// files hold the new limits. `None` when no set waits or the reused one failed (it is then
    /// removed: its files are in an unknown state), so the caller makes a new one.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        key: u8,
        limits: &Limits,
        rewrite: impl FnOnce(&JobCgroup, &Limits) -> Result<(), CgroupError>,
    ) -> Option<JobCgroup> {
        let Idle {
            mut cg, applied, ..
        } = {
            let mut idle = self.idle.lock().ok()?;
            // The most recently used set: its kernel objects are the warmest.
            let i = idle.iter().rposition(|e| e.key == key)?;
            idle.swap_remove(i)
        };
        match rewrite(&cg, &applied).and_then(|()| baseline(&cg)) {
            Ok((base, peak_fd)) => {
                cg.reuse = Some(Reuse {
                    pool: Arc::clone(self),
                    key,
                    applied: limits.clone(),
                    base,
                    peak_fd,
                });
                Some(cg)
            }
            Err(_) => {
                let _ = remove_dirs(&cg.name, &cg.parents);
                None
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let idle = self.idle.get_mut().map(std::mem::take).unwrap_or_default();
        for e in idle {
            let _ = remove_dirs(&e.cg.name, &e.cg.parents);
        }
    }
}

/// Reads the counters a reused set reports deltas from, and resets its memory peak.
fn baseline(cg: &JobCgroup) -> Result<(Baseline, Option<OwnedFd>), CgroupError> {
    let cpu_stat = cg.v2.read("cpu.stat")?;
    let (cpu_user_ns, cpu_system_ns) = parse_cpu_stat(&cpu_stat)
        .ok_or_else(|| invalid_data(cg.v2.path_of("cpu.stat"), "no user_usec/system_usec"))?;
    let mut base = Baseline {
        cpu_user_ns,
        cpu_system_ns,
        ..Baseline::default()
    };
    let Some(memory) = &cg.memory else {
        return Ok((base, None));
    };
    base.oom_kills = memory.oom_kills(&cg.name)?;
    let mut peak_fd = None;
    if let Some(peak) = memory.peak() {
        let rel = format!("{}/{peak}", cg.name);
        match memory.version {
            MemoryVersion::V1 => memory.dir.write(&rel, "0")?,
            MemoryVersion::V2 => {
                let fd = memory.dir.open_rw(&rel)?;
                fs::write_fd(&fd, "reset").map_err(|source| CgroupError::Write {
                    path: memory.dir.path_of(&rel),
                    value: "reset".into(),
                    source,
                })?;
                peak_fd = Some(fd);
            }
        }
    }
    // After the reset the peak restarts from what is charged now.
    base.memory_bytes = memory.read_u64(&cg.name, memory.current())?;
    Ok((base, peak_fd))
}

/// Puts an emptied set back in its pool, or removes it.
pub(super) fn release(cg: JobCgroup, reuse: Reuse) -> Result<(), CgroupError> {
    let Reuse {
        pool, key, applied, ..
    } = reuse;
    let room = pool.idle() < pool.capacity;
    if !room || !reusable(&cg) {
        return remove_dirs(&cg.name, &cg.parents);
    }
    let mut idle = match pool.idle.lock() {
        Ok(idle) => idle,
        Err(_) => return remove_dirs(&cg.name, &cg.parents),
    };
    if idle.len() >= pool.capacity {
        drop(idle);
        return remove_dirs(&cg.name, &cg.parents);
    }
    idle.push(Idle { cg, key, applied });
    Ok(())
}

/// Whether nothing of the job that used `cg` would reach the next one; see the module docs.
fn reusable(cg: &JobCgroup) -> bool {
    // Every task of a job is born in its v2 cgroup and cannot leave it, so this covers the v1
    // cgroups too.
    let empty = cg
        .v2
        .read("cgroup.events")
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "populated 0"));
    if !empty {
        return false;
    }
    // A kernfs directory's link count is 2 plus its subdirectories.
    if !cg
        .parents
        .iter()
        .all(|p| p.child_nlink(&cg.name).is_ok_and(|n| n == 2))
    {
        return false;
    }
    let Some(memory) = &cg.memory else {
        return true;
    };
    memory
        .read_u64(&cg.name, memory.current())
        .is_ok_and(|bytes| bytes <= MAX_LEFTOVER_BYTES)
}
