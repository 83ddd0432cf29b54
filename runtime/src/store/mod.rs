//! The state dir and the per-job log store.
//!
//! Layout: `<state>/jobs/<id>/log` (the append-only, sequence-numbered output log, see
//! [`format`](mod@format)) and `<state>/jobs/<id>/record.json` (the job's [`JobRecord`], replaced atomically).
//! The state dir is `--state-dir`, else `$JOBLET_STATE_DIR`, else `/var/lib/joblet`
//! ([`StateDir::resolve`]).
//!
//! One process writes a log ([`LogWriter`], or the capture engine through it); any number of
//! processes read it while it grows ([`LogReader`], [`Follower`]). The design, the durability
//! policy and the format are described in `docs/design/capture.md`.

use std::io;
use std::path::{Path, PathBuf};

use crate::job::{JobId, JobRecord};

pub mod format;
mod index;
pub mod logs;
mod reader;
mod writer;

pub use format::{Marker, TruncationReason};
pub use index::{RUNNING_DIR, RunningEntry, RunningMark};
pub use reader::FOLLOW_BACKSTOP;
pub use reader::{Follower, LogReader};
pub use writer::{LogEnd, LogWriter, MARKER_RESERVE, Recovery};

/// The default state dir.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/joblet";
/// The environment variable overriding the state dir.
pub const STATE_DIR_ENV: &str = "JOBLET_STATE_DIR";
/// File name of a job's log inside its directory.
pub const LOG_FILE: &str = "log";
/// File name of a job's record inside its directory.
pub const RECORD_FILE: &str = "record.json";

/// One of a job's output streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// File descriptor 1.
    Stdout,
    /// File descriptor 2.
    Stderr,
}

/// What a chunk holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkKind {
    /// Bytes the job wrote to a stream.
    Data(Stream),
    /// Output was dropped; the marker says how much and why.
    Truncated(Marker),
    /// The log is complete: no chunk follows.
    End,
}

/// One chunk read back from a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Sequence number: 1 for the first chunk of a log, +1 per chunk.
    pub seq: u64,
    /// When the chunk was stored, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// What it is.
    pub kind: ChunkKind,
    /// The payload: the job's bytes for [`ChunkKind::Data`], empty otherwise.
    pub data: Vec<u8>,
}

/// Errors of the log store. Messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A directory of the state dir could not be created.
    #[error("failed to create directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A log or record could not be opened or created.
    #[error("failed to open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A log could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A log or record could not be written (ENOSPC included).
    #[error("failed to write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A log or record could not be flushed to disk.
    #[error("failed to sync {path}")]
    Sync {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file is not a valid joblet log, or a complete chunk failed its checksum.
    #[error("corrupt log {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte offset of the bad chunk.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A log that already has its end chunk was opened for appending.
    #[error("log {path} is already complete")]
    Ended {
        /// The file.
        path: PathBuf,
    },
    /// A log does not end where a hand-off said it does.
    #[error("log {path} does not end at offset {offset} before sequence {seq}: {reason}")]
    NotAt {
        /// The file.
        path: PathBuf,
        /// Where the log was said to end.
        offset: u64,
        /// The sequence number its next chunk was said to get.
        seq: u64,
        /// What was found instead.
        reason: String,
    },
    /// Another live writer (in this or another process) holds the log.
    #[error("log {path} is held by another writer")]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The writer's lock on a log could not be taken.
    #[error("failed to lock {path}")]
    Lock {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A record could not be encoded or decoded.
    #[error("failed to parse record {path}")]
    Record {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// No job with that id in the state dir.
    #[error("no job {id} in {state_dir}")]
    NoSuchJob {
        /// The id asked for.
        id: JobId,
        /// The state dir searched.
        state_dir: PathBuf,
    },
}

/// A state dir: where jobs' logs and records live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// A state dir at `root` (not created until a job is).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    /// The state dir in force: `flag` (`--state-dir`), else `$JOBLET_STATE_DIR` when set and
    /// non-empty, else [`DEFAULT_STATE_DIR`].
    pub fn resolve(flag: Option<PathBuf>) -> Self {
        let root = flag
            .or_else(|| {
                std::env::var_os(STATE_DIR_ENV)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        StateDir::new(root)
    }

    /// The state dir's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<state>/jobs`.
    pub fn jobs_dir(&self) -> PathBuf {
        self.root.join("jobs")
    }

    /// `<state>/jobs/<id>`.
    pub fn job_dir(&self, id: &JobId) -> PathBuf {
        self.jobs_dir().join(id.as_str())
    }

    /// `<state>/jobs/<id>/log`.
    pub fn log_path(&self, id: &JobId) -> PathBuf {
        self.job_dir(id).join(LOG_FILE)
    }

    /// `<state>/jobs/<id>/record.json`.
    pub fn record_path(&self, id: &JobId) -> PathBuf {
        self.job_dir(id).join(RECORD_FILE)
    }

    /// Creates the job's directory (mode 0700, parents as needed) and its empty log.
    pub fn create_job(&self, id: &JobId) -> Result<LogWriter, StoreError> {
        LogWriter::create(&self.ensure_job_dir(id)?.join(LOG_FILE))
    }

    /// The job's directory, created (mode 0700, parents as needed) if missing.
    fn ensure_job_dir(&self, id: &JobId) -> Result<PathBuf, StoreError> {
        let dir = self.job_dir(id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| StoreError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        Ok(dir)
    }

    /// Opens a job's log for reading.
    pub fn open_log(&self, id: &JobId) -> Result<LogReader, StoreError> {
        let path = self.log_path(id);
        if !self.job_dir(id).is_dir() {
            return Err(self.no_such_job(id));
        }
        LogReader::open(&path)
    }

    /// Writes the job's record: to a temporary file in the job's directory, synced, then renamed
    /// over `record.json` (and the directory synced), so a reader sees the old or the new record,
    /// never a mix, even after a power cut.
    pub fn write_record(&self, record: &JobRecord) -> Result<(), StoreError> {
        self.replace_record(record, true)
    }

    /// Writes the record like [`StateDir::write_record`] but without syncing: for the `running`
    /// record written on the spawn path, which a crash may lose (the final record is durable).
    pub fn write_record_unsynced(&self, record: &JobRecord) -> Result<(), StoreError> {
        self.replace_record(record, false)
    }

    fn replace_record(&self, record: &JobRecord, durable: bool) -> Result<(), StoreError> {
        let path = self.ensure_job_dir(&record.id)?.join(RECORD_FILE);
        let mut json = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Record {
            path: path.clone(),
            source,
        })?;
        json.push(b'\n');
        replace_file(&path, &json, 0o600, durable)
    }

    /// Reads a job's record.
    pub fn read_record(&self, id: &JobId) -> Result<JobRecord, StoreError> {
        let path = self.record_path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.no_such_job(id)),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Record { path, source })
    }

    /// The ids of all jobs in the state dir (unsorted; an absent state dir has none).
    pub fn job_ids(&self) -> Result<Vec<JobId>, StoreError> {
        let dir = self.jobs_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Read { path: dir, source }),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StoreError::Read {
                path: dir.clone(),
                source,
            })?;
            if let Some(id) = entry.file_name().to_str().and_then(JobId::parse) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// The records of all jobs that have one, oldest start first. Jobs whose record is missing
    /// or unreadable (e.g. a crash before the first record write) are skipped.
    pub fn records(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut records: Vec<JobRecord> = self
            .job_ids()?
            .iter()
            .filter_map(|id| self.read_record(id).ok())
            .collect();
        records.sort_by(|a, b| a.started_at_ns.cmp(&b.started_at_ns).then(a.id.cmp(&b.id)));
        Ok(records)
    }

    fn no_such_job(&self, id: &JobId) -> StoreError {
        StoreError::NoSuchJob {
            id: id.clone(),
            state_dir: self.root.clone(),
        }
    }
}

use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};

/// fsyncs a directory so a rename or create in it survives a power cut.
/// Replaces `path` with `bytes` atomically: written to a temporary file beside it (created with
/// `mode`), then renamed over it, so a reader sees the old or the new content, never a mix.
/// With `durable`, the file and then its directory are synced, so the new content also survives
/// a power cut. Used for records and for `joblet run --report`.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> Result<(), StoreError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> io::Result<()> {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable { f.sync_data() } else { Ok(()) }
    };
    if let Err(source) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(StoreError::Write { path: tmp, source });
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        StoreError::Write {
            path: path.to_owned(),
            source,
        }
    })?;
    if durable { sync_dir(dir) } else { Ok(()) }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Sync {
            path: dir.to_owned(),
            source,
        })
}

/// Nanoseconds since the Unix epoch, now.
pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
