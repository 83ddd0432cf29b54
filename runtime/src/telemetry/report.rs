//! [`LatencyReport`]: one job's latency figures, as `joblet run --report` serialises them under
//! `latency` and `joblet run --trace` prints them.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::hist::{Distribution, Recorder};
use crate::sys::bpf::{BioJob, Job, LEADER_EXEC_DELTA, LEADER_EXIT_DELTA};

/// Where a job's time went, in nanoseconds. Built from the probes' in-kernel counters and
/// histograms plus the lifecycle events of the ring buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LatencyReport {
    /// From spawn to exec, per process exec'd in the job: for the job's command, from the clone3
    /// timestamp given to `watch` to its exec; for a process it forked, from that fork.
    pub spawn_to_exec_ns: Distribution,
    /// From exec to exit, per process of the job that exec'd and exited.
    pub exec_to_exit_ns: Distribution,
    /// Run-queue wait: runnable (woken, new, or preempted) until switched in.
    pub runq_wait_ns: Distribution,
    /// Off-CPU: switched out while sleeping until woken.
    pub off_cpu_ns: Distribution,
    /// Block I/O latency: from the submission of each bio the job's own tasks submitted to its
    /// completion by the device. Writes the kernel's writeback threads flush later are not the
    /// job's submissions and are not in it (`docs/design/telemetry.md`).
    pub block_io_ns: Distribution,
    /// Bytes of the bios in `block_io_ns`.
    pub block_io_bytes: u64,
    /// Bios the job submitted whose completion the probes did not see (not in `block_io_ns`):
    /// the completion tracepoint did not reach them, or there was no room to track the bio.
    pub block_io_unseen: u64,
    /// Time the job's threads spent on a CPU.
    pub on_cpu_ns: u64,
    /// Switches where a thread gave up the CPU to sleep.
    pub voluntary_switches: u64,
    /// Switches where a runnable thread was preempted (or yielded).
    pub involuntary_switches: u64,
    /// Processes created in the job, including its first one when it was cloned straight into
    /// the job's cgroup (`CLONE_INTO_CGROUP`).
    pub forks: u64,
    /// Threads created in the job (not counting processes).
    pub threads: u64,
    /// Successful execs in the job.
    pub execs: u64,
    /// Processes of the job that exited.
    pub exits: u64,
    /// Lifecycle events the ring buffer had no room for; `spawn_to_exec_ns` and `exec_to_exit_ns`
    /// miss that many values. Counters and histograms are kept in maps and lose nothing.
    pub events_lost: u64,
    /// The job's command alone (its pid 1).
    pub command: CommandLatency,
}

/// The job's command: the process of the job's first exec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CommandLatency {
    /// From the clone3 timestamp to the command's exec; `None` if it never exec'd (or no spawn
    /// timestamp was given).
    pub spawn_to_exec_ns: Option<u64>,
    /// From the command's exec to its exit; `None` while it runs.
    pub exec_to_exit_ns: Option<u64>,
}

/// Lifecycle figures collected from the ring buffer for one job.
#[derive(Clone, Debug, Default)]
pub(crate) struct Lifecycle {
    /// The clone3 timestamp (CLOCK_MONOTONIC ns), 0 when unknown.
    pub(crate) spawn_ns: u64,
    pub(crate) spawn_to_exec: Recorder,
    pub(crate) exec_to_exit: Recorder,
}

impl LatencyReport {
    /// `life` holds the ring buffer's figures of the job's other processes; the command's own
    /// come from the map entry, which the probes fill instead of sending records for them. `bio`
    /// is the job's block I/O entry, if it did block I/O.
    pub(crate) fn build(job: &Job, bio: Option<&BioJob>, mut life: Lifecycle) -> LatencyReport {
        let command_spawn_to_exec = (life.spawn_ns != 0 && job.first_exec_ns >= life.spawn_ns)
            .then(|| job.first_exec_ns - life.spawn_ns);
        let command_exec_to_exit = (job.first_exec_ns != 0
            && job.leader_exit_ns >= job.first_exec_ns)
            .then(|| job.leader_exit_ns - job.first_exec_ns);
        // The command's spawn is the clone3 timestamp when known, else the kernel's fork.
        let leader_spawn_to_exec = command_spawn_to_exec.or_else(|| {
            (job.first_exec_ns != 0 && job.leader_flags & LEADER_EXEC_DELTA != 0)
                .then_some(job.leader_exec_delta_ns)
        });
        if let Some(v) = leader_spawn_to_exec {
            life.spawn_to_exec.record(v);
        }
        if job.leader_exit_ns != 0 && job.leader_flags & LEADER_EXIT_DELTA != 0 {
            life.exec_to_exit.record(job.leader_exit_delta_ns);
        }
        LatencyReport {
            spawn_to_exec_ns: life.spawn_to_exec.distribution(),
            exec_to_exit_ns: life.exec_to_exit.distribution(),
            runq_wait_ns: Distribution::from_kernel(&job.runq),
            off_cpu_ns: Distribution::from_kernel(&job.off_cpu),
            block_io_ns: bio
                .map(|b| Distribution::from_kernel(&b.latency))
                .unwrap_or_default(),
            block_io_bytes: bio.map_or(0, |b| b.bytes),
            block_io_unseen: bio.map_or(0, |b| b.queued.saturating_sub(b.latency.count)),
            on_cpu_ns: job.on_cpu_ns,
            voluntary_switches: job.voluntary_switches,
            involuntary_switches: job.involuntary_switches,
            forks: job.forks,
            threads: job.threads,
            execs: job.execs,
            exits: job.exits,
            events_lost: job.events_lost,
            command: CommandLatency {
                spawn_to_exec_ns: command_spawn_to_exec,
                exec_to_exit_ns: command_exec_to_exit,
            },
        }
    }
}

/// A duration in ns, with a unit a person reads at a glance.
struct Ns(u64);

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0 as f64;
        match self.0 {
            0..1_000 => write!(f, "{} ns", self.0),
            1_000..1_000_000 => write!(f, "{:.1} µs", ns / 1e3),
            1_000_000..1_000_000_000 => write!(f, "{:.1} ms", ns / 1e6),
            _ => write!(f, "{:.2} s", ns / 1e9),
        }
    }
}

/// A size in bytes, in binary units.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        match self.0 {
            0..1024 => write!(f, "{} B", self.0),
            1024..1_048_576 => write!(f, "{:.1} KiB", b / 1024.0),
            1_048_576..1_073_741_824 => write!(f, "{:.1} MiB", b / 1_048_576.0),
            _ => write!(f, "{:.2} GiB", b / 1_073_741_824.0),
        }
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| Ns(v).to_string())
}

fn dist_line(f: &mut fmt::Formatter<'_>, name: &str, what: &str, d: &Distribution) -> fmt::Result {
    if d.count == 0 {
        return writeln!(f, "  {name:<15} none");
    }
    writeln!(
        f,
        "  {name:<15} {} over {} {what}: p50 {}, p90 {}, p99 {}, max {}",
        Ns(d.total),
        d.count,
        Ns(d.p50),
        Ns(d.p90),
        Ns(d.p99),
        Ns(d.max)
    )
}

/// The short breakdown printed by `joblet run --trace`.
impl fmt::Display for LatencyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "latency:")?;
        writeln!(
            f,
            "  {:<15} {} to exec, {} from exec to exit",
            "command",
            opt(self.command.spawn_to_exec_ns),
            opt(self.command.exec_to_exit_ns)
        )?;
        writeln!(
            f,
            "  {:<15} {} ({} voluntary, {} involuntary switches)",
            "on-CPU",
            Ns(self.on_cpu_ns),
            self.voluntary_switches,
            self.involuntary_switches
        )?;
        dist_line(f, "run-queue wait", "waits", &self.runq_wait_ns)?;
        dist_line(f, "off-CPU", "sleeps", &self.off_cpu_ns)?;
        if self.block_io_ns.count > 0 {
            dist_line(
                f,
                "block I/O",
                &format!("bios ({})", Bytes(self.block_io_bytes)),
                &self.block_io_ns,
            )?;
        }
        if self.block_io_unseen > 0 {
            write!(
                f,
                "\n  {:<15} {} bios whose completion was not seen",
                "", self.block_io_unseen
            )?;
        }
        if self.execs > 1 {
            dist_line(f, "spawn to exec", "execs", &self.spawn_to_exec_ns)?;
            dist_line(f, "exec to exit", "processes", &self.exec_to_exit_ns)?;
        }
        write!(
            f,
            "  {:<15} {} forked, {} threads, {} exec'd, {} exited",
            "processes", self.forks, self.threads, self.execs, self.exits
        )?;
        if self.events_lost > 0 {
            write!(f, "\n  {} lifecycle events lost", self.events_lost)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::bpf::{BioJob, Job};
    use crate::telemetry::hist::kernel_index;

    fn sample_job() -> Job {
        let mut job = Job::ZERO;
        job.on_cpu_ns = 1_500_000;
        job.voluntary_switches = 3;
        job.involuntary_switches = 1;
        job.forks = 1;
        job.execs = 1;
        job.exits = 1;
        job.first_exec_ns = 10_000_500;
        job.leader_exit_ns = 210_000_500;
        job.off_cpu.buckets[kernel_index(200_000_000)] = 1;
        job.off_cpu.count = 1;
        job.off_cpu.total = 200_000_000;
        job.off_cpu.max = 200_000_000;
        job
    }

    #[test]
    fn command_figures_come_from_the_kernel_timestamps() {
        let life = Lifecycle {
            spawn_ns: 10_000_000,
            ..Lifecycle::default()
        };
        let r = LatencyReport::build(&sample_job(), None, life);
        assert_eq!(r.command.spawn_to_exec_ns, Some(500));
        assert_eq!(r.command.exec_to_exit_ns, Some(200_000_000));
        assert_eq!(r.off_cpu_ns.total, 200_000_000);
        assert_eq!(r.off_cpu_ns.p50, 200_000_000);
        assert_eq!(r.runq_wait_ns.count, 0);
    }

    #[test]
    fn the_command_joins_the_distributions_from_its_map_entry() {
        let mut job = sample_job();
        job.leader_flags = LEADER_EXEC_DELTA | LEADER_EXIT_DELTA;
        job.leader_exec_delta_ns = 700;
        job.leader_exit_delta_ns = 150_000_000;
        let mut life = Lifecycle::default();
        life.spawn_to_exec.record(5_000);
        life.exec_to_exit.record(1_000);
        // Without a spawn timestamp the command's spawn-to-exec is its fork-to-exec.
        let r = LatencyReport::build(&job, None, life.clone());
        assert_eq!(r.spawn_to_exec_ns.count, 2);
        assert_eq!(r.spawn_to_exec_ns.total, 5_700);
        assert_eq!(r.exec_to_exit_ns.count, 2);
        assert_eq!(r.exec_to_exit_ns.total, 150_001_000);
        // With one, the clone3 timestamp wins.
        life.spawn_ns = 10_000_000;
        let r = LatencyReport::build(&job, None, life);
        assert_eq!(r.spawn_to_exec_ns.total, 5_500);
        // No exec, no exit: nothing joins.
        job.first_exec_ns = 0;
        job.leader_exit_ns = 0;
        let r = LatencyReport::build(&job, None, Lifecycle::default());
        assert_eq!(r.spawn_to_exec_ns.count, 0);
        assert_eq!(r.exec_to_exit_ns.count, 0);
    }

    #[test]
    fn missing_timestamps_give_none_not_garbage() {
        let mut job = sample_job();
        job.leader_exit_ns = 0;
        let r = LatencyReport::build(&job, None, Lifecycle::default());
        assert_eq!(r.command, CommandLatency::default());
    }

    #[test]
    fn json_has_the_documented_field_names() {
        let r = LatencyReport::build(&sample_job(), None, Lifecycle::default());
        let v = serde_json::to_value(&r).expect("serialise");
        for key in [
            "spawn_to_exec_ns",
            "exec_to_exit_ns",
            "runq_wait_ns",
            "off_cpu_ns",
            "block_io_ns",
            "block_io_bytes",
            "block_io_unseen",
            "on_cpu_ns",
            "voluntary_switches",
            "involuntary_switches",
            "events_lost",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        for key in ["total", "count", "p50", "p90", "p99", "max", "buckets"] {
            assert!(
                v["off_cpu_ns"].get(key).is_some(),
                "missing off_cpu_ns.{key}"
            );
        }
        assert_eq!(v["off_cpu_ns"]["buckets"][0]["count"], 1);
    }

    #[test]
    fn display_is_a_short_readable_breakdown() {
        let r = LatencyReport::build(&sample_job(), None, Lifecycle::default());
        let text = r.to_string();
        assert!(
            text.contains("off-CPU         200.0 ms over 1 sleeps"),
            "{text}"
        );
        assert!(
            text.contains("on-CPU          1.5 ms (3 voluntary, 1 involuntary"),
            "{text}"
        );
        assert!(text.lines().count() <= 8, "{text}");
        assert!(!text.contains("block I/O"), "no block I/O, no line: {text}");
    }

    fn sample_bio() -> BioJob {
        let mut bio = BioJob::ZERO;
        for v in [100_000, 100_000, 300_000, 2_000_000] {
            bio.latency.buckets[kernel_index(v)] += 1;
            bio.latency.count += 1;
            bio.latency.total += v;
            bio.latency.max = bio.latency.max.max(v);
        }
        bio.bytes = 4 * 65536;
        bio.queued = 4;
        bio
    }

    #[test]
    fn bios_submitted_but_never_seen_completing_are_reported_apart() {
        let mut bio = sample_bio();
        bio.queued = 6;
        let r = LatencyReport::build(&sample_job(), Some(&bio), Lifecycle::default());
        assert_eq!((r.block_io_ns.count, r.block_io_unseen), (4, 2));
        let text = r.to_string();
        assert!(
            text.contains("2 bios whose completion was not seen"),
            "{text}"
        );
        let complete =
            LatencyReport::build(&sample_job(), Some(&sample_bio()), Lifecycle::default());
        assert_eq!(complete.block_io_unseen, 0);
        assert!(!complete.to_string().contains("not seen"));
    }

    #[test]
    fn block_io_comes_from_its_own_entry_and_shows_when_there_is_some() {
        let r = LatencyReport::build(&sample_job(), Some(&sample_bio()), Lifecycle::default());
        assert_eq!(r.block_io_ns.count, 4);
        assert_eq!(r.block_io_ns.total, 2_500_000);
        assert_eq!(r.block_io_ns.max, 2_000_000);
        assert!(
            r.block_io_ns.p50 >= 87_500 && r.block_io_ns.p50 <= 112_500,
            "{r:#?}"
        );
        assert_eq!(r.block_io_bytes, 262_144);
        let text = r.to_string();
        assert!(
            text.contains("block I/O       2.5 ms over 4 bios (256.0 KiB): p50"),
            "{text}"
        );
        let v = serde_json::to_value(&r).expect("serialise");
        for key in ["total", "count", "p50", "p90", "p99", "max", "buckets"] {
            assert!(
                v["block_io_ns"].get(key).is_some(),
                "missing block_io_ns.{key}"
            );
        }
        assert_eq!(v["block_io_ns"]["count"], 4);
        // No entry: nothing, and an empty distribution rather than garbage.
        let none = LatencyReport::build(&sample_job(), None, Lifecycle::default());
        assert_eq!(none.block_io_ns, Distribution::default());
        assert_eq!(none.block_io_bytes, 0);
    }
}
