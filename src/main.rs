//! The `joblet` binary: a thin CLI over `joblet_runtime`.
//!
//! Exit codes are mapped in one place, [`exit_code`]: 125 when joblet itself fails, otherwise
//! what the job's outcome dictates (see `joblet run --help`).

mod cli;
mod top;

use std::ffi::OsString;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Parser as _;
use joblet_runtime::capture::{Capture, CaptureConfig};
use joblet_runtime::gc::{self, Retention};
use joblet_runtime::job::{JobId, JobRecord, OutputInfo};
use joblet_runtime::spawn::{self, SuperviseOptions};
use joblet_runtime::store::logs::{LogsOptions, copy_followed, copy_logs, ps_filter, ps_table};
use joblet_runtime::store::{Follower, RunningMark, StateDir, Stream};
use joblet_runtime::{Runtime, RuntimeConfig, SignalForwarder, SpawnError, Stdio};

use crate::cli::{Cli, Command, RunArgs, StreamArg};

/// joblet's own failure (bad option, setup error), as docker.
const EXIT_JOBLET_FAILED: u8 = 125;

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    // Inside a job started with --init, joblet's binary is re-executed as the job's PID 1.
    if args.first().is_some_and(|a| a == spawn::INIT_ARGV0) {
        let code = joblet_runtime::init::run(args.split_off(1));
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line naming the option; the usage hint is noise in scripts' logs.
            let rendered = e.render().to_string();
            let line = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("joblet: {}", line.trim_start_matches("error: "));
            return ExitCode::from(EXIT_JOBLET_FAILED);
        }
    };
    let state = StateDir::resolve(cli.state_dir.clone());
    let result = match &cli.command {
        Command::Run(run) => cmd_run(&state, run),
        Command::Ps { all, json } => cmd_ps(&state, *all, *json),
        Command::Logs {
            id,
            follow,
            since,
            stream,
            timestamps,
        } => {
            let opts = LogsOptions {
                since: *since,
                stream: stream.map(|s| match s {
                    StreamArg::Stdout => Stream::Stdout,
                    StreamArg::Stderr => Stream::Stderr,
                }),
                timestamps: *timestamps,
                follow: *follow,
            };
            cmd_logs(&state, id, &opts)
        }
        Command::Inspect { id, json } => cmd_inspect(&state, id, *json),
        Command::Gc {
            older_than,
            keep,
            max_size,
            json,
        } => {
            let retention = Retention {
                older_than: *older_than,
                keep: *keep,
                max_bytes: *max_size,
            };
            cmd_gc(&state, &retention, *json)
        }
        Command::Top { interval, once } => {
            top::run(&state, *interval, *once).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("joblet: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The one place errors become exit codes.
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<SpawnError>() {
        Some(s) => s.exit_code() as u8,
        None => EXIT_JOBLET_FAILED,
    }
}

fn cmd_run(state: &StateDir, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let spec = args.to_spec();
    let config = RuntimeConfig {
        state_dir: state.root().to_owned(),
        // One job: building a template for it alone costs more than it saves (~1 ms measured,
        // docs/PERFORMANCE.md).
        root_template: false,
        kill_on_supervisor_exit: true,
        ..RuntimeConfig::default()
    };
    let mut runtime = Runtime::new(&config)?;
    runtime.validate(&spec)?;
    // Jobs of `joblet run`s that were killed: only the running index is read, a few entries.
    match gc::recover_index(state, &runtime.cgroups().parents()) {
        Ok(recovered) => {
            for r in recovered.iter().filter(|r| r.error.is_some()) {
                eprintln!(
                    "joblet: warning: recovering job {} of dead supervisor {}: {}",
                    r.id,
                    r.supervisor_pid,
                    r.error.as_deref().unwrap_or_default()
                );
            }
        }
        Err(e) => eprintln!(
            "joblet: warning: failed to recover stale jobs: {:#}",
            anyhow::Error::new(e)
        ),
    }
    if args.trace {
        // Loaded only when asked: loading the probes stays out of the plain spawn path.
        let t = joblet_runtime::telemetry::Telemetry::load()
            .context("failed to load the eBPF probes for --trace")?;
        runtime.set_telemetry(std::sync::Arc::new(t));
    }
    // Before the spawn, so a Ctrl-C during it is queued and forwarded, not lost.
    let signals = SignalForwarder::new().context("failed to set up signal forwarding")?;

    // The job writes into pipes captured into its log; the terminal shows the log as stored,
    // so what the terminal showed is what was stored.
    // In the running index from before the job's directory exists until after its final
    // record: if this process is killed, the next joblet finds the job there.
    let _mark = RunningMark::new(state, &spec.id)?;
    let log = state.create_job(&spec.id)?;
    let pipe = || rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC);
    let (out_r, out_w) = pipe().context("failed to create the stdout pipe")?;
    let (err_r, err_w) = pipe().context("failed to create the stderr pipe")?;
    // One job: the default pool (8 x 1 MiB, touched only as output arrives) is one job's worth,
    // and syncing is opt-in (--sync).
    let capture = Capture::start(CaptureConfig {
        sync_on_end: args.sync,
        ..CaptureConfig::default()
    })?;
    // The engine wakes the view through an eventfd: an inotify watch would cost ~10 ms to tear
    // down (an SRCU grace period) on the one-shot path.
    let notify = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )
    .context("failed to create an eventfd")?;
    let notify_view =
        rustix::io::fcntl_dupfd_cloexec(&notify, 3).context("failed to duplicate the eventfd")?;
    let handle =
        capture.add_notified(spec.id.clone(), Some(out_r), Some(err_r), log, Some(notify))?;
    let follower = Follower::with_eventfd(state.open_log(&spec.id)?, 1, notify_view);
    let view = std::thread::spawn(move || {
        let opts = LogsOptions {
            since: 1,
            stream: None,
            timestamps: false,
            follow: true,
        };
        copy_followed(
            follower,
            &opts,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )
    });
    let stdin = if args.interactive {
        Some(
            rustix::io::fcntl_dupfd_cloexec(rustix::stdio::stdin(), 3)
                .context("failed to duplicate stdin")?,
        )
    } else {
        None
    };

    let job = match runtime.spawn(
        &spec,
        Stdio {
            stdin,
            stdout: out_w,
            stderr: err_w,
        },
    ) {
        Ok(job) => job,
        Err(e) => {
            // The pipes' write ends are closed: capture ends, the view drains, the record says why.
            let _ = handle.wait();
            let _ = view.join();
            let _ = state.write_record(&spawn::failed_record(
                &spec,
                runtime.cgroups().layout().as_str(),
                &e,
            ));
            return Err(e.into());
        }
    };
    state.write_record_unsynced(job.record())?;
    let opts = SuperviseOptions {
        timeout: spec.limits.timeout,
        grace: args.grace,
    };
    let (status, reason) =
        spawn::supervise(&job, opts, Some(&signals)).context("failed to supervise the job")?;
    let (mut record, latency) = job.finish_traced(status, reason);

    // Every process of the job is gone, so both pipes are at EOF: capture finishes the log.
    let output = match handle.wait() {
        Ok(s) => OutputInfo {
            stdout_bytes: s.stdout_bytes,
            stderr_bytes: s.stderr_bytes,
            lost_bytes: s.lost_stdout + s.lost_stderr,
            last_seq: s.end_seq,
            error: s
                .write_error
                .map(|e| format!("{:#}", anyhow::Error::new(e))),
        },
        Err(e) => OutputInfo {
            error: Some(format!("{:#}", anyhow::Error::new(e))),
            ..OutputInfo::default()
        },
    };
    let capture_failed = output.error.is_some();
    record.output = Some(output);
    if args.sync {
        state.write_record(&record)?;
    } else {
        state.write_record_unsynced(&record)?;
    }
    if !capture_failed {
        match view.join() {
            Ok(Err(e)) => eprintln!(
                "joblet: warning: failed to show the job's output: {:#}",
                anyhow::Error::new(e)
            ),
            Err(_) => eprintln!("joblet: warning: the output view panicked"),
            Ok(Ok(_)) => {}
        }
    }
    let _ = capture.shutdown();
    if let Some(lat) = &latency {
        eprintln!("{lat}");
    }
    if let Some(path) = &args.report {
        write_report(path, &record)
            .with_context(|| format!("failed to write the report to {}", path.display()))?;
    }
    if let Some(err) = &record.error {
        eprintln!("joblet: warning: job {}: {err}", record.id);
    }
    if let Some(err) = record.output.as_ref().and_then(|o| o.error.as_ref()) {
        eprintln!(
            "joblet: warning: job {}: output capture failed: {err}",
            record.id
        );
    }
    Ok(ExitCode::from(status.code().clamp(0, 255) as u8))
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn cmd_ps(state: &StateDir, all: bool, json: bool) -> anyhow::Result<ExitCode> {
    let records = if state.jobs_dir().exists() {
        state.records()?
    } else {
        Vec::new()
    };
    let records = ps_filter(records, all);
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &records)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", ps_table(&records, now_ns()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// An exact id, or a prefix matching exactly one job.
fn resolve_id(state: &StateDir, id: &str) -> anyhow::Result<JobId> {
    let Some(wanted) = JobId::parse(id) else {
        bail!("invalid job id {id:?}");
    };
    if state.job_dir(&wanted).is_dir() {
        return Ok(wanted);
    }
    let ids = if state.jobs_dir().exists() {
        state.job_ids()?
    } else {
        Vec::new()
    };
    let matches: Vec<JobId> = ids
        .into_iter()
        .filter(|j| j.as_str().starts_with(id))
        .collect();
    match matches.len() {
        1 => Ok(matches.into_iter().next().expect("one match")),
        0 => bail!("no such job: {id}"),
        n => bail!("job id prefix {id:?} is ambiguous ({n} jobs match)"),
    }
}

fn cmd_logs(state: &StateDir, id: &str, opts: &LogsOptions) -> anyhow::Result<ExitCode> {
    let id = resolve_id(state, id)?;
    let reader = state.open_log(&id)?;
    // A job whose supervisor died will never get its end chunk: show what is stored, then say
    // why instead of following forever.
    let orphaned = state.read_record(&id).ok().filter(|r| {
        r.state == joblet_runtime::job::JobState::Running
            && r.effective_state() != joblet_runtime::job::JobState::Running
    });
    let opts = LogsOptions {
        follow: opts.follow && orphaned.is_none(),
        ..opts.clone()
    };
    let summary = copy_logs(
        reader,
        &opts,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )?;
    if let Some(r) = orphaned
        && !summary.ended
    {
        let pid = r.runtime.supervisor.map_or(0, |s| s.pid);
        bail!("job {id}: its supervisor (pid {pid}) is gone, so its log will not grow or end");
    }
    if opts.follow && !summary.ended {
        bail!("job {id}: the log ended without its end marker");
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_inspect(state: &StateDir, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let id = resolve_id(state, id)?;
    let record = state.read_record(&id)?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &record)?;
        writeln!(out)?;
    } else {
        let v = serde_json::to_value(&record)?;
        if let serde_json::Value::Object(map) = v {
            for (k, v) in map {
                if !v.is_null() {
                    writeln!(out, "{k:<18} {v}")?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_gc(state: &StateDir, retention: &Retention, json: bool) -> anyhow::Result<ExitCode> {
    let cgroups = joblet_runtime::cgroup::detect(Path::new("/sys/fs/cgroup"))
        .context("failed to probe the cgroup layout")?;
    let report = gc::collect(state, &cgroups.parents(), retention)?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        for r in &report.recovered {
            writeln!(
                out,
                "recovered {}: supervisor pid {} died; killed {} process(es), removed {} cgroup(s){}",
                r.id,
                r.supervisor_pid,
                r.killed,
                r.cgroups_removed,
                r.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )?;
        }
        for c in &report.cgroups_removed {
            writeln!(out, "removed leftover cgroup {c}")?;
        }
        for r in &report.removed {
            writeln!(out, "removed {} ({} bytes)", r.id, r.bytes)?;
        }
    }
    for e in &report.errors {
        eprintln!("joblet: warning: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the record atomically and durably: a reader never sees half a report.
fn write_report(path: &Path, record: &JobRecord) -> anyhow::Result<()> {
    let mut json = serde_json::to_vec_pretty(record)?;
    json.push(b'\n');
    joblet_runtime::store::replace_file(path, &json, 0o644, true)?;
    Ok(())
}
