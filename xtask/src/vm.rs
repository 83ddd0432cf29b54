//! `cargo xtask vm-test`: the pure-cgroup-v2 test lane.
//!
//! This machine and CI have hybrid cgroups, most production hosts are pure cgroup v2, so the
//! privileged tests also run in a VM booting a cgroup-v2-only Debian kernel (`cgroup_no_v1=all`):
//!
//! 1. install qemu, a static busybox, kmod and e2fsprogs with apt when missing, and cache an
//!    unpacked Debian 6.1 kernel plus the few modules the guest loads (virtio, ext4, 9p, overlayfs)
//!    under `~/.cache/joblet-vm/` (see [`cache_dir`]);
//! 2. build every test binary of the workspace with `cargo test --no-run` (the host's build: the
//!    binaries embed absolute paths such as `CARGO_BIN_EXE_joblet`, which stay valid in the guest);
//! 3. write a busybox initramfs whose init mounts a fresh ext4 disk as `/` and, on it, each
//!    top-level directory of the host (shared read-only over virtio-9p) under an overlay, so the
//!    host's paths resolve unchanged, tests can write anywhere without touching the host, and `/`
//!    is a real block device; then it `switch_root`s, sets up cgroup2 with `+cpu +cpuset +io
//!    +memory +pids` delegated from the root, bpffs, tracefs, debugfs, tmpfs scratch dirs and
//!    loopback, and runs each test binary with `JOBLET_REQUIRE_PRIVILEGED=1`;
//! 4. boot it under qemu (TCG: the nested KVM here cannot boot stock kernels), once for all
//!    binaries, killing the guest after a timeout; the console goes to a log file that is kept;
//! 5. read each binary's output, exit status and test list back from a second, writable 9p share
//!    and report pass/fail with the names of failing (or never finishing) tests.
//!
//! Why not virtme-ng: it needs Python and a PyPI install, boots slower here (7 s against 4.5 s)
//! and its exit status does not reflect the guest's; two short init scripts stay under our
//! control.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// The apt packages the lane needs on the host, each with a file that proves it installed.
const HOST_PACKAGES: [(&str, &str); 4] = [
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("kmod", "/sbin/depmod"),
    ("e2fsprogs", "/sbin/mkfs.ext4"),
];

/// The Debian metapackage whose dependency names the current 6.1 kernel image of this release.
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// Kernel modules the guest loads from its initramfs, in order (their modules.dep dependencies
/// come along; soft dependencies do not, hence crc32c_generic, which ext4 needs to mount).
const GUEST_MODULES: [&str; 7] = [
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "9pnet_virtio",
    "9p",
    "overlay",
];

/// Size of the guest's root disk (a sparse file, formatted ext4 afresh on every run).
const DISK_SIZE: u64 = 8 << 30;

/// Top-level host directories the guest does not take from the host: it mounts its own
/// (`proc`, `sys`, `dev`, `run`, `tmp`) or has no use for them.
const HOST_DIRS_SKIPPED: &str = "proc sys dev run tmp mnt media boot lost+found";

/// Where the static busybox lives once `busybox-static` is installed.
const BUSYBOX: &str = "/bin/busybox";

/// The cgroup controllers the guest enables in its root `cgroup.subtree_control`.
const GUEST_CONTROLLERS: &str = "+cpu +cpuset +io +memory +pids";

const HELP: &str = "usage: cargo xtask vm-test [options] [-- test-binary-args...]

Boots a cgroup-v2-only Debian 6.1 kernel under qemu and runs every test binary of the workspace
inside it as root with JOBLET_REQUIRE_PRIVILEGED=1. Arguments after `--` go to every test binary
(for example a test name filter).

options:
  --timeout SECS         kill the guest after this long (default 900)
  --binary-timeout SECS  kill one test binary after this long (default 600)
  --memory MIB           guest memory (default 2048)
  --cpus N               guest CPUs (default 2)
  --test-threads N       libtest --test-threads inside the guest (default 2)
  --slow N               JOBLET_TEST_SLOW exported to the tests (default 50)
  --kernel PACKAGE       Debian kernel package (default: the current linux-image-amd64 dependency)
  --accel ACCEL          qemu accelerator (default tcg)
  --quiet                do not echo the guest console (it is still logged)

environment:
  JOBLET_VM_CACHE        cache directory (default ~/.cache/joblet-vm)";

/// Options of `cargo xtask vm-test`.
#[derive(Debug)]
struct Options {
    timeout: Duration,
    binary_timeout: Duration,
    memory_mib: u32,
    cpus: u32,
    test_threads: u32,
    slow: u32,
    kernel: Option<String>,
    accel: String,
    quiet: bool,
    test_args: Vec<String>,
}

impl Options {
    /// Parses the arguments after `vm-test`; `None` when help was asked for.
    fn parse(args: Vec<String>) -> Result<Option<Options>> {
        let mut opts = Options {
            timeout: Duration::from_secs(900),
            binary_timeout: Duration::from_secs(600),
            memory_mib: 2048,
            cpus: 2,
            test_threads: 2,
            slow: 50,
            kernel: None,
            accel: "tcg".to_owned(),
            quiet: false,
            test_args: Vec::new(),
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("option {arg} needs a value"))
            };
            match arg.as_str() {
                "-h" | "--help" => {
                    println!("{HELP}");
                    return Ok(None);
                }
                "--timeout" => opts.timeout = Duration::from_secs(number(&arg, &value()?)?),
                "--binary-timeout" => {
                    opts.binary_timeout = Duration::from_secs(number(&arg, &value()?)?);
                }
                "--memory" => opts.memory_mib = number(&arg, &value()?)?,
                "--cpus" => opts.cpus = number(&arg, &value()?)?,
                "--test-threads" => opts.test_threads = number(&arg, &value()?)?,
                "--slow" => opts.slow = number(&arg, &value()?)?,
                "--kernel" => opts.kernel = Some(value()?),
                "--accel" => opts.accel = value()?,
                "--quiet" => opts.quiet = true,
                "--" => {
                    opts.test_args = args.collect();
                    break;
                }
                other => bail!("unknown option {other:?}\n{HELP}"),
            }
        }
        // Below this the kernel and initramfs do not fit and qemu exits silently.
        ensure!(
            opts.memory_mib >= 256,
            "--memory {} is too small: the guest needs at least 256 MiB",
            opts.memory_mib
        );
        for arg in &opts.test_args {
            // The guest reads the arguments one per line.
            ensure!(
                !arg.contains('\n'),
                "test binary argument {arg:?} contains a newline"
            );
        }
        Ok(Some(opts))
    }
}

fn number<T: std::str::FromStr>(option: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| anyhow!("option {option} needs a number, got {value:?}"))
}

/// Runs `cargo xtask vm-test` with the arguments after the task name.
pub(crate) fn run(args: Vec<String>) -> Result<()> {
    let Some(opts) = Options::parse(args)? else {
        return Ok(());
    };
    let started = Instant::now();
    let workspace = Workspace::locate()?;
    let mut apt = Apt::default();
    ensure_host_packages(&mut apt)?;
    let busybox = fs::read(BUSYBOX).with_context(|| format!("failed to read {BUSYBOX}"))?;
    ensure!(
        is_static_elf(&busybox),
        "{BUSYBOX} is not statically linked: the guest's initramfs needs the busybox-static package"
    );
    let kernel = ensure_kernel(&mut apt, &cache_dir()?, opts.kernel.as_deref())?;
    eprintln!(
        "vm-test: kernel {} from {} ({})",
        kernel.release,
        kernel.package,
        kernel.dir.display()
    );

    let binaries = workspace.build_test_binaries()?;
    ensure!(!binaries.is_empty(), "cargo built no test binaries");

    let run_dir = workspace.target_dir.join("vm-test");
    let results_dir = run_dir.join("results");
    if results_dir.exists() {
        fs::remove_dir_all(&results_dir)
            .with_context(|| format!("failed to clear {}", results_dir.display()))?;
    }
    fs::create_dir_all(&results_dir)
        .with_context(|| format!("failed to create {}", results_dir.display()))?;
    write_guest_plan(&results_dir, &binaries, &opts)?;
    let initramfs = run_dir.join("initramfs.cpio");
    write_file(&initramfs, &initramfs_image(&kernel, &busybox, &workspace)?)?;
    let console_log = run_dir.join("console.log");
    let disk = run_dir.join("disk.img");
    make_root_disk(&disk)?;

    eprintln!(
        "vm-test: booting the guest ({} test binaries, timeout {} s, console log {})",
        binaries.len(),
        opts.timeout.as_secs(),
        console_log.display()
    );
    let guest = boot(
        &opts,
        &kernel,
        &initramfs,
        &disk,
        &results_dir,
        &console_log,
    )?;
    let report = Report::collect(&results_dir, &binaries)?;
    report.print();
    eprintln!(
        "vm-test: guest ran {:.1} s, lane {:.1} s; console log: {}",
        guest.elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        console_log.display()
    );
    if guest.timed_out {
        eprintln!(
            "vm-test: the guest did not finish within {} s and was killed",
            opts.timeout.as_secs()
        );
    } else if !report.guest_done {
        eprintln!(
            "vm-test: the guest stopped before running every binary (qemu {}): see the console log",
            guest.status
        );
        // Setup failures and panics are the usual reasons: show them without opening the log.
        let console = fs::read_to_string(&console_log).unwrap_or_default();
        for line in console.lines().filter(|l| {
            l.contains("guest setup failed")
                || l.contains("Kernel panic")
                || l.contains("Out of memory")
        }) {
            eprintln!("vm-test:     console: {}", line.trim_end());
        }
    }
    eprintln!(
        "vm-test: {} passed, {} failed",
        report.passed, report.failed
    );
    if report.failed > 0 || !report.guest_done || guest.timed_out {
        bail!(
            "the VM test lane failed; console log: {}",
            console_log.display()
        );
    }
    Ok(())
}

/// The cargo workspace being tested.
#[derive(Debug)]
struct Workspace {
    root: PathBuf,
    target_dir: PathBuf,
    /// Package id -> package name, for naming test binaries.
    packages: BTreeMap<String, String>,
}

/// One test binary to run in the guest.
#[derive(Debug, Clone)]
struct TestBinary {
    /// File-name-safe id, unique in the run, in running order.
    id: String,
    /// Human-readable name: package, target kind and target name.
    name: String,
    exe: PathBuf,
    /// Where cargo would run it: the package's directory.
    cwd: PathBuf,
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
}

impl Workspace {
    fn locate() -> Result<Workspace> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_owned();
        let out = cargo()
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(&root)
            .stderr(Stdio::inherit())
            .output()
            .context("failed to run cargo metadata")?;
        ensure!(
            out.status.success(),
            "cargo metadata failed: {}",
            out.status
        );
        let meta: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("failed to parse cargo metadata")?;
        let target_dir = meta["target_directory"]
            .as_str()
            .context("cargo metadata has no target_directory")?
            .into();
        let packages = meta["packages"]
            .as_array()
            .context("cargo metadata has no packages")?
            .iter()
            .filter_map(|p| Some((p["id"].as_str()?.to_owned(), p["name"].as_str()?.to_owned())))
            .collect();
        Ok(Workspace {
            root,
            target_dir,
            packages,
        })
    }

    /// Builds every test binary of the workspace except xtask's and returns them.
    fn build_test_binaries(&self) -> Result<Vec<TestBinary>> {
        eprintln!("vm-test: building the test binaries (cargo test --workspace --no-run)");
        let out = cargo()
            .args([
                "test",
                "--workspace",
                "--exclude",
                "xtask",
                "--no-run",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(&self.root)
            .stderr(Stdio::inherit())
            .output()
            .context("failed to run cargo test --no-run")?;
        ensure!(
            out.status.success(),
            "building the test binaries failed: {}",
            out.status
        );
        let stdout = String::from_utf8(out.stdout).context("cargo printed invalid UTF-8")?;
        let mut binaries = Vec::new();
        let mut seen = HashSet::new();
        for line in stdout.lines() {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
                continue;
            }
            let Some(exe) = msg["executable"].as_str() else {
                continue;
            };
            if !seen.insert(exe.to_owned()) {
                continue;
            }
            let package_id = msg["package_id"].as_str().unwrap_or_default();
            let package = self
                .packages
                .get(package_id)
                .cloned()
                .unwrap_or_else(|| package_id.to_owned());
            let kind = msg["target"]["kind"][0].as_str().unwrap_or("test");
            let target = msg["target"]["name"].as_str().unwrap_or("?");
            let manifest = msg["manifest_path"]
                .as_str()
                .context("cargo artifact message without manifest_path")?;
            binaries.push(TestBinary {
                id: format!("{package}-{kind}-{target}"),
                name: format!("{package} {kind} {target}"),
                exe: exe.into(),
                cwd: Path::new(manifest)
                    .parent()
                    .context("manifest path has no parent")?
                    .to_owned(),
            });
        }
        // cargo reports artifacts in build order, which varies: run in a stable order instead.
        binaries.sort_by(|a, b| a.name.cmp(&b.name));
        for (i, b) in binaries.iter_mut().enumerate() {
            b.id = format!("{i:02}-{}", b.id)
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
        }
        Ok(binaries)
    }
}

/// apt, with `apt-get update` run at most once per lane run.
#[derive(Debug, Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn update(&mut self) -> Result<()> {
        if !self.updated {
            eprintln!("vm-test: apt-get update");
            run_checked(
                Command::new("apt-get").args(["update", "-q", "-o", "DPkg::Lock::Timeout=600"]),
                "apt-get update",
            )?;
            self.updated = true;
        }
        Ok(())
    }
}

/// Runs `cmd`, failing with `what` when it cannot start or exits non-zero.
fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to run {what}"))?;
    ensure!(status.success(), "{what} failed: {status}");
    Ok(())
}

fn package_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .stderr(Stdio::null())
        .output()
        .context("failed to run dpkg-query: the VM lane needs a Debian-based host with apt")?;
    Ok(out.status.success() && out.stdout.starts_with(b"ii"))
}

/// Installs the missing [`HOST_PACKAGES`] with apt (apt keeps them: this is the cache).
fn ensure_host_packages(apt: &mut Apt) -> Result<()> {
    let mut missing = Vec::new();
    for (package, _) in HOST_PACKAGES {
        if !package_installed(package)? {
            missing.push(package);
        }
    }
    if !missing.is_empty() {
        eprintln!("vm-test: installing {}", missing.join(" "));
        apt.update()?;
        run_checked(
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    "-o",
                    "DPkg::Lock::Timeout=600",
                ])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install",
        )
        .with_context(|| {
            format!(
                "cannot install {} (the VM lane needs root and a reachable Debian mirror)",
                missing.join(" ")
            )
        })?;
    }
    for (package, file) in HOST_PACKAGES {
        ensure!(
            Path::new(file).exists(),
            "{file} is missing although {package} is installed"
        );
    }
    Ok(())
}

/// True when `elf` is an ELF file without a `PT_INTERP` program header (no dynamic loader).
fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        elf.get(0x20..0x28),
        elf.get(0x36..0x38),
        elf.get(0x38..0x3a),
    ) else {
        return false;
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let phoff = u64::from_le_bytes(phoff.try_into().unwrap_or_default()) as usize;
    let phentsize = usize::from(u16::from_le_bytes(phentsize.try_into().unwrap_or_default()));
    let phnum = usize::from(u16::from_le_bytes(phnum.try_into().unwrap_or_default()));
    (0..phnum).all(|i| {
        let start = phoff + i * phentsize;
        elf.get(start..start + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap_or_default()) != PT_INTERP)
    })
}

/// `$JOBLET_VM_CACHE`, else `$XDG_CACHE_HOME/joblet-vm`, else `~/.cache/joblet-vm`: shared by every
/// checkout on the machine, so the kernel is downloaded once.
fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("JOBLET_VM_CACHE") {
        return Ok(dir.into());
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(Path::new(&dir).join("joblet-vm"));
    }
    let home = std::env::var_os("HOME").context("neither JOBLET_VM_CACHE nor HOME is set")?;
    Ok(Path::new(&home).join(".cache/joblet-vm"))
}

/// A cached kernel: `vmlinuz`, `release`, and `modules/` holding the guest's modules plus
/// `modules/order`, the load order.
#[derive(Debug)]
struct Kernel {
    package: String,
    release: String,
    dir: PathBuf,
}

impl Kernel {
    fn load(dir: &Path) -> Result<Kernel> {
        let release = fs::read_to_string(dir.join("release"))
            .with_context(|| format!("failed to read {}/release", dir.display()))?;
        Ok(Kernel {
            package: dir
                .file_name()
                .context("kernel cache dir has no name")?
                .to_string_lossy()
                .into_owned(),
            release: release.trim().to_owned(),
            dir: dir.to_owned(),
        })
    }

    fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The modules' file names, in load order.
    fn modules(&self) -> Result<Vec<String>> {
        let path = self.dir.join("modules/order");
        Ok(fs::read_to_string(&path)
            .with_context(|| format!("failed to read {}", path.display()))?
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

/// The current kernel image package of this Debian release, from apt's (local) package lists.
fn current_kernel_package(apt: &mut Apt) -> Result<String> {
    for attempt in 0..2 {
        if attempt == 1 {
            apt.update()?;
        }
        let out = Command::new("apt-cache")
            .args(["depends", KERNEL_METAPACKAGE])
            .stderr(Stdio::null())
            .output()
            .context("failed to run apt-cache")?;
        let found = String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            l.trim()
                .strip_prefix("Depends: ")
                .filter(|p| p.starts_with("linux-image-"))
                .map(str::to_owned)
        });
        if let Some(package) = found {
            return Ok(package);
        }
    }
    bail!("apt-cache does not know {KERNEL_METAPACKAGE}: is this a Debian host with apt lists?")
}

/// The cached kernel `package` (default: the current one), downloading and unpacking it first when
/// it is not cached. Without apt lists, falls back to the newest cached kernel.
fn ensure_kernel(apt: &mut Apt, cache: &Path, package: Option<&str>) -> Result<Kernel> {
    let package = match package {
        Some(p) => p.to_owned(),
        None => match current_kernel_package(apt) {
            Ok(p) => p,
            Err(err) => {
                let newest = newest_cached_kernel(cache);
                let Some(dir) = newest else {
                    return Err(err.context("cannot pick a kernel and none is cached"));
                };
                eprintln!("vm-test: {err:#}; using the cached {}", dir.display());
                return Kernel::load(&dir);
            }
        },
    };
    let dir = cache.join(&package);
    if cached_kernel_is_current(&dir) {
        return Kernel::load(&dir);
    }
    if dir.exists() {
        // Cached by an older lane with another module set.
        fs::remove_dir_all(&dir).with_context(|| format!("failed to remove {}", dir.display()))?;
    }
    fs::create_dir_all(cache).with_context(|| format!("failed to create {}", cache.display()))?;
    let staging = cache.join(format!(".{package}.{}", std::process::id()));
    let result = fetch_kernel(&package, &staging, &dir);
    let _ = fs::remove_dir_all(&staging);
    result?;
    Kernel::load(&dir)
}

/// Whether `dir` holds a complete kernel with the modules this lane loads.
fn cached_kernel_is_current(dir: &Path) -> bool {
    dir.join("release").exists()
        && fs::read_to_string(dir.join("guest-modules")).is_ok_and(|m| m == GUEST_MODULES.join(" "))
}

fn newest_cached_kernel(cache: &Path) -> Option<PathBuf> {
    fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| cached_kernel_is_current(&e.path()))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// Downloads `package` into `staging`, unpacks it and moves the kernel and the guest's modules to
/// `dest` (renamed into place last, so a cache dir with `release` is always complete).
fn fetch_kernel(package: &str, staging: &Path, dest: &Path) -> Result<()> {
    eprintln!("vm-test: downloading {package}");
    let download = staging.join("download");
    let unpacked = staging.join("unpacked");
    let out = staging.join("kernel");
    fs::create_dir_all(&download)
        .and_then(|()| fs::create_dir_all(out.join("modules")))
        .with_context(|| format!("failed to create {}", staging.display()))?;
    run_checked(
        Command::new("apt-get")
            // The staging dir is root's: without this apt warns it cannot sandbox as _apt.
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
            .current_dir(&download),
        &format!("apt-get download {package}"),
    )
    .with_context(|| format!("cannot download the kernel package {package}"))?;
    let deb = fs::read_dir(&download)
        .with_context(|| format!("failed to list {}", download.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    run_checked(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        "dpkg-deb -x",
    )?;
    let modules_root = unpacked.join("lib/modules");
    let release = fs::read_dir(&modules_root)
        .with_context(|| format!("failed to list {}", modules_root.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{package} has no kernel modules"))?;
    run_checked(
        Command::new("depmod")
            .arg("-b")
            .arg(&unpacked)
            .arg(&release),
        "depmod",
    )?;
    let modules_dir = modules_root.join(&release);
    let dep = fs::read_to_string(modules_dir.join("modules.dep"))
        .context("failed to read modules.dep")?;
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let mut order = String::new();
    for module in module_load_order(&dep, &builtin, &GUEST_MODULES)? {
        let name = Path::new(&module)
            .file_name()
            .context("module path without a file name")?;
        ensure!(
            module.ends_with(".ko"),
            "module {module} is compressed; busybox insmod needs plain .ko files"
        );
        copy(&modules_dir.join(&module), &out.join("modules").join(name))?;
        writeln!(order, "{}", name.to_string_lossy())?;
    }
    write_file(&out.join("modules/order"), order.as_bytes())?;
    copy(
        &unpacked.join(format!("boot/vmlinuz-{release}")),
        &out.join("vmlinuz"),
    )?;
    copy(
        &unpacked.join(format!("boot/config-{release}")),
        &out.join("config"),
    )?;
    write_file(
        &out.join("guest-modules"),
        GUEST_MODULES.join(" ").as_bytes(),
    )?;
    write_file(&out.join("release"), format!("{release}\n").as_bytes())?;
    if let Err(err) = fs::rename(&out, dest) {
        // Another run may have cached the same kernel meanwhile.
        if !cached_kernel_is_current(dest) {
            return Err(err)
                .with_context(|| format!("failed to move the kernel to {}", dest.display()));
        }
    }
    Ok(())
}

/// The `modules.dep` paths of `wanted` and their dependencies, dependencies first. Modules listed
/// in `builtin` (`modules.builtin`) are built into the kernel and skipped.
fn module_load_order(dep: &str, builtin: &str, wanted: &[&str]) -> Result<Vec<String>> {
    fn stem(path: &str) -> &str {
        let name = path.rsplit('/').next().unwrap_or(path);
        name.split(".ko").next().unwrap_or(name)
    }
    let mut deps = BTreeMap::new();
    for line in dep.lines() {
        if let Some((module, needs)) = line.split_once(':') {
            deps.insert(
                stem(module).replace('-', "_"),
                (
                    module.to_owned(),
                    needs.split_whitespace().collect::<Vec<_>>(),
                ),
            );
        }
    }
    let builtin: HashSet<String> = builtin.lines().map(|l| stem(l).replace('-', "_")).collect();
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<&str>)>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        ensure!(depth < 64, "module dependency loop at {name}");
        let (path, needs) = deps
            .get(name)
            .with_context(|| format!("kernel module {name} not found in modules.dep"))?;
        if order.contains(path) {
            return Ok(());
        }
        // modules.dep lists the whole closure, innermost last: visit it from the end.
        for need in needs.iter().rev() {
            visit(&stem(need).replace('-', "_"), deps, order, depth + 1)?;
        }
        if !order.contains(path) {
            order.push(path.clone());
        }
        Ok(())
    }
    let mut order = Vec::new();
    for name in wanted {
        if builtin.contains(*name) {
            continue;
        }
        visit(name, &deps, &mut order, 0)?;
    }
    Ok(order)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("failed to copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    fs::write(path, data).with_context(|| format!("failed to write {}", path.display()))
}

/// Creates the guest's root disk: a sparse file formatted ext4, new on every run so no state
/// leaks from one run to the next.
fn make_root_disk(disk: &Path) -> Result<()> {
    let _ = fs::remove_file(disk);
    File::create(disk)
        .and_then(|f| f.set_len(DISK_SIZE))
        .with_context(|| format!("failed to create {}", disk.display()))?;
    run_checked(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(disk)
            .stdout(Stdio::null()),
        "mkfs.ext4",
    )
}

/// Writes what the guest's stage 2 reads from the results share: `plan` (one binary a line:
/// id, cwd, exe, name, tab-separated), `args` (one test binary argument a line) and `config`
/// (shell variables).
fn write_guest_plan(results: &Path, binaries: &[TestBinary], opts: &Options) -> Result<()> {
    let mut plan = String::new();
    for b in binaries {
        let cwd = b.cwd.to_str().context("non-UTF-8 package path")?;
        let exe = b.exe.to_str().context("non-UTF-8 test binary path")?;
        ensure!(
            !(cwd.contains(['\t', '\n']) || exe.contains(['\t', '\n'])),
            "tab or newline in {exe}"
        );
        writeln!(plan, "{}\t{cwd}\t{exe}\t{}", b.id, b.name)?;
    }
    write_file(&results.join("plan"), plan.as_bytes())?;
    let mut args = String::new();
    for arg in &opts.test_args {
        writeln!(args, "{arg}")?;
    }
    write_file(&results.join("args"), args.as_bytes())?;
    let config = format!(
        "THREADS={}\nBINARY_TIMEOUT={}\nSLOW={}\n",
        opts.test_threads,
        opts.binary_timeout.as_secs(),
        opts.slow
    );
    write_file(&results.join("config"), config.as_bytes())
}

/// Stage 1, the initramfs's `/init`: loads the virtio/ext4/9p/overlay modules, mounts the
/// freshly formatted ext4 disk as the new root and, on it, each top-level directory of the host
/// (shared read-only over 9p) under an overlay whose writable layer is on that disk, then
/// `switch_root`s into it. Why not one overlay of the whole host root: `/` must be a real root
/// mount (jobs `pivot_root`, which rootfs refuses) on a real block device (io limits name the
/// disk holding `/`, as on a production host), and an overlay's device is anonymous.
const STAGE1: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "vm-test: guest setup failed: $*"; poweroff -f; }
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
while read -r m; do insmod "/modules/$m" || fail "insmod $m"; done < /modules/order
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host \
    || fail "mount the host root over 9p"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 -o noinit_itable /dev/vda /newroot || fail "mount the root disk /dev/vda"
L=/newroot/.vm-test/layers
mkdir -p $L/upper $L/work || fail "create the overlay layers"
for p in /host/*; do
    n=${p#/host/}
    case " @SKIPPED@ " in *" $n "*) mkdir -p "/newroot/$n"; continue ;; esac
    if [ -L "$p" ]; then
        ln -s "$(readlink "$p")" "/newroot/$n" || fail "link /$n"
    elif [ -d "$p" ]; then
        mkdir -p "/newroot/$n" "$L/upper/$n" "$L/work/$n" || fail "create /$n"
        mount -t overlay -o "lowerdir=$p,upperdir=$L/upper/$n,workdir=$L/work/$n" overlay "/newroot/$n" \
            || fail "mount the overlay of /$n"
    fi
done
WS="@WORKSPACE_SHARE@"
if [ -n "$WS" ]; then
    mkdir -p /newroot/.vm-test/ws "$L/upper/.ws" "$L/work/.ws" || fail "create the workspace overlay"
    mount -t overlay -o "lowerdir=/host$WS,upperdir=$L/upper/.ws,workdir=$L/work/.ws" overlay \
        /newroot/.vm-test/ws || fail "mount the overlay of the workspace $WS"
fi
cp /bin/busybox /stage2 /newroot/.vm-test/ || fail "copy stage 2"
for d in dev proc sys; do mount --move "/$d" "/newroot/$d" || fail "move /$d"; done
exec switch_root /newroot /.vm-test/stage2
"#;

/// Stage 2, PID 1 in the new root: sets the guest up like a pure cgroup v2 systemd host (cgroup2
/// with nsdelegate, controllers delegated from the root, init outside the root cgroup), then runs
/// the plan and powers off.
const STAGE2: &str = r#"#!/.vm-test/busybox sh
B=/.vm-test/busybox
R=/.vm-test/results
say() { echo "vm-test: $*"; }
fail() { say "guest setup failed: $*"; $B sync; $B poweroff -f; }
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
$B mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 /sys/fs/cgroup || fail "mount cgroup2"
echo "@CONTROLLERS@" > /sys/fs/cgroup/cgroup.subtree_control || fail "enable @CONTROLLERS@"
$B mkdir /sys/fs/cgroup/init.scope && echo $$ > /sys/fs/cgroup/init.scope/cgroup.procs \
    || fail "move init into init.scope"
$B mount -t bpf -o mode=700 bpf /sys/fs/bpf || fail "mount bpffs"
$B mount -t tracefs tracefs /sys/kernel/tracing || fail "mount tracefs"
$B mount -t debugfs debugfs /sys/kernel/debug || fail "mount debugfs"
$B mount -t tmpfs -o mode=1777 tmpfs /tmp || fail "mount /tmp"
$B mount -t tmpfs -o mode=755 tmpfs /var/lib || fail "mount /var/lib"
$B mount -t tmpfs -o mode=755 tmpfs /run || fail "mount /run"
$B mkdir -p /dev/pts /dev/shm
$B mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts || fail "mount /dev/pts"
$B mount -t tmpfs -o mode=1777 tmpfs /dev/shm || fail "mount /dev/shm"
WS="@WORKSPACE_SHARE@"
if [ -n "$WS" ]; then
    $B mkdir -p "$WS" && $B mount --move /.vm-test/ws "$WS" || fail "move the workspace to $WS"
fi
$B ip link set lo up || fail "bring up lo"
$B hostname joblet-vm
$B mkdir -p $R && $B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results $R \
    || fail "mount the results share"
ulimit -n 65536
ulimit -l unlimited
. $R/config
set --
while IFS= read -r a; do set -- "$@" "$a"; done < $R/args
export HOME=/root JOBLET_REQUIRE_PRIVILEGED=1 JOBLET_TEST_SLOW=$SLOW JOBLET_TEST_LANE=vm RUST_BACKTRACE=1
{ $B uname -r; $B cat /sys/fs/cgroup/cgroup.subtree_control; } > $R/guest-info
say "guest ready after $($B cut -d' ' -f1 /proc/uptime) s: kernel $($B uname -r), root subtree_control: $($B cat /sys/fs/cgroup/cgroup.subtree_control)"
TAB=$(printf '\t')
while IFS="$TAB" read -r id cwd exe name; do
    say "running $name"
    (
        if cd "$cwd"; then
            "$exe" --list "$@" < /dev/null > "$R/$id.list" 2> /dev/null
            CARGO_MANIFEST_DIR="$cwd" $B timeout -s KILL "$BINARY_TIMEOUT" "$exe" \
                --test-threads="$THREADS" "$@" < /dev/null
            echo $? > "$R/$id.status"
        else
            echo 126 > "$R/$id.status"
        fi
    ) 2>&1 | $B tee "$R/$id.out"
done < $R/plan
echo done > $R/done
$B sync
say "guest done after $($B cut -d' ' -f1 /proc/uptime) s"
$B poweroff -f
"#;

/// The initramfs: busybox, the two stages and the kernel modules, as an uncompressed newc cpio.
fn initramfs_image(kernel: &Kernel, busybox: &[u8], workspace: &Workspace) -> Result<Vec<u8>> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "host", "newroot", "modules"] {
        cpio.entry(dir, 0o040_755, (0, 0), &[]);
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    cpio.entry("dev/console", 0o020_600, (5, 1), &[]);
    cpio.entry("bin/busybox", 0o100_755, (0, 0), busybox);
    // A workspace below a directory the guest does not share or replaces with a tmpfs (a CI
    // clone under /tmp, say) gets an overlay of its own, moved into place after those mounts.
    let ws = workspace
        .root
        .to_str()
        .context("the workspace path is not UTF-8")?;
    ensure!(
        !ws.contains(['"', '$', '`', '\\']),
        "unsupported characters in the workspace path {ws}"
    );
    let hidden = HOST_DIRS_SKIPPED
        .split(' ')
        .chain(["var/lib"])
        .any(|d| workspace.root.starts_with(Path::new("/").join(d)));
    let ws_share = if hidden { ws } else { "" };
    let stage1 = STAGE1
        .replace("@SKIPPED@", HOST_DIRS_SKIPPED)
        .replace("@WORKSPACE_SHARE@", ws_share);
    cpio.entry("init", 0o100_755, (0, 0), stage1.as_bytes());
    let stage2 = STAGE2
        .replace("@CONTROLLERS@", GUEST_CONTROLLERS)
        .replace("@WORKSPACE_SHARE@", ws_share);
    cpio.entry("stage2", 0o100_755, (0, 0), stage2.as_bytes());
    let modules = kernel.modules()?;
    for module in &modules {
        let path = kernel.dir.join("modules").join(module);
        let data = fs::read(&path).with_context(|| format!("failed to read {}", path.display()))?;
        cpio.entry(&format!("modules/{module}"), 0o100_644, (0, 0), &data);
    }
    let order: String = modules.iter().map(|m| format!("{m}\n")).collect();
    cpio.entry("modules/order", 0o100_644, (0, 0), order.as_bytes());
    Ok(cpio.finish())
}

/// A writer of the "newc" cpio format the kernel unpacks initramfs images from.
#[derive(Debug, Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    /// Appends one entry; `rdev` is the (major, minor) of a device node.
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("initramfs file over 4 GiB"),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("huge file name"),
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// How the guest ended.
#[derive(Debug)]
struct GuestRun {
    status: ExitStatus,
    timed_out: bool,
    elapsed: Duration,
}

/// Boots the guest and waits for it to power off, killing it after `opts.timeout`. qemu's serial
/// console is written to `console_log` (and echoed unless `--quiet`).
fn boot(
    opts: &Options,
    kernel: &Kernel,
    initramfs: &Path,
    disk: &Path,
    results: &Path,
    console_log: &Path,
) -> Result<GuestRun> {
    let started = Instant::now();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", &opts.accel, "-cpu", "max"])
        .args(["-m", &opts.memory_mib.to_string()])
        .args(["-smp", &opts.cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initramfs)
        // cache=unsafe: the disk is scratch, recreated on every run, so host flushes only cost.
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            disk.display()
        ))
        // panic=-1 + -no-reboot: a guest panic ends qemu at once instead of waiting for the timeout.
        .args([
            "-append",
            "console=ttyS0 cgroup_no_v1=all panic=-1 quiet loglevel=4",
        ])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=results,security_model=none,multidevs=remap",
            results.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let log = File::create(console_log)
        .with_context(|| format!("failed to create {}", console_log.display()))?;
    let log = Arc::new(Mutex::new(log));
    let mut child = cmd.spawn().context("failed to start qemu-system-x86_64")?;
    // Drain stdout and stderr together so qemu never blocks on a full pipe.
    let pumps = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|source| {
        let log = Arc::clone(&log);
        let echo = !opts.quiet;
        thread::spawn(move || pump(source, &log, echo))
    })
    .collect::<Vec<_>>();

    let deadline = started + opts.timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("failed to wait for qemu")? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            // Ignore the error: qemu may have exited between try_wait and kill.
            let _ = child.kill();
            break child.wait().context("failed to wait for the killed qemu")?;
        }
        thread::sleep(Duration::from_millis(100));
    };
    for pump in pumps {
        let _ = pump.join();
    }
    if timed_out {
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            log,
            "\nvm-test: guest killed by the host after {} s",
            opts.timeout.as_secs()
        );
    }
    Ok(GuestRun {
        status,
        timed_out,
        elapsed: started.elapsed(),
    })
}

/// Copies `source` to the console log (and stderr when `echo`) until EOF.
fn pump(mut source: Box<dyn Read + Send>, log: &Mutex<File>, echo: bool) {
    let mut buf = [0u8; 8192];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            // A full disk must not stop the guest: the results share is what counts.
            let _ = log.write_all(&buf[..n]);
        }
        if echo {
            let _ = io::stderr().write_all(&buf[..n]);
        }
    }
}

/// What libtest printed for one binary.
#[derive(Debug, Default, PartialEq, Eq)]
struct LibtestOutput {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Whether the `test result:` line was seen.
    finished: bool,
    failed_names: Vec<String>,
    /// Tests libtest reported as running for over 60 s: the suspects when a binary hangs.
    slow_names: Vec<String>,
    /// Every test with a result line (ok, FAILED, ignored).
    finished_names: HashSet<String>,
}

/// Parses libtest's human output: `test NAME ... FAILED`, the final `failures:` list and
/// `test result: ... N passed; M failed; K ignored; ...`.
fn parse_libtest(output: &str) -> LibtestOutput {
    let mut parsed = LibtestOutput::default();
    let mut in_failure_list = false;
    for line in output.lines() {
        let line = line.trim_end_matches('\r');
        if in_failure_list {
            if let Some(name) = line.strip_prefix("    ") {
                push_unique(&mut parsed.failed_names, name.trim());
                continue;
            }
            in_failure_list = false;
        }
        if line == "failures:" {
            // The first `failures:` heads the captured outputs (`---- NAME stdout ----`), the
            // second the indented names; only indented lines are taken.
            in_failure_list = true;
        } else if let Some(summary) = line.strip_prefix("test result: ") {
            parsed.finished = true;
            for part in summary.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(count)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(count) = count.parse::<u64>() else {
                    continue;
                };
                match what {
                    "passed" => parsed.passed += count,
                    "failed" => parsed.failed += count,
                    "ignored" => parsed.ignored += count,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, _)) = rest.split_once(" ... ") {
                parsed
                    .finished_names
                    .insert(name.trim_end_matches(" - should panic").to_owned());
            }
            if let Some(name) = rest.strip_suffix(" ... FAILED") {
                push_unique(
                    &mut parsed.failed_names,
                    name.trim_end_matches(" - should panic"),
                );
            } else if let Some(name) = rest.strip_suffix(" has been running for over 60 seconds") {
                push_unique(&mut parsed.slow_names, name);
            }
        }
    }
    parsed
}

fn push_unique(names: &mut Vec<String>, name: &str) {
    if !name.is_empty() && !names.iter().any(|n| n == name) {
        names.push(name.to_owned());
    }
}

/// The outcome of one test binary in the guest.
#[derive(Debug)]
struct BinaryReport {
    binary: TestBinary,
    /// Exit status; `None` when the binary never finished (guest killed or crashed).
    status: Option<i32>,
    /// Whether the guest started it (its output file exists).
    started: bool,
    output: LibtestOutput,
    /// Tests `--list` named that printed no result: where a killed binary hung.
    unfinished: Vec<String>,
}

impl BinaryReport {
    /// Whether the binary failed without libtest naming a failed test (crash, timeout, setup).
    fn failed_unnamed(&self) -> bool {
        self.status != Some(0) && self.output.failed == 0 && self.output.failed_names.is_empty()
    }
}

/// Results of the whole lane.
#[derive(Debug)]
struct Report {
    /// The results share: `<id>.out` and `<id>.status` per binary.
    results: PathBuf,
    binaries: Vec<BinaryReport>,
    guest_info: String,
    guest_done: bool,
    passed: u64,
    /// Failed tests, plus binaries that failed without naming a test.
    failed: u64,
}

impl Report {
    fn collect(results: &Path, binaries: &[TestBinary]) -> Result<Report> {
        let mut reports = Vec::new();
        let (mut passed, mut failed) = (0, 0);
        for binary in binaries {
            let read = |ext: &str| fs::read_to_string(results.join(format!("{}.{ext}", binary.id)));
            let status = read("status").ok().and_then(|s| s.trim().parse().ok());
            let output = read("out").ok();
            let started = output.is_some();
            let output = parse_libtest(&output.unwrap_or_default());
            let unfinished = read("list")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.strip_suffix(": test"))
                .filter(|name| !output.finished_names.contains(*name))
                .map(str::to_owned)
                .collect();
            let report = BinaryReport {
                binary: binary.clone(),
                status,
                started,
                output,
                unfinished,
            };
            passed += report.output.passed;
            failed += report
                .output
                .failed
                .max(report.output.failed_names.len() as u64);
            if report.failed_unnamed() {
                failed += 1;
            }
            reports.push(report);
        }
        Ok(Report {
            results: results.to_owned(),
            binaries: reports,
            guest_info: fs::read_to_string(results.join("guest-info")).unwrap_or_default(),
            guest_done: results.join("done").exists(),
            passed,
            failed,
        })
    }

    fn print(&self) {
        let mut info = self.guest_info.lines();
        if let (Some(release), Some(controllers)) = (info.next(), info.next()) {
            eprintln!(
                "vm-test: guest kernel {release}, root cgroup.subtree_control: {controllers}"
            );
        }
        for b in &self.binaries {
            let o = &b.output;
            let verdict = match b.status {
                None if b.started => "did not finish".to_owned(),
                None => "not started".to_owned(),
                Some(0) => "ok".to_owned(),
                Some(137) => "KILLED (--binary-timeout or the guest's OOM killer)".to_owned(),
                Some(code) => format!("FAILED, status {code}"),
            };
            eprintln!(
                "vm-test: {}: {verdict}: {} passed, {} failed, {} ignored",
                b.binary.name, o.passed, o.failed, o.ignored
            );
            for name in &o.failed_names {
                eprintln!("vm-test:     FAILED {name}");
            }
            if b.status != Some(0) && b.started {
                for name in &o.slow_names {
                    eprintln!("vm-test:     ran for over 60 s: {name}");
                }
                for name in &b.unfinished {
                    eprintln!("vm-test:     never finished: {name}");
                }
                if !o.finished && b.status.is_some_and(|s| s != 137) {
                    eprintln!("vm-test:     libtest printed no result line: crash? see the output");
                }
                eprintln!(
                    "vm-test:     output: {}",
                    self.results.join(format!("{}.out", b.binary.id)).display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILING: &str = "
running 3 tests
test a::ok ... ok
test a::bad ... FAILED
test a::panics - should panic ... FAILED
test a::skip ... ignored
test a::slow has been running for over 60 seconds

failures:

---- a::bad stdout ----
thread 'a::bad' panicked at src/lib.rs:1:1:
boom

failures:
    a::bad
    a::panics

test result: FAILED. 1 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s
";

    #[test]
    fn libtest_failures_are_named_and_counted() {
        let parsed = parse_libtest(FAILING);
        assert_eq!(parsed.passed, 1);
        assert_eq!(parsed.failed, 2);
        assert_eq!(parsed.ignored, 1);
        assert!(parsed.finished);
        assert_eq!(parsed.failed_names, ["a::bad", "a::panics"]);
        assert_eq!(parsed.slow_names, ["a::slow"]);
        let finished: HashSet<String> = ["a::ok", "a::bad", "a::panics", "a::skip"]
            .map(String::from)
            .into();
        assert_eq!(parsed.finished_names, finished);
    }

    #[test]
    fn libtest_output_cut_short_is_not_finished() {
        let parsed = parse_libtest("running 2 tests\ntest x ... ok\n");
        assert!(!parsed.finished);
        assert_eq!(parsed.passed, 0);
        assert!(parsed.failed_names.is_empty());
    }

    #[test]
    fn crashed_binary_counts_as_one_failure() {
        let report = BinaryReport {
            binary: TestBinary {
                id: "00-x".into(),
                name: "x".into(),
                exe: "/x".into(),
                cwd: "/".into(),
            },
            status: Some(101),
            started: true,
            unfinished: Vec::new(),
            output: parse_libtest("running 1 test\n"),
        };
        assert!(report.failed_unnamed());
    }

    #[test]
    fn module_dependencies_load_first() {
        let dep = "\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/fs/overlayfs/overlay.ko:
";
        let order = module_load_order(dep, "kernel/fs/overlayfs/overlay.ko\n", &["9p", "overlay"])
            .expect("order");
        assert_eq!(
            order,
            [
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/fscache/fscache.ko",
                "kernel/net/9p/9pnet.ko",
                "kernel/fs/9p/9p.ko"
            ]
        );
        assert!(module_load_order(dep, "", &["nope"]).is_err());
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut cpio = Cpio::default();
        cpio.entry("init", 0o100_755, (0, 0), b"#!/bin/sh\n");
        let out = cpio.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // name size field (12th) of the first entry: "init" + NUL
        assert_eq!(&out[6 + 11 * 8..6 + 12 * 8], b"00000005");
        let trailer = out
            .windows(10)
            .position(|w| w == b"TRAILER!!!")
            .expect("trailer");
        assert!(trailer > 110);
    }

    #[test]
    fn static_elf_is_recognised() {
        let busybox = fs::read(BUSYBOX);
        let own = fs::read("/proc/self/exe").expect("read own executable");
        // Test binaries are dynamically linked against glibc.
        assert!(!is_static_elf(&own));
        assert!(!is_static_elf(b"not an elf"));
        if let Ok(busybox) = busybox
            && package_installed("busybox-static").unwrap_or(false)
        {
            assert!(is_static_elf(&busybox));
        }
    }

    #[test]
    fn options_parse() {
        let opts = Options::parse(
            ["--timeout", "60", "--quiet", "--", "vm_sanity", "--exact"]
                .map(String::from)
                .to_vec(),
        )
        .expect("parse")
        .expect("not help");
        assert_eq!(opts.timeout, Duration::from_secs(60));
        assert!(opts.quiet);
        assert_eq!(opts.test_args, ["vm_sanity", "--exact"]);
        assert!(Options::parse(vec!["--bogus".into()]).is_err());
        assert!(Options::parse(vec!["--cpus".into()]).is_err());
    }
}
