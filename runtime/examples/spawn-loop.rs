//! Spawns jobs back to back for profiling the spawn path (`perf record`): the default
//! sandbox, pooled cgroups and the root template, stdio on `/dev/null`, like the `pooled` mode
//! of `benches/spawn.rs`.
//!
//! Run as root: `cargo run --release -p joblet-runtime --example spawn-loop -- PROGRAM [SECONDS]`.

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
    let rt = Runtime::new(&RuntimeConfig {
        state_dir: state.clone(),
        cgroup_pool: 8,
        ..RuntimeConfig::default()
    })?;
    let devnull: OwnedFd = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")?
        .into();
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut jobs = 0u64;
    while Instant::now() < until {
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
        let status = job.wait()?;
        if status != ExitStatus::Code(0) {
            return Err(format!("job exited with {status:?}").into());
        }
        let record = job.finish(status, StopReason::default());
        if let Some(e) = record.error {
            return Err(format!("finish: {e}").into());
        }
        jobs += 1;
    }
    let dt = t0.elapsed().as_secs_f64();
    println!("{jobs} jobs in {dt:.2} s: {:.0} jobs/s", jobs as f64 / dt);
    drop(rt);
    std::fs::remove_dir_all(&state)?;
    Ok(())
}
