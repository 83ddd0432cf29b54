//! Sanity checks of the machine the privileged tests run on, in both lanes: the hybrid host
//! (v1 controllers plus a controller-less cgroup2 at `unified/`) and the `cargo xtask vm-test`
//! guest (pure cgroup v2, every controller delegated from the root). Each test asserts what its
//! layout must provide, so a guest that silently lost its setup fails here, by name, rather than
//! as a confusing failure deep in a spawn test.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use joblet_runtime::testsupport;

/// The controllers joblet's v2 driver uses.
const V2_CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "io", "memory", "pids"];

/// The filesystem type mounted at `path` (the topmost mount), from /proc/self/mountinfo.
fn fstype_at(path: &str) -> Option<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let fstype = post.split(' ').next()?;
            (mount_point == path).then(|| fstype.to_owned())
        })
        .next_back()
}

fn words(path: &str) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn cgroup_fs() -> Result<(), String> {
    fstype_at("/sys/fs/cgroup")
        .map(|_| ())
        .ok_or_else(|| "nothing is mounted at /sys/fs/cgroup".to_owned())
}

#[test]
fn cgroup_layout_is_pure_v2_or_hybrid() {
    if !testsupport::privileged("a cgroup filesystem", cgroup_fs) {
        return;
    }
    let fstype = fstype_at("/sys/fs/cgroup").expect("probed above");
    match fstype.as_str() {
        "cgroup2" => {
            let available = words("/sys/fs/cgroup/cgroup.controllers");
            for c in V2_CONTROLLERS {
                assert!(
                    available.iter().any(|a| a == c),
                    "pure cgroup v2 host lacks the {c} controller (has {available:?})"
                );
            }
        }
        "tmpfs" => {
            assert_eq!(
                fstype_at("/sys/fs/cgroup/unified").as_deref(),
                Some("cgroup2"),
                "hybrid host without cgroup2 at /sys/fs/cgroup/unified"
            );
            for c in ["memory", "pids", "cpuset"] {
                let path = format!("/sys/fs/cgroup/{c}");
                assert_eq!(
                    fstype_at(&path).as_deref(),
                    Some("cgroup"),
                    "hybrid host without a v1 {c} hierarchy at {path}"
                );
            }
        }
        other => panic!("unknown cgroup layout: {other} at /sys/fs/cgroup"),
    }
    if testsupport::in_vm_lane() {
        assert_eq!(
            fstype, "cgroup2",
            "the VM lane's guest must be pure cgroup v2"
        );
        let cmdline = fs::read_to_string("/proc/cmdline").expect("read /proc/cmdline");
        assert!(
            cmdline.split_whitespace().any(|w| w == "cgroup_no_v1=all"),
            "guest booted without cgroup_no_v1=all: {cmdline}"
        );
        let delegated = words("/sys/fs/cgroup/cgroup.subtree_control");
        for c in V2_CONTROLLERS {
            assert!(
                delegated.iter().any(|d| d == c),
                "guest root cgroup does not delegate {c} (subtree_control: {delegated:?})"
            );
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
        assert!(
            !mountinfo.lines().any(|l| l.contains(" - cgroup ")),
            "a cgroup v1 hierarchy is mounted in the guest"
        );
    }
}

/// clone3 (5.3) with CLONE_INTO_CGROUP (5.7) is how jobs are spawned.
#[test]
fn kernel_has_clone3_with_clone_into_cgroup() {
    if !testsupport::root() {
        return;
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("read osrelease");
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    assert!(
        version >= (5, 7),
        "kernel {release} predates CLONE_INTO_CGROUP (5.7)"
    );
    let kallsyms = fs::read_to_string("/proc/kallsyms").expect("read /proc/kallsyms");
    assert!(
        kallsyms
            .lines()
            .any(|l| l.ends_with(" __x64_sys_clone3") || l.ends_with(" __do_sys_clone3")),
        "kernel {release} has no clone3 syscall in /proc/kallsyms"
    );
}

/// Tests start servers on 127.0.0.1: the guest must bring loopback up.
#[test]
fn loopback_carries_tcp() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let mut client = TcpStream::connect(addr).expect("connect to loopback listener");
    let (mut server, _) = listener.accept().expect("accept");
    client.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"ping");
}

/// The eBPF probes need BTF; in the VM lane also bpffs, tracefs and debugfs, which its init mounts.
#[test]
fn bpf_prerequisites_are_present() {
    let btf = "/sys/kernel/btf/vmlinux";
    if !testsupport::privileged("kernel BTF", || {
        fs::metadata(btf)
            .map(|_| ())
            .map_err(|e| format!("{btf}: {e}"))
    }) {
        return;
    }
    let mut magic = [0u8; 2];
    fs::File::open(btf)
        .and_then(|mut f| f.read_exact(&mut magic))
        .unwrap_or_else(|e| panic!("read {btf}: {e}"));
    assert_eq!(u16::from_le_bytes(magic), 0xeb9f, "{btf} is not BTF");
    if testsupport::in_vm_lane() {
        for (path, fstype) in [
            ("/sys/fs/bpf", "bpf"),
            ("/sys/kernel/tracing", "tracefs"),
            ("/sys/kernel/debug", "debugfs"),
        ] {
            assert_eq!(
                fstype_at(path).as_deref(),
                Some(fstype),
                "{path} in the guest"
            );
        }
        let id = "/sys/kernel/tracing/events/sched/sched_switch/id";
        assert!(
            fs::read_to_string(id).is_ok_and(|s| s.trim().parse::<u64>().is_ok()),
            "no tracepoint id at {id}"
        );
    }
}

/// Tests write to /tmp and to the target dir (`CARGO_TARGET_TMPDIR`); the guest sees the host's
/// read-only root under a writable overlay, so both must accept writes there too.
#[test]
fn scratch_dirs_are_writable() {
    let mut dirs = vec![std::env::temp_dir(), env!("CARGO_TARGET_TMPDIR").into()];
    if testsupport::in_vm_lane() {
        dirs.push("/var/lib".into());
    }
    for dir in dirs {
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let file = tempfile::NamedTempFile::new_in(&dir)
            .unwrap_or_else(|e| panic!("create a file in {}: {e}", dir.display()));
        fs::write(file.path(), b"x").unwrap_or_else(|e| panic!("write in {}: {e}", dir.display()));
    }
}

fn find_tool(name: &str) -> Result<std::path::PathBuf, String> {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|p| p.exists())
        .ok_or_else(|| format!("{name} (util-linux) is not installed"))
}

/// Jobs `pivot_root` into their minimal root, which the kernel refuses when `/` is the initramfs
/// (rootfs): the guest must have switched to a real root mount. Done by util-linux in a child, so
/// the test process's own mounts are untouched.
#[test]
fn root_mount_allows_pivot_root() {
    if !testsupport::privileged("unshare and pivot_root", || {
        find_tool("unshare")
            .and(find_tool("pivot_root"))
            .map(|_| ())
    }) {
        return;
    }
    let scratch = tempfile::tempdir().expect("create a scratch dir");
    let out = std::process::Command::new(find_tool("unshare").expect("probed"))
        .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
        .arg(
            "set -e; mount -t tmpfs joblet-sanity \"$1\"; mkdir \"$1/old\"; cd \"$1\"; \
             \"$2\" . old; echo pivoted",
        )
        .arg("sh")
        .arg(scratch.path())
        .arg(find_tool("pivot_root").expect("probed"))
        .output()
        .expect("run unshare");
    assert!(
        out.status.success() && out.stdout == b"pivoted\n",
        "pivot_root in a new mount namespace failed: {}, stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// io limits name the disk holding `/` (as on a production host), so `/` must be on a real block
/// device: in the guest, the ext4 disk the lane formats, not an overlay's anonymous device.
#[test]
fn root_is_on_a_block_device() {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata("/").expect("stat /").dev();
    let sys = format!(
        "/sys/dev/block/{}:{}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    if !testsupport::privileged("a block device holding /", || {
        fs::metadata(&sys)
            .map(|_| ())
            .map_err(|e| format!("{sys}: {e}"))
    }) {
        return;
    }
    let numbers = fs::read_to_string(format!("{sys}/dev")).expect("read the device number");
    assert_eq!(
        numbers.trim(),
        format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev))
    );
}
