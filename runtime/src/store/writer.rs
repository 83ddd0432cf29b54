//! The writing side of a log: creation, appends, recovery of a torn tail, space reservation and
//! the end chunk. The capture engine uses the same type; it writes the bytes through io_uring
//! and reports them back with [`LogWriter::committed`].

use std::io::{self, IoSlice};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::FallocateFlags;

use super::format::{
    self, CHUNK_HEADER_LEN, FILE_HEADER_LEN, KIND_END, KIND_MARKER, MAX_CHUNK_PAYLOAD, Marker,
};
use super::{StoreError, Stream, now_ns};

/// Room kept reserved (allocated with `fallocate(FALLOC_FL_KEEP_SIZE)`) past the last chunk, so
/// the truncation markers and the end chunk can still be written when the disk fills up.
pub const MARKER_RESERVE: u64 = 4096;

/// What [`LogWriter::open`] found and repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Valid chunks in the log.
    pub chunks: u64,
    /// The sequence number the next chunk gets.
    pub next_seq: u64,
    /// Length of the valid part of the file.
    pub valid_len: u64,
    /// Bytes of torn or corrupt tail that were cut off.
    pub torn_bytes: u64,
}

/// Where a log ends, as its writer knows it: what a hand-off tells the next writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogEnd {
    /// Length of the complete chunks, file header included: where the next chunk goes.
    pub len: u64,
    /// The sequence number the next chunk gets.
    pub next_seq: u64,
    /// Offset of the last chunk (`None` while the log has none).
    pub last_chunk: Option<u64>,
}

/// The single writer of one job's log.
///
/// It holds an exclusive `flock` on the log for as long as it lives (the lock belongs to the
/// open file, so the kernel drops it when the writer is dropped or its process dies). That makes
/// "one writer per log" hold across processes too: during a hand-off the log itself says which
/// process owns the job (see `capture::handoff`).
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: Arc<OwnedFd>,
    /// End of the last complete chunk: where the next one goes.
    offset: u64,
    /// Start of the last complete chunk (0: none yet).
    last_chunk: u64,
    next_seq: u64,
    /// End of the space reserved with fallocate (past `offset`).
    reserved_end: u64,
    /// Whether the filesystem supports `FALLOC_FL_KEEP_SIZE` (e.g. not on some FUSE or NFS).
    reserve_supported: bool,
}

impl LogWriter {
    /// Creates a new, empty log at `path` (which must not exist) and locks it.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        let file = OwnedFd::from(file);
        lock(path, &file)?;
        let mut w = LogWriter {
            path: path.to_owned(),
            file: Arc::new(file),
            offset: 0,
            last_chunk: 0,
            next_seq: 1,
            reserved_end: 0,
            reserve_supported: true,
        };
        w.write_at(&[&format::file_header()], 0)?;
        w.offset = FILE_HEADER_LEN;
        // Best effort: the first reservation fails only on a full disk, which the first data
        // write reports.
        let _ = w.make_room(0);
        Ok(w)
    }

    /// Opens an existing log to append to it (after a crash, or when another process hands the
    /// job over): checks every chunk, cuts off a torn or corrupt tail and continues the
    /// sequence after the last valid chunk. A complete log (end chunk present) is refused, and
    /// so is a log another live writer holds ([`StoreError::Locked`]).
    pub fn open(path: &Path) -> Result<(Self, Recovery), StoreError> {
        let (file, file_len, mut reader) = open_locked(path)?;
        let mut chunks = 0;
        let mut ended = false;
        let mut last_chunk = 0;
        loop {
            let at = reader.position().0;
            match reader.try_next() {
                Ok(Some(chunk)) => {
                    chunks += 1;
                    last_chunk = at;
                    if matches!(chunk.kind, super::ChunkKind::End) {
                        ended = true;
                        break;
                    }
                }
                // An incomplete or corrupt chunk is the torn tail: everything from it on goes.
                Ok(None) | Err(StoreError::Corrupt { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        if ended {
            return Err(StoreError::Ended {
                path: path.to_owned(),
            });
        }
        let (valid_len, next_seq) = reader.position();
        if valid_len < file_len {
            rustix::fs::ftruncate(&file, valid_len).map_err(|e| StoreError::Write {
                path: path.to_owned(),
                source: e.into(),
            })?;
        }
        let mut w = LogWriter {
            path: path.to_owned(),
            file: Arc::new(file),
            offset: valid_len,
            last_chunk,
            next_seq,
            reserved_end: valid_len,
            reserve_supported: true,
        };
        // Blocks a crashed writer reserved past the end are released, then reserved again.
        w.release_reserve();
        let _ = w.make_room(0);
        Ok((
            w,
            Recovery {
                chunks,
                next_seq,
                valid_len,
                torn_bytes: file_len.saturating_sub(valid_len),
            },
        ))
    }

    /// Reopens a log whose end is known, to continue it in another process after a hand-off:
    /// the fast, checked form of [`LogWriter::open`] that reads only the last chunk instead of
    /// the whole log. It takes the writer lock, checks that the chunk at `end.last_chunk` is
    /// complete, valid (CRC) and numbered `end.next_seq - 1` and that it ends at `end.len`, and
    /// that no complete chunk follows (a chunk there means someone wrote after `end` was taken:
    /// [`StoreError::NotAt`]). A torn tail after `end.len` is cut like recovery does. The prefix
    /// before the last chunk is trusted: its writer held the lock and vouched for `end`.
    pub fn reopen_at(path: &Path, end: LogEnd) -> Result<(Self, Recovery), StoreError> {
        let not_at = |reason: String| StoreError::NotAt {
            path: path.to_owned(),
            offset: end.len,
            seq: end.next_seq,
            reason,
        };
        let (file, file_len, mut reader) = open_locked(path)?;
        if file_len < end.len || end.len < FILE_HEADER_LEN || end.next_seq == 0 {
            return Err(not_at(format!("the file is {file_len} bytes long")));
        }
        match end.last_chunk {
            None if end.len == FILE_HEADER_LEN && end.next_seq == 1 => {}
            None => return Err(not_at("no last chunk given for a non-empty log".into())),
            Some(at) => {
                reader.seek(at, end.next_seq - 1);
                match reader.try_next() {
                    Ok(Some(c)) if c.kind == super::ChunkKind::End => {
                        return Err(StoreError::Ended {
                            path: path.to_owned(),
                        });
                    }
                    Ok(Some(_)) if reader.position() == (end.len, end.next_seq) => {}
                    Ok(Some(_)) => {
                        return Err(not_at(format!(
                            "the last chunk ends at offset {}",
                            reader.position().0
                        )));
                    }
                    Ok(None) => return Err(not_at("the last chunk is incomplete".into())),
                    Err(StoreError::Corrupt { reason, .. }) => {
                        return Err(not_at(format!("the last chunk is invalid: {reason}")));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        reader.seek(end.len, end.next_seq);
        match reader.try_next() {
            // Incomplete or invalid: a torn tail, cut below.
            Ok(None) | Err(StoreError::Corrupt { .. }) => {}
            Ok(Some(c)) => {
                return Err(not_at(format!("chunk {} follows", c.seq)));
            }
            Err(e) => return Err(e),
        }
        if file_len > end.len {
            rustix::fs::ftruncate(&file, end.len).map_err(|e| StoreError::Write {
                path: path.to_owned(),
                source: e.into(),
            })?;
        }
        let mut w = LogWriter {
            path: path.to_owned(),
            file: Arc::new(file),
            offset: end.len,
            last_chunk: end.last_chunk.unwrap_or(0),
            next_seq: end.next_seq,
            reserved_end: end.len,
            reserve_supported: true,
        };
        w.release_reserve();
        let _ = w.make_room(0);
        Ok((
            w,
            Recovery {
                chunks: end.next_seq - 1,
                next_seq: end.next_seq,
                valid_len: end.len,
                torn_bytes: file_len - end.len,
            },
        ))
    }

    /// Where the log ends: what [`LogWriter::reopen_at`] checks in the next writer.
    pub fn end(&self) -> LogEnd {
        LogEnd {
            len: self.offset,
            next_seq: self.next_seq,
            last_chunk: (self.last_chunk > 0).then_some(self.last_chunk),
        }
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sequence number the next chunk gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Length of the log's complete chunks, header included.
    pub fn len(&self) -> u64 {
        self.offset
    }

    /// Whether the log has no chunk yet.
    pub fn is_empty(&self) -> bool {
        self.offset <= FILE_HEADER_LEN
    }

    /// Appends `data` as one chunk of `stream` (several when it exceeds the maximum chunk size)
    /// and returns the last chunk's sequence number. On failure (e.g. ENOSPC) nothing of the
    /// failed chunk remains in the file.
    pub fn append(&mut self, stream: Stream, data: &[u8]) -> Result<u64, StoreError> {
        let kind = format::stream_kind(stream);
        let mut last = self.next_seq;
        for piece in data.chunks(MAX_CHUNK_PAYLOAD as usize).chain(
            // An empty append still stores one (empty) chunk, so the call is observable.
            data.is_empty().then_some(&data[..0]),
        ) {
            self.make_room((CHUNK_HEADER_LEN + piece.len()) as u64)
                .map_err(|source| StoreError::Write {
                    path: self.path.clone(),
                    source,
                })?;
            last = self.append_chunk(kind, piece)?;
        }
        Ok(last)
    }

    /// Appends a truncation marker. It uses the reserved room, so it can succeed on a full disk.
    pub fn append_marker(&mut self, marker: &Marker) -> Result<u64, StoreError> {
        self.append_chunk(KIND_MARKER, &marker.encode())
    }

    /// Flushes the log's data to disk (`fdatasync`).
    pub fn sync(&mut self) -> Result<(), StoreError> {
        rustix::fs::fdatasync(&*self.file).map_err(|e| StoreError::Sync {
            path: self.path.clone(),
            source: e.into(),
        })
    }

    /// Appends the end chunk, syncs the log to disk and releases the reserved room. Returns the
    /// end chunk's sequence number.
    pub fn finish(mut self) -> Result<u64, StoreError> {
        let seq = self.append_chunk(KIND_END, &[])?;
        self.sync()?;
        self.release_reserve();
        Ok(seq)
    }

    fn append_chunk(&mut self, kind: u8, payload: &[u8]) -> Result<u64, StoreError> {
        let seq = self.next_seq;
        let header = format::encode_header(kind, seq, now_ns(), &[payload]);
        if let Err(e) = self.write_at(&[&header, payload], self.offset) {
            // Leave no partial chunk behind: a reader would wait for it forever.
            let _ = rustix::fs::ftruncate(&*self.file, self.offset);
            self.reserved_end = self.offset;
            return Err(e);
        }
        let len = (CHUNK_HEADER_LEN + payload.len()) as u64;
        self.committed(len, len, 1);
        Ok(seq)
    }

    fn write_at(&self, bufs: &[&[u8]], mut offset: u64) -> Result<(), StoreError> {
        let mut slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            match rustix::io::pwritev(&*self.file, slices, offset) {
                Ok(0) => {
                    return Err(StoreError::Write {
                        path: self.path.clone(),
                        source: io::ErrorKind::WriteZero.into(),
                    });
                }
                Ok(n) => {
                    offset += n as u64;
                    IoSlice::advance_slices(&mut slices, n);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(StoreError::Write {
                        path: self.path.clone(),
                        source: e.into(),
                    });
                }
            }
        }
        Ok(())
    }

    // ---- the engine's side: it writes chunks itself and reports them here ----

    /// The log file, for the capture engine's writes.
    pub(crate) fn fd(&self) -> &Arc<OwnedFd> {
        &self.file
    }

    /// Where the next chunk goes.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Takes the next sequence number for a chunk about to be written.
    pub(crate) fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Gives back sequence numbers taken for chunks that were not written.
    pub(crate) fn untake_seqs(&mut self, n: u64) {
        self.next_seq -= n;
    }

    /// Records that `bytes` of complete chunks were written at the old offset, the last of them
    /// `last_len` bytes long. `chunks_numbered_here` of them were numbered by
    /// [`append_chunk`](Self::append_chunk) here rather than with [`take_seq`](Self::take_seq).
    pub(crate) fn committed(&mut self, bytes: u64, last_len: u64, chunks_numbered_here: u64) {
        if bytes > 0 {
            self.last_chunk = self.offset + bytes - last_len;
        }
        self.offset += bytes;
        self.next_seq += chunks_numbered_here;
    }

    /// Ensures `n` more bytes can be written past the end and still leave [`MARKER_RESERVE`]
    /// for markers, by reserving the blocks ahead (`FALLOC_FL_KEEP_SIZE`: the file's size, which
    /// readers see, does not change). `Err` (normally ENOSPC) means the write must not be tried:
    /// the disk is (nearly) full, but the markers still fit in what is already reserved.
    pub(crate) fn make_room(&mut self, n: u64) -> io::Result<()> {
        let need = self.offset + n + MARKER_RESERVE;
        if !self.reserve_supported || need <= self.reserved_end {
            return Ok(());
        }
        // Reserve ahead in proportion to what the log already holds (an eighth of it, at least
        // this write's size up to 4 MiB, at most 32 MiB): a fast writer makes one fallocate call
        // every few MiB instead of one every other batch (~2,000 per GiB with 256 KiB batches,
        // each a journal handle on ext4), while a slow job holds little disk it does not use.
        // The rest is released when the log ends.
        let ahead = (self.offset / 8).clamp(n.min(4 << 20), 32 << 20);
        // tmpfs's fallocate gives up with EINTR when a signal is pending (seen on Linux 6.1
        // with 1,000 jobs in the VM lane); it reserved nothing then, so try again.
        let reserve = |end: u64| loop {
            match rustix::fs::fallocate(
                &*self.file,
                FallocateFlags::KEEP_SIZE,
                self.offset,
                end - self.offset,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                r => break r,
            }
        };
        let mut end = need + ahead;
        let mut res = reserve(end);
        if res == Err(rustix::io::Errno::NOSPC) {
            // A nearly full disk may still have room for what is needed now: the margin ahead
            // must not turn into lost output.
            end = need;
            res = reserve(end);
        }
        match res {
            Ok(()) => {
                self.reserved_end = end;
                Ok(())
            }
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                self.reserve_supported = false;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Releases blocks reserved past the end of the file.
    pub(crate) fn release_reserve(&mut self) {
        if self.reserve_supported {
            let _ = rustix::fs::fallocate(
                &*self.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                self.offset,
                u64::MAX / 2 - self.offset,
            );
        }
        self.reserved_end = self.offset;
    }

    /// Cuts the file back to the end of the last complete chunk, after a failed or short write.
    pub(crate) fn cut_to_offset(&mut self) -> io::Result<()> {
        rustix::fs::ftruncate(&*self.file, self.offset)?;
        self.reserved_end = self.reserved_end.min(self.offset);
        Ok(())
    }

    /// The end chunk's header (the engine writes it through the ring).
    pub(crate) fn end_header(&mut self) -> [u8; CHUNK_HEADER_LEN] {
        let seq = self.take_seq();
        format::encode_header(KIND_END, seq, now_ns(), &[])
    }

    /// Writes a marker synchronously (the engine's markers are rare and small).
    pub(crate) fn write_marker(&mut self, marker: &Marker) -> Result<u64, StoreError> {
        self.append_marker(marker)
    }
}

/// Takes the writer's exclusive lock on a log, without waiting: a log has one writer.
/// Opens an existing log read-write under its writer lock (taken before anything looks at the
/// tail: a live writer may be extending it), with its length and a reader over the same file.
fn open_locked(path: &Path) -> Result<(OwnedFd, u64, super::reader::LogReader), StoreError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
    let file = OwnedFd::from(file);
    lock(path, &file)?;
    let file_len = rustix::fs::fstat(&file)
        .map_err(|e| StoreError::Read {
            path: path.to_owned(),
            source: e.into(),
        })?
        .st_size as u64;
    let reader = super::reader::LogReader::from_fd(
        path,
        file.try_clone().map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?,
    )?;
    Ok((file, file_len, reader))
}

fn lock(path: &Path, file: &OwnedFd) -> Result<(), StoreError> {
    loop {
        match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StoreError::Locked {
                    path: path.to_owned(),
                });
            }
            Err(e) => {
                return Err(StoreError::Lock {
                    path: path.to_owned(),
                    source: e.into(),
                });
            }
        }
    }
}
