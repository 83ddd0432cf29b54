//! joblet's developer tasks: `cargo xtask <task>`.

use anyhow::{Result, bail};

mod ebpf;

fn main() -> Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    match task.as_str() {
        "build-ebpf" => ebpf::build(),
        "check-ebpf" => ebpf::check(),
        _ => bail!("usage: cargo xtask <build-ebpf|check-ebpf>"),
    }
}
