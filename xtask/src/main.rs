//! `cargo xtask <task>`: developer and CI tasks that are not plain cargo commands.
//!
//! Each task lives in its own module; this file only dispatches on the task name.

use std::process::ExitCode;

mod vm;

const USAGE: &str = "usage: cargo xtask <task> [options]

tasks:
  vm-test    run the privileged tests in a VM with a cgroup-v2-only kernel (--help for options)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let result = match task.as_deref() {
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
