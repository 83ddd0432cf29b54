//! Tests of the default filter.
//!
//! A filter can never be removed, so every test that installs one runs in a child process: this
//! test binary re-executed into [`child_entry`] with a role in `JOBLET_SECCOMP_TEST_ROLE`. Each
//! filtered role has an unfiltered control, which shows that the same calls behave differently
//! without the filter (the tests can fail).

use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, Output};

use rustix::io::Errno;

use super::*;
use crate::sys::seccomp::testing;
use crate::testsupport;

const ROLE_ENV: &str = "JOBLET_SECCOMP_TEST_ROLE";

/// Runs `role` in a re-executed copy of this test binary.
fn run_child(role: &str) -> Output {
    let exe = std::env::current_exe().expect("path of the running test binary");
    Command::new(exe)
        .args([
            "seccomp::tests::child_entry",
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, role)
        .output()
        .unwrap_or_else(|e| panic!("failed to re-execute the test binary for role {role}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `role` and returns its stdout; panics with its output unless it succeeded.
fn child_succeeds(role: &str) -> String {
    let out = run_child(role);
    assert!(
        out.status.success(),
        "child role {role} failed: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "entry point of the child processes the other tests re-execute this binary into"]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        eprintln!("child_entry only runs re-executed by the other seccomp tests");
        return;
    };
    // A session of its own, without a controlling terminal: `vhangup` must have none to hang up
    // if the filter let it through.
    rustix::process::setsid().expect("setsid");
    match role.as_str() {
        "denylist" => denylist(true),
        "denylist-control" => denylist(false),
        "mount" => mount(true),
        "mount-control" => mount(false),
        "ordinary" => ordinary(),
        "clone3-control" => {
            assert_eq!(
                testing::clone3_invalid(),
                Errno::INVAL,
                "clone3(NULL, 0) without filter"
            );
        }
        #[cfg(target_arch = "x86_64")]
        "i386" => {
            install_default();
            let pid = testing::i386_getpid();
            println!("i386 getpid returned {pid} under the filter");
        }
        #[cfg(target_arch = "x86_64")]
        "i386-control" => {
            let pid = testing::i386_getpid();
            assert_eq!(
                pid,
                i64::from(std::process::id()),
                "i386 getpid without filter"
            );
        }
        #[cfg(target_arch = "x86_64")]
        "x32" => {
            install_default();
            let r = testing::x32_getpid();
            println!("x32 getpid returned {r:?} under the filter");
        }
        #[cfg(target_arch = "x86_64")]
        "x32-control" => {
            let r = testing::x32_getpid();
            println!("x32 getpid without filter: {r:?}");
        }
        "measure" => measure(),
        other => panic!("unknown child role {other}"),
    }
}

fn install_default() {
    rustix::thread::set_no_new_privs(true).expect("set no_new_privs");
    install(default_filter().expect("default filter")).expect("install the default filter");
}

/// Gives the child a mount namespace of its own whose mounts do not propagate to the host, so a
/// filter that failed to deny `mount` cannot change the host's mount table.
fn private_mount_ns() {
    let unshare = GROUPS
        .iter()
        .flat_map(|g| g.calls)
        .find(|d| d.nr == libc::SYS_unshare)
        .expect("unshare is in the denylist");
    testing::call_denied(unshare, Some(CLONE_NEWNS)).expect("unshare(CLONE_NEWNS)");
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
    )
    .expect("make / private");
}

/// One call of a denylisted syscall, and whether the filter must deny it.
#[derive(Debug)]
struct Probe {
    denied: Denied,
    value: Option<u32>,
    must_deny: bool,
}

/// The calls each denylist entry must deny, and neighbours it must let through.
fn probes() -> Vec<Probe> {
    let mut probes = Vec::new();
    for &denied in GROUPS.iter().flat_map(|g| g.calls) {
        let mut push = |value, must_deny| {
            probes.push(Probe {
                denied,
                value,
                must_deny,
            })
        };
        match denied.when {
            When::Always => push(None, true),
            When::AnyBitSet { bits, .. } => {
                bits.iter().for_each(|&bit| push(Some(bit), true));
                push(Some(0), false);
            }
            When::Equals { value, .. } => {
                push(Some(value), true);
                push(Some(value + 1), false);
            }
            When::NoneOf { allowed, .. } => {
                allowed.iter().for_each(|&v| push(Some(v), false));
                // personality: 1, ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC.
                let outside = [1, 0x0004_0000, 0x0040_0000];
                assert!(outside.iter().all(|v| !allowed.contains(v)));
                outside.iter().for_each(|&v| push(Some(v), true));
            }
        }
    }
    probes
}

fn probe_name(p: &Probe) -> String {
    match p.value {
        None => format!("{}(all ones)", p.denied.syscall()),
        Some(v) => format!("{}({v:#x})", p.denied.syscall()),
    }
}

/// Calls every probe; with the filter, checks the verdict of each; without, that the kernel's own
/// answer is not `EPERM` (as root), so that `EPERM` under the filter comes from the filter.
fn denylist(filtered: bool) {
    private_mount_ns();
    if filtered {
        install_default();
    }
    let mut wrong = Vec::new();
    for p in probes() {
        let got = testing::call_denied(&p.denied, p.value);
        println!("{:<40} {got:?}", probe_name(&p));
        let eperm = got == Err(Errno::PERM);
        if filtered && eperm != p.must_deny {
            wrong.push(format!(
                "{}: {got:?}, must deny: {}",
                probe_name(&p),
                p.must_deny
            ));
        }
        if !filtered && eperm && !HOST_POLICY_MAY_DENY.contains(&p.denied.syscall()) {
            wrong.push(format!("{}: EPERM without the filter", probe_name(&p)));
        }
    }
    if filtered {
        assert_eq!(
            testing::clone3_invalid(),
            Errno::NOSYS,
            "clone3 under the filter"
        );
    } else {
        assert_eq!(
            testing::clone3_invalid(),
            Errno::INVAL,
            "clone3 without the filter"
        );
    }
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
}

/// Calls that root may still be refused by host policy rather than by the filter (lockdown,
/// sysctls), and so are not held to "not EPERM" in the unfiltered control.
const HOST_POLICY_MAY_DENY: &[&str] = &[
    "kexec_load",
    "kexec_file_load",
    "iopl",
    "ioperm",
    "bpf",
    "perf_event_open",
    "io_uring_setup",
    "userfaultfd",
];

/// A real `mount` of a tmpfs, in a private mount namespace.
fn mount(filtered: bool) {
    private_mount_ns();
    let dir = tempfile::tempdir().expect("tempdir");
    if filtered {
        install_default();
    }
    let got = rustix::mount::mount(
        "joblet-test",
        dir.path(),
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    );
    println!("mount tmpfs on {}: {got:?}", dir.path().display());
    if filtered {
        assert_eq!(got, Err(Errno::PERM), "mount under the filter");
    } else {
        got.expect("mount tmpfs without the filter");
        rustix::mount::unmount(dir.path(), rustix::mount::UnmountFlags::empty()).expect("unmount");
    }
}

/// What ordinary programs do still works under the filter.
fn ordinary() {
    install_default();

    // The harness may run this on a thread of its own; the filter is per thread.
    let status =
        std::fs::read_to_string("/proc/thread-self/status").expect("read /proc/thread-self/status");
    assert!(
        status.contains("Seccomp:\t2\n"),
        "not in filter mode:\n{status}"
    );

    let pid = rustix::process::getpid();
    assert_eq!(
        pid.as_raw_nonzero().get().unsigned_abs(),
        std::process::id()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("data");
    std::fs::write(&file, b"joblet").expect("write a file");
    assert_eq!(std::fs::read(&file).expect("read it back"), b"joblet");

    let (r, w) = rustix::pipe::pipe().expect("pipe");
    assert_eq!(rustix::io::write(&w, b"x"), Ok(1));
    let mut buf = [0_u8; 1];
    assert_eq!(rustix::io::read(&r, &mut buf), Ok(1));

    // pthread_create tries clone3 first and falls back to clone on ENOSYS.
    assert_eq!(
        testing::clone3_invalid(),
        Errno::NOSYS,
        "clone3 under the filter"
    );
    let main_tid = rustix::thread::gettid();
    let thread_tid = std::thread::spawn(rustix::thread::gettid)
        .join()
        .expect("join thread");
    assert_ne!(thread_tid, main_tid);

    // fork/vfork + exec, and the filter follows the job into what it executes.
    let status = Command::new("/bin/true").status().expect("spawn /bin/true");
    assert!(status.success(), "/bin/true: {status}");
    let out = Command::new("/bin/sh")
        .args(["-c", "grep '^Seccomp:' /proc/self/status && exit 3"])
        .output()
        .expect("spawn /bin/sh");
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Seccomp:\t2\n");

    // Sockets other than AF_VSOCK.
    std::os::unix::net::UnixStream::pair().expect("unix socketpair");
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback TCP socket");

    // -1 is no syscall, but tracers use it: ENOSYS, not a kill.
    assert_eq!(testing::nr_minus_one(), Err(Errno::NOSYS));
}

#[test]
fn compiles_once_for_the_host_arch() {
    let prog = default_filter().expect("default filter");
    assert!(
        prog.len() < 4096,
        "{} instructions exceed BPF_MAXINSNS",
        prog.len()
    );
    assert!(
        std::ptr::eq(prog, default_filter().expect("default filter")),
        "compiled twice"
    );
}

#[test]
fn abi_guard_follows_the_arch_check() {
    let prog = default_filter().expect("default filter");
    assert_eq!(prog[0], stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH));
    assert_eq!(prog[1], jump(BPF_JMP_JEQ_K, AUDIT_ARCH_NATIVE, 1, 0));
    assert_eq!(prog[2], stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS));
    assert_eq!(prog[3], stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR));
    let enosys = stmt(BPF_RET_K, libc::SECCOMP_RET_ERRNO | 38);
    let clone3_at = prog
        .iter()
        .position(|i| *i == enosys)
        .expect("clone3 returns ENOSYS");
    assert_eq!(prog[clone3_at - 1], jump(BPF_JMP_JEQ_K, 435, 0, 1));
    // seccompiler's program resumes with its own load of the syscall number.
    assert_eq!(prog[clone3_at + 1], stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR));
    // A program without seccompiler's head is refused, not spliced blindly.
    assert!(matches!(
        splice_abi_guard(prog[3..].to_vec()),
        Err(SeccompError::UnexpectedLayout { .. })
    ));
}

#[test]
fn denylist_is_well_formed() {
    let mut seen = std::collections::HashSet::new();
    for group in GROUPS {
        assert!(
            !group.calls.is_empty() && !group.reason.is_empty(),
            "group {}",
            group.name
        );
        for d in group.calls {
            assert!(seen.insert(d.nr), "{} listed twice", d.name);
            assert!(d.name.starts_with("SYS_"), "{}", d.name);
        }
    }
    for must in [
        "mount",
        "bpf",
        "kexec_load",
        "unshare",
        "setns",
        "init_module",
        "keyctl",
    ] {
        assert!(
            GROUPS
                .iter()
                .flat_map(|g| g.calls)
                .any(|d| d.syscall() == must),
            "{must}"
        );
    }
    // Never filtered: they are what every program runs on.
    for nr in [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_execve,
        libc::SYS_getpid,
        libc::SYS_futex,
    ] {
        assert!(!seen.contains(&nr), "syscall {nr} is denied");
    }
}

#[test]
fn denylist_denies_every_listed_call() {
    if !testsupport::root() {
        return;
    }
    let out = child_succeeds("denylist");
    assert!(out.contains("mount(all ones)"), "no probe output:\n{out}");
}

#[test]
fn denylist_probes_are_not_eperm_without_the_filter() {
    if !testsupport::root() {
        return;
    }
    child_succeeds("denylist-control");
}

#[test]
fn mount_is_denied() {
    if !testsupport::root() {
        return;
    }
    child_succeeds("mount-control");
    child_succeeds("mount");
}

#[test]
fn ordinary_programs_still_work() {
    child_succeeds("clone3-control");
    child_succeeds("ordinary");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn i386_abi_kills_the_job() {
    let available = || {
        let out = run_child("i386-control");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("int 0x80 does not work here: {}", describe(&out)))
        }
    };
    if !testsupport::privileged("the i386 syscall ABI (IA32 emulation)", available) {
        return;
    }
    let out = run_child("i386");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "{}",
        describe(&out)
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn x32_abi_kills_the_job() {
    child_succeeds("x32-control");
    let out = run_child("x32");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "{}",
        describe(&out)
    );
}

/// Prints what the filter costs: compiling, installing, and per call, for a call the kernel's
/// action cache answers (getpid) and one whose arguments the program must inspect (personality).
#[test]
#[ignore = "measurement: cargo test -p joblet-runtime --release seccomp::tests::measure -- --ignored --nocapture"]
fn measure_filter_cost() {
    print!("{}", child_succeeds("measure"));
}

fn measure() {
    use std::hint::black_box;
    use std::time::Instant;

    const CALLS: u32 = 2_000_000;
    const INSTALLS: u32 = 50;
    let per_call = |f: &dyn Fn()| {
        let start = Instant::now();
        for _ in 0..CALLS {
            f();
        }
        start.elapsed().as_secs_f64() * 1e9 / f64::from(CALLS)
    };
    let personality = GROUPS
        .iter()
        .flat_map(|g| g.calls)
        .find(|d| d.nr == libc::SYS_personality)
        .expect("personality is in the denylist");
    let getpid = || {
        black_box(rustix::process::getpid());
    };
    let query = || {
        black_box(testing::call_denied(personality, Some(u32::MAX))).expect("personality query");
    };

    let getpid_before = per_call(&getpid);
    let query_before = per_call(&query);

    let start = Instant::now();
    let prog = default_filter().expect("default filter");
    let compile = start.elapsed();
    rustix::thread::set_no_new_privs(true).expect("set no_new_privs");
    let start = Instant::now();
    install(prog).expect("install");
    let first_install = start.elapsed();

    let getpid_after = per_call(&getpid);
    let query_after = per_call(&query);

    let start = Instant::now();
    for _ in 0..INSTALLS {
        install(prog).expect("install again");
    }
    let install = start.elapsed() / INSTALLS;

    println!("filter: {} BPF instructions", prog.len());
    println!("compile (first default_filter call): {compile:?}");
    println!(
        "install (first seccomp call): {first_install:?}; mean of {INSTALLS} more: {install:?}"
    );
    println!(
        "getpid:  {getpid_before:.1} ns/call without, {getpid_after:.1} ns/call with the filter"
    );
    println!(
        "personality(0xffffffff): {query_before:.1} ns/call without, {query_after:.1} ns/call with"
    );
}
