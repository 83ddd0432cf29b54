//! Spawns jobs back to back for profiling the spawn path (`perf record`): the default
//! sandbox, pooled cgroups and the root template, stdio on `/dev/null`, like the `pooled` mode
//! of `benches/spawn.rs`.
//!
//! Run as root: `cargo run --release -p joblet-runtime --example spawn-loop -- PROGRAM [SECONDS]`.
//! With `JOBLET_TRACE=1` the eBPF probes watch every job, like the `traced` mode;
//! `JOBLET_TRACE=PATH` loads another build of `ebpf/joblet.bpf.c` instead, to compare two.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use joblet_runtime::job::{JobId, JobSpec, Limits, Sandbox};
use joblet_runtime::{ExitStatus, Runtime, RuntimeConfig, Stdio, StopReason};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let program = args.next().ok_or("usage: spawn-loop PROGRAM [SECONDS]")?;
    let secs: f64 = match args.next() {
        Some(s) => s.to_str().ok_or("SECONDS: not UTF-8")?.parse()?,
        None => 3.0,
    };
    let state = std::env::temp_dir().join(format!("joblet-spawn-loop-{}", std::process::id()));
    let mut rt = Runtime::new(&RuntimeConfig {
        state_dir: state.clone(),
        cgroup_pool: 8,
        ..RuntimeConfig::default()
    })?;
    use joblet_runtime::telemetry::Telemetry;
    let telemetry = match std::env::var_os("JOBLET_TRACE") {
        Some(v) if v == "1" => Some(Telemetry::load()?),
        Some(v) if v != "0" && !v.is_empty() => Some(Telemetry::load_object(&std::fs::read(&v)?)?),
        _ => None,
    }
    .map(std::sync::Arc::new);
    // JOBLET_TRACE_UNUSED=1: the probes run, but the runtime neither marks spawns nor reads
    // reports (their userspace side), to tell the two costs apart.
    let unused = std::env::var_os("JOBLET_TRACE_UNUSED").is_some_and(|v| v == "1");
    if let Some(t) = telemetry.as_ref().filter(|_| !unused) {
        rt.set_telemetry(t.clone());
    }
    let devnull: OwnedFd = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")?
        .into();
    let busy0 = joblet_runtime::testsupport::host_busy_ticks()?;
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut jobs = 0u64;
    let mut latencies = Vec::new();
    // Per phase: Runtime::spawn, waiting for the exit, Job::finish.
    let mut phases: [Vec<Duration>; 3] = Default::default();
    // Sums over the measured jobs: voluntary and involuntary switches, run-queue waits, sleeps.
    let mut sched = [0u64; 4];
    while Instant::now() < until {
        let started = Instant::now();
        let spec = JobSpec {
            id: JobId::generate(),
            name: None,
            labels: Default::default(),
            command: vec![OsString::from(&program)],
            env: Vec::new(),
            limits: Limits::default(),
            sandbox: Sandbox::default(),
        };
        let stdio = Stdio {
            stdin: None,
            stdout: devnull.try_clone()?,
            stderr: devnull.try_clone()?,
        };
        let job = rt.spawn(&spec, stdio)?;
        let spawned = Instant::now();
        let status = job.wait()?;
        let exited = Instant::now();
        if status != ExitStatus::Code(0) {
            return Err(format!("job exited with {status:?}").into());
        }
        let record = job.finish(status, StopReason::default());
        if let Some(e) = record.error {
            return Err(format!("finish: {e}").into());
        }
        if let Some(l) = &record.latency {
            let counts = [
                l.voluntary_switches,
                l.involuntary_switches,
                l.runq_wait_ns.count,
                l.off_cpu_ns.count,
            ];
            for (sum, n) in sched.iter_mut().zip(counts) {
                *sum += n;
            }
        }
        jobs += 1;
        let done = Instant::now();
        latencies.push(done - started);
        phases[0].push(spawned - started);
        phases[1].push(exited - spawned);
        phases[2].push(done - exited);
    }
    let p50 = median(&mut latencies);
    let dt = t0.elapsed().as_secs_f64();
    let busy = joblet_runtime::testsupport::host_busy_ticks()? - busy0;
    println!(
        "{jobs} jobs in {dt:.2} s: {:.0} jobs/s, {:.0} us of host CPU per job, p50 {:.1} us",
        jobs as f64 / dt,
        busy as f64 * 1e6 / TICKS_PER_SEC / jobs.max(1) as f64,
        p50.as_secs_f64() * 1e6
    );
    let [spawn, wait, finish] = phases.map(|mut p| median(&mut p).as_secs_f64() * 1e6);
    println!("  p50 per phase: spawn {spawn:.1} us, wait {wait:.1} us, finish {finish:.1} us");
    if sched.iter().any(|&n| n > 0) {
        let [vol, invol, runq, off] = sched.map(|n| n as f64 / jobs.max(1) as f64);
        println!(
            "  job tasks per job: {vol:.2} voluntary + {invol:.2} involuntary switches, \
             {runq:.2} run-queue waits, {off:.2} sleeps"
        );
    }
    drop(rt);
    // Per-program BPF run time, when kernel.bpf_stats_enabled is 1.
    let mut total_ns = 0;
    for p in telemetry
        .iter()
        .flat_map(|t| t.program_stats().into_iter().flatten())
    {
        if p.run_count > 0 {
            total_ns += p.run_time_ns;
            println!(
                "  bpf {:<20} {:>5.2} runs/job {:>5} ns/run",
                p.tracepoint,
                p.run_count as f64 / jobs.max(1) as f64,
                p.run_time_ns / p.run_count
            );
        }
    }
    if total_ns > 0 {
        println!(
            "  bpf total {:.2} us/job",
            total_ns as f64 / 1e3 / jobs.max(1) as f64
        );
    }
    std::fs::remove_dir_all(&state)?;
    Ok(())
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// `USER_HZ`: the unit of /proc/stat on Linux.
const TICKS_PER_SEC: f64 = 100.0;
