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
fn starts_with_the_arch_check_and_the_abi_guard() {
    let prog = default_filter().expect("default filter");
    let head: Vec<_> = arch_head().into_iter().chain(abi_guard()).collect();
    assert_eq!(prog[..head.len()], head[..]);
    // A seccompiler program without the architecture check is refused, not assembled blindly.
    let headless = vec![(0, prog[3..].to_vec())];
    assert!(matches!(
        assemble(&headless),
        Err(SeccompError::UnexpectedLayout { .. })
    ));
}

/// The kernel's verdict on one call, from a classic-BPF interpreter of the opcodes seccompiler and
/// [`assemble`] emit.
fn verdict(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    let word = |offset: u32| -> u32 {
        match offset {
            SECCOMP_DATA_NR => nr,
            SECCOMP_DATA_ARCH => arch,
            16..=63 => {
                let arg = args[usize::try_from((offset - 16) / 8).expect("small")];
                let [lo, hi] = [arg as u32, (arg >> 32) as u32];
                if offset.is_multiple_of(8) { lo } else { hi }
            }
            _ => panic!("load from offset {offset}"),
        }
    };
    let (mut acc, mut pc) = (0_u32, 0_usize);
    loop {
        let insn = &prog[pc];
        pc += 1;
        let branch = |taken: bool| usize::from(if taken { insn.jt } else { insn.jf });
        match insn.code {
            BPF_LD_W_ABS => acc = word(insn.k),
            0x54 => acc &= insn.k, // BPF_ALU | BPF_AND | BPF_K
            BPF_JMP_JA => pc += usize::try_from(insn.k).expect("small"),
            BPF_JMP_JEQ_K => pc += branch(acc == insn.k),
            BPF_JMP_JGE_K => pc += branch(acc >= insn.k),
            0x25 => pc += branch(acc > insn.k), // BPF_JMP | BPF_JGT | BPF_K
            BPF_RET_K => return insn.k,
            code => panic!("opcode {code:#x} at {}", pc - 1),
        }
    }
}

/// Runs the compiled program, with the interpreter above, on every syscall number and on the
/// arguments each conditional entry looks at, against the verdicts the denylist table states.
/// The peephole pass changes no verdict: the program before and after it, run by the
/// interpreter on every syscall number with argument 0 set to each value a rule looks at (and
/// neighbours), in the native and a foreign ABI.
#[test]
fn threaded_program_gives_the_same_verdicts() {
    let buckets = buckets(GROUPS).expect("buckets");
    let before = assemble_unthreaded(&buckets).expect("assemble");
    let after = assemble(&buckets).expect("assemble");
    assert!(
        after.len() * 3 < before.len() * 2,
        "the pass should drop at least a third of {} instructions, left {}",
        before.len(),
        after.len()
    );
    let mut values: Vec<u64> = vec![0, 1, 40, 41, u64::from(u32::MAX), 1 << 32, u64::MAX];
    for d in GROUPS.iter().flat_map(|g| g.calls) {
        match d.when {
            When::Always => {}
            When::AnyBitSet { bits, .. } => values.extend(bits.iter().map(|&b| u64::from(b))),
            When::Equals { value, .. } => values.push(u64::from(value)),
            When::NoneOf { allowed, .. } => values.extend(allowed.iter().map(|&v| u64::from(v))),
        }
    }
    let more: Vec<u64> = values
        .iter()
        .flat_map(|&v| [v | 1, v ^ 0x0002_0000, v << 32])
        .collect();
    values.extend(more);
    for arch in [AUDIT_ARCH_NATIVE, 0x4000_0003] {
        for nr in (0..1024_u32).chain([u32::MAX, 0x4000_0027, 0x4000_00a5]) {
            for &v in &values {
                let args = [v, 0, 0, 0, 0, 0];
                assert_eq!(
                    verdict(&before, arch, nr, args),
                    verdict(&after, arch, nr, args),
                    "arch {arch:#x} syscall {nr} arg0 {v:#x}"
                );
            }
        }
    }
}

#[test]
fn program_gives_the_table_verdicts() {
    let prog = default_filter().expect("default filter");
    let allow = libc::SECCOMP_RET_ALLOW;
    let eperm = libc::SECCOMP_RET_ERRNO | 1;
    let enosys = libc::SECCOMP_RET_ERRNO | 38;
    let kill = libc::SECCOMP_RET_KILL_PROCESS;
    let entries: Vec<&Denied> = GROUPS.iter().flat_map(|g| g.calls).collect();
    let call = |nr: u32, arg0: u64| verdict(prog, AUDIT_ARCH_NATIVE, nr, [arg0, 0, 0, 0, 0, 0]);

    for nr in 0..1024_u32 {
        let entry = entries.iter().find(|d| d.nr == i64::from(nr));
        let expected = match entry.map(|d| d.when) {
            _ if i64::from(nr) == libc::SYS_clone3 => enosys,
            Some(When::Always) => eperm,
            // Argument 0 is zero: no bit set, not AF_VSOCK, personality(PER_LINUX).
            Some(_) | None => allow,
        };
        assert_eq!(call(nr, 0), expected, "syscall {nr} ({entry:?})");
    }
    for d in &entries {
        let nr = u32::try_from(d.nr).expect("small");
        match d.when {
            When::Always => {}
            When::AnyBitSet { bits, .. } => {
                for &bit in bits {
                    assert_eq!(call(nr, u64::from(bit)), eperm, "{}({bit:#x})", d.name);
                    // Only the low 32 bits count.
                    assert_eq!(
                        call(nr, u64::from(bit) << 32),
                        allow,
                        "{}({bit:#x}<<32)",
                        d.name
                    );
                }
            }
            When::Equals { value, .. } => {
                assert_eq!(call(nr, u64::from(value)), eperm, "{}({value})", d.name);
                assert_eq!(
                    call(nr, u64::from(value) + 1),
                    allow,
                    "{}({value}+1)",
                    d.name
                );
            }
            When::NoneOf { allowed, .. } => {
                for &v in allowed {
                    assert_eq!(call(nr, u64::from(v)), allow, "{}({v:#x})", d.name);
                    assert_eq!(
                        call(nr, u64::from(v) | 1 << 40),
                        allow,
                        "{}({v:#x}|1<<40)",
                        d.name
                    );
                }
                for v in [1, 0x0004_0000, 0x0040_0000, 0xffff_fffe] {
                    assert_eq!(call(nr, v), eperm, "{}({v:#x})", d.name);
                }
            }
        }
    }
    // Foreign ABIs are killed; -1, which tracers use to skip a call, is not.
    let i386 = 0x4000_0003;
    assert_eq!(verdict(prog, i386, 20, [0; 6]), kill, "i386 getpid");
    #[cfg(target_arch = "x86_64")]
    {
        assert_eq!(call(X32_SYSCALL_BIT | 39, 0), kill, "x32 getpid");
        assert_eq!(call(X32_SYSCALL_BIT | 165, 0), kill, "x32 mount");
    }
    assert_eq!(call(u32::MAX, 0), allow, "syscall -1");
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
/// action cache answers without running the program (getpid) and one whose arguments the program
/// must inspect (personality). Installs are compared with a one-rule filter, to separate the
/// kernel's fixed cost from the part that grows with the program.
#[test]
#[ignore = "measurement: cargo test -p joblet-runtime --release seccomp::tests::measure -- --ignored --nocapture"]
fn measure_filter_cost() {
    print!("{}", child_succeeds("measure"));
}

fn measure() {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    const CALLS: u32 = 1_000_000;
    const ROUNDS: u32 = 5;
    const INSTALLS: u32 = 20;
    // Minimum over rounds: other load on the machine only ever adds time.
    let per_call = |f: &dyn Fn()| {
        (0..ROUNDS)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..CALLS {
                    f();
                }
                start.elapsed().as_secs_f64() * 1e9 / f64::from(CALLS)
            })
            .fold(f64::INFINITY, f64::min)
    };
    let min_install = |prog: &[sock_filter]| {
        (0..INSTALLS)
            .map(|_| {
                let start = Instant::now();
                install(prog).expect("install");
                start.elapsed()
            })
            .min()
            .unwrap_or(Duration::ZERO)
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

    // Every further install stacks one more filter; the kernel allows 32768 instructions in all
    // (plus 4 per filter), so keep the count low.
    let one_rule = compile_one_rule();
    let tiny = min_install(&one_rule);
    let full = min_install(prog);

    println!(
        "filter: {} BPF instructions (one-rule filter: {})",
        prog.len(),
        one_rule.len()
    );
    println!("compile (first default_filter call): {compile:?}");
    println!(
        "install: first {first_install:?}; min of {INSTALLS} more {full:?} (one-rule filter: {tiny:?})"
    );
    println!(
        "getpid: {getpid_before:.1} ns/call without, {getpid_after:.1} ns/call with the filter"
    );
    println!("personality(0xffffffff): {query_before:.1} ns/call without, {query_after:.1} with");
}

fn compile_one_rule() -> BpfProgram {
    let rules = [(libc::SYS_reboot, Vec::new())].into_iter().collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(1),
        target_arch().expect("target arch"),
    )
    .expect("one-rule filter");
    BpfProgram::try_from(filter).expect("compile one-rule filter")
}
