//! Stopping jobs (signals, timeout, --init) and leaving nothing behind.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::{joblet, privileged, sh};

/// Host processes whose command line contains `marker`.
pub(crate) fn host_processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) && !cmd.contains("joblet") {
                found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn timeout_kills_the_whole_tree_including_daemonized_children() {
    if !privileged() {
        return;
    }
    // A unique sleep duration marks this job's processes on the host.
    let secs = format!("{}.{}", 900 + (std::process::id() % 90), std::process::id());
    let script = format!(
        "setsid sleep {secs} & (sleep {secs} &) ; sh -c 'sleep {secs} & exit 0'; sleep {secs}"
    );
    let t = Instant::now();
    let r = sh(&["--timeout", "700ms"], &script);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(r.report()["timed_out"], true);
    let left = host_processes_with(&format!("sleep {secs}"));
    assert!(left.is_empty(), "processes survived the job: {left:?}");
}

#[test]
fn sigint_is_forwarded_and_a_second_one_kills() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    // First: the job traps SIGINT and exits 7.
    let child = joblet()
        .args(["run", "--report"])
        .arg(&report)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "trap 'exit 7' INT; echo ready; while :; do sleep 0.05; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = interrupt_when_ready(child, 1);
    let r = crate::finish(out, &report);
    assert_eq!(r.code, 7, "{r:#?}");
    assert_eq!(r.report()["stopped"], true);
    assert_eq!(r.report()["state"], "stopped");

    // Second: the job catches SIGINT and carries on; the second Ctrl-C kills it.
    let child = joblet()
        .args(["run", "--report"])
        .arg(&report)
        .args([
            "--grace",
            "60s",
            "--",
            "/bin/sh",
            "-c",
            "trap 'echo caught' INT; echo ready; while :; do sleep 0.05; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let out = interrupt_when_ready(child, 2);
    assert!(t.elapsed() < Duration::from_secs(30));
    let r = crate::finish(out, &report);
    assert_eq!(r.code, 137, "{r:#?}");
    assert!(r.stdout.contains("caught"), "{r:#?}");
}

/// Waits for "ready" on the child's stdout, then sends `n` SIGINTs to joblet, 300 ms apart.
fn interrupt_when_ready(mut child: std::process::Child, n: usize) -> std::process::Output {
    use std::io::{BufRead, BufReader, Read};
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    for _ in 0..n {
        rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let mut out = child.wait_with_output().unwrap();
    out.stdout = rest.into_bytes();
    out
}

#[test]
fn init_forwards_signals_and_reaps_zombies() {
    if !privileged() {
        return;
    }
    // Without --init the shell is PID 1: SIGTERM is dropped by the kernel, so joblet kills it.
    // With --init the shell is PID 2 and dies of the forwarded SIGTERM: 128 + 15.
    let r = sh(
        &["--init", "--timeout", "300ms", "--grace", "20s"],
        "sleep 30",
    );
    assert_eq!(r.code, 143, "{r:#?}");
    // Orphans are reaped by the init: no zombie is left while the command still runs.
    let r = sh(
        &["--init"],
        "sh -c 'sleep 0.1 & exit 0'; sleep 0.5; grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l; echo pid=$$",
    );
    let out = r.ok();
    assert!(out.starts_with("0\n"), "zombies left: {out}");
    assert!(out.contains("pid=2"), "{out}");
}

#[test]
fn no_cgroup_mount_or_process_is_left_after_100_jobs() {
    if !privileged() {
        return;
    }
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    // A unique sleep duration marks this test's background processes on the host.
    let marker = format!("sleep 71.{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for i in 0..100 {
        let report = dir.path().join(format!("{i}.json"));
        let out = joblet()
            .args(["run", "--report"])
            .arg(&report)
            .args(["--memory", "64M", "--pids", "50", "--", "/bin/sh", "-c"])
            .arg(format!("{marker} & true"))
            .output()
            .unwrap();
        let r = crate::finish(out, &report);
        assert_eq!(r.code, 0, "job {i}: {r:#?}");
        ids.push(r.report()["id"].as_str().unwrap().to_owned());
    }
    // Every hierarchy: no directory named after any of those jobs under joblet's parents.
    let mut left = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        for base in [h.path().join("joblet"), h.path()] {
            for id in &ids {
                if base.join(id).exists() {
                    left.push(base.join(id));
                }
            }
        }
    }
    assert!(left.is_empty(), "cgroups left: {left:?}");
    let survivors = host_processes_with(&marker);
    assert!(
        survivors.is_empty(),
        "processes survived their jobs: {survivors:?}"
    );
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    assert_eq!(mounts_before, mounts_after, "the host mount table changed");
}
