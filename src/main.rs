//! The `joblet` binary: a thin CLI over `joblet_runtime`.
//!
//! Exit codes are mapped in one place, [`exit_code`]: 125 when joblet itself fails, otherwise
//! what the job's outcome dictates (see `joblet run --help`).

mod cli;

use std::ffi::OsString;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use joblet_runtime::job::JobRecord;
use joblet_runtime::spawn::{self, SuperviseOptions};
use joblet_runtime::{Runtime, RuntimeConfig, SignalForwarder, SpawnError, Stdio};

use crate::cli::{Cli, Command, RunArgs};

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
    match cli.command {
        Command::Run(run) => match cmd_run(&cli.state_dir, &run) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("joblet: {e:#}");
                ExitCode::from(exit_code(&e))
            }
        },
    }
}

/// The one place errors become exit codes.
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<SpawnError>() {
        Some(s) => s.exit_code() as u8,
        None => EXIT_JOBLET_FAILED,
    }
}

fn cmd_run(state_dir: &Option<std::path::PathBuf>, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let spec = args.to_spec();
    let mut config = RuntimeConfig::default();
    if let Some(d) = state_dir {
        config.state_dir = d.clone();
    }
    let mut runtime = Runtime::new(&config)?;
    runtime.validate(&spec)?;
    if args.trace {
        // Loaded only when asked: loading the probes stays out of the plain spawn path.
        let t = joblet_runtime::telemetry::Telemetry::load()
            .context("failed to load the eBPF probes for --trace")?;
        runtime.set_telemetry(std::sync::Arc::new(t));
    }
    // Before the spawn, so a Ctrl-C during it is queued and forwarded, not lost.
    let signals = SignalForwarder::new().context("failed to set up signal forwarding")?;
    let stdio = Stdio::inherit(args.interactive).context("failed to duplicate stdio")?;
    let job = runtime.spawn(&spec, stdio)?;
    let opts = SuperviseOptions {
        timeout: spec.limits.timeout,
        grace: args.grace,
    };
    let (status, reason) =
        spawn::supervise(&job, opts, Some(&signals)).context("failed to supervise the job")?;
    let (record, latency) = job.finish_traced(status, reason);
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
    Ok(ExitCode::from(status.code().clamp(0, 255) as u8))
}

/// Writes the record atomically: a reader never sees half a report.
fn write_report(path: &Path, record: &JobRecord) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut f, record)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
