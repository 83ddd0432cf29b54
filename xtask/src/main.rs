//! joblet's developer tasks: `cargo xtask <task>`.

use std::process::ExitCode;

use anyhow::{Result, bail};

mod ebpf;

fn run(task: &str) -> Result<()> {
    match task {
        "build-ebpf" => ebpf::build(),
        "check-ebpf" => ebpf::check(),
        _ => bail!("usage: cargo xtask <build-ebpf|check-ebpf>"),
    }
}

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    match run(&task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
