//! The job's filesystem view: a plan of mount operations built in the parent (all paths and
//! options as C strings, host layout probed once) and executed by the child between clone3 and
//! exec, ending with `pivot_root` into the new root with the old one detached.
//!
//! Layout of the minimal root (a small tmpfs, read-only once built):
//! `/bin /sbin /lib /lib64 /usr` read-only binds (or symlinks, on merged-/usr hosts), `/etc` with
//! a few read-only file binds, private size-limited tmpfs `/tmp` and `/work`, a fresh `/proc` with
//! its dangerous parts read-only or masked, a minimal `/dev`, and the user's `--bind`s.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode};
use rustix::io::Errno;
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use crate::job::{Bind, Sandbox};

/// Host directories bound read-only into the minimal root (symlinks are recreated as symlinks).
const SYSTEM_DIRS: &[&str] = &[
    "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr",
];

/// Host `/etc` entries bound read-only into the minimal root when present.
const ETC_ENTRIES: &[&str] = &[
    "passwd",
    "group",
    "hosts",
    "resolv.conf",
    "nsswitch.conf",
    "ld.so.cache",
    "localtime",
    "ssl",
    "alternatives",
];

/// `/proc` entries made read-only (writable by uid 0 even without capabilities otherwise).
const PROC_READONLY: &[&str] = &["sys", "sysrq-trigger", "irq", "bus", "fs"];
/// `/proc` entries hidden behind `/dev/null`.
const PROC_MASKED: &[&str] = &["kcore", "timer_list", "keys"];

/// Device nodes created in `/dev`: name, major, minor.
const DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Errors found while planning the root (bad `--rootfs` or `--bind`).
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// `--rootfs` is not a directory.
    #[error("--rootfs {path}: not a directory")]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// A path needed inside `--rootfs` is missing.
    #[error("--rootfs {root}: missing {inner} (needed as a mount point)")]
    MissingMountPoint {
        /// The rootfs.
        root: PathBuf,
        /// The path inside it.
        inner: String,
    },
    /// A `--bind` source does not exist.
    #[error("--bind {source}: source does not exist")]
    BindSource {
        /// The source path.
        source: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// A path contains a NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(PathBuf),
}

/// One step of the mount plan.
#[derive(Debug)]
pub(crate) enum MountOp {
    /// Make every mount private so nothing propagates to or from the host.
    MakePrivate,
    /// Mount a tmpfs.
    Tmpfs {
        target: CString,
        data: CString,
        flags: MountFlags,
    },
    /// Create a directory (mount point).
    Mkdir { path: CString },
    /// Create an empty file (mount point for a file bind).
    Touch { path: CString },
    /// Create a symlink.
    Symlink { target: CString, link: CString },
    /// Bind mount.
    Bind {
        source: CString,
        target: CString,
        recursive: bool,
    },
    /// Make one mount read-only (a bind remount).
    ReadOnly { target: CString, flags: MountFlags },
    /// Make a mount and everything below it read-only (`mount_setattr`), falling back to
    /// remounting each listed mount on kernels before 5.12.
    ReadOnlyTree {
        target: CString,
        fallback: Vec<CString>,
    },
    /// Mount a fresh procfs.
    Proc { target: CString },
    /// Mount a new devpts instance.
    Devpts { target: CString },
    /// Create a character device node.
    Mknod {
        path: CString,
        major: u32,
        minor: u32,
    },
    /// Enter the new root: `pivot_root(".", ".")` inside it, then detach the old root.
    PivotRoot { new_root: CString },
}

impl MountOp {
    /// A description for error messages ("bind /usr", "mount tmpfs on /tmp").
    pub(crate) fn describe(&self, stage: &Path) -> String {
        let inner = |c: &CString| {
            let p = Path::new(OsStr::from_bytes(c.as_bytes()));
            match p.strip_prefix(stage) {
                Ok(rest) => Path::new("/").join(rest).display().to_string(),
                Err(_) => p.display().to_string(),
            }
        };
        match self {
            MountOp::MakePrivate => "make mounts private".into(),
            MountOp::Tmpfs { target, .. } => format!("mount tmpfs on {}", inner(target)),
            MountOp::Mkdir { path } => format!("create directory {}", inner(path)),
            MountOp::Touch { path } => format!("create file {}", inner(path)),
            MountOp::Symlink { link, .. } => format!("create symlink {}", inner(link)),
            MountOp::Bind { source, target, .. } => {
                format!("bind {} on {}", inner(source), inner(target))
            }
            MountOp::ReadOnly { target, .. } => format!("make {} read-only", inner(target)),
            MountOp::ReadOnlyTree { target, .. } => format!("make {} read-only", inner(target)),
            MountOp::Proc { target } => format!("mount proc on {}", inner(target)),
            MountOp::Devpts { target } => format!("mount devpts on {}", inner(target)),
            MountOp::Mknod { path, .. } => format!("create device {}", inner(path)),
            MountOp::PivotRoot { .. } => "pivot_root into the job's root".into(),
        }
    }

    /// Executes the step. Runs in the child: async-signal-safe, no allocation.
    pub(crate) fn run(&self) -> Result<(), Errno> {
        use rustix::mount as m;
        match self {
            MountOp::MakePrivate => m::mount_change(
                c"/",
                MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
            ),
            MountOp::Tmpfs {
                target,
                data,
                flags,
            } => m::mount(c"tmpfs", target, c"tmpfs", *flags, data.as_c_str()),
            MountOp::Mkdir { path } => match rustix::fs::mkdir(path, Mode::from_raw_mode(0o755)) {
                Err(Errno::EXIST) => Ok(()),
                r => r,
            },
            MountOp::Touch { path } => rustix::fs::open(
                path,
                rustix::fs::OFlags::CREATE
                    | rustix::fs::OFlags::WRONLY
                    | rustix::fs::OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
            )
            .map(drop),
            MountOp::Symlink { target, link } => rustix::fs::symlink(target, link),
            MountOp::Bind {
                source,
                target,
                recursive,
            } => {
                if *recursive {
                    m::mount_bind_recursive(source, target)
                } else {
                    m::mount_bind(source, target)
                }
            }
            MountOp::ReadOnly { target, flags } => remount_ro(target, *flags),
            MountOp::ReadOnlyTree { target, fallback } => {
                match crate::sys::misc::make_tree_readonly(target) {
                    Err(Errno::NOSYS) => {
                        for t in fallback {
                            remount_ro(t, MountFlags::NOSUID | MountFlags::NODEV)?;
                        }
                        Ok(())
                    }
                    r => r,
                }
            }
            MountOp::Proc { target } => m::mount(
                c"proc",
                target,
                c"proc",
                MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                None,
            ),
            MountOp::Devpts { target } => m::mount(
                c"devpts",
                target,
                c"devpts",
                MountFlags::NOSUID | MountFlags::NOEXEC,
                c"newinstance,ptmxmode=0666,mode=0620",
            ),
            MountOp::Mknod { path, major, minor } => rustix::fs::mknodat(
                rustix::fs::CWD,
                path,
                FileType::CharacterDevice,
                Mode::from_raw_mode(0o666),
                rustix::fs::makedev(*major, *minor),
            ),
            MountOp::PivotRoot { new_root } => {
                rustix::process::chdir(new_root)?;
                rustix::process::pivot_root(c".", c".")?;
                m::unmount(c".", UnmountFlags::DETACH)?;
                rustix::process::chdir(c"/")
            }
        }
    }
}

fn remount_ro(target: &CString, flags: MountFlags) -> Result<(), Errno> {
    rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY | flags, c"")
}

/// What the host offers for the minimal root, probed once per runtime.
#[derive(Debug, Clone)]
pub(crate) struct HostLayout {
    /// System dirs: (path, Some(link target) when a symlink).
    system: Vec<(&'static str, Option<PathBuf>)>,
    /// `/etc` entries present: (name, is_dir).
    etc: Vec<(&'static str, bool)>,
    /// `/proc` entries of [`PROC_READONLY`] and [`PROC_MASKED`] this kernel has.
    proc_readonly: Vec<&'static str>,
    proc_masked: Vec<&'static str>,
}

impl HostLayout {
    /// Probes `/` for the system dirs and `/etc` entries.
    pub(crate) fn probe() -> HostLayout {
        let mut system = Vec::new();
        for &d in SYSTEM_DIRS {
            match std::fs::symlink_metadata(d) {
                Ok(md) if md.file_type().is_symlink() => {
                    if let Ok(t) = std::fs::read_link(d) {
                        system.push((d, Some(t)));
                    }
                }
                Ok(md) if md.is_dir() => system.push((d, None)),
                _ => {}
            }
        }
        let mut etc = Vec::new();
        for &e in ETC_ENTRIES {
            if let Ok(md) = std::fs::metadata(Path::new("/etc").join(e)) {
                etc.push((e, md.is_dir()));
            }
        }
        let present = |names: &[&'static str]| {
            names
                .iter()
                .copied()
                .filter(|n| Path::new("/proc").join(n).exists())
                .collect()
        };
        HostLayout {
            system,
            etc,
            proc_readonly: present(PROC_READONLY),
            proc_masked: present(PROC_MASKED),
        }
    }
}

fn cstr(p: impl AsRef<Path>) -> Result<CString, RootfsError> {
    let p = p.as_ref();
    CString::new(p.as_os_str().as_bytes()).map_err(|_| RootfsError::Nul(p.to_owned()))
}

/// `stage` joined with an absolute in-job path.
fn under(stage: &Path, inner: &Path) -> PathBuf {
    stage.join(inner.strip_prefix("/").unwrap_or(inner))
}

/// Builds the mount plan of one job (the classic path: the whole root is assembled in the
/// job's own mount namespace). `stage` is the (empty, existing) directory the new root is
/// assembled on, inside the child's private mount namespace.
pub(crate) fn plan(
    stage: &Path,
    host: &HostLayout,
    sandbox: &Sandbox,
    uid: u32,
    gid: u32,
) -> Result<Vec<MountOp>, RootfsError> {
    let mut ops = vec![MountOp::MakePrivate];
    let mut ro_mounts = vec![cstr(stage)?];

    match &sandbox.rootfs {
        None => skeleton_ops(&mut ops, &mut ro_mounts, stage, host)?,
        Some(root) => {
            let md = std::fs::metadata(root)
                .map_err(|_| RootfsError::NotADirectory { path: root.clone() })?;
            if !md.is_dir() {
                return Err(RootfsError::NotADirectory { path: root.clone() });
            }
            for d in ["/tmp", "/proc", "/dev"] {
                if !under(root, Path::new(d)).is_dir() {
                    return Err(RootfsError::MissingMountPoint {
                        root: root.clone(),
                        inner: d.into(),
                    });
                }
            }
            ops.push(MountOp::Bind {
                source: cstr(root)?,
                target: cstr(stage)?,
                recursive: true,
            });
        }
    }
    let has_work = sandbox
        .rootfs
        .as_ref()
        .is_none_or(|r| r.join("work").is_dir());

    // Every mount point in the root is created while the root is writable; read-only user
    // binds go in before the tree is made read-only, writable ones after. Binds into the job's
    // own /tmp or /work go on top of those tmpfs, once they are mounted.
    let (late, early): (Vec<&Bind>, Vec<&Bind>) = sandbox
        .binds
        .iter()
        .partition(|b| in_job_tmpfs(&b.target, has_work));
    for b in &early {
        mount_point_ops(&mut ops, stage, sandbox.rootfs.as_deref(), b)?;
    }
    let (ro_binds, rw_binds): (Vec<&Bind>, Vec<&Bind>) =
        early.into_iter().partition(|b| !b.writable);
    for b in &ro_binds {
        ops.push(bind_op(stage, b)?);
        ro_mounts.push(cstr(under(stage, &b.target))?);
    }
    ops.push(MountOp::ReadOnlyTree {
        target: cstr(stage)?,
        fallback: ro_mounts,
    });

    work_ops(&mut ops, stage, sandbox, uid, gid, has_work)?;
    tmpfs_bind_ops(&mut ops, stage, &late)?;
    // /dev before /proc: the /proc masks bind /dev/null.
    dev_skeleton_ops(&mut ops, stage)?;
    dev_job_ops(&mut ops, stage, sandbox)?;
    proc_ops(&mut ops, stage, host)?;

    for b in &rw_binds {
        ops.push(bind_op(stage, b)?);
    }
    ops.push(MountOp::PivotRoot {
        new_root: cstr(stage)?,
    });
    Ok(ops)
}

/// Whether a job can use the shared root template (see [`template_plan`]): the minimal root
/// without `--bind`s. A job in a copy of the template has no path to the host's files, so its
/// bind sources would have to be passed as detached mounts (`open_tree` in the parent), and the
/// mount points of binds outside `/tmp` and `/work` would have to be created in the template,
/// which is read-only and shared.
pub(crate) fn templatable(sandbox: &Sandbox) -> bool {
    sandbox.rootfs.is_none() && sandbox.binds.is_empty()
}

/// Whether a bind's target lies in one of the job's own tmpfs, `/tmp` or `/work` (mounted after
/// the root is made read-only, and which would hide a bind made before them).
fn in_job_tmpfs(target: &Path, has_work: bool) -> bool {
    target.starts_with("/tmp") || (has_work && target.starts_with("/work"))
}

/// Binds into the job's `/tmp` or `/work`: mount points made in that (writable) tmpfs, then
/// the binds in order, each read-only one made read-only with everything below it.
fn tmpfs_bind_ops(
    ops: &mut Vec<MountOp>,
    stage: &Path,
    binds: &[&Bind],
) -> Result<(), RootfsError> {
    for b in binds {
        mount_point_ops(ops, stage, None, b)?;
    }
    for b in binds {
        ops.push(bind_op(stage, b)?);
        if !b.writable {
            let target = cstr(under(stage, &b.target))?;
            ops.push(MountOp::ReadOnlyTree {
                target: target.clone(),
                fallback: vec![target],
            });
        }
    }
    Ok(())
}

/// The part of the minimal root that is the same for every job, built once per runtime in a
/// private mount namespace kept as the template (`spawn::template`): the root tmpfs, the system
/// and `/etc` binds, the mount points, a read-only `/dev` with its nodes, then `pivot_root`
/// into it (the host root detached once, not per job).
pub(crate) fn template_plan(stage: &Path, host: &HostLayout) -> Result<Vec<MountOp>, RootfsError> {
    let mut ops = vec![MountOp::MakePrivate];
    let mut ro_mounts = vec![cstr(stage)?];
    skeleton_ops(&mut ops, &mut ro_mounts, stage, host)?;
    ops.push(MountOp::ReadOnlyTree {
        target: cstr(stage)?,
        fallback: ro_mounts,
    });
    dev_skeleton_ops(&mut ops, stage)?;
    ops.push(MountOp::PivotRoot {
        new_root: cstr(stage)?,
    });
    Ok(ops)
}

/// The per-job mounts on top of a copy of the template: the job's `/tmp`, `/work`, devpts,
/// `/dev/shm`, `/proc` and its masks. Paths are absolute: the child runs them with the
/// template copy as its root.
pub(crate) fn job_plan(
    host: &HostLayout,
    sandbox: &Sandbox,
    uid: u32,
    gid: u32,
) -> Result<Vec<MountOp>, RootfsError> {
    let root = Path::new("/");
    let mut ops = Vec::new();
    work_ops(&mut ops, root, sandbox, uid, gid, true)?;
    dev_job_ops(&mut ops, root, sandbox)?;
    proc_ops(&mut ops, root, host)?;
    Ok(ops)
}

/// The minimal root's tmpfs, system dirs, `/etc` files and mount points (writable still).
fn skeleton_ops(
    ops: &mut Vec<MountOp>,
    ro_mounts: &mut Vec<CString>,
    stage: &Path,
    host: &HostLayout,
) -> Result<(), RootfsError> {
    let s = |inner: &str| cstr(under(stage, Path::new(inner)));
    ops.push(MountOp::Tmpfs {
        target: cstr(stage)?,
        data: CString::from(c"mode=0755,size=1m,nr_inodes=4096"),
        flags: MountFlags::NOSUID | MountFlags::NODEV,
    });
    for (dir, link) in &host.system {
        match link {
            Some(t) => ops.push(MountOp::Symlink {
                target: cstr(t)?,
                link: s(dir)?,
            }),
            None => {
                ops.push(MountOp::Mkdir { path: s(dir)? });
                ops.push(MountOp::Bind {
                    source: cstr(dir)?,
                    target: s(dir)?,
                    recursive: true,
                });
                ro_mounts.push(s(dir)?);
            }
        }
    }
    ops.push(MountOp::Mkdir { path: s("/etc")? });
    for (name, is_dir) in &host.etc {
        let inner = format!("/etc/{name}");
        let target = s(&inner)?;
        if *is_dir {
            ops.push(MountOp::Mkdir {
                path: target.clone(),
            });
        } else {
            ops.push(MountOp::Touch {
                path: target.clone(),
            });
        }
        ops.push(MountOp::Bind {
            source: cstr(&inner)?,
            target: target.clone(),
            recursive: *is_dir,
        });
        ro_mounts.push(target);
    }
    for d in ["/tmp", "/work", "/proc", "/dev"] {
        ops.push(MountOp::Mkdir { path: s(d)? });
    }
    Ok(())
}

/// The job's private, size-limited `/tmp` and `/work` tmpfs, owned by its uid.
fn work_ops(
    ops: &mut Vec<MountOp>,
    stage: &Path,
    sandbox: &Sandbox,
    uid: u32,
    gid: u32,
    has_work: bool,
) -> Result<(), RootfsError> {
    let s = |inner: &str| cstr(under(stage, Path::new(inner)));
    let tmp_data = |mode: &str| {
        CString::new(format!(
            "mode={mode},size={},nr_inodes=65536,uid={uid},gid={gid}",
            sandbox.tmp_size
        ))
        .expect("no NUL in tmpfs options")
    };
    let base_flags = MountFlags::NOSUID | MountFlags::NODEV;
    ops.push(MountOp::Tmpfs {
        target: s("/tmp")?,
        data: tmp_data("1777"),
        flags: base_flags,
    });
    if has_work {
        ops.push(MountOp::Tmpfs {
            target: s("/work")?,
            data: tmp_data("0755"),
            flags: base_flags,
        });
    }
    Ok(())
}

/// A read-only tmpfs `/dev` with the device nodes, the usual symlinks and the mount points of
/// `pts` and `shm`.
fn dev_skeleton_ops(ops: &mut Vec<MountOp>, stage: &Path) -> Result<(), RootfsError> {
    let s = |inner: &str| cstr(under(stage, Path::new(inner)));
    ops.push(MountOp::Tmpfs {
        target: s("/dev")?,
        data: CString::from(c"mode=0755,size=64k,nr_inodes=64"),
        flags: MountFlags::NOSUID | MountFlags::NOEXEC,
    });
    for (name, major, minor) in DEVICES {
        ops.push(MountOp::Mknod {
            path: s(&format!("/dev/{name}"))?,
            major: *major,
            minor: *minor,
        });
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        ops.push(MountOp::Symlink {
            target: cstr(target)?,
            link: s(link)?,
        });
    }
    ops.push(MountOp::Mkdir {
        path: s("/dev/pts")?,
    });
    ops.push(MountOp::Mkdir {
        path: s("/dev/shm")?,
    });
    ops.push(MountOp::ReadOnly {
        target: s("/dev")?,
        flags: MountFlags::NOSUID | MountFlags::NOEXEC,
    });
    Ok(())
}

/// The job's own devpts instance and `/dev/shm`.
fn dev_job_ops(ops: &mut Vec<MountOp>, stage: &Path, sandbox: &Sandbox) -> Result<(), RootfsError> {
    let s = |inner: &str| cstr(under(stage, Path::new(inner)));
    ops.push(MountOp::Devpts {
        target: s("/dev/pts")?,
    });
    ops.push(MountOp::Tmpfs {
        target: s("/dev/shm")?,
        data: CString::new(format!("mode=1777,size={}", sandbox.tmp_size)).expect("no NUL"),
        flags: MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
    });
    Ok(())
}

/// A fresh `/proc` for the job's PID namespace, its dangerous parts read-only or masked.
fn proc_ops(ops: &mut Vec<MountOp>, stage: &Path, host: &HostLayout) -> Result<(), RootfsError> {
    let s = |inner: &str| cstr(under(stage, Path::new(inner)));
    ops.push(MountOp::Proc {
        target: s("/proc")?,
    });
    for p in &host.proc_readonly {
        let t = s(&format!("/proc/{p}"))?;
        ops.push(MountOp::Bind {
            source: t.clone(),
            target: t.clone(),
            recursive: true,
        });
        ops.push(MountOp::ReadOnly {
            target: t,
            flags: MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        });
    }
    for p in &host.proc_masked {
        ops.push(MountOp::Bind {
            source: s("/dev/null")?,
            target: s(&format!("/proc/{p}"))?,
            recursive: false,
        });
    }
    Ok(())
}

/// Creates the mount point of a bind (`rootfs: None`: in the minimal root or a job tmpfs), or
/// checks it exists (in a `--rootfs`).
fn mount_point_ops(
    ops: &mut Vec<MountOp>,
    stage: &Path,
    rootfs: Option<&Path>,
    b: &Bind,
) -> Result<(), RootfsError> {
    let md = std::fs::metadata(&b.source).map_err(|err| RootfsError::BindSource {
        source: b.source.clone(),
        err,
    })?;
    let target = under(stage, &b.target);
    if rootfs.is_none() {
        // Parents first, each a directory in the (still writable) staging tmpfs.
        let mut parents: Vec<&Path> = b
            .target
            .ancestors()
            .skip(1)
            .filter(|p| *p != Path::new("/"))
            .collect();
        parents.reverse();
        for p in parents {
            ops.push(MountOp::Mkdir {
                path: cstr(under(stage, p))?,
            });
        }
        if md.is_dir() {
            ops.push(MountOp::Mkdir {
                path: cstr(&target)?,
            });
        } else {
            ops.push(MountOp::Touch {
                path: cstr(&target)?,
            });
        }
    } else if let Some(root) = rootfs
        && !under(root, &b.target).exists()
    {
        return Err(RootfsError::MissingMountPoint {
            root: root.to_owned(),
            inner: b.target.display().to_string(),
        });
    }
    Ok(())
}

fn bind_op(stage: &Path, b: &Bind) -> Result<MountOp, RootfsError> {
    Ok(MountOp::Bind {
        source: cstr(&b.source)?,
        target: cstr(under(stage, &b.target))?,
        recursive: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descs(ops: &[MountOp]) -> Vec<String> {
        ops.iter()
            .map(|o| o.describe(Path::new("/stage")))
            .collect()
    }

    #[test]
    fn minimal_root_plan_orders_readonly_before_writable_mounts() {
        let host = HostLayout {
            system: vec![("/usr", None), ("/bin", Some("usr/bin".into()))],
            etc: vec![("passwd", false)],
            proc_readonly: vec!["sys"],
            proc_masked: vec!["kcore"],
        };
        let mut sb = Sandbox::default();
        sb.binds.push(crate::parse::bind("/tmp:/data/in").unwrap());
        sb.binds
            .push(crate::parse::bind("/tmp:/data/out:rw").unwrap());
        let ops = plan(Path::new("/stage"), &host, &sb, 65534, 65534).unwrap();
        let d = descs(&ops);
        let pos = |s: &str| {
            d.iter()
                .position(|x| x == s)
                .unwrap_or_else(|| panic!("{s} not in {d:#?}"))
        };
        assert_eq!(d[0], "make mounts private");
        assert!(pos("bind /usr on /usr") < pos("make / read-only"));
        assert!(pos("bind /tmp on /data/in") < pos("make / read-only"));
        assert!(pos("make / read-only") < pos("mount tmpfs on /tmp"));
        assert!(pos("make / read-only") < pos("bind /tmp on /data/out"));
        assert!(pos("create device /dev/null") < pos("bind /dev/null on /proc/kcore"));
        assert!(d.contains(&"create symlink /bin".to_string()));
        assert_eq!(d.last().unwrap(), "pivot_root into the job's root");
        // /data is created before /data/in.
        assert!(pos("create directory /data") < pos("create directory /data/in"));
    }

    #[test]
    fn binds_into_job_tmpfs_go_on_top_of_it() {
        // A read-only bind made before the /work tmpfs would be hidden by it; a writable one
        // would find no mount point in it.
        let host = HostLayout {
            system: vec![("/usr", None)],
            etc: vec![],
            proc_readonly: vec![],
            proc_masked: vec![],
        };
        let mut sb = Sandbox::default();
        sb.binds.push(crate::parse::bind("/tmp:/work/in").unwrap());
        sb.binds
            .push(crate::parse::bind("/tmp:/tmp/out:rw").unwrap());
        assert!(!templatable(&sb), "bind sources are host paths");
        {
            let ops = plan(Path::new("/stage"), &host, &sb, 0, 0).unwrap();
            let d = descs(&ops);
            let pos = |s: &str| {
                d.iter()
                    .position(|x| x == s)
                    .unwrap_or_else(|| panic!("{s} not in {d:#?}"))
            };
            assert!(pos("mount tmpfs on /work") < pos("create directory /work/in"));
            assert!(pos("create directory /work/in") < pos("bind /tmp on /work/in"));
            assert!(pos("bind /tmp on /work/in") < pos("make /work/in read-only"));
            assert!(pos("mount tmpfs on /tmp") < pos("bind /tmp on /tmp/out"));
            assert!(
                !d.contains(&"make /tmp/out read-only".to_string()),
                "{d:#?}"
            );
        }
    }

    #[test]
    fn missing_bind_source_is_a_clear_error() {
        let host = HostLayout {
            system: vec![],
            etc: vec![],
            proc_readonly: vec![],
            proc_masked: vec![],
        };
        let mut sb = Sandbox::default();
        sb.binds
            .push(crate::parse::bind("/definitely/not/here:/x").unwrap());
        let e = plan(Path::new("/stage"), &host, &sb, 0, 0).unwrap_err();
        assert!(e.to_string().contains("/definitely/not/here"), "{e}");
    }

    #[test]
    fn rootfs_needs_mount_points() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostLayout {
            system: vec![],
            etc: vec![],
            proc_readonly: vec![],
            proc_masked: vec![],
        };
        let sb = Sandbox {
            rootfs: Some(dir.path().to_owned()),
            ..Sandbox::default()
        };
        let e = plan(Path::new("/stage"), &host, &sb, 0, 0).unwrap_err();
        assert!(e.to_string().contains("missing /tmp"), "{e}");
        for d in ["tmp", "proc", "dev"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let ops = plan(Path::new("/stage"), &host, &sb, 0, 0).unwrap();
        assert!(
            !descs(&ops).iter().any(|d| d.contains("/work")),
            "no /work in this rootfs"
        );
    }
}
