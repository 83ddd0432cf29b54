//! The raw `seccomp(2)` call that installs a BPF filter, written once so that the spawned child can
//! make it between clone and exec, where only async-signal-safe code may run.
//!
//! seccompiler's own `apply_filter` (0.5.0) happens to be allocation-free too, but it also sets
//! `no_new_privs` behind the caller's back and makes no promise to stay async-signal-safe; the
//! child's setup sequence needs a call whose contract joblet owns.
#![allow(
    unsafe_code,
    reason = "seccomp(2) has no wrapper in rustix; this is its one raw call"
)]

use rustix::io::Errno;
use seccompiler::sock_filter;

/// `struct sock_fprog` (linux/filter.h). seccompiler's `sock_filter` is `repr(C)` with the
/// kernel's layout.
#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const sock_filter,
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, prog)`: adds `prog` to the calling thread's filters.
///
/// Async-signal-safe: no allocation, no lock, one system call. Needs `no_new_privs` (or
/// `CAP_SYS_ADMIN`) on the calling thread.
///
/// # Errors
///
/// `EINVAL` for a program longer than `u16::MAX` instructions (the kernel's own limit is 4096),
/// otherwise the errno of `seccomp(2)`.
#[doc(alias = "SECCOMP_SET_MODE_FILTER")]
pub(crate) fn set_mode_filter(prog: &[sock_filter]) -> Result<(), Errno> {
    let len = u16::try_from(prog.len()).map_err(|_| Errno::INVAL)?;
    let fprog = SockFprog {
        len,
        filter: prog.as_ptr(),
    };
    // The call writes no memory of this process except errno, which after a `CLONE_VM |
    // CLONE_VFORK` clone is the suspended parent thread's, exactly as in posix_spawn's child; no
    // Rust code relies on errno across calls.
    // SAFETY: `fprog` points at `prog`, `len` instructions long; both outlive the call, and the
    // kernel only copies them in.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::c_ulong::from(libc::SECCOMP_SET_MODE_FILTER),
            libc::c_ulong::from(0_u32),
            &raw const fprog,
        )
    };
    if rc == 0 { Ok(()) } else { Err(last_errno()) }
}

/// errno after a failed libc call; reading it allocates nothing.
fn last_errno() -> Errno {
    Errno::from_raw_os_error(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

/// Raw calls the filter's tests make in their child processes, to check the kernel's verdict on
/// exactly the calls the denylist names.
#[cfg(test)]
pub(crate) mod testing {
    use rustix::io::Errno;

    use super::last_errno;
    use crate::seccomp::{Denied, GROUPS, When};

    /// `CLONE_SIGHAND` and `CLONE_THREAD`: `CLONE_THREAD` without `CLONE_SIGHAND` makes the
    /// kernel reject a `clone` before it creates anything.
    const CLONE_SIGHAND: u64 = 0x0000_0800;
    const CLONE_THREAD: u64 = 0x0001_0000;
    /// `unshare(CLONE_FILES)` would give the calling thread its own fd table, so fds other threads
    /// open later would be invisible to it (rustix makes that `unsafe`): never probed.
    const CLONE_FILES: u64 = 0x0000_0400;

    /// Calls `denied`'s syscall with every argument all ones (a kernel address, fd -1, every flag
    /// bit), except its filtered argument, which is `value` when given.
    ///
    /// # Panics
    ///
    /// If `denied` is not an entry of the default denylist, or `value` is given for an
    /// [`When::Always`] entry: the soundness argument below covers those entries only.
    pub(crate) fn call_denied(denied: &Denied, value: Option<u32>) -> Result<i64, Errno> {
        assert!(
            GROUPS.iter().flat_map(|g| g.calls).any(|c| c == denied),
            "{} is not in the denylist",
            denied.name
        );
        let mut args = [u64::MAX; 6];
        let filtered_arg = match denied.when {
            When::Always => None,
            When::AnyBitSet { arg, .. } | When::Equals { arg, .. } | When::NoneOf { arg, .. } => {
                Some(usize::from(arg))
            }
        };
        match (filtered_arg, value) {
            (Some(arg), Some(v)) => args[arg] = u64::from(v),
            (None, Some(_)) => panic!("{} has no filtered argument", denied.name),
            _ => {}
        }
        if denied.nr == libc::SYS_clone {
            args[0] = (args[0] & !CLONE_SIGHAND) | CLONE_THREAD;
        }
        if denied.nr == libc::SYS_unshare {
            args[0] &= !CLONE_FILES;
        }
        // Every denylist entry was audited for these arguments: with all-ones pointers,
        // fds, lengths and flags the kernel rejects each call (EFAULT, EBADF, EINVAL) before it
        // acts, even without a filter and even as root (`reboot` checks its magic first,
        // `kexec_load` its segment count and flags, `acct` faults on its path); `clone` gets
        // CLONE_THREAD without CLONE_SIGHAND, which the kernel refuses before creating anything.
        // The calls that can succeed change only the calling process and none of its memory:
        // `unshare` with any flags but CLONE_FILES, `personality` with any value, `vhangup` (the
        // test child runs in its own session, without a controlling terminal),
        // `socket(value, -1, -1)`.
        // SAFETY: as audited above, no call writes memory of this process.
        let rc = unsafe {
            libc::syscall(
                denied.nr, args[0], args[1], args[2], args[3], args[4], args[5],
            )
        };
        if rc == -1 { Err(last_errno()) } else { Ok(rc) }
    }

    /// `clone3(NULL, 0)`: the kernel rejects a zero size with `EINVAL`; the filter answers
    /// `ENOSYS` first.
    pub(crate) fn clone3_invalid() -> Errno {
        // SAFETY: a zero-sized `clone_args` is rejected before the kernel reads anything or
        // creates a process.
        let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0_usize) };
        assert_eq!(rc, -1, "clone3(NULL, 0) succeeded");
        last_errno()
    }

    /// Syscall number -1, which tracers use to skip a call: `ENOSYS`, with or without the filter.
    pub(crate) fn nr_minus_one() -> Result<i64, Errno> {
        // SAFETY: no syscall has number -1; the kernel answers ENOSYS without doing anything.
        let rc = unsafe { libc::syscall(-1) };
        if rc == -1 { Err(last_errno()) } else { Ok(rc) }
    }

    /// `getpid` through the i386 entry point (`int 0x80`, i386 syscall number 20).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn i386_getpid() -> i64 {
        let mut ret: i64 = 20;
        // The compat entry returns in eax (sign-extended into rax here) and may clobber r8-r11,
        // declared below. The flags are not preserved; no stack is used by the instruction.
        // SAFETY: i386 getpid takes no arguments and touches no memory.
        unsafe {
            std::arch::asm!(
                "int 0x80",
                inlateout("rax") ret,
                out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            );
        }
        i64::from(ret as i32)
    }

    /// `getpid` through the x32 ABI: x86_64's number (39) with bit 30 set.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn x32_getpid() -> Result<i64, Errno> {
        // SAFETY: getpid takes no arguments and writes no memory, through any ABI; a kernel
        // without x32 support answers ENOSYS.
        let rc = unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) };
        if rc == -1 { Err(last_errno()) } else { Ok(rc) }
    }
}
