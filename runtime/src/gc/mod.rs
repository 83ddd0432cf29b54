//! Garbage collection of a state dir: recovery of the jobs whose supervisor died, and retention
//! of ended jobs' directories (`joblet gc`).
//!
//! A supervisor (`joblet run`, or a daemon) that is killed cannot finish its job: the record
//! stays `running`, the log has no end chunk, and the job's cgroups stay behind (its processes
//! die with a `joblet run` through `PR_SET_PDEATHSIG`; a daemon's jobs may not). Recovery finishes
//! what the supervisor could not:
//!
//! 1. kills whatever is left in the job's own v2 cgroup and removes its cgroup set
//!    ([`Parents::reap`]);
//! 2. ends the log (cuts a torn tail, appends the end chunk), so `joblet logs -f` stops;
//! 3. writes the final record: state `failed`, `error` saying the supervisor died, the output
//!    counts read back from the log;
//! 4. removes the job's entry from the running index (`store::RunningMark`).
//!
//! Who is dead is decided by pid and start time ([`Supervisor::is_alive`]), so a live
//! supervisor's job is never touched, and a reused pid is not mistaken for the supervisor.
//! Recoveries are serialised by an exclusive `flock` on `<state>/gc.lock`, so two joblet
//! processes never recover the same job at once; each re-checks, under the lock, that the job
//! still needs it.
//!
//! [`recover_index`] looks only at the running index (jobs in flight): cheap enough for the
//! start of every `joblet run`. [`collect`] (`joblet gc`) also reads every record (jobs of
//! joblets that predate the index, records left `running` by a power cut), removes the leftover
//! cgroups of ended jobs of this state dir and the empty pool sets of dead processes, then
//! applies the retention policy ([`Retention`]).
//!
//! Only joblet's own cgroups are touched: direct children of joblet's parent cgroups whose name
//! is the id of a job recorded in this state dir (or the pool set named in such a job's record,
//! `pool-<supervisor pid>-N`), and, never killing, empty pool sets whose creator pid is gone.

use std::collections::HashSet;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cgroup::CgroupError;
use crate::cgroup::stale::Parents;
use crate::job::{JobId, JobRecord, JobState, OutputInfo, Supervisor};
use crate::store::{
    ChunkKind, LogReader, LogWriter, RunningEntry, StateDir, StoreError, Stream, now_ns,
};

/// The lock file serialising recoveries and retention, under the state dir.
pub const LOCK_FILE: &str = "gc.lock";

/// Errors that stop a collection (a failure on one job is reported in its [`Recovered`] and
/// the collection goes on).
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The state dir's lock could not be taken.
    #[error("failed to lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The running index or the jobs directory could not be listed.
    #[error("failed to list the jobs of the state dir")]
    ListJobs(#[source] StoreError),
    /// joblet's cgroups could not be listed.
    #[error("failed to list joblet's cgroups")]
    ListCgroups(#[source] CgroupError),
}

/// One job recovered from a dead supervisor.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Recovered {
    /// The job.
    pub id: JobId,
    /// Its dead supervisor's pid.
    pub supervisor_pid: u32,
    /// Processes of the job that were still running and were killed.
    pub killed: usize,
    /// Cgroup directories removed.
    pub cgroups_removed: usize,
    /// What could not be done (the rest was).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Which ended jobs [`collect`] removes. A running job is never removed. With several limits a
/// job goes when any of `older_than` and `max_bytes` says so, unless `keep` protects it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Remove ended jobs that ended longer ago than this (`--older-than`).
    pub older_than: Option<Duration>,
    /// Keep at least the most recently ended N jobs (`--keep`); alone, remove all the others.
    pub keep: Option<usize>,
    /// Remove the oldest ended jobs until all jobs' directories take at most this many bytes on
    /// disk (`--max-size`).
    pub max_bytes: Option<u64>,
}

impl Retention {
    /// Whether any limit is set.
    pub fn is_set(&self) -> bool {
        self.older_than.is_some() || self.keep.is_some() || self.max_bytes.is_some()
    }
}

/// An ended job removed by retention.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    /// The job.
    pub id: JobId,
    /// Bytes its directory took on disk.
    pub bytes: u64,
}

/// What [`collect`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Jobs recovered from dead supervisors.
    pub recovered: Vec<Recovered>,
    /// Leftover cgroups removed (of ended jobs of this state dir, and empty pool sets of dead
    /// processes).
    pub cgroups_removed: Vec<String>,
    /// Ended jobs removed by retention.
    pub removed: Vec<Removed>,
    /// Failures that did not stop the collection.
    pub errors: Vec<String>,
}

/// Recovers the jobs of the running index whose supervisor is dead; see the module docs. Reads
/// one small directory and one `/proc/PID/stat` per supervisor when nothing is stale, and takes
/// the lock only when something is, without waiting for it: when another process holds it,
/// nothing is done (that process is recovering or collecting).
pub fn recover_index(state: &StateDir, parents: &Parents) -> Result<Vec<Recovered>, GcError> {
    let entries = state.running_entries().map_err(GcError::ListJobs)?;
    let stale = dead_entries(entries);
    if stale.is_empty() {
        return Ok(Vec::new());
    }
    // Without waiting: a process holding the lock is recovering or collecting already, and a
    // `joblet run` must not wait behind a long retention pass.
    let Some(_lock) = lock(state, false)? else {
        return Ok(Vec::new());
    };
    Ok(stale
        .iter()
        // Another process may have recovered it while this one waited for the lock.
        .filter(|e| state.is_marked_running(e))
        .filter_map(|e| recover(state, parents, &e.id, e.supervisor, Some(e)))
        .collect())
}

/// `joblet gc`: recovers every job whose supervisor is dead (index and records), removes the
/// leftover cgroups of this state dir's ended jobs and the empty pool sets of dead processes,
/// then applies `retention`. Holds the state dir's lock throughout.
pub fn collect(
    state: &StateDir,
    parents: &Parents,
    retention: &Retention,
) -> Result<GcReport, GcError> {
    let _lock = lock(state, true)?;
    let mut report = GcReport::default();
    let entries = state.running_entries().map_err(GcError::ListJobs)?;
    for e in dead_entries(entries) {
        report
            .recovered
            .extend(recover(state, parents, &e.id, e.supervisor, Some(&e)));
    }
    // Every record: `running` ones of dead supervisors that the index does not name.
    let ids = state.job_ids().map_err(GcError::ListJobs)?;
    let mut records = Vec::with_capacity(ids.len());
    for id in &ids {
        let record = state.read_record(id).ok();
        if let Some(r) = &record
            && r.state == JobState::Running
            && let Some(sup) = r.runtime.supervisor
            && !sup.is_alive()
        {
            report
                .recovered
                .extend(recover(state, parents, id, sup, None));
        }
        records.push((id.clone(), record));
    }
    // Read after the job list: a job created after that listing is not in it, and one created
    // before has its entry since before its directory existed.
    let in_flight: HashSet<JobId> = state
        .running_entries()
        .map_err(GcError::ListJobs)?
        .into_iter()
        .filter(|e| e.supervisor.is_alive())
        .map(|e| e.id)
        .collect();
    leftover_cgroups(state, parents, &in_flight, &mut report)?;
    if retention.is_set() {
        apply_retention(state, &ids, &in_flight, retention, &mut report);
    }
    Ok(report)
}

/// The entries whose supervisor is dead, checking each distinct supervisor once.
fn dead_entries(entries: Vec<RunningEntry>) -> Vec<RunningEntry> {
    let mut alive: Vec<(Supervisor, bool)> = Vec::new();
    entries
        .into_iter()
        .filter(|e| {
            let known = alive.iter().find(|(s, _)| *s == e.supervisor).map(|x| x.1);
            let is_alive = known.unwrap_or_else(|| {
                let a = e.supervisor.is_alive();
                alive.push((e.supervisor, a));
                a
            });
            !is_alive
        })
        .collect()
}

/// Takes the state dir's lock, creating the state dir and lock file if needed. With `wait`
/// false, `None` when another process holds it.
fn lock(state: &StateDir, wait: bool) -> Result<Option<OwnedFd>, GcError> {
    let path = state.root().join(LOCK_FILE);
    let err = |source: io::Error| GcError::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state.root()).map_err(err)?;
    let fd = rustix::fs::open(
        &path,
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CREATE | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .map_err(|e| err(e.into()))?;
    let op = if wait {
        rustix::fs::FlockOperation::LockExclusive
    } else {
        rustix::fs::FlockOperation::NonBlockingLockExclusive
    };
    loop {
        match rustix::fs::flock(&fd, op) {
            Ok(()) => return Ok(Some(fd)),
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::WOULDBLOCK) if !wait => return Ok(None),
            Err(e) => return Err(err(e.into())),
        }
    }
}

/// Recovers job `id` whose supervisor `sup` is dead (checked by the caller); `entry` is its
/// running-index entry, removed at the end. `None` when there was nothing to do after all (its
/// record names a live supervisor, e.g. a daemon that took the job over).
fn recover(
    state: &StateDir,
    parents: &Parents,
    id: &JobId,
    sup: Supervisor,
    entry: Option<&RunningEntry>,
) -> Option<Recovered> {
    let record = state.read_record(id).ok();
    if let Some(r) = &record
        && r.state == JobState::Running
        && r.runtime
            .supervisor
            .is_some_and(|s| s != sup && s.is_alive())
    {
        return None;
    }
    let mut errors: Vec<String> = Vec::new();
    let mut out = Recovered {
        id: id.clone(),
        supervisor_pid: sup.pid,
        killed: 0,
        cgroups_removed: 0,
        error: None,
    };
    match job_cgroup_name(record.as_ref(), id, sup, parents.v2_path()) {
        Some(name) => match parents.reap(&name) {
            Ok(r) => {
                out.killed = r.killed;
                out.cgroups_removed = r.removed;
            }
            Err(e) => errors.push(crate::spawn::anyhow_like(&e)),
        },
        None => errors.push("its record names a cgroup joblet does not manage: left alone".into()),
    }
    let still_running = record
        .as_ref()
        .is_some_and(|r| r.state == JobState::Running);
    // Killed before it created the job's directory: there is no log to end.
    let output = if (still_running || record.is_none()) && state.log_path(id).exists() {
        match end_log(&state.log_path(id)) {
            Ok(o) => Some(o),
            Err(e) => {
                errors.push(crate::spawn::anyhow_like(&e));
                None
            }
        }
    } else {
        None
    };
    if let Some(mut r) = record.filter(|_| still_running) {
        r.state = JobState::Failed;
        let mut why = format!(
            "its supervisor (pid {}) died while the job was running; recovered by joblet \
             (killed {} process(es), removed {} cgroup(s))",
            sup.pid, out.killed, out.cgroups_removed
        );
        for e in &errors {
            why.push_str("; ");
            why.push_str(e);
        }
        r.error = Some(why);
        if let Some((o, last_ts)) = output {
            if last_ts > r.started_at_ns {
                r.wall_ns = last_ts - r.started_at_ns;
            }
            r.output = Some(o);
        }
        if let Err(e) = state.write_record(&r) {
            errors.push(crate::spawn::anyhow_like(&e));
        }
    }
    if let Some(e) = entry
        && let Err(err) = state.unmark_running(e)
    {
        errors.push(crate::spawn::anyhow_like(&err));
    }
    if !errors.is_empty() {
        out.error = Some(errors.join("; "));
    }
    Some(out)
}

/// The name of the cgroup set of a stale job, if joblet manages it: the job id, or the pool set
/// of the dead supervisor that its record names, directly under joblet's v2 parent.
fn job_cgroup_name(
    record: Option<&JobRecord>,
    id: &JobId,
    sup: Supervisor,
    v2_parent: &Path,
) -> Option<String> {
    let Some(path) = record.and_then(|r| r.runtime.cgroup_path.as_deref()) else {
        return Some(id.to_string());
    };
    let name = path.file_name()?.to_str()?;
    let ours = path.parent() == Some(v2_parent)
        && (name == id.as_str() || pool_pid(name) == Some(sup.pid));
    ours.then(|| name.to_owned())
}

/// The creator pid of a pool set name `pool-PID-N` (see `cgroup::pool`).
fn pool_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("pool-")?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Ends a log whose writer is dead: cuts a torn tail, appends the end chunk, and returns what it
/// holds and the time of its last chunk. An already complete log is only read.
fn end_log(path: &Path) -> Result<(OutputInfo, u64), StoreError> {
    match LogWriter::open(path) {
        Ok((w, _)) => {
            w.finish()?;
        }
        Err(StoreError::Ended { .. }) => {}
        Err(e) => return Err(e),
    }
    let mut reader = LogReader::open(path)?;
    let mut o = OutputInfo::default();
    let mut last_data_ts = 0;
    while let Some(chunk) = reader.try_next()? {
        match chunk.kind {
            ChunkKind::Data(Stream::Stdout) => o.stdout_bytes += chunk.data.len() as u64,
            ChunkKind::Data(Stream::Stderr) => o.stderr_bytes += chunk.data.len() as u64,
            ChunkKind::Truncated(m) => o.lost_bytes += m.lost_stdout + m.lost_stderr,
            ChunkKind::End => {
                o.last_seq = chunk.seq;
                continue;
            }
        }
        last_data_ts = chunk.ts_ns;
    }
    Ok((o, last_data_ts))
}

/// Removes joblet cgroups left behind by jobs of this state dir that are no longer running, and
/// the empty pool sets of processes that are gone.
fn leftover_cgroups(
    state: &StateDir,
    parents: &Parents,
    in_flight: &HashSet<JobId>,
    report: &mut GcReport,
) -> Result<(), GcError> {
    for name in parents.children().map_err(GcError::ListCgroups)? {
        if let Some(pid) = pool_pid(&name) {
            // A pool set may be lent to a job right now: only a dead process's, only if empty.
            if !Path::new(&format!("/proc/{pid}")).exists() {
                match parents.remove_if_empty(&name) {
                    Ok(true) => report.cgroups_removed.push(name),
                    Ok(false) => {}
                    Err(e) => report.errors.push(crate::spawn::anyhow_like(&e)),
                }
            }
            continue;
        }
        let Some(id) = JobId::parse(&name) else {
            continue;
        };
        if in_flight.contains(&id) {
            continue;
        }
        // Only a job recorded here, and ended: a live supervisor removes its cgroups before it
        // writes the final record, so these are what a dying one left.
        let Ok(record) = state.read_record(&id) else {
            continue;
        };
        if record.state == JobState::Running {
            continue;
        }
        match parents.reap(&name) {
            Ok(r) if r.removed > 0 => report.cgroups_removed.push(name),
            Ok(_) => {}
            Err(e) => report.errors.push(crate::spawn::anyhow_like(&e)),
        }
    }
    Ok(())
}

/// A job retention may remove: ended, with the time it ended and its size on disk.
struct Ended {
    id: JobId,
    ended_ns: u64,
    bytes: u64,
}

fn apply_retention(
    state: &StateDir,
    ids: &[JobId],
    in_flight: &HashSet<JobId>,
    retention: &Retention,
    report: &mut GcReport,
) {
    let mut total: u64 = 0;
    let mut ended: Vec<Ended> = Vec::new();
    for id in ids {
        let dir = state.job_dir(id);
        let bytes = dir_bytes(&dir);
        total += bytes;
        if in_flight.contains(id) {
            continue;
        }
        // When it ended: when its final record was written. Without a record (a crash before
        // the first one, or a directory of an older joblet), when its log last changed.
        let ended_ns = match state.read_record(id) {
            Ok(r) if r.state == JobState::Running => continue,
            Ok(_) => mtime_ns(&state.record_path(id)),
            Err(StoreError::NoSuchJob { .. }) => mtime_ns(&state.log_path(id)),
            // An unreadable record: not knowing its state, leave the job alone.
            Err(_) => continue,
        };
        let Some(ended_ns) = ended_ns else { continue };
        ended.push(Ended {
            id: id.clone(),
            ended_ns,
            bytes,
        });
    }
    // Newest first: `keep` protects a prefix.
    ended.sort_by(|a, b| b.ended_ns.cmp(&a.ended_ns).then(a.id.cmp(&b.id)));
    let now = now_ns();
    let protected = retention.keep.unwrap_or(0).min(ended.len());
    let (_, candidates) = ended.split_at(protected);
    let mut doomed = vec![false; candidates.len()];
    for (i, e) in candidates.iter().enumerate() {
        doomed[i] = match retention.older_than {
            Some(d) => now.saturating_sub(e.ended_ns) > d.as_nanos() as u64,
            // `--keep` alone removes everything past the newest N.
            None => retention.keep.is_some(),
        };
    }
    if let Some(max) = retention.max_bytes {
        let mut remaining = total
            - candidates
                .iter()
                .zip(&doomed)
                .filter(|(_, d)| **d)
                .map(|(e, _)| e.bytes)
                .sum::<u64>();
        // Oldest first.
        for (i, e) in candidates.iter().enumerate().rev() {
            if remaining <= max {
                break;
            }
            if !doomed[i] {
                doomed[i] = true;
                remaining -= e.bytes;
            }
        }
    }
    for (e, _) in candidates.iter().zip(&doomed).filter(|(_, d)| **d) {
        match std::fs::remove_dir_all(state.job_dir(&e.id)) {
            Ok(()) => report.removed.push(Removed {
                id: e.id.clone(),
                bytes: e.bytes,
            }),
            Err(err) => report.errors.push(format!(
                "failed to remove {}: {err}",
                state.job_dir(&e.id).display()
            )),
        }
    }
}

/// Bytes allocated on disk to the files directly in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn mtime_ns(path: &Path) -> Option<u64> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    )
}

#[cfg(test)]
mod tests;
