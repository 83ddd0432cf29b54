//! `clone3(2)` with `CLONE_VM | CLONE_VFORK` on a private stack.
//!
//! The child runs on a stack joblet owns and shares the parent's memory until it calls
//! `execve`, so spawning costs the same whatever the parent's heap size (a fork-style clone of a
//! process with 2 GiB resident costs ~25 ms here, this ~37 us). The calling thread is suspended by
//! the kernel until the child execs or exits, which is what makes sharing memory sound: nothing in
//! the parent runs concurrently with the child on this thread, and the stack is free again when
//! `clone3` returns.

use std::ffi::c_void;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// `struct clone_args` (v2, with `cgroup`), see `clone3(2)`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct CloneArgs {
    pub(crate) flags: u64,
    pub(crate) pidfd: u64,
    pub(crate) child_tid: u64,
    pub(crate) parent_tid: u64,
    pub(crate) exit_signal: u64,
    pub(crate) stack: u64,
    pub(crate) stack_size: u64,
    pub(crate) tls: u64,
    pub(crate) set_tid: u64,
    pub(crate) set_tid_size: u64,
    pub(crate) cgroup: u64,
}

/// `CLONE_VM`.
pub(crate) const CLONE_VM: u64 = libc::CLONE_VM as u64;
/// `CLONE_VFORK`.
pub(crate) const CLONE_VFORK: u64 = libc::CLONE_VFORK as u64;
/// `CLONE_PIDFD`.
pub(crate) const CLONE_PIDFD: u64 = libc::CLONE_PIDFD as u64;
/// `CLONE_NEWPID`.
pub(crate) const CLONE_NEWPID: u64 = libc::CLONE_NEWPID as u64;
/// `CLONE_NEWNS`.
pub(crate) const CLONE_NEWNS: u64 = libc::CLONE_NEWNS as u64;
/// `CLONE_NEWIPC`.
pub(crate) const CLONE_NEWIPC: u64 = libc::CLONE_NEWIPC as u64;
/// `CLONE_NEWUTS`.
pub(crate) const CLONE_NEWUTS: u64 = libc::CLONE_NEWUTS as u64;
/// `CLONE_NEWNET`.
pub(crate) const CLONE_NEWNET: u64 = libc::CLONE_NEWNET as u64;
/// `CLONE_INTO_CGROUP` (Linux 5.7).
pub(crate) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// A private, guard-paged stack for a vfork-style child.
#[derive(Debug)]
pub(crate) struct Stack {
    base: NonNull<c_void>,
    len: usize,
}

// SAFETY: the stack is plain anonymous memory owned by this value; moving the owner between
// threads moves nothing the kernel or another thread references.
unsafe impl Send for Stack {}

const GUARD: usize = 4096;

impl Stack {
    /// Maps `size` bytes of stack plus one guard page below it.
    pub(crate) fn new(size: usize) -> io::Result<Stack> {
        let len = size.next_multiple_of(4096) + GUARD;
        // SAFETY: a fresh anonymous private mapping at an address the kernel picks aliases no
        // existing Rust object.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::STACK,
            )
        }?;
        // SAFETY: `ptr..ptr+GUARD` is the first page of the mapping made above and holds no data.
        unsafe { rustix::mm::mprotect(ptr, GUARD, rustix::mm::MprotectFlags::empty()) }?;
        let base = NonNull::new(ptr).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Stack { base, len })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `Stack::new` with this length and nothing borrows it:
        // a child that used it has exec'd or exited before `clone3_vfork` returned.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr(), self.len) };
    }
}

/// What the child runs: a function pointer and its argument, read on the child's stack.
struct Trampoline<'a, T> {
    ctx: &'a T,
    run: fn(&T) -> i32,
}

extern "C" fn trampoline<T>(arg: *mut c_void) -> i32 {
    // SAFETY: `arg` is the `Trampoline<T>` that `clone3_vfork` keeps alive on the suspended
    // parent's stack frame until the child has exec'd or exited.
    let t = unsafe { &*(arg as *const Trampoline<'_, T>) };
    (t.run)(t.ctx)
}

/// Spawns a job's child with `clone3(args)` on `stack`, running [`crate::spawn::child::run`] with
/// `plan` until it execs. Returns the child's pid and, when `CLONE_PIDFD` is in `args.flags`,
/// its pidfd. `args.flags` must contain `CLONE_VM | CLONE_VFORK`; the stack fields are set here.
/// Every signal is blocked on the calling thread for the duration of the call.
pub(crate) fn clone3_job(
    args: &mut CloneArgs,
    stack: &mut Stack,
    plan: &crate::spawn::child::ChildPlan<'_>,
) -> io::Result<(i32, Option<OwnedFd>)> {
    let mask = super::signal::block_all()?;
    // `child::run` is written to be async-signal-safe (no allocation, locks or panics; raw
    // syscalls on data prepared before the clone, see its module docs), and every signal is
    // blocked on this thread so no handler of the parent runs on the child's stack before the
    // child resets dispositions.
    // SAFETY: as just said; and `plan` outlives the call (this thread is suspended until exec).
    let r = unsafe { clone3_vfork(args, stack, plan, crate::spawn::child::run) };
    super::signal::restore(&mask);
    r
}

/// What the benchmark baseline's child runs: `execve` and nothing else.
struct BareExec<'a> {
    path: &'a std::ffi::CStr,
    argv: &'a super::misc::CStringArray,
    envp: &'a super::misc::CStringArray,
}

fn bare_exec(ctx: &BareExec<'_>) -> i32 {
    let _ = super::misc::exec_path(ctx.path, ctx.argv, ctx.envp);
    127
}

/// The benchmark baselines: `clone3(CLONE_VM | CLONE_VFORK | CLONE_PIDFD | extra_flags)` +
/// `execve` and no setup at all in the child, born in `cgroup` when given (`CLONE_INTO_CGROUP`).
/// With `extra_flags = 0` and no cgroup this is a bare spawn; with the namespace flags and a
/// cgroup it is the "namespaces + cgroup" floor of the spawn benchmark. Returns the pidfd.
pub(crate) fn clone3_baseline_exec(
    stack: &mut Stack,
    extra_flags: u64,
    cgroup: Option<std::os::fd::BorrowedFd<'_>>,
    path: &std::ffi::CStr,
    argv: &super::misc::CStringArray,
    envp: &super::misc::CStringArray,
) -> io::Result<OwnedFd> {
    let mut args = CloneArgs {
        flags: CLONE_VM | CLONE_VFORK | CLONE_PIDFD | extra_flags,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64;
    }
    let ctx = BareExec { path, argv, envp };
    let mask = super::signal::block_all()?;
    // `bare_exec` only calls execve on data prepared before the clone (async-signal-safe).
    // SAFETY: as just said, signals are blocked, and `ctx` outlives the call (this thread is
    // suspended until the child execs or exits).
    let r = unsafe { clone3_vfork(&mut args, stack, &ctx, bare_exec) };
    super::signal::restore(&mask);
    r?.1.ok_or_else(|| io::Error::other("no pidfd returned"))
}

/// Spawns a child with `clone3(args)` on `stack`, running `run(ctx)` until it execs; if `run`
/// returns, the child exits with the returned code.
///
/// # Safety
///
/// `run` executes in a child that shares this process's memory while the calling thread is
/// suspended. It must be async-signal-safe: no allocation, no locks, no panics, no thread-local
/// state other than `errno`, and it must not write to memory the parent reads afterwards except
/// through its own stack. Every signal must be blocked on the calling thread so that no parent
/// signal handler runs on the child's stack before the child resets dispositions.
unsafe fn clone3_vfork<T>(
    args: &mut CloneArgs,
    stack: &mut Stack,
    ctx: &T,
    run: fn(&T) -> i32,
) -> io::Result<(i32, Option<OwnedFd>)> {
    debug_assert!(args.flags & (CLONE_VM | CLONE_VFORK) == CLONE_VM | CLONE_VFORK);
    let mut pidfd: RawFd = -1;
    if args.flags & CLONE_PIDFD != 0 {
        args.pidfd = std::ptr::addr_of_mut!(pidfd) as u64;
    }
    args.stack = stack.base.as_ptr() as u64 + GUARD as u64;
    args.stack_size = (stack.len - GUARD) as u64;
    let tramp = Trampoline { ctx, run };
    let arg = std::ptr::addr_of!(tramp) as *mut c_void;
    // `args` is a valid clone_args of the size passed; the stack is ours, 16-byte aligned at
    // its top and unused; `trampoline::<T>` matches the ABI the assembly calls with.
    // SAFETY: as just said; the caller upholds the child's async-signal-safety contract.
    let ret = unsafe { raw_clone3(args, trampoline::<T>, arg) };
    if ret < 0 {
        return Err(io::Error::from_raw_os_error((-ret) as i32));
    }
    let fd = if pidfd >= 0 {
        // SAFETY: the kernel wrote a new pidfd owned by nobody else into `pidfd`.
        Some(unsafe { OwnedFd::from_raw_fd(pidfd) })
    } else {
        None
    };
    Ok((ret as i32, fd))
}

/// The raw `clone3` syscall. In the child, calls `f(arg)` on the new stack, then `exit_group`
/// with its result; never returns there. In the parent returns the pid or `-errno`.
#[cfg(target_arch = "x86_64")]
unsafe fn raw_clone3(
    args: *mut CloneArgs,
    f: extern "C" fn(*mut c_void) -> i32,
    arg: *mut c_void,
) -> isize {
    let ret: isize;
    // SAFETY: see the function contract. In the child, rsp is the new stack's top (set by the
    // kernel), rbp is cleared to end backtraces, and the function never returns into this frame.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r13",
            "call r12",
            "mov edi, eax",
            "mov eax, {exit}",
            "syscall",
            "ud2",
            "2:",
            exit = const libc::SYS_exit_group,
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") args,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") f,
            in("r13") arg,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// The raw `clone3` syscall (aarch64). See the x86_64 version.
#[cfg(target_arch = "aarch64")]
unsafe fn raw_clone3(
    args: *mut CloneArgs,
    f: extern "C" fn(*mut c_void) -> i32,
    arg: *mut c_void,
) -> isize {
    let ret: isize;
    // SAFETY: as for x86_64: in the child sp is the new stack's top, x29 is cleared, and the
    // function never returns into this frame.
    unsafe {
        std::arch::asm!(
            "svc 0",
            "cbnz x0, 2f",
            "mov x29, xzr",
            "mov x0, x10",
            "blr x9",
            "mov x8, {exit}",
            "svc 0",
            "udf 0",
            "2:",
            exit = const libc::SYS_exit_group,
            inlateout("x0") args as isize => ret,
            in("x1") std::mem::size_of::<CloneArgs>(),
            in("x8") libc::SYS_clone3,
            in("x9") f,
            in("x10") arg,
            lateout("x30") _,
            options(nostack),
        );
    }
    ret
}
