//! Recovery and retention against a temp state dir and plain directories standing in for
//! joblet's cgroup parents (the real kill path is tested as root in `tests/integration/gc.rs`).

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::*;
use crate::job::{Limits, RuntimeInfo};
use crate::store::RunningEntry;

/// A supervisor that is certainly dead: a reaped child's pid and start time.
fn dead_supervisor() -> Supervisor {
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
    let start_ticks = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(19)
        .unwrap();
    let sup = Supervisor {
        pid: child.id(),
        start_ticks: start_ticks.parse().unwrap(),
    };
    assert!(sup.is_alive());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!sup.is_alive());
    sup
}

fn record(id: &JobId, state: JobState, sup: Supervisor, cgroup: Option<&Path>) -> JobRecord {
    JobRecord {
        id: id.clone(),
        name: None,
        labels: Default::default(),
        command: vec!["sleep".into()],
        state,
        exit_code: None,
        signal: None,
        oom_killed: false,
        timed_out: false,
        stopped: false,
        started_at_ns: now_ns() - 1_000_000,
        wall_ns: 0,
        cpu_user_ns: 0,
        cpu_system_ns: 0,
        memory_peak_bytes: None,
        limits: Limits::default(),
        runtime: RuntimeInfo {
            cgroup_path: cgroup.map(Path::to_owned),
            supervisor: Some(sup),
            ..RuntimeInfo::default()
        },
        error: None,
        output: None,
        latency: None,
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    state: StateDir,
    /// The fake v2 parent (`.../joblet`).
    v2: PathBuf,
    /// A fake v1 parent.
    memory: PathBuf,
    parents: Parents,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let v2 = tmp.path().join("unified/joblet");
    let memory = tmp.path().join("memory/joblet");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::create_dir_all(&memory).unwrap();
    let parents = Parents::plain(&v2, &[&memory]);
    Fixture {
        state: StateDir::new(tmp.path().join("state")),
        _tmp: tmp,
        v2,
        memory,
        parents,
    }
}

impl Fixture {
    /// A job as a supervisor `sup` leaves it while running: index entry, log with one chunk,
    /// `running` record, cgroups (empty) in both hierarchies.
    fn running_job(&self, sup: Supervisor) -> JobId {
        let id = JobId::generate();
        self.state
            .mark_running(&RunningEntry {
                id: id.clone(),
                supervisor: sup,
            })
            .unwrap();
        let mut log = self.state.create_job(&id).unwrap();
        log.append(Stream::Stdout, b"hello\n").unwrap();
        drop(log);
        self.state
            .write_record(&record(
                &id,
                JobState::Running,
                sup,
                Some(&self.v2.join(id.as_str())),
            ))
            .unwrap();
        self.make_cgroup(id.as_str());
        id
    }

    fn make_cgroup(&self, name: &str) {
        for p in [&self.v2, &self.memory] {
            std::fs::create_dir_all(p.join(name)).unwrap();
            std::fs::write(p.join(name).join("cgroup.procs"), "").unwrap();
        }
    }

    fn has_cgroup(&self, name: &str) -> bool {
        self.v2.join(name).exists() || self.memory.join(name).exists()
    }

    /// An ended job whose final record was written `age` ago, with `bytes` of log.
    fn ended_job(&self, age: Duration, bytes: usize) -> JobId {
        let id = JobId::generate();
        let mut log = self.state.create_job(&id).unwrap();
        log.append(Stream::Stdout, &vec![b'x'; bytes]).unwrap();
        log.finish().unwrap();
        self.state
            .write_record(&record(
                &id,
                JobState::Exited,
                Supervisor::current().unwrap(),
                None,
            ))
            .unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(self.state.record_path(&id))
            .unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
        id
    }
}

#[test]
fn a_dead_supervisors_job_is_finished_and_its_cgroups_removed() {
    let fx = fixture();
    let dead = dead_supervisor();
    let id = fx.running_job(dead);
    assert_eq!(
        fx.state.read_record(&id).unwrap().effective_state(),
        JobState::Failed
    );

    let recovered = recover_index(&fx.state, &fx.parents).unwrap();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(recovered[0].id, id);
    assert_eq!(recovered[0].cgroups_removed, 2);
    assert_eq!(recovered[0].error, None);
    assert!(!fx.has_cgroup(id.as_str()));
    assert!(fx.state.running_entries().unwrap().is_empty());
    let r = fx.state.read_record(&id).unwrap();
    assert_eq!(r.state, JobState::Failed);
    assert!(
        r.error
            .as_deref()
            .is_some_and(|e| e.contains(&format!("supervisor (pid {}) died", dead.pid))),
        "{r:?}"
    );
    let o = r.output.unwrap();
    assert_eq!(o.stdout_bytes, 6);
    assert_eq!(o.last_seq, 2, "the log got its end chunk");
    // Ended: reopening it for appending is refused.
    assert!(matches!(
        LogWriter::open(&fx.state.log_path(&id)),
        Err(StoreError::Ended { .. })
    ));
    // Nothing left to do the second time.
    assert!(recover_index(&fx.state, &fx.parents).unwrap().is_empty());
}

#[test]
fn a_live_supervisors_job_is_never_touched() {
    let fx = fixture();
    let me = Supervisor::current().unwrap();
    let id = fx.running_job(me);
    let before = std::fs::read(fx.state.record_path(&id)).unwrap();
    assert!(recover_index(&fx.state, &fx.parents).unwrap().is_empty());
    let report = collect(
        &fx.state,
        &fx.parents,
        &Retention {
            keep: Some(0),
            older_than: Some(Duration::ZERO),
            max_bytes: Some(0),
        },
    )
    .unwrap();
    assert_eq!(report, GcReport::default());
    assert_eq!(std::fs::read(fx.state.record_path(&id)).unwrap(), before);
    assert!(fx.has_cgroup(id.as_str()));
    assert_eq!(fx.state.running_entries().unwrap().len(), 1);
}

#[test]
fn collect_recovers_running_records_the_index_does_not_name() {
    let fx = fixture();
    let dead = dead_supervisor();
    let id = fx.running_job(dead);
    // As after a power cut or with a joblet that predates the index.
    std::fs::remove_dir_all(fx.state.running_dir()).unwrap();
    assert!(recover_index(&fx.state, &fx.parents).unwrap().is_empty());
    let report = collect(&fx.state, &fx.parents, &Retention::default()).unwrap();
    assert_eq!(report.recovered.len(), 1);
    assert_eq!(fx.state.read_record(&id).unwrap().state, JobState::Failed);
    assert!(!fx.has_cgroup(id.as_str()));
}

#[test]
fn only_joblets_own_cgroups_of_this_state_dir_are_removed() {
    let fx = fixture();
    // Ended job of this state dir whose supervisor died after the final record: removed.
    let ended = fx.ended_job(Duration::ZERO, 10);
    fx.make_cgroup(ended.as_str());
    // A job id of another state dir (no record here), a foreign name, a live process's pool
    // set and a populated dead one's: all left alone.
    let other = JobId::generate();
    fx.make_cgroup(other.as_str());
    fx.make_cgroup("not-joblets");
    let live_pool = format!("pool-{}-0", std::process::id());
    fx.make_cgroup(&live_pool);
    let dead = dead_supervisor();
    let busy_pool = format!("pool-{}-1", dead.pid);
    fx.make_cgroup(&busy_pool);
    std::fs::write(fx.v2.join(&busy_pool).join("cgroup.procs"), "1\n").unwrap();
    let empty_pool = format!("pool-{}-2", dead.pid);
    fx.make_cgroup(&empty_pool);

    let report = collect(&fx.state, &fx.parents, &Retention::default()).unwrap();
    let mut removed = report.cgroups_removed.clone();
    removed.sort();
    let mut want = vec![ended.to_string(), empty_pool.clone()];
    want.sort();
    assert_eq!(removed, want, "{report:?}");
    for kept in [other.as_str(), "not-joblets", &live_pool, &busy_pool] {
        assert!(fx.has_cgroup(kept), "{kept} was removed");
    }
}

#[test]
fn a_record_naming_a_foreign_cgroup_is_recovered_without_touching_it() {
    let fx = fixture();
    let dead = dead_supervisor();
    let id = fx.running_job(dead);
    let mut r = fx.state.read_record(&id).unwrap();
    r.runtime.cgroup_path = Some(fx.v2.join("not-joblets"));
    fx.state.write_record(&r).unwrap();
    fx.make_cgroup("not-joblets");
    let recovered = recover_index(&fx.state, &fx.parents).unwrap();
    assert!(
        recovered[0]
            .error
            .as_deref()
            .unwrap()
            .contains("left alone")
    );
    assert!(fx.has_cgroup("not-joblets"));
    assert_eq!(fx.state.read_record(&id).unwrap().state, JobState::Failed);
}

#[test]
fn pool_names_parse_only_when_well_formed() {
    assert_eq!(pool_pid("pool-123-4"), Some(123));
    for bad in ["pool-123", "pool--4", "pool-x-4", "pool-123-x", "123-4"] {
        assert_eq!(pool_pid(bad), None, "{bad}");
    }
}

#[test]
fn retention_removes_old_jobs_keeps_recent_ones_and_never_running_ones() {
    let fx = fixture();
    let hour = Duration::from_secs(3600);
    let old = fx.ended_job(3 * hour, 10);
    let older = fx.ended_job(5 * hour, 10);
    let recent = fx.ended_job(Duration::from_secs(60), 10);
    let running = fx.running_job(Supervisor::current().unwrap());
    let report = collect(
        &fx.state,
        &fx.parents,
        &Retention {
            older_than: Some(2 * hour),
            ..Retention::default()
        },
    )
    .unwrap();
    let mut removed: Vec<JobId> = report.removed.iter().map(|r| r.id.clone()).collect();
    removed.sort();
    let mut want = vec![old, older];
    want.sort();
    assert_eq!(removed, want);
    for id in &want {
        assert!(!fx.state.job_dir(id).exists());
    }
    assert!(fx.state.job_dir(&recent).exists());
    assert!(fx.state.job_dir(&running).exists());
}

#[test]
fn retention_keep_protects_the_newest_ended_jobs() {
    let fx = fixture();
    let ids: Vec<JobId> = (1..=5u64)
        .map(|h| fx.ended_job(Duration::from_secs(h * 3600), 10))
        .collect();
    let running = fx.running_job(Supervisor::current().unwrap());
    // Alone: everything past the newest 2.
    let report = collect(
        &fx.state,
        &fx.parents,
        &Retention {
            keep: Some(2),
            ..Retention::default()
        },
    )
    .unwrap();
    assert_eq!(report.removed.len(), 3);
    assert!(fx.state.job_dir(&ids[0]).exists() && fx.state.job_dir(&ids[1]).exists());
    assert!(ids[2..].iter().all(|id| !fx.state.job_dir(id).exists()));
    assert!(fx.state.job_dir(&running).exists());
    // With --older-than, keep wins: 2 are kept even though both are old.
    let report = collect(
        &fx.state,
        &fx.parents,
        &Retention {
            keep: Some(1),
            older_than: Some(Duration::from_secs(60)),
            ..Retention::default()
        },
    )
    .unwrap();
    assert_eq!(report.removed.len(), 1);
    assert_eq!(report.removed[0].id, ids[1]);
    assert!(fx.state.job_dir(&ids[0]).exists());
}

#[test]
fn retention_max_size_removes_the_oldest_until_under_the_cap() {
    let fx = fixture();
    let hour = Duration::from_secs(3600);
    // Oldest first.
    let a = fx.ended_job(4 * hour, 100_000);
    let b = fx.ended_job(3 * hour, 100_000);
    let c = fx.ended_job(2 * hour, 100_000);
    let each = dir_bytes(&fx.state.job_dir(&a));
    assert!(each >= 100_000, "{each}");
    let report = collect(
        &fx.state,
        &fx.parents,
        &Retention {
            max_bytes: Some(each * 2 - 1),
            ..Retention::default()
        },
    )
    .unwrap();
    let removed: Vec<JobId> = report.removed.iter().map(|r| r.id.clone()).collect();
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(removed.contains(&a) && removed.contains(&b));
    assert!(fx.state.job_dir(&c).exists());
}

#[test]
fn a_job_directory_of_a_starting_job_is_not_removed() {
    let fx = fixture();
    // Mark first, then the directory, as `joblet run` does; no record yet.
    let id = JobId::generate();
    let _mark = crate::store::RunningMark::new(&fx.state, &id).unwrap();
    fx.state.create_job(&id).unwrap();
    let report = collect(
        &fx.state,
        &fx.parents,
        &Retention {
            keep: Some(0),
            ..Retention::default()
        },
    )
    .unwrap();
    assert!(report.removed.is_empty());
    assert!(fx.state.job_dir(&id).exists());
}

#[test]
fn recovery_on_the_run_path_does_not_wait_for_a_held_lock() {
    let fx = fixture();
    let id = fx.running_job(dead_supervisor());
    let held = lock(&fx.state, true).unwrap().expect("blocking lock");
    // Another process would hold it; a second open file description conflicts the same way.
    assert!(recover_index(&fx.state, &fx.parents).unwrap().is_empty());
    assert_eq!(fx.state.read_record(&id).unwrap().state, JobState::Running);
    drop(held);
    assert_eq!(recover_index(&fx.state, &fx.parents).unwrap().len(), 1);
}
