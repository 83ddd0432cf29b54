//! Measures the probes' cost: BPF run time per program (with `kernel.bpf_stats_enabled=1`,
//! restored afterwards), ring buffer drops and reader wakeups under a burst of short processes in
//! a watched cgroup, and the burst's spawn rate with the probes loaded vs not loaded.
//!
//! Run as root: `cargo run --release -p joblet-runtime --example telemetry-bench -- [SPAWNS]
//! [OBJECT]` where OBJECT is another build of `ebpf/joblet.bpf.c` (default: the embedded one).
//! Figures and their interpretation: docs/perf-telemetry.md.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use joblet_runtime::telemetry::{ProgramStats, Telemetry, monotonic_ns};

/// anyhow is not a dependency of the runtime crate; a boxed error is enough here.
type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Restores `kernel.bpf_stats_enabled` on drop.
struct StatsEnabled(String);

impl StatsEnabled {
    fn enable() -> Result<StatsEnabled> {
        let old = std::fs::read_to_string(STATS_SYSCTL)?;
        std::fs::write(STATS_SYSCTL, "1")?;
        Ok(StatsEnabled(old.trim().to_owned()))
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, &self.0) {
            eprintln!("failed to restore {STATS_SYSCTL} to {}: {e}", self.0);
        }
    }
}

/// A cgroup v2 under joblet's parent, removed on drop.
struct Cgroup {
    path: PathBuf,
    id: u64,
}

impl Cgroup {
    fn new() -> Result<Cgroup> {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.max.depth").exists())
            .ok_or("no cgroup v2 hierarchy")?;
        let path = root
            .join("joblet")
            .join(format!("telemetry-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        let id = std::fs::metadata(&path)?.ino();
        Ok(Cgroup { path, id })
    }

    /// Runs `spawns` `/bin/true` from a shell inside the cgroup; returns the spawn rate (1/s).
    fn burst(&self, spawns: u32) -> Result<f64> {
        let script = format!(
            "echo $$ > {}; i=0; while [ $i -lt {spawns} ]; do /bin/true; i=$((i+1)); done",
            self.path.join("cgroup.procs").display()
        );
        let start = Instant::now();
        let status = Command::new("/bin/sh").args(["-c", &script]).status()?;
        let secs = start.elapsed().as_secs_f64();
        if !status.success() {
            return Err(format!("burst failed: {status}").into());
        }
        Ok(f64::from(spawns) / secs)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        eprintln!("failed to remove {}", self.path.display());
    }
}

fn delta(before: &[ProgramStats], after: &[ProgramStats]) -> Vec<(String, u64, u64)> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            (
                a.tracepoint.to_owned(),
                a.run_count - b.run_count,
                a.run_time_ns - b.run_time_ns,
            )
        })
        .collect()
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let spawns: u32 = args.next().map_or(Ok(2000), |s| s.parse())?;
    let object = args.next().map(std::fs::read).transpose()?;
    let rounds = 3;

    let cg = Cgroup::new()?;
    // Without probes first: the best of a few rounds, as the machine is shared.
    let mut off = 0f64;
    for _ in 0..rounds {
        off = off.max(cg.burst(spawns)?);
    }

    let _stats = StatsEnabled::enable()?;
    let telemetry = match &object {
        Some(bytes) => {
            // aya parses the ELF in place: copy it to an 8-byte aligned offset.
            let mut buf = vec![0u8; bytes.len() + 8];
            let offset = buf.as_ptr().align_offset(8);
            buf[offset..offset + bytes.len()].copy_from_slice(bytes);
            Telemetry::load_object(&buf[offset..offset + bytes.len()])?
        }
        None => Telemetry::load()?,
    };
    let counters_before = telemetry.counters()?;
    let mut on = 0f64;
    let mut per_program = Vec::new();
    let mut lost = 0;
    let mut events = 0;
    for _ in 0..rounds {
        let stats_before = telemetry.program_stats()?;
        telemetry.watch(cg.id, monotonic_ns())?;
        on = on.max(cg.burst(spawns)?);
        let report = telemetry.finish(cg.id)?;
        let stats_after = telemetry.program_stats()?;
        lost += report.events_lost;
        events += report.execs + report.exits;
        per_program = delta(&stats_before, &stats_after);
    }
    let counters = telemetry.counters()?;
    // The same burst, not watched: what every host task pays for the filter.
    let stats_before = telemetry.program_stats()?;
    cg.burst(spawns)?;
    let unwatched = delta(&stats_before, &telemetry.program_stats()?);

    println!("burst of {spawns} /bin/true in a watched cgroup, best of {rounds} rounds");
    println!("spawn rate without probes: {off:.0}/s, with probes: {on:.0}/s");
    print_table("watched burst (last round)", &per_program, spawns);
    print_table("same burst, not watched", &unwatched, spawns);
    println!(
        "lifecycle events: {events}, lost: {lost}, ring buffer drops: {}, reader wakeups: {}",
        counters.ringbuf_drops - counters_before.ringbuf_drops,
        counters.reader_wakeups - counters_before.reader_wakeups
    );
    Ok(())
}

fn print_table(title: &str, rows: &[(String, u64, u64)], spawns: u32) {
    println!("{title}:");
    println!(
        "  {:<20} {:>10} {:>14} {:>8}",
        "program", "runs", "run time ns", "ns/run"
    );
    let mut total = 0;
    for (tp, runs, ns) in rows {
        total += ns;
        println!(
            "  {tp:<20} {runs:>10} {ns:>14} {:>8.0}",
            *ns as f64 / (*runs).max(1) as f64
        );
    }
    println!(
        "  BPF time: {:.2} ms ({:.2} µs per spawn)",
        total as f64 / 1e6,
        total as f64 / 1e3 / f64::from(spawns)
    );
}
