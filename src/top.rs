//! `joblet top`: a live table of running jobs with their kernel-level figures.
//!
//! The eBPF probes are loaded by this process and watch every running job's cgroup (found in the
//! state dir's records); figures are what the probes measured since `top` started watching.
//! CPU and memory come from the job's cgroup, read once per refresh for display only.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use joblet_runtime::job::{JobRecord, JobState};
use joblet_runtime::store::StateDir;
use joblet_runtime::telemetry::Telemetry;

/// One job being watched.
struct Watched {
    record: JobRecord,
    /// The job's cgroup CPU time at the previous refresh.
    last_cpu_ns: u64,
}

/// Runs the live view; with `once`, prints one table after one interval and returns.
pub(crate) fn run(state: &StateDir, interval: Duration, once: bool) -> anyhow::Result<()> {
    let telemetry = Telemetry::load().context("failed to load the eBPF probes for top")?;
    let mut watched: BTreeMap<u64, Watched> = BTreeMap::new();
    loop {
        refresh_jobs(state, &telemetry, &mut watched)?;
        let start = Instant::now();
        std::thread::sleep(interval);
        let elapsed = start.elapsed();
        let table = render(&telemetry, &mut watched, elapsed);
        let mut out = std::io::stdout().lock();
        if !once {
            // Home and clear, like top.
            write!(out, "\x1b[H\x1b[2J")?;
        }
        write!(out, "{table}")?;
        out.flush()?;
        if once {
            return Ok(());
        }
    }
}

/// Starts watching new running jobs and forgets ended ones.
fn refresh_jobs(
    state: &StateDir,
    telemetry: &Telemetry,
    watched: &mut BTreeMap<u64, Watched>,
) -> anyhow::Result<()> {
    let records = if state.jobs_dir().exists() {
        state.records()?
    } else {
        Vec::new()
    };
    let running: Vec<JobRecord> = records
        .into_iter()
        .filter(|r| r.effective_state() == JobState::Running && r.runtime.cgroup_id != 0)
        .collect();
    let ids: Vec<u64> = running.iter().map(|r| r.runtime.cgroup_id).collect();
    watched.retain(|id, _| {
        let keep = ids.contains(id);
        if !keep {
            let _ = telemetry.finish(*id);
        }
        keep
    });
    for r in running {
        let id = r.runtime.cgroup_id;
        if let std::collections::btree_map::Entry::Vacant(e) = watched.entry(id)
            && telemetry.watch(id, 0).is_ok()
        {
            let last_cpu_ns = cpu_time(&r).unwrap_or(0);
            e.insert(Watched {
                record: r,
                last_cpu_ns,
            });
        }
    }
    Ok(())
}

fn render(
    telemetry: &Telemetry,
    watched: &mut BTreeMap<u64, Watched>,
    elapsed: Duration,
) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "joblet top - {} running job(s), figures since watching started\n",
        watched.len()
    );
    let _ = writeln!(
        s,
        "{:<16}  {:>6}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>8}  COMMAND",
        "ID", "CPU%", "MEM", "RUNQ p50", "RUNQ p99", "OFF-CPU", "BLK p50", "SWITCHES"
    );
    for (id, w) in watched.iter_mut() {
        let Ok(snap) = telemetry.snapshot(*id) else {
            continue;
        };
        // CPU from the cgroup's accounting: the probes count on-CPU time only when a task is
        // switched out, so a busy loop that keeps its core would show 0% between switches.
        let now_cpu = cpu_time(&w.record).unwrap_or(w.last_cpu_ns);
        let cpu =
            now_cpu.saturating_sub(w.last_cpu_ns) as f64 / elapsed.as_nanos().max(1) as f64 * 100.0;
        w.last_cpu_ns = now_cpu;
        let mem = w
            .record
            .runtime
            .cgroup_path
            .as_deref()
            .and_then(joblet_runtime::cgroup::memory_current)
            .map_or_else(|| "-".to_owned(), bytes);
        // Block I/O the job submitted itself (see `LatencyReport::block_io_ns`), if any.
        let blk = if snap.block_io_ns.count > 0 {
            ns(snap.block_io_ns.p50)
        } else {
            "-".to_owned()
        };
        let _ = writeln!(
            s,
            "{:<16}  {:>6.1}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>8}  {}",
            w.record.id,
            cpu,
            mem,
            ns(snap.runq_wait_ns.p50),
            ns(snap.runq_wait_ns.p99),
            ns(snap.off_cpu_ns.total),
            blk,
            snap.voluntary_switches + snap.involuntary_switches,
            w.record.command.join(" ")
        );
    }
    s
}

fn ns(v: u64) -> String {
    match v {
        0..1_000 => format!("{v}ns"),
        1_000..1_000_000 => format!("{:.1}us", v as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}ms", v as f64 / 1e6),
        _ => format!("{:.2}s", v as f64 / 1e9),
    }
}

fn bytes(v: u64) -> String {
    match v {
        0..1024 => format!("{v}B"),
        1024..1_048_576 => format!("{:.1}K", v as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1}M", v as f64 / 1_048_576.0),
        _ => format!("{:.2}G", v as f64 / 1_073_741_824.0),
    }
}

fn cpu_time(record: &JobRecord) -> Option<u64> {
    joblet_runtime::cgroup::cpu_time_ns(record.runtime.cgroup_path.as_deref()?)
}
