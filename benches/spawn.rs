//! Spawn benchmark: jobs/s and spawn-to-exit latency (p50, p99) of full-isolation jobs against a
//! bare `clone3` + `execve` baseline measured in the same run.
//!
//! For two programs (a tiny static no-op built here with gcc, and `/bin/true`) and 1, 2 and 4
//! spawning threads, it measures:
//! - `bare`: [`testsupport::bare_spawn_wait`], `clone3(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)` +
//!   `execve` + `waitid`, no isolation at all: the floor;
//! - `ns+cgroup`: [`testsupport::ns_cgroup_spawn_wait`], the same clone with the job's namespace
//!   set (`CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS`) into one cgroup v2
//!   (`CLONE_INTO_CGROUP`) and nothing else: the cheapest spawn that creates the kernel objects a
//!   job needs, the "minimal hand-written equivalent" the targets compare against;
//! - `pooled`: [`Runtime::spawn`] with the default sandbox (pid, mount, ipc, uts and cgroup
//!   namespaces, minimal pivot_root'ed root, caps dropped, no_new_privs, seccomp, uid 65534,
//!   stdio on `/dev/null`) + [`Job::wait`] + [`Job::finish`], reusing cgroup sets (pool of 8 per
//!   thread);
//! - `fresh`: the same with a new cgroup set per job (`cgroup_pool = 0`, what `joblet run` does).
//!
//! A job's latency is the time from just before `spawn` to the return of `finish` (cgroups
//! removed or back in the pool); the baseline's is `clone3` to the return of `waitid`. Jobs/s is
//! the number of jobs all threads completed divided by the wall time of the measurement.
//!
//! The machine may be shared with other work, so the modes of each (program, threads)
//! cell run interleaved, in several rounds (every other round in reverse order, so that drift and
//! any effect of the preceding mode cancel out), and the ratios compare numbers taken seconds
//! apart.
//!
//! `cargo bench --bench spawn`. Needs root (prints why and exits 0 otherwise). Environment:
//! - `JOBLET_BENCH_SECS` (default 1.5): seconds per mode and cell in each round;
//! - `JOBLET_BENCH_ROUNDS` (default 2): rounds;
//! - `JOBLET_BENCH_THREADS` (default `1,2,4`): the thread counts;
//! - `JOBLET_BENCH_MODES` (default all): the modes to run, comma-separated among `bare`,
//!   `ns`, `pooled`, `fresh`, `notemplate`, `traced` (e.g. `pooled,traced` for telemetry on vs off);
//! - `JOBLET_BENCH_BPF_STATS=1`: per-program BPF run time of the traced cells;
//! - `JOBLET_BENCH_PROBES=PATH`: the traced cells load this build of `ebpf/joblet.bpf.c`
//!   instead of the embedded one (same maps and programs), to compare variants;
//! - `JOBLET_BENCH_ATTACH_ONLY=1`: the traced cells attach the probes but the runtime does not
//!   use them (no job is measured), to tell the cost of attaching from the runtime's side.
//!
//! Telemetry "off" means no probes attached at all: the probes are loaded once, before the
//! first cell, and attached only for the traced cells (before their warm-up, detached after
//! their measurement), so the other modes never pay for the probes' filter on the host's context
//! switches, and no mode pays for loading or freeing them. `pooled` and `traced` share one
//! runtime per (program, threads), so they differ only by the telemetry
//! ([`Runtime::set_telemetry`] / [`Runtime::clear_telemetry`]), not by a cgroup pool built or
//! torn down around them.
//!
//! It creates its own state dir (a temp dir) and removes it, and its cgroups are removed by the
//! runtime (a pool's idle sets when its runtime is dropped).

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use joblet_runtime::job::{Bind, JobId, JobSpec, Limits, Sandbox};
use joblet_runtime::spawn::ExitStatus;
use joblet_runtime::telemetry::Telemetry;
use joblet_runtime::testsupport;
use joblet_runtime::{Runtime, RuntimeConfig, Stdio, StopReason};

/// Pooled cgroup sets kept per spawning thread.
const POOL_PER_THREAD: usize = 8;

/// How many modes each cell runs.
const MODES: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Bare,
    /// Namespaces + cgroup, no setup in the child.
    NsCgroup,
    Pooled,
    Fresh,
    /// Pooled cgroups, each job building its whole root (`root_template: false`, the path of
    /// `--bind`/`--rootfs` jobs and of kernels that cannot build a template).
    PooledNoTemplate,
    /// Pooled, with the eBPF probes watching every job (`--trace`): telemetry on vs off.
    PooledTraced,
}

impl Mode {
    const ALL: [Mode; MODES] = [
        Mode::Bare,
        Mode::NsCgroup,
        Mode::Pooled,
        Mode::Fresh,
        Mode::PooledNoTemplate,
        Mode::PooledTraced,
    ];

    fn key(self) -> &'static str {
        match self {
            Mode::Bare => "bare",
            Mode::NsCgroup => "ns",
            Mode::Pooled => "pooled",
            Mode::Fresh => "fresh",
            Mode::PooledNoTemplate => "notemplate",
            Mode::PooledTraced => "traced",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Bare => "bare clone3+exec",
            Mode::NsCgroup => "ns+cgroup clone3+exec",
            Mode::Pooled => "joblet, pooled cgroups",
            Mode::Fresh => "joblet, fresh cgroups",
            Mode::PooledNoTemplate => "joblet, pooled, no tmpl",
            Mode::PooledTraced => "joblet, pooled, traced",
        }
    }
}

/// A program to run, as seen from the host (baseline) and from inside a job.
struct Program {
    label: &'static str,
    path: CString,
    /// Extra binds needed for the job to see `path` (none when it is under a bound host dir).
    binds: Vec<Bind>,
}

/// One cell's measurements, accumulated over rounds.
struct Cell {
    /// Jobs/s of each round.
    rounds: Vec<f64>,
    jobs: u64,
    elapsed: Duration,
    /// CPU time of this process and its reaped children (the jobs), in clock ticks.
    cpu_ticks: u64,
    /// Busy ticks of the whole host (every CPU, kernel threads included).
    host_ticks: u64,
    latency_ns: Histogram<u64>,
}

impl Cell {
    fn new() -> Cell {
        Cell {
            rounds: Vec::new(),
            cpu_ticks: 0,
            host_ticks: 0,
            jobs: 0,
            elapsed: Duration::ZERO,
            latency_ns: Histogram::new_with_bounds(1_000, 10_000_000_000, 3)
                .expect("histogram bounds"),
        }
    }

    fn jobs_per_sec(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64()
    }

    fn p(&self, q: f64) -> f64 {
        self.latency_ns.value_at_quantile(q) as f64 / 1_000.0
    }
}

/// A distribution-free confidence interval (about 95%) for the median of the sorted values
/// `sorted`: the order statistics of the sign test, ranks n/2 -/+ 1.96 sqrt(n)/2 (normal
/// approximation of the binomial). Assumes only that rounds are independent, not how their
/// noise is distributed (other tenants' load is anything but normal). NaN for fewer than 6
/// values, where the interval would span every value.
fn median_ci(sorted: &[f64]) -> (f64, f64) {
    let n = sorted.len();
    if n < 6 {
        return (f64::NAN, f64::NAN);
    }
    let half = 1.96 * (n as f64).sqrt() / 2.0;
    // 1-based ranks j = floor(n/2 - half), k = ceil(n/2 + 1 + half), clamped to the values.
    let j = ((n as f64 / 2.0 - half).floor() as usize).max(1);
    let k = ((n as f64 / 2.0 + 1.0 + half).ceil() as usize).min(n);
    (sorted[j - 1], sorted[k - 1])
}

/// Telemetry on vs off (the budget: at most 3% throughput loss, 0 lost events).
fn print_telemetry(
    results: &[(&str, usize, [Cell; MODES])],
    telemetry: Option<&Telemetry>,
    bpf_stats: bool,
) {
    let pos = |m: Mode| Mode::ALL.iter().position(|x| *x == m).expect("mode");
    println!("\ntelemetry on vs off (pooled cgroups):");
    for (label, n, cells) in results {
        let (off, on) = (&cells[pos(Mode::Pooled)], &cells[pos(Mode::PooledTraced)]);
        if off.jobs == 0 || on.jobs == 0 {
            continue;
        }
        let mut ratios: Vec<f64> = off
            .rounds
            .iter()
            .zip(&on.rounds)
            .map(|(off, on)| 100.0 * (on - off) / off)
            .collect();
        let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:+.1}%")).collect();
        ratios.sort_by(f64::total_cmp);
        // The median of the per-round ratios resists a round hit by someone else's build.
        let median = match ratios.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => ratios[n / 2],
            n => (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0,
        };
        // The middle half of the per-round ratios: how far one median of this many rounds can
        // be trusted on this machine.
        let quartile = |q: f64| {
            ratios
                .get(((ratios.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        let (ci_low, ci_high) = median_ci(&ratios);
        println!(
            "  {label:<14} {n} thread(s): {:>7.0} jobs/s off, {:>7.0} on: {:+.1}%, median of rounds {median:+.1}% (95% CI {ci_low:+.1}% to {ci_high:+.1}%; middle half {:+.1}% to {:+.1}%; rounds: {})",
            off.jobs_per_sec(),
            on.jobs_per_sec(),
            100.0 * (on.jobs_per_sec() - off.jobs_per_sec()) / off.jobs_per_sec(),
            quartile(0.25),
            quartile(0.75),
            per_round.join(" ")
        );
        // CPU per job moves much less than throughput when others load the machine.
        let (cpu_off, cpu_on) = (
            off.cpu_ticks as f64 / off.jobs as f64,
            on.cpu_ticks as f64 / on.jobs as f64,
        );
        let tick_us = 1e6 / 100.0;
        println!(
            "  {:<14} {:>10} CPU per job: {:>6.0} us off, {:>6.0} us on: {:+.1}% (process + reaped jobs, 10 ms ticks)",
            "",
            "",
            cpu_off * tick_us,
            cpu_on * tick_us,
            100.0 * (cpu_on - cpu_off) / cpu_off
        );
        // With one thread a job's latency is the inverse of the rate, and its median shrugs off
        // the rounds someone else's work slowed down.
        println!(
            "  {:<14} {:>10} latency p50: {:>6.1} us off, {:>6.1} us on: {:+.1}%",
            "",
            "",
            off.p(0.5),
            on.p(0.5),
            100.0 * (on.p(0.5) - off.p(0.5)) / off.p(0.5)
        );
        let (host_off, host_on) = (
            off.host_ticks as f64 / off.jobs as f64,
            on.host_ticks as f64 / on.jobs as f64,
        );
        println!(
            "  {:<14} {:>10} host CPU per job: {:>6.0} us off, {:>6.0} us on: {:+.1}% (every CPU, kernel threads included)",
            "",
            "",
            host_off * tick_us,
            host_on * tick_us,
            100.0 * (host_on - host_off) / host_off
        );
    }
    let Some(t) = telemetry else {
        return;
    };
    let c = t.counters().expect("telemetry counters");
    let traced = TRACED_JOBS.load(Ordering::Relaxed);
    println!(
        "  {traced} traced jobs, {} events lost in them; ring buffer drops {}, task map full {}, reader wakeups {}",
        EVENTS_LOST.load(Ordering::Relaxed),
        c.ringbuf_drops,
        c.task_map_full,
        c.reader_wakeups
    );
    if !bpf_stats {
        println!("  (per-program BPF run time: run with JOBLET_BENCH_BPF_STATS=1)");
        return;
    }
    let mut sum = 0;
    for p in t.program_stats().expect("BPF program stats") {
        let (tracepoint, runs, ns) = (p.tracepoint, p.run_count, p.run_time_ns);
        sum += ns;
        println!(
            "  bpf {tracepoint:<22} {runs:>10} runs {:>8.1} ms total {:>6} ns/run",
            ns as f64 / 1e6,
            ns.checked_div(runs).unwrap_or(0)
        );
    }
    // Includes the warm-up jobs, which TRACED_JOBS counts too.
    println!(
        "  bpf total {:.1} ms, {:.2} us per traced job (host activity during the traced cells included)",
        sum as f64 / 1e6,
        sum as f64 / 1e3 / traced.max(1) as f64
    );
}

/// Jobs measured with telemetry on, and the ring-buffer events they lost.
static TRACED_JOBS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static EVENTS_LOST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter or `--list` from other tools is ignored.
    if !rustix::process::geteuid().is_root() {
        eprintln!("spawn bench skipped: needs root (namespaces, cgroups, pivot_root)");
        return;
    }
    let secs: f64 = env_or("JOBLET_BENCH_SECS", 1.5);
    let rounds: u32 = env_or("JOBLET_BENCH_ROUNDS", 2);
    let threads: Vec<usize> = std::env::var("JOBLET_BENCH_THREADS")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .map(|t| {
            t.trim()
                .parse()
                .expect("JOBLET_BENCH_THREADS: comma-separated counts")
        })
        .collect();
    let per_cell = Duration::from_secs_f64(secs);
    let modes: Vec<Mode> = match std::env::var("JOBLET_BENCH_MODES") {
        Ok(v) => v
            .split(',')
            .map(|m| {
                Mode::ALL
                    .into_iter()
                    .find(|x| x.key() == m.trim())
                    .unwrap_or_else(|| panic!("JOBLET_BENCH_MODES: unknown mode {m:?}"))
            })
            .collect(),
        Err(_) => Mode::ALL.to_vec(),
    };

    let state = tempfile::Builder::new()
        .prefix("joblet-bench-")
        .tempdir()
        .expect("create the bench state dir");
    let noop = NoopBinary::install(state.path());
    let programs = [
        noop.program(),
        Program {
            label: "/bin/true",
            path: c"/bin/true".into(),
            binds: Vec::new(),
        },
    ];

    // Per-program BPF run time needs kernel.bpf_stats_enabled, which itself slows every BPF
    // program a little: only on request, so the on/off throughput figures stay clean.
    let stats_path = "/proc/sys/kernel/bpf_stats_enabled";
    let stats_before = std::fs::read_to_string(stats_path).unwrap_or_default();
    let bpf_stats = std::env::var_os("JOBLET_BENCH_BPF_STATS").is_some_and(|v| v == "1");
    if bpf_stats {
        std::fs::write(stats_path, "1").expect("enable kernel.bpf_stats_enabled");
    }
    print_context(secs, rounds, &threads, &noop);
    // Loaded once (tens of ms of verification and map allocation), attached per traced cell.
    let telemetry = modes.contains(&Mode::PooledTraced).then(|| {
        let t = match std::env::var_os("JOBLET_BENCH_PROBES") {
            // A heap buffer this large is 16-byte aligned (glibc), as the ELF parser needs.
            Some(path) => Telemetry::load_object(
                &std::fs::read(&path).expect("read the JOBLET_BENCH_PROBES object"),
            ),
            None => Telemetry::load(),
        }
        .expect("load the eBPF probes");
        t.set_attached(false).expect("detach the eBPF probes");
        std::sync::Arc::new(t)
    });
    let floor = FloorCgroup::create();
    let mut results = Vec::new();
    for program in &programs {
        for &n in &threads {
            let mut cells = std::array::from_fn(|_| Cell::new());
            // `pooled` and `traced` share one runtime (its cgroup pool and root template), made
            // once: no cell pays for the previous cell's pool being torn down, and the two
            // differ only by the telemetry.
            let mut shared = Runtime::new(&RuntimeConfig {
                state_dir: state.path().to_owned(),
                cgroup_pool: POOL_PER_THREAD * n,
                ..RuntimeConfig::default()
            })
            .expect("create the runtime");
            for round in 0..rounds {
                let mut order: Vec<(usize, Mode)> = Mode::ALL.into_iter().enumerate().collect();
                if round % 2 == 1 {
                    order.reverse();
                }
                for (i, mode) in order {
                    if !modes.contains(&mode) {
                        continue;
                    }
                    let target = Target {
                        program,
                        state: state.path(),
                        floor_cgroup: floor.fd.as_fd(),
                        telemetry: telemetry.as_ref(),
                    };
                    run_cell(mode, &target, &mut shared, n, per_cell, &mut cells[i]);
                }
            }
            results.push((program.label, n, cells));
        }
    }
    floor.remove();
    print_table(&results);
    print_telemetry(&results, telemetry.as_deref(), bpf_stats);
    if bpf_stats {
        let _ = std::fs::write(stats_path, stats_before.trim());
    }
    drop(noop);
    // Nothing may be left mounted on the staging dir: each job's mounts lived in its own
    // namespace and died with it.
    state.close().expect("remove the bench state dir");
}

/// The cgroup v2 the `ns+cgroup` baseline spawns into: one set made by joblet's own driver (so
/// under joblet's parent, removed at the end), shared by every baseline job.
struct FloorCgroup {
    cgroup: joblet_runtime::cgroup::JobCgroup,
    fd: OwnedFd,
}

impl FloorCgroup {
    fn create() -> FloorCgroup {
        let driver = joblet_runtime::cgroup::detect(Path::new("/sys/fs/cgroup"))
            .expect("detect the cgroup layout");
        let cgroup = driver
            .create(
                &format!("bench-floor-{}", std::process::id()),
                &Limits::default(),
            )
            .expect("create the baseline's cgroup");
        let fd = rustix::fs::open(
            cgroup.path(),
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .expect("open the baseline's cgroup");
        FloorCgroup { cgroup, fd }
    }

    fn remove(self) {
        drop(self.fd);
        self.cgroup.remove().expect("remove the baseline's cgroup");
    }
}

/// What a cell runs, and where.
struct Target<'a> {
    program: &'a Program,
    state: &'a Path,
    floor_cgroup: std::os::fd::BorrowedFd<'a>,
    /// The probes, detached outside the traced cells.
    telemetry: Option<&'a std::sync::Arc<Telemetry>>,
}

/// Runs `mode` with `threads` spawning threads for `dur` (after a short warm-up) into `cell`.
fn run_cell(
    mode: Mode,
    target: &Target<'_>,
    shared: &mut Runtime,
    threads: usize,
    dur: Duration,
    cell: &mut Cell,
) {
    let Target {
        program,
        state,
        floor_cgroup,
        telemetry,
    } = *target;
    let telemetry = telemetry.filter(|_| mode == Mode::PooledTraced);
    if let Some(t) = telemetry {
        t.set_attached(true).expect("attach the eBPF probes");
    }
    let owned;
    let runtime: Option<&Runtime> = match mode {
        Mode::Bare | Mode::NsCgroup => None,
        Mode::Pooled | Mode::PooledTraced => {
            match telemetry {
                Some(t) if std::env::var_os("JOBLET_BENCH_ATTACH_ONLY").is_none() => {
                    shared.set_telemetry(std::sync::Arc::clone(t))
                }
                _ => shared.clear_telemetry(),
            }
            Some(shared)
        }
        Mode::Fresh | Mode::PooledNoTemplate => {
            owned = Runtime::new(&RuntimeConfig {
                state_dir: state.to_owned(),
                cgroup_pool: if mode == Mode::Fresh {
                    0
                } else {
                    POOL_PER_THREAD * threads
                },
                root_template: mode != Mode::PooledNoTemplate,
                ..RuntimeConfig::default()
            })
            .expect("create the runtime");
            Some(&owned)
        }
    };
    let devnull = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("open /dev/null");
    let devnull: OwnedFd = devnull.into();
    let one = |hist: &mut Histogram<u64>| {
        let t0 = Instant::now();
        match runtime {
            None => {
                let code = if mode == Mode::NsCgroup {
                    testsupport::ns_cgroup_spawn_wait(&program.path, floor_cgroup)
                        .expect("ns+cgroup spawn")
                } else {
                    testsupport::bare_spawn_wait(&program.path).expect("bare spawn")
                };
                assert_eq!(code, 0, "{} exited {code}", program.label);
            }
            Some(rt) => {
                let spec = job_spec(program);
                let stdio = Stdio {
                    stdin: None,
                    stdout: devnull.try_clone().expect("dup /dev/null"),
                    stderr: devnull.try_clone().expect("dup /dev/null"),
                };
                let job = rt
                    .spawn(&spec, stdio)
                    .unwrap_or_else(|e| panic!("spawn {}: {e:#}", program.label));
                let status = job.wait().expect("wait for the job");
                assert_eq!(status, ExitStatus::Code(0), "{} in a job", program.label);
                let record = job.finish(status, StopReason::default());
                assert!(record.error.is_none(), "finish: {:?}", record.error);
                if let Some(lat) = &record.latency {
                    TRACED_JOBS.fetch_add(1, Ordering::Relaxed);
                    EVENTS_LOST.fetch_add(lat.events_lost, Ordering::Relaxed);
                }
            }
        }
        hist.record(t0.elapsed().as_nanos() as u64)
            .expect("latency within histogram bounds");
    };

    let warmup = Duration::from_millis(200).min(dur / 4);
    let stop = AtomicBool::new(false);
    let start = std::sync::Barrier::new(threads + 1);
    let (jobs, elapsed, cpu, hists) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut scratch = Cell::new().latency_ns;
                    let warm_until = Instant::now() + warmup;
                    while Instant::now() < warm_until {
                        one(&mut scratch);
                    }
                    start.wait();
                    let mut hist = Cell::new().latency_ns;
                    while !stop.load(Ordering::Relaxed) {
                        one(&mut hist);
                    }
                    hist
                })
            })
            .collect();
        start.wait();
        let (cpu0, host0) = (
            cpu_ticks(),
            testsupport::host_busy_ticks().expect("read /proc/stat"),
        );
        let t0 = Instant::now();
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
        let hists: Vec<Histogram<u64>> = workers
            .into_iter()
            .map(|w| w.join().expect("bench thread"))
            .collect();
        // Jobs in flight when `stop` was set finish after `dur`: count the time they took.
        let elapsed = t0.elapsed();
        let cpu = (
            cpu_ticks() - cpu0,
            testsupport::host_busy_ticks().expect("read /proc/stat") - host0,
        );
        let jobs = hists.iter().map(|h| h.len()).sum::<u64>();
        (jobs, elapsed, cpu, hists)
    });
    if mode == Mode::PooledTraced {
        shared.clear_telemetry();
    }
    if let Some(t) = telemetry {
        t.set_attached(false).expect("detach the eBPF probes");
    }
    cell.rounds.push(jobs as f64 / elapsed.as_secs_f64());
    cell.cpu_ticks += cpu.0;
    cell.host_ticks += cpu.1;
    cell.jobs += jobs;
    cell.elapsed += elapsed;
    for h in hists {
        cell.latency_ns.add(h).expect("merge histograms");
    }
}

/// utime + stime + cutime + cstime of this process from /proc/self/stat, in clock ticks: the
/// spawning threads, the telemetry reader and every job reaped so far (its setup before exec
/// runs in the child).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // Fields after the command name (which may contain spaces), from field 3 (state) on.
    let rest = &stat[stat.rfind(')').expect("stat has a comm") + 2..];
    rest.split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse::<u64>().expect("numeric CPU times"))
        .sum()
}

fn job_spec(program: &Program) -> JobSpec {
    JobSpec {
        id: JobId::generate(),
        name: None,
        labels: Default::default(),
        command: vec![OsString::from(program.path.to_str().expect("UTF-8 path"))],
        env: Vec::new(),
        limits: Limits::default(),
        sandbox: Sandbox {
            binds: program.binds.clone(),
            ..Sandbox::default()
        },
    }
}

/// The static no-op, placed where jobs see it: under `/usr/local/libexec` (every job gets the
/// host's `/usr` read-only) when that is writable, else in the state dir with a read-only bind
/// into each job, which adds two mount operations per job.
struct NoopBinary {
    path: PathBuf,
    /// The directory to remove at the end, when installed under `/usr`.
    installed: Option<PathBuf>,
}

impl NoopBinary {
    fn install(state: &Path) -> NoopBinary {
        let src = state.join("noop.c");
        std::fs::write(
            &src,
            "#if defined(__x86_64__)\n\
             __asm__(\".globl _start\\n_start:\\n mov $60, %eax\\n xor %edi, %edi\\n syscall\\n\");\n\
             #elif defined(__aarch64__)\n\
             __asm__(\".globl _start\\n_start:\\n mov x8, #93\\n mov x0, #0\\n svc #0\\n\");\n\
             #endif\n",
        )
        .expect("write noop.c");
        let built = state.join("noop");
        let out = Command::new("gcc")
            .args(["-static", "-nostdlib", "-O2", "-o"])
            .arg(&built)
            .arg(&src)
            .output()
            .expect("run gcc (needed to build the static no-op)");
        assert!(
            out.status.success(),
            "gcc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = PathBuf::from(format!(
            "/usr/local/libexec/joblet-bench-{}",
            std::process::id()
        ));
        let installed = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::copy(&built, dir.join("noop")))
            .is_ok();
        if installed {
            NoopBinary {
                path: dir.join("noop"),
                installed: Some(dir),
            }
        } else {
            let _ = std::fs::remove_dir_all(&dir);
            NoopBinary {
                path: built,
                installed: None,
            }
        }
    }

    fn program(&self) -> Program {
        let path = CString::new(self.path.to_str().expect("UTF-8 path")).expect("no NUL");
        let binds = match self.installed {
            Some(_) => Vec::new(),
            None => vec![Bind {
                source: self.path.clone(),
                target: self.path.clone(),
                writable: false,
            }],
        };
        Program {
            label: "static no-op",
            path,
            binds,
        }
    }
}

impl Drop for NoopBinary {
    fn drop(&mut self) {
        if let Some(dir) = &self.installed {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn print_context(secs: f64, rounds: u32, threads: &[usize], noop: &NoopBinary) {
    let kernel = rustix::system::uname();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("joblet spawn bench");
    println!(
        "  kernel {} {}, {} CPUs, load average {}",
        kernel.release().to_string_lossy(),
        kernel.machine().to_string_lossy(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  {rounds} round(s) x {secs} s per mode and cell, threads {threads:?}, pool {POOL_PER_THREAD} sets per thread"
    );
    println!(
        "  static no-op at {}{}",
        noop.path.display(),
        if noop.installed.is_some() {
            ""
        } else {
            " (bound into each job: +2 mount ops)"
        }
    );
}

fn print_table(results: &[(&str, usize, [Cell; MODES])]) {
    println!();
    println!(
        "{:<13} {:>3}  {:<23} {:>9} {:>9} {:>9}  {:>8} {:>8}  {:>8} {:>8} {:>8}",
        "program",
        "thr",
        "mode",
        "jobs/s",
        "p50 us",
        "p99 us",
        "% bare/s",
        "p50 x",
        "% ns/s",
        "p50 x ns",
        "p99 x ns"
    );
    for (label, threads, cells) in results {
        let bare = &cells[0];
        let ns = &cells[1];
        for (mode, c) in Mode::ALL.into_iter().zip(cells) {
            if c.jobs == 0 {
                continue;
            }
            let vs_bare = if mode == Mode::Bare || bare.jobs == 0 {
                format!("{:>8} {:>8}", "", "")
            } else {
                format!(
                    "{:>7.1}% {:>7.2}x",
                    100.0 * c.jobs_per_sec() / bare.jobs_per_sec(),
                    c.p(0.5) / bare.p(0.5),
                )
            };
            let vs_ns = if matches!(mode, Mode::Bare | Mode::NsCgroup) || ns.jobs == 0 {
                String::new()
            } else {
                format!(
                    "{:>7.1}% {:>7.2}x {:>7.2}x",
                    100.0 * c.jobs_per_sec() / ns.jobs_per_sec(),
                    c.p(0.5) / ns.p(0.5),
                    c.p(0.99) / ns.p(0.99)
                )
            };
            let ratios = format!("{vs_bare}  {vs_ns}");
            println!(
                "{:<13} {:>3}  {:<23} {:>9.0} {:>9.1} {:>9.1}  {}",
                label,
                threads,
                mode.name(),
                c.jobs_per_sec(),
                c.p(0.5),
                c.p(0.99),
                ratios
            );
        }
    }
    let find = |label: &str, mode: Mode| {
        results
            .iter()
            .filter(|r| r.0 == label)
            .map(|r| r.2[Mode::ALL.iter().position(|m| *m == mode).expect("mode")].jobs_per_sec())
            .fold(0.0, f64::max)
    };
    println!();
    for (label, pooled_ref, fresh_ref) in [
        ("static no-op", 5_700.0, 2_900.0),
        ("/bin/true", 1_800.0, 1_400.0),
    ] {
        let ns = find(label, Mode::NsCgroup);
        println!(
            "best {label}: pooled {:.0}/s ({:.0}% of the best ns+cgroup {ns:.0}/s of this run; {:.0}% of the issue's {pooled_ref:.0}/s), fresh {:.0}/s ({:.0}% of the issue's {fresh_ref:.0}/s)",
            find(label, Mode::Pooled),
            100.0 * find(label, Mode::Pooled) / ns,
            100.0 * find(label, Mode::Pooled) / pooled_ref,
            find(label, Mode::Fresh),
            100.0 * find(label, Mode::Fresh) / fresh_ref,
        );
    }
    println!(
        "targets (issue 2): full isolation >= 85% of the jobs/s of a minimal hand-written equivalent \
         (the ns+cgroup rows; the issue's references were measured earlier on this machine), p50 <= 1.3x that floor"
    );
}
