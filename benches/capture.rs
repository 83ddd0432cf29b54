//! Capture benchmark: output of `dd` jobs written into their logs by joblet's io_uring engine,
//! beside two baselines in the same run: a blocking read+write loop per pipe (one thread per
//! job) and tokio (epoll, one thread). Prints a table: throughput (median round and range), the
//! capture side's CPU time per GiB (CPU clock of the measuring process, = getrusage(RUSAGE_SELF):
//! the producers are child processes, io_uring's kernel workers are threads of the process and
//! count) and the throughput relative to the blocking loop and to tokio.
//!
//! `cargo bench --bench capture` (1 GiB per scenario and round, 5 rounds; `JOBLET_BENCH_MIB=2048`
//! for the 2 GiB figure, `JOBLET_BENCH_ROUNDS`, `JOBLET_BENCH_ONLY="1 job"`,
//! `JOBLET_BENCH_VARIANT=<substring>[,<substring>...]`, `JOBLET_BENCH_EXPERIMENTS=1` for
//! alternative engine settings in the same rounds).
//!
//! The machine is a shared, noisy 2-core VM, and each variant disturbed the next one; so:
//! each round runs every variant once, in an order rotated per round; each measurement runs in
//! a fresh process (this binary, re-executed), after an untimed blocking pass over the same
//! amount of data, with the filesystem settled in between (see `prime` and `settle`); the ratio
//! to each baseline is computed per round (the two ran seconds apart) and summarised as the
//! median ratio and its range. docs/PERFORMANCE.md ("Capture") says what each step fixed.

use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use joblet_runtime::capture::{Capture, CaptureConfig};
use joblet_runtime::job::JobId;
use joblet_runtime::store::StateDir;

const PIPE_SIZE: usize = 1 << 20;

fn cpu_time() -> Duration {
    // User + system time of every thread of this process, as getrusage(RUSAGE_SELF) sums it.
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Starts `jobs` dd processes writing `mib_each` MiB each into fresh pipes (1 MiB capacity).
fn producers(jobs: usize, mib_each: usize) -> Vec<(Child, OwnedFd)> {
    (0..jobs)
        .map(|_| {
            let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
            rustix::pipe::fcntl_setpipe_size(&r, PIPE_SIZE).unwrap();
            let child = Command::new("dd")
                .args([
                    "if=/dev/zero",
                    "bs=1M",
                    &format!("count={mib_each}"),
                    "status=none",
                ])
                .stdout(Stdio::from(w))
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn dd");
            (child, r)
        })
        .collect()
}

fn blocking(dir: &Path, pipes: Vec<OwnedFd>) {
    let threads: Vec<_> = pipes
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let path = dir.join(format!("blocking-{i}"));
            std::thread::spawn(move || {
                let mut r = std::fs::File::from(r);
                let mut f = std::fs::File::create(path).unwrap();
                let mut buf = vec![0u8; PIPE_SIZE];
                loop {
                    let n = r.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    f.write_all(&buf[..n]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn tokio_epoll(dir: &Path, pipes: Vec<OwnedFd>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, r) in pipes.into_iter().enumerate() {
            let path = dir.join(format!("tokio-{i}"));
            tasks.push(tokio_task::copy(r, path));
        }
        // All copies run concurrently on the one runtime thread.
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let handles: Vec<_> = tasks.into_iter().map(tokio::task::spawn_local).collect();
                for h in handles {
                    h.await.unwrap();
                }
            })
            .await;
    });
}

/// tokio's file I/O goes through a blocking thread pool; a capture loop written for speed
/// writes the file directly from the task, which is what this does.
mod tokio_task {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    pub(super) async fn copy(r: OwnedFd, path: std::path::PathBuf) {
        let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(r).unwrap();
        let mut f = std::fs::File::create(path).unwrap();
        let mut buf = vec![0u8; PIPE_SIZE];
        loop {
            let n = rx.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            f.write_all(&buf[..n]).unwrap();
        }
    }
}

/// The engine's configuration for a variant: the default, with syncs off for the page-cache
/// variants (like the baselines), and the experiments' changes.
fn joblet_config(variant: &str) -> CaptureConfig {
    let mut config = CaptureConfig::default();
    if !variant.contains("durable") {
        config.sync_every_bytes = u64::MAX;
        config.sync_interval = Duration::from_secs(3600);
        config.sync_on_end = false;
    }
    if variant.contains("inline") {
        config.inline_writes = !config.inline_writes;
    }
    if variant.contains("256 KiB bufs") {
        config.buffers = 32;
        config.buffer_size = 256 << 10;
    }
    if variant.contains("16 x 1 MiB bufs") {
        config.buffers = 16;
    }
    config
}

fn joblet(dir: &Path, pipes: Vec<OwnedFd>, config: CaptureConfig) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
    let config = CaptureConfig {
        buffers: env("JOBLET_BENCH_BUFFERS").map_or(config.buffers, |n| n as u16),
        buffer_size: env("JOBLET_BENCH_BUFFER_KIB").map_or(config.buffer_size, |k| k << 10),
        inline_writes: env("JOBLET_BENCH_INLINE").map_or(config.inline_writes, |v| v == 1),
        ..config
    };
    let cap = Capture::start(config).unwrap();
    let state = StateDir::new(dir);
    let handles: Vec<_> = pipes
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let id = JobId::parse(&format!("j{i}")).unwrap();
            let log = state.create_job(&id).unwrap();
            cap.add(id, Some(r), None, log).unwrap()
        })
        .collect();
    for h in handles {
        let s = h.wait().unwrap();
        assert!(s.write_error.is_none());
    }
}

/// Lets the filesystem finish what the last variant left it, outside the timed part. Its files
/// are deleted; on ext4 mounted with `discard` (as `/` here) freeing blocks that were allocated
/// (the engine's fallocate reserve, synced data; the baselines' never-written delalloc pages
/// have none) issues discards after the next journal commit, from a workqueue (Linux 5.19+), so
/// `syncfs` alone does not wait for them. Unsettled, they landed in the next variant's time:
/// tokio after the engine ran at 0.3-1.0 GB/s and twice the CPU per GiB, against a steady
/// 2.7 GB/s alone. So: `syncfs`, then wait until the device has had no discard and no request
/// in flight for two 100 ms samples (at most 60 s).
fn settle(base: &Path) {
    if let Ok(dir) = std::fs::File::open(base) {
        let _ = rustix::fs::syncfs(&dir);
    }
    let Ok(st) = rustix::fs::stat(base) else {
        return;
    };
    let stat = format!(
        "/sys/dev/block/{}:{}/stat",
        rustix::fs::major(st.st_dev),
        rustix::fs::minor(st.st_dev)
    );
    // (in flight, discards completed): fields 9 and 12 of the block stat file.
    let sample = || -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(&stat).ok()?;
        let f: Vec<u64> = text
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        Some((*f.get(8)?, *f.get(11)?))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = sample();
    let mut quiet = 0;
    while quiet < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = sample();
        let idle = matches!((last, now), (Some(a), Some(b)) if b.0 == 0 && a.1 == b.1);
        quiet = if idle || now.is_none() { quiet + 1 } else { 0 };
        last = now;
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// `1.23x (0.90-1.50)`: the median of per-round ratios and their range.
fn summary(ratios: &[f64]) -> String {
    if ratios.is_empty() {
        return "-".into();
    }
    format!(
        "{:.2}x ({:.2}-{:.2})",
        median(ratios),
        min(ratios),
        max(ratios)
    )
}

/// Runs one measurement in a fresh process (this binary, re-executed), so a variant inherits no
/// thread, ring or allocator state of the one before it, then settles the filesystem.
fn measure_in_child(variant: &str, jobs: usize, mib_each: usize, base: &Path) -> (f64, f64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("--bench")
        .env(CHILD_ENV, format!("{variant}|{jobs}|{mib_each}"))
        .env("JOBLET_BENCH_DIR", base)
        .stderr(Stdio::inherit())
        .output()
        .expect("re-execute the bench");
    assert!(out.status.success(), "{variant}: measurement failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().unwrap());
    let (wall, cpu) = (it.next().unwrap(), it.next().unwrap());
    settle(base);
    (wall, cpu)
}

/// An untimed blocking pass over the same amount of data before every measurement, so each
/// variant starts from the same page allocator state. In this VM (virtio-balloon with free page
/// reporting) freed guest pages go back to the host and the next touch of one costs a host
/// fault: `copy_folio_from_iter_atomic` (the copy into fresh page-cache pages) is 70-80% of all
/// samples in a cold run, and a run after the engine's was slowed for about two runs (tokio
/// 0.84-0.94 s per GiB against 0.49-0.54 s before it, in separate processes).
fn prime(jobs: usize, mib_each: usize, base: &Path) {
    let dir = tempfile::tempdir_in(base).unwrap();
    let (children, pipes): (Vec<_>, Vec<_>) = producers(jobs, mib_each).into_iter().unzip();
    blocking(dir.path(), pipes);
    for mut c in children {
        c.wait().unwrap();
    }
    drop(dir);
    settle(base);
}

/// Set in a re-executed bench process: `variant|jobs|mib_each`, one measurement to run.
const CHILD_ENV: &str = "JOBLET_BENCH_CHILD";

/// The child side of [`measure_in_child`]: prints `wall cpu` in seconds.
fn child(spec: &str, base: &Path) {
    let mut parts = spec.split('|');
    let variant = parts.next().unwrap();
    let jobs: usize = parts.next().unwrap().parse().unwrap();
    let mib_each: usize = parts.next().unwrap().parse().unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    let (children, pipes): (Vec<_>, Vec<_>) = producers(jobs, mib_each).into_iter().unzip();
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    if variant.starts_with("blocking") {
        blocking(dir.path(), pipes);
    } else if variant.starts_with("tokio") {
        tokio_epoll(dir.path(), pipes);
    } else {
        joblet(dir.path(), pipes, joblet_config(variant));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "{variant}: dd failed");
    }
    println!("{wall} {cpu}");
}

fn main() {
    let total_mib: usize = std::env::var("JOBLET_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    // `cargo bench` passes --bench; `cargo test --benches` does not: keep that run tiny.
    let total_mib = if std::env::args().any(|a| a == "--bench") {
        total_mib
    } else {
        64
    };
    let base = std::env::var_os("JOBLET_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child(&spec, &base);
    }
    let rounds: usize = std::env::var("JOBLET_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    println!(
        "{:<10} {:<30} {:>7} {:>13} {:>8} {:>11} {:>17} {:>17}",
        "scenario",
        "capture",
        "GB/s",
        "GB/s min-max",
        "CPU s",
        "CPU s/GiB",
        "vs block (range)",
        "vs tokio (range)"
    );
    let mut variants = vec![
        "blocking read+write",
        "tokio (epoll)",
        "joblet io_uring (page cache)",
        "joblet io_uring (durable)",
    ];
    // Alternatives to the engine's defaults, measured in the same rounds.
    if std::env::var_os("JOBLET_BENCH_EXPERIMENTS").is_some() {
        variants.push("joblet io_uring (toggle inline)");
        variants.push("joblet io_uring (32 x 256 KiB bufs)");
        variants.push("joblet io_uring (16 x 1 MiB bufs)");
    }
    let only = std::env::var("JOBLET_BENCH_ONLY").ok();
    for (scenario, jobs) in [("1 job", 1usize), ("100 jobs", 100)] {
        if only.as_deref().is_some_and(|o| o != scenario) {
            continue;
        }
        let mib_each = (total_mib / jobs).max(1);
        let bytes = (mib_each * jobs) as f64 * (1 << 20) as f64;
        // Rounds interleave the variants so a noisy neighbour hurts them alike; the median
        // round of each is reported.
        let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); variants.len()];
        // Every measurement runs in its own process after an untimed blocking pass (`prime`).
        for round in 0..rounds {
            // Rotate the order too, so no variant always follows the same one.
            for k in 0..variants.len() {
                let v = (k + round) % variants.len();
                let variant = variants[v];
                if std::env::var("JOBLET_BENCH_VARIANT")
                    .is_ok_and(|x| !x.split(',').any(|p| variant.contains(p)))
                {
                    continue;
                }
                prime(jobs, mib_each, &base);
                let (wall, cpu) = measure_in_child(variant, jobs, mib_each, &base);
                results[v].push((wall, cpu));
            }
        }
        // Ratios are taken per round (same round, adjacent in time) and then summarised, so a
        // noisy stretch that slows a whole round cancels out.
        let gbps = |wall: f64| bytes / wall / 1e9;
        for (v, variant) in variants.iter().enumerate() {
            if results[v].is_empty() {
                continue;
            }
            let walls: Vec<f64> = results[v].iter().map(|r| r.0).collect();
            let cpus: Vec<f64> = results[v].iter().map(|r| r.1).collect();
            let ratio_to = |base: usize| -> Vec<f64> {
                results[base]
                    .iter()
                    .zip(&results[v])
                    .map(|(b, x)| b.0 / x.0)
                    .collect()
            };
            let cpu = median(&cpus);
            println!(
                "{:<10} {:<30} {:>7.2} {:>13} {:>8.2} {:>11.3} {:>17} {:>17}",
                scenario,
                variant,
                gbps(median(&walls)),
                format!("{:.2}-{:.2}", gbps(max(&walls)), gbps(min(&walls))),
                cpu,
                cpu / (bytes / (1u64 << 30) as f64),
                summary(&ratio_to(0)),
                summary(&ratio_to(1)),
            );
        }
    }
}
