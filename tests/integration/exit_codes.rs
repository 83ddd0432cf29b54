//! `joblet run`'s exit codes (docker's convention), its report, and bad input.

use crate::{joblet, privileged, run, sh};

#[test]
fn exit_codes_follow_docker() {
    if !privileged() {
        return;
    }
    assert_eq!(sh(&[], "exit 3").code, 3);
    assert_eq!(sh(&[], "exit 0").code, 0);
    let r = run(&[], &["no-such-command-anywhere"]);
    assert_eq!(r.code, 127, "{r:#?}");
    assert!(
        r.stderr.contains("no-such-command-anywhere"),
        "{}",
        r.stderr
    );
    assert_eq!(run(&[], &["/etc/passwd"]).code, 126);
    assert_eq!(run(&[], &["/etc"]).code, 126);
    // Killed by a signal: 128 + N, and the report says which signal.
    let r = run(&["--timeout", "200ms"], &["sleep", "10"]);
    assert_eq!(r.code, 137);
    assert_eq!(r.report()["signal"], 9);
    assert_eq!(r.report()["exit_code"], serde_json::Value::Null);
}

#[test]
fn report_has_every_documented_field() {
    if !privileged() {
        return;
    }
    let r = sh(
        &[
            "--name",
            "nightly",
            "--label",
            "team=infra",
            "--label",
            "tier=2",
            "--memory",
            "64M",
        ],
        "echo hi",
    );
    assert_eq!(r.ok(), "hi\n");
    let rep = r.report();
    for key in [
        "id",
        "command",
        "exit_code",
        "signal",
        "oom_killed",
        "timed_out",
        "wall_ns",
        "cpu_user_ns",
        "cpu_system_ns",
        "memory_peak_bytes",
        "limits",
        "name",
        "labels",
    ] {
        assert!(rep.get(key).is_some(), "{key} missing from {rep:#}");
    }
    assert_eq!(rep["name"], "nightly");
    assert_eq!(rep["labels"]["team"], "infra");
    assert_eq!(
        rep["command"],
        serde_json::json!(["/bin/sh", "-c", "echo hi"])
    );
    assert_eq!(rep["exit_code"], 0);
    assert_eq!(rep["state"], "exited");
    assert!(rep["wall_ns"].as_u64().unwrap() > 0);
    assert!(rep["runtime"]["cgroup_id"].as_u64().is_some());
}

#[test]
fn bad_options_fail_with_one_line_and_125_before_spawning() {
    // Parsing errors need no privileges; host checks (cores, rootfs) run as root only.
    let cases: &[(&[&str], &str)] = &[
        (&["--memory", "12Q"], "--memory"),
        (&["--cpu", "-5"], "--cpu"),
        (&["--cap-add", "CAP_FLY"], "capability"),
        (&["--timeout", "soon"], "--timeout"),
        (&["--bind", "relative:/x"], "--bind"),
        (&["--user", "root"], "--user"),
        (&["--io-read-bps", "sda=1M"], "--io-read-bps"),
    ];
    let root = rustix::process::geteuid().is_root();
    let host: &[(&[&str], &str)] = &[
        (&["--cores", "99"], "--cores"),
        (&["--rootfs", "/no/such/dir"], "--rootfs"),
    ];
    for (args, needle) in cases.iter().chain(host.iter().filter(|_| root)) {
        let marker = crate::unique();
        let out = joblet()
            .arg("run")
            .args(*args)
            .args(["--", "/bin/sh", "-c", &format!("echo {marker}")])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: not one line: {stderr}"
        );
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(&marker),
            "{args:?} ran the job"
        );
    }
}

#[test]
fn help_documents_every_option() {
    let out = joblet().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--memory",
        "--cpu",
        "--cores",
        "--pids",
        "--io-read-bps",
        "--io-write-bps",
        "--timeout",
        "--network",
        "--rootfs",
        "--bind",
        "--workdir",
        "--tmp-size",
        "--hostname",
        "--user",
        "--cap-add",
        "--no-seccomp",
        "--init",
        "--interactive",
        "--env",
        "--name",
        "--label",
        "--report",
    ] {
        assert!(help.contains(opt), "{opt} not in run --help");
    }
    let out = joblet().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("run"));
}

#[test]
fn trace_adds_a_latency_breakdown_to_the_report() {
    if !joblet_runtime::testsupport::privileged("eBPF (raw tracepoints, ring buffer, BTF)", || {
        std::path::Path::new("/sys/kernel/btf/vmlinux")
            .exists()
            .then_some(())
            .ok_or_else(|| "no BTF at /sys/kernel/btf/vmlinux".to_owned())
    }) {
        return;
    }
    let r = run(&["--trace"], &["sleep", "0.2"]);
    r.ok();
    let lat = &r.report()["latency"];
    for key in [
        "spawn_to_exec_ns",
        "exec_to_exit_ns",
        "runq_wait_ns",
        "off_cpu_ns",
    ] {
        for field in ["total", "count", "p50", "p90", "p99", "max", "buckets"] {
            assert!(
                lat[key].get(field).is_some(),
                "latency.{key}.{field} missing: {lat:#}"
            );
        }
    }
    for key in [
        "on_cpu_ns",
        "voluntary_switches",
        "involuntary_switches",
        "events_lost",
    ] {
        assert!(lat[key].is_u64(), "latency.{key} missing: {lat:#}");
    }
    let slow = joblet_runtime::testsupport::timeout(std::time::Duration::from_millis(1)).as_millis()
        as u64;
    let off = lat["off_cpu_ns"]["total"].as_u64().unwrap();
    // sleep 0.2 spends ~200 ms off-CPU (within 10%, more under emulation in the VM lane).
    assert!(
        off >= 180_000_000 && off <= 220_000_000 * slow,
        "off-CPU {off} ns for a 200 ms sleep"
    );
    assert_eq!(lat["events_lost"], 0);
    assert!(
        r.stderr.contains("off-CPU"),
        "no breakdown printed: {}",
        r.stderr
    );
}
