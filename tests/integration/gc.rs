//! Recovery after a killed supervisor and retention, for real: `joblet run`s SIGKILLed mid-job
//! leave a `running` record and their cgroups; the next `joblet run` or `joblet gc` cleans them
//! up, without touching a job whose `joblet run` is alive.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use joblet_runtime::job::{JobId, JobSpec, Supervisor};
use joblet_runtime::store::{RunningEntry, StateDir};

use crate::privileged;
use crate::state::RemoveJobCgroups;

fn joblet_in(state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_joblet"));
    c.env("JOBLET_STATE_DIR", state).stdin(Stdio::null());
    c
}

/// The job's cgroup directories in every hierarchy.
/// The job's cgroup directories: `/sys/fs/cgroup/joblet/ID` on a pure v2 host,
/// `/sys/fs/cgroup/HIERARCHY/joblet/ID` on a hybrid one.
fn cgroups_of(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|h| h.path().join("joblet").join(id))
        .chain([root.join("joblet").join(id)])
        .filter(|p| p.is_dir())
        .collect()
}

fn record(state: &Path, id: &str) -> serde_json::Value {
    let bytes = std::fs::read(state.join("jobs").join(id).join("record.json")).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn ps_state(state: &Path, id: &str) -> String {
    let out = joblet_in(state)
        .args(["ps", "--all", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = v
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in ps: {v:#}"));
    // ps shows the state the record has, or `failed` for a dead supervisor's `running` one.
    let table = joblet_in(state).args(["ps", "--all"]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{table}"));
    let shown = row.split_whitespace().nth(1).unwrap().to_owned();
    assert!(job["state"].is_string());
    shown
}

/// Starts `joblet run -- sh -c "echo started; sleep <marker>"` and returns it, with the job id,
/// once its `running` record is written.
#[expect(
    clippy::zombie_processes,
    reason = "the child is returned to the caller, which waits for it; a panic ends the test"
)]
pub(crate) fn start_job(state: &Path, marker: &str) -> (Child, String) {
    let before: Vec<String> = job_ids(state);
    let mut run = joblet_in(state)
        .args([
            "run",
            // sh as PID 1 catches SIGINT: a stop would wait out the default 10 s grace.
            "--grace",
            "100ms",
            "--",
            "/bin/sh",
            "-c",
            &format!("echo started; sleep {marker}"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    run.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"started\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let new: Vec<String> = job_ids(state)
            .into_iter()
            .filter(|i| !before.contains(i))
            .collect();
        if let [id] = new.as_slice()
            && state.join("jobs").join(id).join("record.json").exists()
        {
            return (run, id.clone());
        }
        assert!(Instant::now() < deadline, "no record was written");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn job_ids(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("jobs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// SIGKILLs a `joblet run` and waits for its job to die with it (PR_SET_PDEATHSIG).
pub(crate) fn kill_supervisor(mut run: Child, marker: &str) {
    run.kill().unwrap();
    run.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !crate::lifecycle::host_processes_with(marker).is_empty() {
        assert!(Instant::now() < deadline, "the job outlived its joblet run");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A sleep duration no other process on the host has: it marks a test's job processes.
fn marker(k: u32) -> String {
    format!("{}.{}{k}", 600 + k, std::process::id())
}

#[test]
fn the_next_joblet_run_recovers_a_killed_runs_job() {
    if !privileged() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let _cleanup = RemoveJobCgroups(state.path().to_owned());
    let marker = marker(1);
    let (run, id) = start_job(state.path(), &marker);
    kill_supervisor(run, &marker);

    // What a killed supervisor leaves: the `running` record and the job's cgroups.
    assert_eq!(record(state.path(), &id)["state"], "running");
    assert!(!cgroups_of(&id).is_empty(), "the cgroups were left behind");
    assert_eq!(ps_state(state.path(), &id), "failed");

    let next = joblet_in(state.path())
        .args(["run", "--", "/bin/true"])
        .output()
        .unwrap();
    assert!(next.status.success(), "{next:?}");
    assert!(cgroups_of(&id).is_empty(), "{:?}", cgroups_of(&id));
    let r = record(state.path(), &id);
    assert_eq!(r["state"], "failed");
    assert!(r["error"].as_str().unwrap().contains("supervisor"), "{r:#}");
    assert_eq!(r["output"]["stdout_bytes"], 8);
    assert_eq!(ps_state(state.path(), &id), "failed");
    assert_eq!(
        std::fs::read_dir(state.path().join("running"))
            .unwrap()
            .count(),
        0,
        "the running index is empty once both runs are done"
    );
    // Its log is complete now: following it ends at once, successfully.
    let logs = joblet_in(state.path())
        .args(["logs", "-f", &id])
        .output()
        .unwrap();
    assert!(logs.status.success(), "{logs:?}");
    assert_eq!(logs.stdout, b"started\n");
}

#[test]
fn gc_recovers_dead_runs_jobs_and_leaves_a_live_runs_job_alone() {
    if !privileged() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let _cleanup = RemoveJobCgroups(state.path().to_owned());
    let live_marker = marker(2);
    let (mut live, live_id) = start_job(state.path(), &live_marker);
    let dead_marker = marker(3);
    let (dead, dead_id) = start_job(state.path(), &dead_marker);
    kill_supervisor(dead, &dead_marker);
    let live_cgroups = cgroups_of(&live_id);
    assert!(!live_cgroups.is_empty());
    assert!(!cgroups_of(&dead_id).is_empty());

    let gc = joblet_in(state.path())
        .args(["gc", "--json"])
        .output()
        .unwrap();
    assert!(gc.status.success(), "{gc:?}");
    let report: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    let recovered = report["recovered"].as_array().unwrap();
    assert_eq!(recovered.len(), 1, "{report:#}");
    assert_eq!(recovered[0]["id"], dead_id.as_str());
    assert!(cgroups_of(&dead_id).is_empty());
    assert_eq!(record(state.path(), &dead_id)["state"], "failed");

    // Retention that would remove everything ended: the dead run's job goes, the live one stays.
    let gc = joblet_in(state.path())
        .args([
            "gc",
            "--json",
            "--keep",
            "0",
            "--older-than",
            "0s",
            "--max-size",
            "0",
        ])
        .output()
        .unwrap();
    assert!(gc.status.success(), "{gc:?}");
    let report: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    let removed: Vec<&str> = report["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(removed, [dead_id.as_str()], "{report:#}");
    assert!(!state.path().join("jobs").join(&dead_id).exists());

    // The live job was not touched by either: still running, same cgroups, same process.
    assert_eq!(record(state.path(), &live_id)["state"], "running");
    assert_eq!(ps_state(state.path(), &live_id), "running");
    assert_eq!(cgroups_of(&live_id), live_cgroups);
    assert!(!crate::lifecycle::host_processes_with(&live_marker).is_empty());
    assert!(live.try_wait().unwrap().is_none());

    // It still ends normally.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(live.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    live.wait().unwrap();
    let r = record(state.path(), &live_id);
    assert_eq!(r["state"], "stopped", "{r:#}");
    assert!(cgroups_of(&live_id).is_empty());
}

/// A daemon-style supervisor (no parent-death signal) whose jobs outlive it: recovery kills the
/// processes left in the job's own cgroup, and nothing else.
#[test]
fn recovery_kills_what_is_left_in_a_dead_supervisors_job_cgroup() {
    if !privileged() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::new(tmp.path().join("state"));
    let runtime = joblet_runtime::Runtime::new(&joblet_runtime::RuntimeConfig {
        state_dir: state.root().to_owned(),
        root_template: false,
        kill_on_supervisor_exit: false,
        ..Default::default()
    })
    .unwrap();
    let spec = JobSpec {
        id: JobId::generate(),
        name: None,
        labels: Default::default(),
        command: vec!["/bin/sleep".into(), "60".into()],
        env: Vec::new(),
        limits: Default::default(),
        sandbox: Default::default(),
    };
    let _cleanup = RemoveJobCgroups(state.root().to_owned());
    // A host process outside joblet's cgroups, which recovery must not kill.
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    let dead = dead_supervisor();
    let entry = RunningEntry {
        id: spec.id.clone(),
        supervisor: dead,
    };
    state.mark_running(&entry).unwrap();
    drop(state.create_job(&spec.id).unwrap());
    let null = || std::fs::File::create("/dev/null").unwrap().into();
    let job = runtime
        .spawn(
            &spec,
            joblet_runtime::Stdio {
                stdin: None,
                stdout: null(),
                stderr: null(),
            },
        )
        .unwrap();
    let mut r = job.record().clone();
    r.runtime.supervisor = Some(dead);
    state.write_record(&r).unwrap();
    assert!(!cgroups_of(spec.id.as_str()).is_empty());

    let recovered =
        joblet_runtime::gc::recover_index(&state, &runtime.cgroups().parents()).unwrap();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert!(recovered[0].killed >= 1, "{recovered:?}");
    assert_eq!(recovered[0].error, None);
    let status = job.wait().unwrap();
    assert_eq!(
        status,
        joblet_runtime::ExitStatus::Signal(libc::SIGKILL),
        "the job was killed"
    );
    assert!(cgroups_of(spec.id.as_str()).is_empty());
    assert!(bystander.try_wait().unwrap().is_none(), "a bystander died");
    bystander.kill().unwrap();
    bystander.wait().unwrap();
    let stored = state.read_record(&spec.id).unwrap();
    assert_eq!(stored.state, joblet_runtime::job::JobState::Failed);
    drop(job);
}

/// A supervisor that is certainly dead: a reaped child's pid and start time.
fn dead_supervisor() -> Supervisor {
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
    let ticks = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(19);
    let sup = Supervisor {
        pid: child.id(),
        start_ticks: ticks.unwrap().parse().unwrap(),
    };
    assert!(sup.is_alive());
    child.kill().unwrap();
    child.wait().unwrap();
    sup
}
