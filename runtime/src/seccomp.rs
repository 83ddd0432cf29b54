//! The default seccomp filter every job runs under, and its installation.
//!
//! The filter is a denylist: a job may make any system call except the few that reach past its
//! sandbox into the host (kernel modules, reboot, swap, mounts, namespaces, raw I/O, the host clock
//! and keyrings) or that expose a large kernel attack surface an ordinary program can live
//! without (bpf, perf_event_open, userfaultfd, io_uring). Denied calls fail with `EPERM`, as under
//! Docker's default profile, so programs see the same error they would get without the
//! privilege; `clone3` alone fails with `ENOSYS`, because its flags live in memory a filter cannot
//! read: libc then falls back to `clone`, whose flags the filter can inspect.
//!
//! The denylist is written in the native ABI's syscall numbers, so it says nothing about another
//! ABI: a call through the i386 entry (`int 0x80` on x86_64, AArch32 on aarch64) or with the x32
//! bit set kills the job with `SIGSYS` instead of slipping past the list.
//!
//! The program is compiled once per process by [`default_filter`] (seccompiler generates the
//! rules, in small buckets that a hand-written binary tree dispatches to, after a hand-written ABI
//! guard, see [`compile`] and [`abi_guard`]), in the parent, before the clone: compiling
//! allocates. The spawned child installs it with [`install`], last, right before `execve`: it
//! denies `mount`, `pivot_root`, `setns` and `unshare`, which the child's own setup needs.
//! [`install`] is async-signal-safe, as the child of a `CLONE_VM | CLONE_VFORK` clone requires.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch, sock_filter,
};

/// Why the default filter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// joblet has no denylist for the architecture it was built for.
    #[error(
        "no default seccomp filter for architecture {arch}: joblet's denylist covers x86_64 and \
         aarch64 (run with seccomp disabled on this architecture)"
    )]
    UnsupportedArch {
        /// `std::env::consts::ARCH` of this build.
        arch: &'static str,
    },
    /// seccompiler rejected the rules.
    #[error("failed to compile the default seccomp filter for {arch}")]
    Compile {
        /// `std::env::consts::ARCH` of this build.
        arch: &'static str,
        /// seccompiler's reason.
        #[source]
        source: BackendError,
    },
    /// The assembled program exceeds the kernel's limit.
    #[error("failed to assemble the seccomp filter for {arch}: {len} instructions exceed 4096")]
    TooLong {
        /// `std::env::consts::ARCH` of this build.
        arch: &'static str,
        /// Its length.
        len: usize,
    },
    /// seccompiler's output did not have the shape `assemble` relies on.
    #[error(
        "failed to assemble the seccomp filter for {arch}: seccompiler's program does not start \
         with its architecture check"
    )]
    UnexpectedLayout {
        /// `std::env::consts::ARCH` of this build.
        arch: &'static str,
    },
}

/// The compiled default filter for the running architecture.
///
/// Compiled on first use and kept for the life of the process; a failure is not cached (it is
/// deterministic, so every call reports it). Call it in the parent before cloning a job: the
/// first call allocates.
///
/// # Errors
///
/// [`SeccompError::UnsupportedArch`] on architectures other than x86_64 and aarch64; the other
/// variants if the rules do not compile, which is a bug.
pub(crate) fn default_filter() -> Result<&'static BpfProgram, SeccompError> {
    static FILTER: OnceLock<BpfProgram> = OnceLock::new();
    if let Some(prog) = FILTER.get() {
        return Ok(prog);
    }
    let prog = compile(denylist()?)?;
    Ok(FILTER.get_or_init(|| prog))
}

/// Installs `prog` as a seccomp filter on the calling thread, which every thread and process it
/// creates afterwards, and every program it executes, inherits.
///
/// Async-signal-safe: a single `seccomp(SECCOMP_SET_MODE_FILTER)` system call, no allocation, no
/// lock. Call it last before `execve`, after `no_new_privs` is set (the kernel refuses a filter
/// from a thread without `CAP_SYS_ADMIN` otherwise, with `EACCES`), because the default filter
/// denies calls the child's setup makes (mount, pivot_root, setns, unshare).
///
/// # Errors
///
/// The errno of `seccomp(2)`: `EACCES` without `no_new_privs`, `EINVAL` for an empty or
/// malformed program, `ENOMEM` when the thread's filters would exceed the kernel's limit.
#[doc(alias = "seccomp")]
pub(crate) fn install(prog: &[sock_filter]) -> Result<(), rustix::io::Errno> {
    crate::sys::seccomp::set_mode_filter(prog)
}

/// What the filter does with a call whose number it lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum When {
    /// Deny every call.
    Always,
    /// Deny calls whose argument `arg` has any of `bits` set (compared on its low 32 bits, all
    /// the kernel reads of these flags).
    AnyBitSet {
        /// Argument index, 0-based.
        arg: u8,
        /// Single-bit masks.
        bits: &'static [u32],
    },
    /// Deny calls whose argument `arg` (low 32 bits) equals `value`.
    Equals {
        /// Argument index, 0-based.
        arg: u8,
        /// The denied value.
        value: u32,
    },
    /// Deny calls whose argument `arg` (low 32 bits) is none of `allowed`.
    NoneOf {
        /// Argument index, 0-based.
        arg: u8,
        /// The values still allowed.
        allowed: &'static [u32],
    },
}

/// One denied system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Denied {
    /// The libc constant's name, `SYS_mount`.
    pub(crate) name: &'static str,
    /// Its number in the native ABI.
    pub(crate) nr: i64,
    /// Which calls are denied.
    pub(crate) when: When,
}

impl Denied {
    /// The syscall's name without the `SYS_` prefix.
    #[cfg_attr(not(test), expect(dead_code, reason = "named in test failures"))]
    pub(crate) fn syscall(&self) -> &'static str {
        self.name.trim_start_matches("SYS_")
    }
}

/// A family of denied calls and the one reason they are denied.
#[derive(Debug)]
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "name and reason document the table; tests print them"
    )
)]
pub(crate) struct Group {
    /// Short name, in the spirit of systemd's `@reboot`, `@mount`...
    pub(crate) name: &'static str,
    /// Why a job has no business making these calls.
    pub(crate) reason: &'static str,
    /// The calls.
    pub(crate) calls: &'static [Denied],
}

/// `Denied { .. When::Always }` entries from the names of [`nr`]'s constants.
macro_rules! always {
    ($($sys:ident),* $(,)?) => {
        &[$(Denied { name: stringify!($sys), nr: nr::$sys, when: When::Always }),*]
    };
}

// `CLONE_NEW*` flags as u32 (libc declares them as c_int).
const CLONE_NEWNS: u32 = 0x0002_0000;
const CLONE_NEWCGROUP: u32 = 0x0200_0000;
const CLONE_NEWUTS: u32 = 0x0400_0000;
const CLONE_NEWIPC: u32 = 0x0800_0000;
const CLONE_NEWUSER: u32 = 0x1000_0000;
const CLONE_NEWPID: u32 = 0x2000_0000;
const CLONE_NEWNET: u32 = 0x4000_0000;
/// Only meaningful to `unshare` and `clone3`: in `clone`'s flags this bit belongs to the exit
/// signal (`CSIGNAL`).
const CLONE_NEWTIME: u32 = 0x0000_0080;

/// Namespace flags `clone` may not carry.
const CLONE_NS_FLAGS: &[u32] = &[
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
];

/// Namespace flags `unshare` may not carry.
const UNSHARE_NS_FLAGS: &[u32] = &[
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
    CLONE_NEWTIME,
];

/// `personality(2)` values that stay allowed: exactly Docker's default profile's list. `PER_LINUX`
/// (0), `PER_LINUX32` (8, what `linux32`/`setarch` use for 32-bit uname), `UNAME26` (0x20000) and
/// their combination, and 0xffffffff, the query glibc and others issue. Everything else (notably
/// `ADDR_NO_RANDOMIZE` and `READ_IMPLIES_EXEC`) would weaken the job's memory protections.
const PERSONALITY_ALLOWED: &[u32] = &[0, 8, 0x0002_0000, 0x0002_0008, 0xffff_ffff];

/// Syscall numbers: libc's, and those it does not declare yet (a local item shadows the glob, so
/// libc adding one later changes nothing).
mod nr {
    pub(super) use libc::*;

    /// `open_tree_attr(2)` (Linux 6.15): the same number on every architecture with the unified
    /// syscall table.
    #[expect(non_upper_case_globals, reason = "named like libc's SYS_* constants")]
    pub(super) const SYS_open_tree_attr: i64 = 467;
}

/// The denylist, by group.
///
/// Deliberately allowed, against some other profiles:
/// - `ptrace`, `process_vm_readv`/`writev`, `kcmp`, `pidfd_getfd`: since Linux 4.8 the kernel
///   re-runs seccomp after a tracer rewrites a call, so tracing cannot bypass the filter; the PID
///   namespace and the job's single uid already confine it to the job's own processes; and
///   debuggers and profilers (gdb, strace, py-spy) are ordinary tools in a batch job. Docker
///   allows them too on kernels >= 4.8.
/// - `adjtimex`, `clock_adjtime`: with `modes == 0` they are the read-only queries behind
///   `ntp_gettime(3)` and clock-sync checks; any change needs `CAP_SYS_TIME`, which jobs never
///   hold (Docker allows them for the same reason).
/// - `sethostname`, `setdomainname`: the job has its own UTS namespace.
/// - `get_mempolicy`, `set_mempolicy`, `mbind`, `move_pages`, `migrate_pages`: NUMA placement of
///   the job's own memory (JVMs and OpenMP runtimes use them); moving another process's pages
///   needs `CAP_SYS_NICE`.
/// - `modify_ldt`: Wine and old runtimes need it; Docker allows it.
/// - `seccomp`, `landlock_*`: a job may only restrict itself further.
/// - syscalls the kernel no longer implements (`create_module`, `tuxcall`...): they already fail
///   with `ENOSYS`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) const GROUPS: &[Group] = &[
    Group {
        name: "reboot",
        reason: "a job must not restart the host or replace its kernel",
        calls: always![SYS_reboot, SYS_kexec_load, SYS_kexec_file_load],
    },
    Group {
        name: "module",
        reason: "kernel modules run with full privilege for every process on the host",
        calls: always![SYS_init_module, SYS_finit_module, SYS_delete_module],
    },
    Group {
        name: "swap",
        reason: "swap devices are host-wide memory configuration",
        calls: always![SYS_swapon, SYS_swapoff],
    },
    #[cfg(target_arch = "x86_64")]
    Group {
        name: "raw-io",
        reason: "I/O port access bypasses every driver and permission check",
        calls: always![SYS_iopl, SYS_ioperm],
    },
    Group {
        name: "mount",
        reason: "the job's root is built before exec; remounting could undo its pivot_root'ed view",
        calls: always![
            SYS_mount,
            SYS_umount2,
            SYS_pivot_root,
            SYS_chroot,
            SYS_fsopen,
            SYS_fsconfig,
            SYS_fsmount,
            SYS_fspick,
            SYS_move_mount,
            SYS_open_tree,
            SYS_open_tree_attr,
            SYS_mount_setattr,
        ],
    },
    Group {
        name: "namespaces",
        reason: "new (user) namespaces hand root-only kernel interfaces to unprivileged code, the \
                 main source of local privilege escalations; a job stays in the ones joblet made",
        calls: &[
            Denied {
                name: "SYS_setns",
                nr: libc::SYS_setns,
                when: When::Always,
            },
            Denied {
                name: "SYS_unshare",
                nr: libc::SYS_unshare,
                when: When::AnyBitSet {
                    arg: 0,
                    bits: UNSHARE_NS_FLAGS,
                },
            },
            Denied {
                name: "SYS_clone",
                nr: libc::SYS_clone,
                when: When::AnyBitSet {
                    arg: 0,
                    bits: CLONE_NS_FLAGS,
                },
            },
        ],
    },
    Group {
        name: "file-handles",
        reason: "open_by_handle_at opens any inode of a mounted filesystem, escaping the job's root \
                 (the \"shocker\" escape); handles are only useful to it",
        calls: always![SYS_open_by_handle_at, SYS_name_to_handle_at],
    },
    Group {
        name: "tracing",
        reason: "bpf and perf events observe the whole host and are large, often-exploited kernel \
                 interfaces",
        calls: always![SYS_bpf, SYS_perf_event_open],
    },
    Group {
        name: "userfaultfd",
        reason: "stalling the kernel on a chosen page fault is a staple of kernel exploits; only \
                 live migration and checkpointing tools need it",
        calls: always![SYS_userfaultfd],
    },
    Group {
        name: "io_uring",
        reason: "the most exploited kernel interface of recent years (disabled by Google on \
                 ChromeOS, Android and its servers); programs fall back when it is unavailable",
        calls: always![
            SYS_io_uring_setup,
            SYS_io_uring_enter,
            SYS_io_uring_register
        ],
    },
    Group {
        name: "keyring",
        reason: "kernel keyrings are not namespaced: a job could read or plant the host's keys",
        calls: always![SYS_add_key, SYS_keyctl, SYS_request_key],
    },
    Group {
        name: "clock",
        reason: "the system clock is shared by the whole host",
        calls: always![SYS_settimeofday, SYS_clock_settime],
    },
    Group {
        name: "host-admin",
        reason: "process accounting, quotas, the kernel log, terminal hangup and filesystem-wide \
                 monitoring are host administration",
        calls: always![
            SYS_acct,
            SYS_quotactl,
            SYS_quotactl_fd,
            SYS_syslog,
            SYS_vhangup,
            SYS_fanotify_init,
        ],
    },
    Group {
        name: "obsolete",
        reason: "obsolete interfaces still compiled into some kernels, unused by current programs",
        #[cfg(target_arch = "x86_64")]
        calls: always![
            SYS_lookup_dcookie,
            SYS_nfsservctl,
            SYS_uselib,
            SYS_sysfs,
            SYS_ustat,
            SYS__sysctl,
        ],
        #[cfg(target_arch = "aarch64")]
        calls: always![SYS_lookup_dcookie, SYS_nfsservctl],
    },
    Group {
        name: "personality",
        reason: "execution domains other than Linux's defaults disable ASLR or make data executable",
        calls: &[Denied {
            name: "SYS_personality",
            nr: libc::SYS_personality,
            when: When::NoneOf {
                arg: 0,
                allowed: PERSONALITY_ALLOWED,
            },
        }],
    },
    Group {
        name: "vsock",
        reason: "AF_VSOCK reaches the hypervisor and other VMs: the host network is shared on \
                 purpose, channels out of the machine are not",
        calls: &[Denied {
            name: "SYS_socket",
            nr: libc::SYS_socket,
            when: When::Equals { arg: 0, value: 40 },
        }],
    },
];

/// The denylist for this build's architecture.
fn denylist() -> Result<&'static [Group], SeccompError> {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        Ok(GROUPS)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Err(SeccompError::UnsupportedArch {
            arch: std::env::consts::ARCH,
        })
    }
}

// Classic BPF opcodes (linux/bpf_common.h); libc declares them as u32, `sock_filter.code` is u16.
/// The kernel's limit on the length of one program.
const BPF_MAXINSNS: usize = 4096;
/// `BPF_LD | BPF_W | BPF_ABS`.
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
const BPF_JMP_JEQ_K: u16 = 0x15;
/// `BPF_JMP | BPF_JGE | BPF_K`.
const BPF_JMP_JGE_K: u16 = 0x35;
/// `BPF_JMP | BPF_JA`.
const BPF_JMP_JA: u16 = 0x05;
/// `BPF_RET | BPF_K`.
const BPF_RET_K: u16 = 0x06;
/// Offsets in `struct seccomp_data`.
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
/// The x32 ABI marks its syscall numbers with this bit; they share x86_64's audit arch.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_NATIVE: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_NATIVE: u32 = 0xc000_00b7;

/// The target for seccompiler.
fn target_arch() -> Result<TargetArch, SeccompError> {
    #[cfg(target_arch = "x86_64")]
    {
        Ok(TargetArch::x86_64)
    }
    #[cfg(target_arch = "aarch64")]
    {
        Ok(TargetArch::aarch64)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Err(SeccompError::UnsupportedArch {
            arch: std::env::consts::ARCH,
        })
    }
}

/// Syscalls per seccompiler program in [`compile`]'s tree: small enough that a walk through one
/// bucket is short, large enough that the dispatch tree stays shallow (measured in the
/// `measure_filter_cost` test).
const BUCKET: usize = 4;

/// Compiles `groups` into one program: allow by default, `EPERM` for the listed calls, plus the
/// ABI guard.
///
/// seccompiler emits one linear chain of syscall-number comparisons, and the kernel walks it for
/// every syscall number when it fills its constant-action cache at install time: for the whole
/// denylist in one chain that walk was about 140 of the 175 µs an install cost. So the rules are
/// split into buckets of [`BUCKET`] consecutive syscall numbers, each compiled by seccompiler on
/// its own, and a hand-written binary tree of `jge` on the syscall number picks the bucket (see
/// [`assemble`]), which brought an install down to about 55 µs; [`thread_jumps`] then removes
/// seccompiler's jump chains (415 instructions to 225), about 38 µs (see the
/// `measure_filter_cost` test).
fn compile(groups: &[Group]) -> Result<BpfProgram, SeccompError> {
    assemble(&buckets(groups)?)
}

/// The rules of `groups` in buckets of [`BUCKET`] syscall numbers, each compiled by seccompiler
/// on its own, with the first syscall number of each.
fn buckets(groups: &[Group]) -> Result<Vec<(u32, BpfProgram)>, SeccompError> {
    let arch = std::env::consts::ARCH;
    let compile_err = |source| SeccompError::Compile { arch, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for denied in groups.iter().flat_map(|g| g.calls) {
        rules
            .entry(denied.nr)
            .or_default()
            .extend(seccomp_rules(denied.when).map_err(compile_err)?);
    }
    let rules: Vec<_> = rules.into_iter().collect();
    let mut buckets = Vec::new();
    for chunk in rules.chunks(BUCKET) {
        let first_nr = u32::try_from(chunk[0].0).expect("syscall numbers fit in u32");
        let filter = SeccompFilter::new(
            chunk.iter().cloned().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM.unsigned_abs()),
            target_arch()?,
        )
        .map_err(compile_err)?;
        let prog = BpfProgram::try_from(filter).map_err(compile_err)?;
        buckets.push((first_nr, prog));
    }
    Ok(buckets)
}

/// The head seccompiler starts every program with: `load arch; jeq NATIVE, +1; ret KILL_PROCESS`.
/// It kills any call through a foreign ABI (i386 `int 0x80`, AArch32).
fn arch_head() -> [sock_filter; 3] {
    [
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH_NATIVE, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
    ]
}

/// The ABI guard, which follows the architecture check and leaves the syscall number in the
/// accumulator. seccompiler matches syscalls by number only, so two cases need hand-written BPF:
/// - x32 calls carry x86_64's audit arch with bit 30 set in the number, so `mount` through x32 is
///   not `mount` to the rules: kill any number with that bit, except -1, which tracers use to
///   skip a call (libseccomp makes the same exception).
/// - `clone3` must fail with `ENOSYS` (its flags are in memory the filter cannot read; libc then
///   falls back to `clone`), and a seccompiler filter has a single match action, `EPERM`.
fn abi_guard() -> Vec<sock_filter> {
    let mut guard = vec![stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR)];
    #[cfg(target_arch = "x86_64")]
    guard.extend([
        jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 2),
        jump(BPF_JMP_JEQ_K, u32::MAX, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
    ]);
    let clone3 = u32::try_from(libc::SYS_clone3).expect("syscall numbers fit in u32");
    guard.extend([
        jump(BPF_JMP_JEQ_K, clone3, 0, 1),
        stmt(
            BPF_RET_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS.unsigned_abs(),
        ),
    ]);
    guard
}

/// Assembles the program: the architecture check, the ABI guard, then a binary tree over the
/// buckets' first syscall numbers whose leaves are the buckets' seccompiler programs without
/// their own architecture check.
///
/// Each bucket program starts by reloading the syscall number and ends every path with a
/// `ret`, and its jumps stay inside it, so it can sit anywhere in the tree. Every instruction
/// here is one the kernel's constant-action cache can evaluate (loads of the number and arch,
/// `jeq`/`jge`/`ja` on constants), so calls the filter always allows, such as `getpid`, still
/// skip the program entirely at run time.
fn assemble(buckets: &[(u32, BpfProgram)]) -> Result<BpfProgram, SeccompError> {
    let arch = std::env::consts::ARCH;
    let prog = thread_jumps(&assemble_unthreaded(buckets)?);
    if prog.len() > BPF_MAXINSNS {
        return Err(SeccompError::TooLong {
            arch,
            len: prog.len(),
        });
    }
    Ok(prog)
}

/// [`assemble`] before [`thread_jumps`].
fn assemble_unthreaded(buckets: &[(u32, BpfProgram)]) -> Result<BpfProgram, SeccompError> {
    let arch = std::env::consts::ARCH;
    let head = arch_head();
    let mut bodies = Vec::with_capacity(buckets.len());
    for (first_nr, prog) in buckets {
        let body = prog
            .strip_prefix(&head[..])
            .ok_or(SeccompError::UnexpectedLayout { arch })?;
        bodies.push((*first_nr, body));
    }
    let mut prog = head.to_vec();
    prog.extend(abi_guard());
    prog.extend(tree(&bodies));
    Ok(prog)
}

/// A peephole pass over the assembled program: every jump whose target is an unconditional
/// `ja` goes straight to where that `ja` leads, a `ja` to a `ret` becomes that `ret`, and
/// instructions nothing reaches any more are dropped.
///
/// seccompiler compiles each rule into a `jeq` over two `ja`s to a shared `ret`, five
/// instructions for a call that needs two; the kernel converts and JIT-compiles every
/// instruction at each job's install, so the dead weight is paid per job. The pass changes no
/// verdict (the `threaded_program_gives_the_same_verdicts` test runs both programs on every
/// syscall number) and emits no opcode the input did not have, so the kernel's constant-action
/// cache still evaluates it. A conditional jump's offset is 8 bits: a target farther than 255
/// instructions is left as it was.
fn thread_jumps(prog: &[sock_filter]) -> Vec<sock_filter> {
    let is_ja = |i: usize| prog[i].code == BPF_JMP_JA;
    let is_ret = |i: usize| prog[i].code == BPF_RET_K;
    let is_cond = |i: usize| prog[i].code & 0x07 == 0x05 && !is_ja(i);
    let ja_target = |i: usize| i + 1 + prog[i].k as usize;
    // Follows `ja`s from `t` while the result stays within `reach` instructions after `from`.
    let follow = |from: usize, mut t: usize, reach: usize| {
        let mut hops = 0;
        while is_ja(t) && hops < prog.len() {
            let next = ja_target(t);
            if next - from - 1 > reach {
                break;
            }
            t = next;
            hops += 1;
        }
        t
    };
    // Absolute targets of every instruction: (jt, jf) for conditional jumps, (t, t) for `ja`.
    let mut insns: Vec<(sock_filter, usize, usize)> = Vec::with_capacity(prog.len());
    for (i, insn) in prog.iter().enumerate() {
        let (mut insn, mut jt, mut jf) = (insn.clone(), i + 1, i + 1);
        if is_cond(i) {
            jt = follow(i, i + 1 + usize::from(insn.jt), 255);
            jf = follow(i, i + 1 + usize::from(insn.jf), 255);
        } else if is_ja(i) {
            let t = follow(i, ja_target(i), usize::MAX);
            if is_ret(t) {
                insn = prog[t].clone();
            }
            (jt, jf) = (t, t);
        }
        insns.push((insn, jt, jf));
    }
    // Reachability from the first instruction.
    let mut live = vec![false; insns.len()];
    let mut todo = vec![0];
    while let Some(i) = todo.pop() {
        if i >= insns.len() || live[i] {
            continue;
        }
        live[i] = true;
        let (ref insn, jt, jf) = insns[i];
        match insn.code {
            BPF_RET_K => {}
            c if c == BPF_JMP_JA || c & 0x07 == 0x05 => todo.extend([jt, jf]),
            _ => todo.push(i + 1),
        }
    }
    let mut new_index = vec![0; insns.len()];
    let mut n = 0;
    for (i, &l) in live.iter().enumerate() {
        new_index[i] = n;
        n += usize::from(l);
    }
    let rel = |from: usize, to: usize| new_index[to] - new_index[from] - 1;
    insns
        .iter()
        .enumerate()
        .filter(|&(i, _)| live[i])
        .map(|(i, (insn, jt, jf))| {
            let (mut insn, jt, jf) = (insn.clone(), *jt, *jf);
            if insn.code == BPF_JMP_JA {
                insn.k = u32::try_from(rel(i, jt)).expect("a shorter jump than the original");
            } else if insn.code & 0x07 == 0x05 {
                insn.jt = u8::try_from(rel(i, jt)).expect("targets were kept within 255");
                insn.jf = u8::try_from(rel(i, jf)).expect("targets were kept within 255");
            }
            insn
        })
        .collect()
}

/// `if nr >= pivot { right } else { left }`, recursively; the accumulator holds the number.
fn tree(bodies: &[(u32, &[sock_filter])]) -> Vec<sock_filter> {
    match bodies {
        [] => vec![stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW)],
        [(_, body)] => body.to_vec(),
        _ => {
            let (left, right) = bodies.split_at(bodies.len() / 2);
            let left = tree(left);
            // Too long a program is refused by `assemble` once it is built.
            let over_left = u32::try_from(left.len()).unwrap_or(u32::MAX);
            let mut code = vec![
                // true: the `ja` over the left subtree; false: skip the `ja`.
                jump(BPF_JMP_JGE_K, right[0].0, 0, 1),
                stmt(BPF_JMP_JA, over_left),
            ];
            code.extend(left);
            code.extend(tree(right));
            code
        }
    }
}

/// seccompiler rules that match exactly the calls `when` denies (an empty list matches the
/// syscall number alone).
fn seccomp_rules(when: When) -> Result<Vec<SeccompRule>, BackendError> {
    // Dword: the low 32 bits, all the kernel reads of these arguments.
    let low = || SeccompCmpArgLen::Dword;
    match when {
        When::Always => Ok(Vec::new()),
        // Rules are alternatives: one rule per bit.
        When::AnyBitSet { arg, bits } => bits
            .iter()
            .map(|&bit| {
                let bit = u64::from(bit);
                SeccompRule::new(vec![SeccompCondition::new(
                    arg,
                    low(),
                    SeccompCmpOp::MaskedEq(bit),
                    bit,
                )?])
            })
            .collect(),
        When::Equals { arg, value } => Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
            arg,
            low(),
            SeccompCmpOp::Eq,
            u64::from(value),
        )?])?]),
        // Conditions within a rule must all hold: one rule of "!=" conditions.
        When::NoneOf { arg, allowed } => Ok(vec![SeccompRule::new(
            allowed
                .iter()
                .map(|&v| SeccompCondition::new(arg, low(), SeccompCmpOp::Ne, u64::from(v)))
                .collect::<Result<_, _>>()?,
        )?]),
    }
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

#[cfg(test)]
mod tests;
