//! The reading side of a log: [`LogReader`] returns complete chunks from any sequence number
//! while the writer appends; [`Follower`] blocks for new chunks (inotify, with a slow poll as a
//! backstop) until the end chunk.
//!
//! The reader keeps its own position (file offset, next sequence number) and only ever moves
//! past a chunk it has returned. Stored and live data are one and the same file read through one
//! cursor, so the switch from "catching up" to "following" cannot skip or repeat a chunk: there
//! is no switch. The only race is the wake-up, and the follower avoids losing it by draining its
//! inotify queue *before* it tries to read, so any append after that attempt wakes it again.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::inotify;

use super::format::{self, CHUNK_HEADER_LEN, FILE_HEADER_LEN, Marker};
use super::{Chunk, ChunkKind, StoreError, Stream};

/// A cursor over one log.
#[derive(Debug)]
pub struct LogReader {
    path: PathBuf,
    file: OwnedFd,
    offset: u64,
    next_seq: u64,
    header_ok: bool,
}

impl LogReader {
    /// Opens a log for reading from its first chunk.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file = std::fs::File::open(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_fd(path, OwnedFd::from(file))
    }

    pub(crate) fn from_fd(path: &Path, file: OwnedFd) -> Result<Self, StoreError> {
        let mut r = LogReader {
            path: path.to_owned(),
            file,
            offset: 0,
            next_seq: 1,
            header_ok: false,
        };
        r.check_header()?;
        Ok(r)
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the cursor to the chunk at `offset`, which must have sequence number `next_seq`
    /// (the next read checks that it does).
    pub(crate) fn seek(&mut self, offset: u64, next_seq: u64) {
        self.offset = offset;
        self.next_seq = next_seq;
    }

    /// The cursor: the offset of the next chunk and the sequence number it will have.
    pub fn position(&self) -> (u64, u64) {
        (self.offset.max(FILE_HEADER_LEN), self.next_seq)
    }

    fn check_header(&mut self) -> Result<bool, StoreError> {
        if self.header_ok {
            return Ok(true);
        }
        let mut h = [0u8; FILE_HEADER_LEN as usize];
        if self.read_exact_at(&mut h, 0)? < h.len() {
            // The creator has not written the header yet.
            return Ok(false);
        }
        format::check_file_header(&h).map_err(|reason| StoreError::Corrupt {
            path: self.path.clone(),
            offset: 0,
            reason,
        })?;
        self.header_ok = true;
        self.offset = FILE_HEADER_LEN;
        Ok(true)
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many (fewer only at end of file).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, StoreError> {
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pread(&self.file, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(StoreError::Read {
                        path: self.path.clone(),
                        source: e.into(),
                    });
                }
            }
        }
        Ok(done)
    }

    /// Reads the chunk at the cursor without moving it. `None`: no complete chunk there yet.
    fn peek(&self, with_payload: bool) -> Result<Option<(format::Header, Vec<u8>)>, StoreError> {
        let mut raw = [0u8; CHUNK_HEADER_LEN];
        if self.read_exact_at(&mut raw, self.offset)? < CHUNK_HEADER_LEN {
            return Ok(None);
        }
        let corrupt = |reason: String| StoreError::Corrupt {
            path: self.path.clone(),
            offset: self.offset,
            reason,
        };
        let header = format::decode_header(&raw).map_err(corrupt)?;
        if header.seq != self.next_seq {
            return Err(corrupt(format!(
                "sequence number {} where {} was expected",
                header.seq, self.next_seq
            )));
        }
        let payload_at = self.offset + CHUNK_HEADER_LEN as u64;
        let mut payload = Vec::new();
        if with_payload {
            payload = vec![0u8; header.len as usize];
            if self.read_exact_at(&mut payload, payload_at)? < payload.len() {
                return Ok(None);
            }
            if !format::crc_matches(&raw, &header, &payload) {
                return Err(corrupt("checksum mismatch".to_owned()));
            }
        } else {
            // Skipping: the chunk counts as present once its last byte is.
            let end = payload_at + u64::from(header.len);
            if header.len > 0 && self.read_exact_at(&mut [0u8; 1], end - 1)? == 0 {
                return Ok(None);
            }
        }
        Ok(Some((header, payload)))
    }

    fn advance(&mut self, header: &format::Header) {
        self.offset += CHUNK_HEADER_LEN as u64 + u64::from(header.len);
        self.next_seq += 1;
    }

    /// The next complete chunk, or `None` when the writer has not finished writing one yet.
    /// A complete chunk that fails its checksum is [`StoreError::Corrupt`] (the cursor stays, so
    /// a follower can retry after the writer's recovery rewrote the tail).
    pub fn try_next(&mut self) -> Result<Option<Chunk>, StoreError> {
        if !self.check_header()? {
            return Ok(None);
        }
        let Some((header, payload)) = self.peek(true)? else {
            return Ok(None);
        };
        let kind = match header.kind {
            format::KIND_STDOUT => ChunkKind::Data(Stream::Stdout),
            format::KIND_STDERR => ChunkKind::Data(Stream::Stderr),
            format::KIND_MARKER => {
                ChunkKind::Truncated(Marker::decode(&payload).ok_or_else(|| {
                    StoreError::Corrupt {
                        path: self.path.clone(),
                        offset: self.offset,
                        reason: "malformed truncation marker".to_owned(),
                    }
                })?)
            }
            _ => ChunkKind::End,
        };
        self.advance(&header);
        let data = if matches!(kind, ChunkKind::Data(_)) {
            payload
        } else {
            Vec::new()
        };
        Ok(Some(Chunk {
            seq: header.seq,
            ts_ns: header.ts_ns,
            kind,
            data,
        }))
    }

    /// Moves the cursor past every chunk numbered below `seq`, reading headers only. Returns
    /// `false` when the log does not (yet) reach `seq`; the cursor then stays at the first missing
    /// chunk and a later call continues from there.
    pub fn skip_to(&mut self, seq: u64) -> Result<bool, StoreError> {
        if !self.check_header()? {
            return Ok(false);
        }
        while self.next_seq < seq {
            match self.peek(false)? {
                Some((header, _)) => {
                    let end = header.kind == format::KIND_END;
                    self.advance(&header);
                    if end {
                        return Ok(false);
                    }
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }
}

/// Follows a log live: [`next_chunk`](Follower::next_chunk) blocks until the next chunk is complete, and
/// returns `None` once the end chunk has been returned.
#[derive(Debug)]
pub struct Follower {
    reader: LogReader,
    /// What wakes the follower: an inotify watch on the log, or an eventfd the capture engine
    /// signals after each write (in-process followers: no fsnotify group, whose teardown waits
    /// for an SRCU grace period, ~10 ms here, on the one-shot path).
    inotify: OwnedFd,
    eventfd: bool,
    backstop: Duration,
    ended: bool,
    since: u64,
    /// How many times in a row a complete chunk failed its checksum.
    corrupt_retries: u32,
}

/// How long a follower waits for an inotify event before looking anyway (e.g. on a filesystem
/// whose writes do not raise inotify events, such as NFS written from another host).
pub const FOLLOW_BACKSTOP: Duration = Duration::from_millis(500);

impl Follower {
    /// Follows `reader` from its cursor, returning only chunks numbered `since` or later.
    pub fn new(reader: LogReader, since: u64) -> Result<Self, StoreError> {
        let fail = |e: rustix::io::Errno| StoreError::Open {
            path: reader.path.clone(),
            source: e.into(),
        };
        let inotify = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .map_err(fail)?;
        // The watch exists before the first read attempt: no append after it can go unnoticed.
        inotify::add_watch(
            &inotify,
            &reader.path,
            inotify::WatchFlags::MODIFY | inotify::WatchFlags::CLOSE_WRITE,
        )
        .map_err(fail)?;
        Ok(Follower {
            reader,
            inotify,
            eventfd: false,
            backstop: FOLLOW_BACKSTOP,
            ended: false,
            since,
            corrupt_retries: 0,
        })
    }

    /// Follows `reader` from its cursor, woken by `eventfd`, which the writer in this process
    /// signals after each write and at the end (`capture::Capture::add_notified`).
    pub fn with_eventfd(reader: LogReader, since: u64, eventfd: OwnedFd) -> Self {
        Follower {
            reader,
            inotify: eventfd,
            eventfd: true,
            backstop: FOLLOW_BACKSTOP,
            ended: false,
            since,
            corrupt_retries: 0,
        }
    }

    /// Changes the backstop poll interval (tests use it to prove inotify does the waking).
    pub fn set_backstop(&mut self, backstop: Duration) {
        self.backstop = backstop;
    }

    /// The underlying cursor.
    pub fn reader(&self) -> &LogReader {
        &self.reader
    }

    /// The underlying cursor, to read without waiting.
    pub fn reader_mut(&mut self) -> &mut LogReader {
        &mut self.reader
    }

    /// The next chunk, waiting for it; `None` after the end chunk.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>, StoreError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            self.drain_events();
            if !self.reader.skip_to(self.since)? {
                self.wait_for_growth();
                continue;
            }
            match self.reader.try_next() {
                Ok(Some(chunk)) => {
                    self.corrupt_retries = 0;
                    if matches!(chunk.kind, ChunkKind::End) {
                        self.ended = true;
                    }
                    return Ok(Some(chunk));
                }
                Ok(None) => self.wait_for_growth(),
                // A corrupt tail of a log whose writer crashed is cut and rewritten by the next
                // writer (hand-off); give it time, then report it.
                Err(e @ StoreError::Corrupt { .. }) => {
                    self.corrupt_retries += 1;
                    if self.corrupt_retries > 20 {
                        return Err(e);
                    }
                    self.wait_for_growth();
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn drain_events(&mut self) {
        if self.eventfd {
            let mut counter = [0u8; 8];
            let _ = rustix::io::read(&self.inotify, &mut counter);
            return;
        }
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
        let mut events = inotify::Reader::new(&self.inotify, &mut buf);
        while events.next().is_ok() {}
    }

    fn wait_for_growth(&self) {
        let mut fds = [rustix::event::PollFd::new(
            &self.inotify,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::time::Timespec {
            tv_sec: self.backstop.as_secs() as i64,
            tv_nsec: i64::from(self.backstop.subsec_nanos()),
        };
        let _ = rustix::event::poll(&mut fds, Some(&timeout));
    }
}
