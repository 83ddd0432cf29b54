//! The root template: the part of the minimal root that is the same for every job, built once
//! per [`super::Runtime`] in a private mount namespace that joblet keeps (by an nsfs fd) and
//! that each job copies.
//!
//! Building the minimal root in every job's own mount namespace costs ~40 syscalls (tmpfs,
//! binds, mkdir/touch/symlink/mknod, read-only remounts) plus `pivot_root` and the detach of
//! the host root, which waits for an expedited RCU grace period. With a template the child
//! instead `setns`es into the template namespace and `unshare(CLONE_NEWNS)`s a private copy of
//! it (the copy's root is already the template root: the host root was detached from the
//! template once, when it was built), then mounts only what is per job: `/tmp`, `/work`, devpts,
//! `/dev/shm`, `/proc` and its masks. The job is cloned without `CLONE_NEWNS`, so the kernel
//! does not copy the host's mount table first either.
//!
//! The template is built from a short-lived thread: `unshare(CLONE_NEWNS)` on a thread gives
//! that thread alone a copy of the host's mount namespace (the kernel unshares its `fs_struct`
//! too), so the rest of the process, and the host, never see the template's mounts. The thread
//! opens `/proc/thread-self/ns/mnt` before its `pivot_root` and exits; the fd keeps the
//! namespace alive.
//!
//! File binds of `/etc` entries pin the inode they were made from: a file replaced by rename
//! (`useradd`, `ldconfig`) would keep its old content in the template. A rename in `/etc`
//! changes the directory's mtime, so the runtime compares it on each spawn (one `statx`) and
//! rebuilds the template when it changed.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::io::Errno;

use crate::rootfs::{self, HostLayout};

/// A built template: its mount namespace, and the `/etc` mtime it was built at.
#[derive(Debug)]
pub(crate) struct Template {
    ns: OwnedFd,
    etc_stamp: EtcStamp,
}

impl Template {
    /// The template's mount namespace (for `setns` in the child).
    pub(crate) fn ns(&self) -> BorrowedFd<'_> {
        self.ns.as_fd()
    }

    /// Whether `/etc` still looks the way it did when the template was built.
    pub(crate) fn is_current(&self, now: EtcStamp) -> bool {
        self.etc_stamp == now
    }
}

/// The modification time of the host's `/etc` (`None` if it cannot be read: then the template
/// is rebuilt whenever it can be read again).
pub(crate) type EtcStamp = Option<(i64, u32)>;

/// Reads the host's `/etc` mtime.
pub(crate) fn etc_stamp() -> EtcStamp {
    rustix::fs::stat(c"/etc")
        .ok()
        .map(|st| (st.st_mtime, st.st_mtime_nsec as u32))
}

/// Why a template could not be built.
#[derive(Debug)]
pub(crate) enum BuildError {
    /// This kernel or its confinement cannot give joblet a template: use the classic plan.
    Unsupported(Errno),
    /// A step failed: (description, errno).
    Step(String, Errno),
}

/// Builds the template for this host layout on a short-lived thread.
pub(crate) fn build(stage: &Path, host: &HostLayout) -> Result<Template, BuildError> {
    let ops = rootfs::template_plan(stage, host)
        .map_err(|e| BuildError::Step(e.to_string(), Errno::INVAL))?;
    let etc_stamp = etc_stamp();
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Template, BuildError> {
            match crate::sys::misc::unshare_mount_ns() {
                Ok(()) => {}
                // EPERM: no CAP_SYS_ADMIN, or an LSM or seccomp policy refuses new mount
                // namespaces; EINVAL: a kernel built without CONFIG_NAMESPACES; ENOSYS: a
                // seccomp sandbox hiding unshare. The classic plan needs the same capability
                // through clone3, so it reports the real error if it cannot work either.
                Err(e @ (Errno::PERM | Errno::INVAL | Errno::NOSYS)) => {
                    return Err(BuildError::Unsupported(e));
                }
                Err(e) => return Err(BuildError::Step("unshare the mount namespace".into(), e)),
            }
            let ns = match rustix::fs::open(
                c"/proc/thread-self/ns/mnt",
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            ) {
                Ok(fd) => fd,
                // ENOENT: no /proc/thread-self (Linux < 3.17) or no /proc at all.
                Err(e @ Errno::NOENT) => return Err(BuildError::Unsupported(e)),
                Err(e) => {
                    return Err(BuildError::Step(
                        "open the template's mount namespace".into(),
                        e,
                    ));
                }
            };
            // The umask is part of the fs_struct this thread no longer shares.
            rustix::process::umask(rustix::fs::Mode::empty());
            for op in &ops {
                op.run()
                    .map_err(|e| BuildError::Step(op.describe(stage), e))?;
            }
            Ok(Template { ns, etc_stamp })
        })
        .join()
        .unwrap_or_else(|_| {
            Err(BuildError::Step(
                "build the root template (thread panicked)".into(),
                Errno::IO,
            ))
        })
    })
}
