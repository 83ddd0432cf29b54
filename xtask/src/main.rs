//! `cargo xtask <task>`: developer and CI tasks that are not plain cargo commands.
//!
//! Each task lives in its own module; this file only dispatches on the task name.

use std::process::ExitCode;

mod ebpf;
mod vm;

const USAGE: &str = "usage: cargo xtask <task> [options]

tasks:
  build-ebpf  compile ebpf/joblet.bpf.c into the committed ebpf/joblet.bpf.o (installs clang if missing)
  check-ebpf  rebuild the probes into a temp dir and fail if the committed object differs
  vm-test     run the privileged tests in a VM with a cgroup-v2-only kernel (--help for options)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let result = match task.as_deref() {
        Some("build-ebpf") => ebpf::build(),
        Some("check-ebpf") => ebpf::check(),
        Some("vm-test") => vm::run(args.collect()),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown task {other:?}\n{USAGE}")),
        None => Err(anyhow::anyhow!("no task given\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
