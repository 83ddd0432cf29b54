//! The state dir from the CLI: every `joblet run` is stored (record + log), and `ps`, `logs`,
//! `inspect` and `top` read it, in other processes, while jobs run.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::privileged;

fn joblet_in(state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_joblet"));
    c.env("JOBLET_STATE_DIR", state).stdin(Stdio::null());
    c
}

fn only_job_id(state: &Path) -> String {
    let out = joblet_in(state)
        .args(["ps", "--all", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ps --json is JSON");
    let jobs = v.as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{v:#}");
    jobs[0]["id"].as_str().unwrap().to_owned()
}

#[test]
fn output_is_stored_exactly_and_ps_logs_inspect_read_it() {
    if !privileged() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    // Every byte value on stdout, a line on stderr, and no trailing newline.
    let script = r#"i=0; while [ $i -lt 256 ]; do printf "\\$(printf %o $i)"; i=$((i+1)); done; echo oops >&2; printf end"#;
    let run = joblet_in(state.path())
        .args(["run", "--name", "bytes", "--", "/bin/bash", "-c", script])
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let mut expected: Vec<u8> = (0u8..=255).collect();
    expected.extend_from_slice(b"end");
    assert_eq!(run.stdout, expected, "what the terminal showed");
    assert_eq!(run.stderr, b"oops\n");

    let id = only_job_id(state.path());
    let logs = joblet_in(state.path())
        .args(["logs", &id])
        .output()
        .unwrap();
    assert!(logs.status.success());
    assert_eq!(
        logs.stdout, run.stdout,
        "logs replays exactly what the terminal showed"
    );
    assert_eq!(logs.stderr, run.stderr);
    let only_err = joblet_in(state.path())
        .args(["logs", "--stream", "stderr", &id[..6]])
        .output()
        .unwrap();
    assert_eq!(only_err.stdout, b"");
    assert_eq!(only_err.stderr, b"oops\n");

    let ps = joblet_in(state.path())
        .args(["ps", "--all"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&ps.stdout);
    assert!(table.contains(&id) && table.contains("exited"), "{table}");
    assert!(
        !String::from_utf8_lossy(&joblet_in(state.path()).arg("ps").output().unwrap().stdout)
            .contains(&id),
        "ps without --all lists running jobs only"
    );

    let inspect = joblet_in(state.path())
        .args(["inspect", "--json", &id])
        .output()
        .unwrap();
    let rec: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(rec["name"], "bytes");
    assert_eq!(rec["state"], "exited");
    assert_eq!(rec["output"]["stdout_bytes"], 259);
    assert_eq!(rec["output"]["lost_bytes"], 0);
    let missing = joblet_in(state.path())
        .args(["inspect", "nosuchjob"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(125));
}

#[test]
fn followers_attaching_at_any_moment_see_every_line_once_in_order() {
    if !privileged() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let n = 20_000;
    let mut job = joblet_in(state.path())
        .args([
            "run",
            "--",
            "/bin/sh",
            "-c",
            &format!("i=1; while [ $i -le {n} ]; do echo $i; i=$((i+1)); done"),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the job's record, then attach followers while it writes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let out = joblet_in(state.path())
            .args(["ps", "--all", "--json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(id) = v
            .as_array()
            .and_then(|a| a.first())
            .and_then(|j| j["id"].as_str())
        {
            break id.to_owned();
        }
        assert!(Instant::now() < deadline, "the job never showed up in ps");
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut followers = Vec::new();
    for delay_ms in [0u64, 3, 10, 30] {
        std::thread::sleep(Duration::from_millis(delay_ms));
        followers.push(
            joblet_in(state.path())
                .args(["logs", "-f", &id])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    assert!(job.wait().unwrap().success());
    for mut f in followers {
        let mut text = String::new();
        f.stdout.take().unwrap().read_to_string(&mut text).unwrap();
        assert!(f.wait().unwrap().success());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), n, "a follower lost or duplicated lines");
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l.parse::<usize>().ok(), Some(i + 1), "line {i} is {l:?}");
        }
    }
}

#[test]
fn top_shows_running_jobs_with_kernel_figures() {
    if !joblet_runtime::testsupport::privileged("eBPF (raw tracepoints, ring buffer, BTF)", || {
        Path::new("/sys/kernel/btf/vmlinux")
            .exists()
            .then_some(())
            .ok_or_else(|| "no BTF".to_owned())
    }) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let mut job = joblet_in(state.path())
        .args([
            "run",
            "--timeout",
            "20s",
            "--",
            "/bin/sh",
            "-c",
            "echo up; while :; do :; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 3];
    job.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    let top = joblet_in(state.path())
        .args(["top", "--once", "--interval", "500ms"])
        .output()
        .unwrap();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(job.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    );
    job.wait().unwrap();
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "{top:?}");
    let id = only_job_id(state.path());
    let row = text
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("job not in top: {text}"));
    let cpu: f64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(cpu > 10.0, "a busy loop shows CPU use: {row}");
    assert_eq!(
        row.split_whitespace().nth(6),
        Some("-"),
        "a busy loop submits no block I/O: {row}"
    );
}

#[test]
fn a_job_dies_with_a_killed_joblet_run_and_is_shown_as_failed() {
    if !privileged() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    // A killed supervisor cannot remove its job's cgroups: this guard removes them (empty, the
    // job is gone), even when an assertion below fails.
    let _cleanup = RemoveJobCgroups(state.path().to_owned());
    let marker = format!("79.{}", std::process::id());
    let (run, id) = crate::gc::start_job(state.path(), &marker);
    // The job died with its supervisor (PR_SET_PDEATHSIG): no process of it is left.
    crate::gc::kill_supervisor(run, &marker);
    let ps = joblet_in(state.path())
        .args(["ps", "--all"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&ps.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("failed")),
        "{table}"
    );
    // Following its log does not hang: it prints what is stored and says why it stops.
    let t = Instant::now();
    let logs = joblet_in(state.path())
        .args(["logs", "-f", &id])
        .output()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(logs.stdout, b"started\n");
    assert!(
        String::from_utf8_lossy(&logs.stderr).contains("supervisor"),
        "{logs:?}"
    );
    assert_eq!(logs.status.code(), Some(125));
}

/// Removes, on drop, the cgroups of every job in a state dir (waiting briefly for the kernel to
/// release exited tasks).
pub(crate) struct RemoveJobCgroups(pub(crate) std::path::PathBuf);

impl Drop for RemoveJobCgroups {
    fn drop(&mut self) {
        let ids = std::fs::read_dir(self.0.join("jobs"))
            .into_iter()
            .flatten()
            .flatten();
        for id in ids.map(|e| e.file_name()) {
            for h in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let dir = h.path().join("joblet").join(&id);
                let deadline = Instant::now() + Duration::from_secs(5);
                while dir.exists()
                    && std::fs::remove_dir(&dir).is_err()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}
