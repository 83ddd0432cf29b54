//! The running index: `<state>/running/<pid>-<start_ticks>-<id>`, one empty file per job whose
//! supervisor has not finished with it, named after that supervisor.
//!
//! It exists so that finding the jobs of supervisors that died is cheap enough for every
//! `joblet run`: a readdir of a directory holding only the jobs in flight (and one `/proc` read
//! per distinct supervisor), instead of reading every record of a state dir that may hold 100k
//! ended jobs. A supervisor adds its job's entry before the job's directory exists
//! ([`RunningMark::new`]) and removes it only after the final record is written, so:
//!
//! - a job directory without an entry has either a final record, or was left by a joblet that
//!   predates the index (the full scan of `joblet gc` handles those);
//! - an entry whose supervisor is dead names a job to recover (`crate::gc`).
//!
//! Entries are not synced: after a power cut every supervisor is dead anyway, and the full scan
//! finds `running` records whatever the index says.

use std::io;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use super::{StateDir, StoreError};
use crate::job::{JobId, Supervisor};

/// The index directory's name under the state dir.
pub const RUNNING_DIR: &str = "running";

/// One entry of the running index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningEntry {
    /// The job.
    pub id: JobId,
    /// The process supervising it.
    pub supervisor: Supervisor,
}

impl RunningEntry {
    /// The entry's file name: `<pid>-<start_ticks>-<id>`.
    pub fn file_name(&self) -> String {
        format!(
            "{}-{}-{}",
            self.supervisor.pid, self.supervisor.start_ticks, self.id
        )
    }

    /// Parses a file name made by [`RunningEntry::file_name`].
    pub fn parse(name: &str) -> Option<RunningEntry> {
        let mut parts = name.splitn(3, '-');
        let pid = parts.next()?.parse().ok()?;
        let start_ticks = parts.next()?.parse().ok()?;
        let id = JobId::parse(parts.next()?)?;
        Some(RunningEntry {
            id,
            supervisor: Supervisor { pid, start_ticks },
        })
    }
}

impl StateDir {
    /// `<state>/running`.
    pub fn running_dir(&self) -> PathBuf {
        self.root().join(RUNNING_DIR)
    }

    /// Adds `entry` to the running index.
    pub fn mark_running(&self, entry: &RunningEntry) -> Result<(), StoreError> {
        let dir = self.running_dir();
        let path = dir.join(entry.file_name());
        let create = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
        };
        let res = match create() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .create(&dir)
                    .map_err(|source| StoreError::CreateDir {
                        path: dir.clone(),
                        source,
                    })?;
                create()
            }
            r => r,
        };
        res.map(drop)
            .map_err(|source| StoreError::Write { path, source })
    }

    /// Removes `entry` from the running index (a missing entry is not an error).
    pub fn unmark_running(&self, entry: &RunningEntry) -> Result<(), StoreError> {
        let path = self.running_dir().join(entry.file_name());
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::Write { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Whether `entry` is in the running index.
    pub fn is_marked_running(&self, entry: &RunningEntry) -> bool {
        self.running_dir().join(entry.file_name()).exists()
    }

    /// Every entry of the running index (none when it does not exist).
    pub fn running_entries(&self) -> Result<Vec<RunningEntry>, StoreError> {
        let dir = self.running_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Read { path: dir, source }),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StoreError::Read {
                path: dir.clone(),
                source,
            })?;
            if let Some(e) = entry.file_name().to_str().and_then(RunningEntry::parse) {
                out.push(e);
            }
        }
        Ok(out)
    }
}

/// A job's entry in the running index, removed when dropped: held by the supervisor from before
/// the job's directory exists until after its final record is written. A supervisor killed in
/// between leaves the entry behind, which is how its job is found again.
#[derive(Debug)]
pub struct RunningMark {
    state: StateDir,
    entry: RunningEntry,
}

impl RunningMark {
    /// Adds the entry of job `id` supervised by the calling process.
    pub fn new(state: &StateDir, id: &JobId) -> Result<RunningMark, StoreError> {
        let supervisor = Supervisor::current().ok_or_else(|| StoreError::Read {
            path: PathBuf::from("/proc/self/stat"),
            source: io::Error::new(io::ErrorKind::InvalidData, "no start time"),
        })?;
        let entry = RunningEntry {
            id: id.clone(),
            supervisor,
        };
        state.mark_running(&entry)?;
        Ok(RunningMark {
            state: state.clone(),
            entry,
        })
    }

    /// The entry.
    pub fn entry(&self) -> &RunningEntry {
        &self.entry
    }
}

impl Drop for RunningMark {
    fn drop(&mut self) {
        let _ = self.state.unmark_running(&self.entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_round_trip_and_reject_junk() {
        let e = RunningEntry {
            id: JobId::parse("ab-c_d").unwrap(),
            supervisor: Supervisor {
                pid: 42,
                start_ticks: 9_000_000_001,
            },
        };
        assert_eq!(e.file_name(), "42-9000000001-ab-c_d");
        assert_eq!(RunningEntry::parse(&e.file_name()), Some(e));
        for junk in [
            "",
            "42",
            "42-1",
            "42-1-",
            "x-1-abc",
            "42-y-abc",
            "42-1-../x",
        ] {
            assert_eq!(RunningEntry::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn a_mark_is_listed_while_held_and_gone_after() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        assert!(state.running_entries().unwrap().is_empty());
        let id = JobId::generate();
        let mark = RunningMark::new(&state, &id).unwrap();
        let entries = state.running_entries().unwrap();
        assert_eq!(entries, vec![mark.entry().clone()]);
        assert_eq!(entries[0].supervisor, Supervisor::current().unwrap());
        assert!(state.is_marked_running(mark.entry()));
        drop(mark);
        assert!(state.running_entries().unwrap().is_empty());
    }
}
