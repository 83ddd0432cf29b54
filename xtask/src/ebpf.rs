//! `cargo xtask build-ebpf` and `cargo xtask check-ebpf`: compile joblet's probes
//! (`ebpf/joblet.bpf.c`) into the committed object `ebpf/joblet.bpf.o`, and check that the
//! committed object is what the sources produce.
//!
//! The object is committed so that a plain `cargo build` on a machine without clang still embeds
//! the probes. The build is deterministic: the same clang and libbpf headers (Debian 12's, pinned
//! by the distribution) turn the same sources into the same bytes. Source paths are mapped to
//! `ebpf/` so the checkout location does not leak into the object, and DWARF is stripped; BTF and
//! BTF.ext stay, as CO-RE relocations live there.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The probes' source, relative to the workspace root.
const SOURCE: &str = "ebpf/joblet.bpf.c";
/// The committed object, relative to the workspace root.
const OBJECT: &str = "ebpf/joblet.bpf.o";
/// Debian packages providing clang, llvm-strip and the libbpf headers (`bpf/bpf_helpers.h`).
const PACKAGES: &[&str] = &["clang", "llvm", "libbpf-dev"];
/// The libbpf header the probes need.
const LIBBPF_HEADER: &str = "/usr/include/bpf/bpf_helpers.h";

fn workspace_root() -> PathBuf {
    // xtask/ is one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_owned()
}

/// `cargo xtask build-ebpf`: regenerate the committed object.
pub(crate) fn build() -> Result<()> {
    let root = workspace_root();
    let out = root.join(OBJECT);
    compile(&root, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// `cargo xtask check-ebpf`: rebuild into a temporary directory and fail if the result differs
/// from the committed object.
pub(crate) fn check() -> Result<()> {
    let root = workspace_root();
    let tmp = tempfile::tempdir().context("failed to create a temporary directory")?;
    let fresh = tmp.path().join("joblet.bpf.o");
    compile(&root, &fresh)?;
    let committed_path = root.join(OBJECT);
    let committed = std::fs::read(&committed_path)
        .with_context(|| format!("failed to read {}", committed_path.display()))?;
    let rebuilt =
        std::fs::read(&fresh).with_context(|| format!("failed to read {}", fresh.display()))?;
    if committed != rebuilt {
        bail!(
            "{OBJECT} is stale: rebuilding {SOURCE} gives a different object ({} bytes instead of \
             {}); run `cargo xtask build-ebpf` and commit the result (compiler: {})",
            rebuilt.len(),
            committed.len(),
            tool_version(&find_tool("clang")?)
        );
    }
    println!("{OBJECT} matches its sources");
    Ok(())
}

/// Compiles the probes into `out`.
fn compile(root: &Path, out: &Path) -> Result<()> {
    ensure_toolchain()?;
    let clang = find_tool("clang")?;
    let strip = find_tool("llvm-strip")?;
    let ebpf_dir = root.join("ebpf");
    let unstripped = out.with_extension("debug.o");

    let mut cmd = Command::new(&clang);
    cmd.current_dir(root)
        .args(["-target", "bpf"])
        // v2 (kernel >= 4.14) keeps XADD as the only atomic: the object must load on 5.8.
        .arg("-mcpu=v2")
        .args(["-O2", "-g"])
        .arg("-Wall")
        .arg("-Werror")
        .arg(format!("-ffile-prefix-map={}=ebpf", ebpf_dir.display()))
        .arg(format!("-ffile-prefix-map={}=.", root.display()))
        .arg("-Iebpf")
        // <linux/types.h> includes <asm/types.h>, which Debian keeps in the multiarch directory.
        .arg(format!("-I/usr/include/{}", multiarch()?))
        .args(["-c", SOURCE, "-o"])
        .arg(&unstripped);
    run(&mut cmd)?;

    // DWARF only serves debuggers; BTF (kept by --strip-debug) is what the loader needs.
    let mut cmd = Command::new(&strip);
    cmd.arg("--strip-debug").arg(&unstripped).arg("-o").arg(out);
    run(&mut cmd)?;
    std::fs::remove_file(&unstripped)
        .with_context(|| format!("failed to remove {}", unstripped.display()))?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed with {status}");
    Ok(())
}

fn multiarch() -> Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => bail!("no Debian multiarch triplet known for {other}"),
    })
}

/// Finds `name`, or Debian's versioned `name-NN`, on PATH.
fn find_tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for dir in &dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    // Highest version first, so a machine with several LLVMs picks one deterministically.
    for version in (14..=30).rev() {
        for dir in &dirs {
            let candidate = dir.join(format!("{name}-{version}"));
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("{name} not found on PATH")
}

fn tool_version(tool: &Path) -> String {
    Command::new(tool)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown version".to_owned())
}

/// Installs clang, llvm and libbpf-dev with apt-get when any of them is missing.
fn ensure_toolchain() -> Result<()> {
    let missing = find_tool("clang").is_err()
        || find_tool("llvm-strip").is_err()
        || !Path::new(LIBBPF_HEADER).is_file();
    if !missing {
        return Ok(());
    }
    let hint = format!(
        "building the eBPF probes needs clang, llvm-strip and the libbpf headers: install the \
         Debian/Ubuntu packages {} (or your distribution's equivalents)",
        PACKAGES.join(" ")
    );
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!("apt-get is not available; {hint}");
    }
    if !is_root() {
        bail!("not root, so apt-get cannot run; {hint}");
    }
    eprintln!("installing {} with apt-get", PACKAGES.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"])).context(hint.clone())?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context(hint.clone())?;
    ensure!(
        find_tool("clang").is_ok()
            && find_tool("llvm-strip").is_ok()
            && Path::new(LIBBPF_HEADER).is_file(),
        "apt-get succeeded but the toolchain is still incomplete; {hint}"
    );
    Ok(())
}

fn is_root() -> bool {
    // `id -u` avoids a libc dependency in xtask for one call.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
