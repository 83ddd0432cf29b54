//! Raw syscalls without a safe `rustix` wrapper, each usable between clone3 and exec
//! (async-signal-safe: no allocation, no locks).

use std::ffi::{CStr, CString, c_char};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use rustix::io::Errno;

fn last_errno() -> Errno {
    Errno::from_raw_os_error(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

fn check(rc: libc::c_long) -> Result<(), Errno> {
    if rc < 0 { Err(last_errno()) } else { Ok(()) }
}

/// `close_range(first, ~0, CLOSE_RANGE_CLOEXEC)`: marks every fd from `first` up close-on-exec,
/// so nothing of joblet's leaks into a job while fds still needed before exec stay usable.
pub(crate) fn cloexec_from(first: u32) -> Result<(), Errno> {
    // SAFETY: close_range only changes fd flags; CLOSE_RANGE_CLOEXEC closes nothing now.
    check(unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    })
}

/// `mount_setattr(path, AT_RECURSIVE, MOUNT_ATTR_RDONLY)` (Linux 5.12): makes a mount and
/// every mount below it read-only.
pub(crate) fn make_tree_readonly(path: &CStr) -> Result<(), Errno> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 1;
    const AT_RECURSIVE: libc::c_int = 0x8000;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is a valid C string and `attr` a valid mount_attr of the size passed.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
}

/// A NULL-terminated array of C string pointers (argv, envp) that owns the strings it points
/// into: what `execve` needs, built before the clone so the child allocates nothing.
#[derive(Debug)]
pub(crate) struct CStringArray {
    _strings: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

// SAFETY: the pointers point into the `CString`s owned by the same value, which are never
// mutated; sharing or sending them is as safe as sharing the strings.
unsafe impl Send for CStringArray {}
// SAFETY: as above; nothing is mutated through a shared reference.
unsafe impl Sync for CStringArray {}

impl CStringArray {
    pub(crate) fn new(strings: Vec<CString>) -> CStringArray {
        let mut ptrs: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        CStringArray {
            _strings: strings,
            ptrs,
        }
    }
}

/// `execve(path, argv, envp)`; returns only on failure.
pub(crate) fn exec_path(path: &CStr, argv: &CStringArray, envp: &CStringArray) -> Errno {
    // SAFETY: both arrays are NULL-terminated and point into strings they own (CStringArray's
    // invariant), alive for the whole call.
    unsafe { libc::execve(path.as_ptr(), argv.ptrs.as_ptr(), envp.ptrs.as_ptr()) };
    last_errno()
}

/// `execveat(fd, "", argv, envp, AT_EMPTY_PATH)`: executes the file `fd` refers to; returns only
/// on failure.
pub(crate) fn exec_fd(fd: BorrowedFd<'_>, argv: &CStringArray, envp: &CStringArray) -> Errno {
    // SAFETY: as for `exec_path`; the empty path with AT_EMPTY_PATH names `fd` itself.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd.as_raw_fd(),
            c"".as_ptr(),
            argv.ptrs.as_ptr(),
            envp.ptrs.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    last_errno()
}

/// `unshare(CLONE_NEWCGROUP)`: enters a new cgroup namespace rooted at the caller's cgroups.
pub(crate) fn unshare_cgroup_ns() -> Result<(), Errno> {
    // SAFETY: a new cgroup namespace does not unshare the fd table, the hazard that makes
    // rustix's `unshare_unsafe` unsafe.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWCGROUP) }
}

/// Brings the loopback interface up in the current network namespace (`SIOCSIFFLAGS`).
pub(crate) fn loopback_up() -> Result<(), Errno> {
    let sock = rustix::net::socket_with(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads a valid ifreq naming "lo".
    let rc = unsafe {
        libc::ioctl(
            sock.as_fd().as_raw_fd(),
            libc::SIOCSIFFLAGS as _,
            &req as *const libc::ifreq,
        )
    };
    check(rc as libc::c_long)
}

/// `posix_spawnp(argv[0], argv, environ)` with every signal reset to its default disposition
/// and an empty signal mask in the child, whatever the caller blocks (the job's init blocks
/// everything it forwards, and `std::process::Command` passes the mask on). Returns the pid.
pub(crate) fn spawn_clean(argv: &CStringArray) -> std::io::Result<i32> {
    let prog = argv
        .ptrs
        .first()
        .copied()
        .filter(|p| !p.is_null())
        .ok_or(std::io::ErrorKind::InvalidInput)?;
    let mut pid: libc::pid_t = 0;
    // The attr is initialised before use and destroyed after; `prog` and `argv` are
    // NULL-terminated C strings owned by `argv` (CStringArray's invariant).
    // SAFETY: as just said; `environ` is not modified concurrently (single-threaded init).
    unsafe {
        let mut attr = std::mem::MaybeUninit::<libc::posix_spawnattr_t>::uninit();
        let rc = libc::posix_spawnattr_init(attr.as_mut_ptr());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(empty.as_mut_ptr());
        libc::sigfillset(all.as_mut_ptr());
        libc::posix_spawnattr_setsigmask(attr.as_mut_ptr(), empty.as_ptr());
        libc::posix_spawnattr_setsigdefault(attr.as_mut_ptr(), all.as_ptr());
        libc::posix_spawnattr_setflags(
            attr.as_mut_ptr(),
            (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
        );
        unsafe extern "C" {
            static environ: *const *mut c_char;
        }
        let rc = libc::posix_spawnp(
            &mut pid,
            prog,
            std::ptr::null(),
            attr.as_ptr(),
            argv.ptrs.as_ptr() as *const *mut c_char,
            environ,
        );
        libc::posix_spawnattr_destroy(attr.as_mut_ptr());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
    }
    Ok(pid)
}

/// `unshare(CLONE_NEWNS)`: gives the calling thread a private copy of its mount namespace (and,
/// as the kernel implies `CLONE_FS`, its own root, working directory and umask).
pub(crate) fn unshare_mount_ns() -> Result<(), Errno> {
    // SAFETY: a new mount namespace does not unshare the fd table, the hazard that makes
    // rustix's `unshare_unsafe` unsafe; the implied CLONE_FS only affects the calling thread.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
}

/// `unshare(CLONE_NEWNS | CLONE_NEWCGROUP)` in one call: a private copy of the current mount
/// namespace and a new cgroup namespace rooted at the caller's cgroups.
pub(crate) fn unshare_mount_and_cgroup_ns() -> Result<(), Errno> {
    use rustix::thread::UnshareFlags;
    // SAFETY: neither namespace unshares the fd table (see `unshare_mount_ns`).
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS | UnshareFlags::NEWCGROUP) }
}
