//! Signal masks and dispositions around a vfork-style spawn, and `signalfd` for supervisors.
//!
//! The spawning thread blocks every signal before `clone3` so no handler of the parent can run
//! on the child's stack (the child shares the parent's memory). The child then resets every
//! disposition to the default and unblocks everything before it execs, so a job never inherits
//! joblet's handlers, ignored signals or mask.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A saved signal mask of the calling thread.
#[derive(Debug)]
pub(crate) struct SavedMask(libc::sigset_t);

/// Blocks every signal on the calling thread; returns the previous mask.
pub(crate) fn block_all() -> io::Result<SavedMask> {
    let mut all = MaybeUninit::<libc::sigset_t>::uninit();
    let mut old = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initialises `all`; pthread_sigmask reads it and fills `old`.
    unsafe {
        libc::sigfillset(all.as_mut_ptr());
        let rc = libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(SavedMask(old.assume_init()))
    }
}

/// Restores a mask saved by [`block_all`].
pub(crate) fn restore(mask: &SavedMask) {
    // SAFETY: `mask.0` is a valid sigset_t obtained from pthread_sigmask.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &mask.0, std::ptr::null_mut());
    }
}

/// The kernel's `struct sigaction` layout for `rt_sigaction` (x86_64 and aarch64).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// In the child: sets every signal's disposition to the default and unblocks all signals.
/// Async-signal-safe (raw syscalls only).
pub(crate) fn child_reset_all() -> Result<(), rustix::io::Errno> {
    let dfl = KernelSigaction { handler: 0, flags: 0, restorer: 0, mask: 0 };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction with a valid kernel sigaction struct and sigset size 8; setting
        // SIG_DFL cannot make any handler run.
        let rc = unsafe {
            libc::syscall(libc::SYS_rt_sigaction, sig, &dfl as *const KernelSigaction, 0usize, 8usize)
        };
        if rc < 0 {
            return Err(last_errno());
        }
    }
    let empty: u64 = 0;
    // SAFETY: rt_sigprocmask with a valid 8-byte set; unblocking is safe now that every
    // disposition is the default.
    let rc = unsafe {
        libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &empty as *const u64, 0usize, 8usize)
    };
    if rc < 0 {
        return Err(last_errno());
    }
    Ok(())
}

fn last_errno() -> rustix::io::Errno {
    rustix::io::Errno::from_raw_os_error(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
}

/// A `signalfd` for a set of signals, which are blocked on the calling thread while it lives.
/// Used by single-threaded supervisors (`joblet run`, the job init) to wait for signals and
/// child exits in one `poll`.
#[derive(Debug)]
pub(crate) struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks `signals` on the calling thread and opens a signalfd for them.
    pub(crate) fn new(signals: &[i32]) -> io::Result<SignalFd> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: the set is initialised by sigemptyset before sigaddset and use; signalfd
        // returns a new fd owned by nobody else.
        unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            for &s in signals {
                libc::sigaddset(set.as_mut_ptr(), s);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            let fd = libc::signalfd(-1, set.as_ptr(), libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SignalFd { fd: OwnedFd::from_raw_fd(fd) })
        }
    }

    /// Reads one pending signal number, or `None` if none is pending.
    pub(crate) fn read(&self) -> io::Result<Option<i32>> {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into a buffer of that size.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        if n as usize != size {
            return Err(io::Error::other("short read from signalfd"));
        }
        // SAFETY: the kernel filled the whole struct.
        Ok(Some(unsafe { info.assume_init() }.ssi_signo as i32))
    }
}

impl AsFd for SignalFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
