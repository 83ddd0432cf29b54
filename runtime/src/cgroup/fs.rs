//! cgroupfs access: every syscall of the cgroup layer goes through [`Dir`], a directory opened
//! once whose files are reached with `*at` calls (no walk from `/` on the hot path).
//!
//! A [`Dir`] is either backed by the kernel's cgroupfs or, in unit tests, by a plain temp
//! directory standing in for it ([`Backing::Plain`]). The two differ only where cgroupfs has
//! semantics a plain directory lacks: interface files appear with `mkdir` (so writes to a plain
//! directory create the file) and `rmdir` ignores them (so a plain directory's regular files are
//! unlinked first, never anything deeper).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::CgroupError;

/// What a [`Dir`] is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backing {
    /// The kernel's cgroupfs.
    Kernel,
    /// A plain directory faking one (unit tests).
    Plain,
}

/// An open cgroup directory and the path it was opened at (for messages).
#[derive(Debug)]
pub(crate) struct Dir {
    path: PathBuf,
    fd: OwnedFd,
    backing: Backing,
}

impl Dir {
    /// Opens `path` as a parent directory (`O_PATH`: only used as the base of `*at` calls).
    pub(crate) fn open(path: &Path, backing: Backing) -> Result<Dir, CgroupError> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| CgroupError::Open {
            path: path.to_owned(),
            source: e.into(),
        })?;
        Ok(Dir {
            path: path.to_owned(),
            fd,
            backing,
        })
    }

    /// Creates the child directory `name` if it is missing and opens it as a parent.
    pub(crate) fn ensure_child(&self, name: &str) -> Result<Dir, CgroupError> {
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                return Err(CgroupError::Create {
                    path: self.path.join(name),
                    source: e.into(),
                });
            }
        }
        Dir::open(&self.path.join(name), self.backing)
    }

    /// Creates the child directory `name`, failing if it exists.
    pub(crate) fn mkdir(&self, name: &str) -> Result<(), CgroupError> {
        rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755)).map_err(|e| {
            CgroupError::Create {
                path: self.path.join(name),
                source: e.into(),
            }
        })
    }

    /// Opens the child directory `name` `O_RDONLY | O_DIRECTORY` (the form `CLONE_INTO_CGROUP`
    /// takes).
    pub(crate) fn open_child(&self, name: &str) -> Result<Dir, CgroupError> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| CgroupError::Open {
            path: self.path.join(name),
            source: e.into(),
        })?;
        Ok(Dir {
            path: self.path.join(name),
            fd,
            backing: self.backing,
        })
    }

    /// Removes the empty child cgroup `name`.
    pub(crate) fn rmdir(&self, name: &str) -> io::Result<()> {
        if self.backing == Backing::Plain {
            self.unlink_plain_files(name)?;
        }
        rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR).map_err(Into::into)
    }

    /// The fake's stand-in for cgroupfs ignoring interface files on `rmdir`: unlinks the regular
    /// files directly in `name`, and nothing else.
    fn unlink_plain_files(&self, name: &str) -> io::Result<()> {
        let dir = self.path.join(name);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// The path of `rel` under this directory.
    pub(crate) fn path_of(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// The directory's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's fd.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The directory's inode number: its cgroup id on cgroupfs.
    pub(crate) fn inode(&self) -> Result<u64, CgroupError> {
        rustix::fs::fstat(&self.fd)
            .map(|st| st.st_ino)
            .map_err(|e| CgroupError::Read {
                path: self.path.clone(),
                source: e.into(),
            })
    }

    /// Whether `rel` exists.
    pub(crate) fn exists(&self, rel: &str) -> bool {
        rustix::fs::statat(&self.fd, rel, AtFlags::empty()).is_ok()
    }

    /// Opens `rel` for writing (`O_WRONLY | O_CLOEXEC`).
    pub(crate) fn open_write(&self, rel: &str) -> Result<OwnedFd, CgroupError> {
        let mut flags = OFlags::WRONLY | OFlags::CLOEXEC;
        if self.backing == Backing::Plain {
            flags |= OFlags::CREATE | OFlags::APPEND;
        }
        rustix::fs::openat(&self.fd, rel, flags, Mode::from_raw_mode(0o644)).map_err(|e| {
            CgroupError::Open {
                path: self.path_of(rel),
                source: e.into(),
            }
        })
    }

    /// Opens `rel` for reading and writing (`O_RDWR | O_CLOEXEC`).
    pub(crate) fn open_rw(&self, rel: &str) -> Result<OwnedFd, CgroupError> {
        rustix::fs::openat(&self.fd, rel, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).map_err(
            |e| CgroupError::Open {
                path: self.path_of(rel),
                source: e.into(),
            },
        )
    }

    /// The link count of the child directory `name`: on kernfs (as on most filesystems), 2 plus
    /// its subdirectories.
    pub(crate) fn child_nlink(&self, name: &str) -> io::Result<u64> {
        rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .map(|st| st.st_nlink)
            .map_err(Into::into)
    }

    /// Writes `value` to the control file `rel` in one `write` (cgroupfs parses each write
    /// whole). On the fake, writes are appended, each ending in a newline, so tests see every
    /// write in order.
    pub(crate) fn write(&self, rel: &str, value: &str) -> Result<(), CgroupError> {
        let fd = self.open_write(rel)?;
        let res = if self.backing == Backing::Plain && !value.ends_with('\n') {
            write_fd(&fd, &format!("{value}\n"))
        } else {
            write_fd(&fd, value)
        };
        res.map_err(|source| CgroupError::Write {
            path: self.path_of(rel),
            value: value.to_owned(),
            source,
        })
    }

    /// Reads the whole control file `rel` as text.
    pub(crate) fn read(&self, rel: &str) -> Result<String, CgroupError> {
        let err = |source: io::Error| CgroupError::Read {
            path: self.path_of(rel),
            source,
        };
        let fd = rustix::fs::openat(
            &self.fd,
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err(e.into()))?;
        read_fd(&fd).map_err(err)
    }
}

/// Writes `value` to an open control file in one `write`.
pub(crate) fn write_fd(fd: impl AsFd, value: &str) -> io::Result<()> {
    match rustix::io::write(fd, value.as_bytes()) {
        Ok(n) if n == value.len() => Ok(()),
        Ok(n) => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write of {n} of {} bytes", value.len()),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Reads an open control file from offset 0 to its end.
pub(crate) fn read_fd(fd: impl AsFd) -> io::Result<String> {
    // Control files are small: one page covers every file read here in one call.
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = rustix::io::pread(&fd, &mut buf[len..], len as u64)?;
        if n == 0 {
            break;
        }
        len += n;
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
