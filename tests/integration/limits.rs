//! Every resource limit, enforced: each test pushes a job past its limit.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::{privileged, run, sh};

#[test]
fn memory_limit_oom_kills_the_job() {
    if !privileged() {
        return;
    }
    let r = run(
        &["--memory", "32M"],
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=96M", "count=1"],
    );
    let rep = r.report();
    assert_eq!(rep["oom_killed"], true, "{r:#?}");
    assert_eq!(rep["signal"], 9);
    assert_eq!(rep["exit_code"], serde_json::Value::Null);
    assert_eq!(r.code, 137);
    let peak = rep["memory_peak_bytes"]
        .as_u64()
        .expect("peak memory reported");
    assert!(peak <= 33 << 20, "peak {peak} above the limit");
    assert_eq!(rep["limits"]["memory_bytes"], 32 << 20);

    // Within the limit: not killed, peak reported.
    let r = run(
        &["--memory", "64M"],
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=16M", "count=1"],
    );
    r.ok();
    assert_eq!(r.report()["oom_killed"], false);
    assert!(
        r.report()["memory_peak_bytes"].as_u64().unwrap() >= 16 << 20,
        "{:#?}",
        r.report()
    );
}

#[test]
fn cpu_percent_caps_cpu_time() {
    if !privileged() {
        return;
    }
    let r = sh(&["--cpu", "20", "--timeout", "2s"], "while :; do :; done");
    let rep = r.report();
    assert_eq!(rep["timed_out"], true);
    let cpu = rep["cpu_user_ns"].as_u64().unwrap() + rep["cpu_system_ns"].as_u64().unwrap();
    let wall = rep["wall_ns"].as_u64().unwrap();
    let share = cpu as f64 / wall as f64;
    // 20% of one core, with slack for the CFS period granularity.
    assert!(
        share > 0.05 && share < 0.3,
        "used {share:.2} of a core with --cpu 20"
    );
}

#[test]
fn cores_pin_the_job() {
    if !privileged() {
        return;
    }
    let r = sh(
        &["--cores", "0"],
        "grep Cpus_allowed_list /proc/self/status; nproc",
    );
    let out = r.ok();
    assert!(out.contains("Cpus_allowed_list:\t0\n"), "{out}");
    assert_eq!(out.lines().last(), Some("1"));
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    if !privileged() {
        return;
    }
    // perl is essential on Debian; it reports how many forks succeeded.
    let bomb = "my $n = 0; for (1..200) { my $p = fork; last unless defined $p; if ($p == 0) { sleep 5; exit 0 } $n++ } print \"$n\\n\"; kill 'KILL', -$$; exit 0";
    let r = run(&["--pids", "10", "--timeout", "20s"], &["perl", "-e", bomb]);
    let n: u32 = r.stdout.trim().parse().unwrap_or_else(|_| panic!("{r:#?}"));
    assert!(n < 10 && n > 0, "forked {n} processes with --pids 10");
}

/// A directory on a real block device, and that device as `MAJ:MIN` (the whole disk).
/// Candidates in order: `JOBLET_TEST_BLOCK_DIR`, the target dir, `/var/tmp`, `/` (the VM
/// lane's root is an ext4 disk while its host paths are 9p/overlay mounts).
fn block_dir() -> Option<(PathBuf, String)> {
    let candidates = std::env::var_os("JOBLET_TEST_BLOCK_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
            "/var/tmp".into(),
            "/".into(),
        ]);
    candidates
        .filter(|d| d.is_dir())
        .find_map(|d| block_device_of(&d).map(|dev| (d, dev)))
}

fn block_device_of(dir: &std::path::Path) -> Option<String> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.exists() {
        return None;
    }
    // A partition: limit its disk.
    let disk = if sys.join("partition").exists() {
        std::fs::read_to_string(sys.join("../dev"))
            .ok()?
            .trim()
            .to_owned()
    } else {
        format!("{major}:{minor}")
    };
    Some(disk)
}

#[test]
fn io_bandwidth_limits_throttle_direct_io() {
    let mut found = None;
    if !joblet_runtime::testsupport::privileged(
        "a block device under the test dir (set JOBLET_TEST_BLOCK_DIR)",
        || {
            found = block_dir();
            found
                .as_ref()
                .map(drop)
                .ok_or_else(|| "the test dir is not on a block device".to_owned())
        },
    ) {
        return;
    }
    let (dir, disk) = found.unwrap();
    let work = tempfile::tempdir_in(&dir).unwrap();
    let data = work.path().join("data");
    std::fs::write(&data, vec![7u8; 4 << 20]).unwrap();
    let bind = format!("{}:/data:rw", work.path().display());
    let read = "dd if=/data/data of=/dev/null bs=256k iflag=direct 2>/dev/null";
    let write = "dd if=/dev/zero of=/data/out bs=256k count=16 oflag=direct 2>/dev/null";

    let timed = |args: &[&str], script: &str| {
        let t = Instant::now();
        sh(args, script).ok();
        t.elapsed()
    };
    let free = timed(&["--bind", &bind, "--user", "0"], read);
    let limit = format!("{disk}=1M");
    let slow = timed(
        &["--bind", &bind, "--user", "0", "--io-read-bps", &limit],
        read,
    );
    // 4 MiB at 1 MiB/s: about 4 s (the throttle allows a small initial burst).
    assert!(
        slow >= Duration::from_millis(2500),
        "read of 4 MiB at 1 MiB/s took {slow:?} (unlimited: {free:?})"
    );
    let slow = timed(
        &["--bind", &bind, "--user", "0", "--io-write-bps", &limit],
        write,
    );
    assert!(
        slow >= Duration::from_millis(2500),
        "write of 4 MiB at 1 MiB/s took {slow:?}"
    );
}

#[test]
fn timeout_stops_the_job() {
    if !privileged() {
        return;
    }
    let t = Instant::now();
    let r = run(&["--timeout", "500ms"], &["sleep", "30"]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let rep = r.report();
    assert_eq!(rep["timed_out"], true);
    assert_eq!(rep["state"], "stopped");
    assert_eq!(
        rep["signal"], 9,
        "sleep as PID 1 ignores SIGTERM, so joblet kills it: {rep:#}"
    );
    assert!(rep["wall_ns"].as_u64().unwrap() >= 500_000_000);
}
