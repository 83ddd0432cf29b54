//! The capture engine: one thread owning one io_uring drains the stdout and stderr pipes of every
//! running job into their logs.
//!
//! Per job, both pipes always have a read armed (so a job never blocks on a full stderr while
//! joblet waits on its stdout); reads take a buffer from the ring's shared pool of provided
//! buffers only when data arrives, so idle jobs hold no memory. Completed reads queue as chunks;
//! each job has at most one `writev` in flight, carrying every chunk queued since the previous
//! one (headers and data, straight from the read buffers), which keeps the log strictly ordered
//! and batches writes as the disk slows down. A job that holds its share of buffers gets no new
//! read until its write completes: the pipe fills and the job blocks in `write(2)`, losing
//! nothing (backpressure).
//!
//! Jobs can be detached (their in-flight reads are cancelled and what they read is stored first)
//! and attached to another engine, possibly in another process after the fds traveled over a
//! unix socket ([`handoff`]): the log is reopened and numbering continues.
//!
//! See `docs/design/capture.md`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::job::JobId;
use crate::store::format::{self, CHUNK_HEADER_LEN, Marker, TruncationReason};
use crate::store::{LogWriter, MARKER_RESERVE, StoreError, Stream};
use crate::sys::uring::{Buf, Completion, Owned, Part, Ring, WriteBatch};

/// Settings of a capture engine.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Submission queue entries of the ring.
    pub ring_entries: u32,
    /// Number of provided read buffers shared by all jobs (a power of two).
    pub buffers: u16,
    /// Size of each read buffer, so the largest chunk's payload.
    pub buffer_size: u32,
    /// Pipe capacity set on each job's pipes with `F_SETPIPE_SZ` (0: leave as is).
    pub pipe_size: usize,
    /// Maximum size of one job's log file, markers included.
    pub job_cap: Option<u64>,
    /// Maximum bytes this engine writes into all logs together.
    pub total_cap: Option<u64>,
    /// `fdatasync` a job's log after this many bytes since its last sync.
    pub sync_every_bytes: u64,
    /// `fdatasync` a job's log when data older than this is not yet synced.
    pub sync_interval: Duration,
    /// Write batches with a blocking `pwritev` from the engine thread instead of through the
    /// ring (which punts buffered writes to a kernel worker on filesystems without
    /// `IOCB_NOWAIT` buffered writes, such as ext4). See `docs/design/capture.md`.
    pub inline_writes: bool,
    /// `fdatasync` each log after its end chunk, so a finished job's output survives a power
    /// cut. The one-shot `joblet run` turns it off unless `--sync` (see docs/design/capture.md).
    pub sync_on_end: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            ring_entries: 1024,
            // One pipe's worth per read: a read drains what a 1 MiB pipe holds in one go (a
            // quarter of the wakeups of 256 KiB buffers, fewer and larger writes). Measured
            // against 32 x 256 KiB, same 8 MiB pool, fresh process per run: less CPU per GiB and
            // more throughput with 1 and with 100 jobs (docs/PERFORMANCE.md, "Capture").
            buffers: 8,
            buffer_size: 1 << 20,
            pipe_size: 1 << 20,
            job_cap: None,
            total_cap: None,
            sync_every_bytes: 256 << 20,
            sync_interval: Duration::from_secs(5),
            inline_writes: false,
            sync_on_end: true,
        }
    }
}

/// Errors of the capture engine.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The io_uring or its buffers could not be set up.
    #[error("failed to set up the io_uring capture engine")]
    Setup(#[source] io::Error),
    /// A job's pipe could not be prepared.
    #[error("failed to prepare the output pipe of job {job}")]
    Pipe {
        /// The job.
        job: JobId,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The engine thread stopped (a ring failure); the job's capture is incomplete.
    #[error("the capture engine stopped while capturing job {job}")]
    EngineGone {
        /// The job.
        job: JobId,
    },
    /// The ring failed.
    #[error("io_uring submission failed")]
    Ring(#[source] io::Error),
}

/// How a job's capture ended.
#[derive(Debug, Default)]
pub struct CaptureSummary {
    /// Bytes of stdout stored.
    pub stdout_bytes: u64,
    /// Bytes of stderr stored.
    pub stderr_bytes: u64,
    /// Bytes of stdout dropped (each drop is recorded by a truncation marker in the log).
    pub lost_stdout: u64,
    /// Bytes of stderr dropped.
    pub lost_stderr: u64,
    /// Sequence number of the end chunk (0 when it could not be written).
    pub end_seq: u64,
    /// The first failure to write or sync the log (e.g. ENOSPC), if any.
    pub write_error: Option<StoreError>,
}

/// A job taken out of an engine with [`CaptureHandle::detach`]: its pipes (whose data up to
/// now is stored) and where its log continues. The engine has closed the log (and released
/// its writer lock); [`handoff::hand_over`] sends all this to another process.
#[derive(Debug)]
pub struct Detached {
    /// The job.
    pub job: JobId,
    /// The stdout read end, `None` if it had reached end of file.
    pub stdout: Option<OwnedFd>,
    /// The stderr read end, `None` if it had reached end of file.
    pub stderr: Option<OwnedFd>,
    /// The log.
    pub log_path: PathBuf,
    /// The sequence number the next chunk gets.
    pub next_seq: u64,
    /// Length of the log's complete chunks (file header included): where the next chunk goes.
    pub log_len: u64,
    /// Offset of the log's last chunk (`None` if it has none), so the next writer can check the
    /// end with [`LogWriter::reopen_at`] without reading the whole log.
    pub last_chunk: Option<u64>,
}

enum Outcome {
    Finished(CaptureSummary),
    Detached(Detached),
    Gone,
}

enum Cmd {
    Add {
        key: u64,
        job: JobId,
        pipes: [Option<OwnedFd>; 2],
        log: LogWriter,
        notify: Option<OwnedFd>,
        reply: mpsc::Sender<Outcome>,
    },
    Detach {
        key: u64,
    },
    Shutdown,
}

/// A running capture engine. Dropping it waits for every job's capture to finish.
#[derive(Debug)]
pub struct Capture {
    tx: mpsc::Sender<Cmd>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<Result<(), CaptureError>>>,
    config: CaptureConfig,
    next_key: AtomicU64,
}

/// One job's capture in an engine.
#[derive(Debug)]
pub struct CaptureHandle {
    job: JobId,
    key: u64,
    rx: mpsc::Receiver<Outcome>,
    tx: mpsc::Sender<Cmd>,
    wake: Arc<OwnedFd>,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outcome")
    }
}

fn wake(fd: &OwnedFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

impl Capture {
    /// Starts an engine: sets up its ring and buffers and spawns its thread.
    pub fn start(config: CaptureConfig) -> Result<Capture, CaptureError> {
        let wake_fd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
            .map_err(|e| CaptureError::Setup(e.into()))?;
        let wake_fd = Arc::new(wake_fd);
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (wake2, config2) = (wake_fd.clone(), config.clone());
        let thread = std::thread::Builder::new()
            .name("joblet-capture".into())
            .spawn(move || {
                // The ring is created on the thread that submits to it (IORING_SETUP_SINGLE_ISSUER).
                let ring =
                    match Ring::new(config2.ring_entries, config2.buffers, config2.buffer_size) {
                        Ok(r) => {
                            let _ = ready_tx.send(Ok(()));
                            r
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                Engine::new(ring, rx, wake2, config2).run()
            })
            .map_err(CaptureError::Setup)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(CaptureError::Setup(e));
            }
            Err(_) => return Err(CaptureError::Setup(io::ErrorKind::Other.into())),
        }
        Ok(Capture {
            tx,
            wake: wake_fd,
            thread: Some(thread),
            config,
            next_key: AtomicU64::new(1),
        })
    }

    /// Starts capturing a job's stdout and stderr read ends into `log` (new, or reopened with
    /// [`LogWriter::open`] to resume after a hand-off). Raises the pipes to the configured size
    /// and makes them blocking (io_uring then waits for data without a worker thread).
    pub fn add(
        &self,
        job: JobId,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
        log: LogWriter,
    ) -> Result<CaptureHandle, CaptureError> {
        self.add_notified(job, stdout, stderr, log, None)
    }

    /// [`Capture::add`], also signalling the eventfd `notify` after every write to the log and
    /// when the capture ends, so an in-process follower needs no inotify watch.
    pub fn add_notified(
        &self,
        job: JobId,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
        log: LogWriter,
        notify: Option<OwnedFd>,
    ) -> Result<CaptureHandle, CaptureError> {
        for fd in stdout.iter().chain(stderr.iter()) {
            let fail = |e: rustix::io::Errno| CaptureError::Pipe {
                job: job.clone(),
                source: e.into(),
            };
            if self.config.pipe_size > 0 {
                // Above /proc/sys/fs/pipe-max-size an unprivileged caller gets EPERM: keep the
                // default size then, it is only slower.
                match rustix::pipe::fcntl_setpipe_size(fd, self.config.pipe_size) {
                    Ok(_) | Err(rustix::io::Errno::PERM) => {}
                    Err(e) => return Err(fail(e)),
                }
            }
            let flags = rustix::fs::fcntl_getfl(fd).map_err(fail)?;
            if flags.contains(rustix::fs::OFlags::NONBLOCK) {
                rustix::fs::fcntl_setfl(fd, flags - rustix::fs::OFlags::NONBLOCK).map_err(fail)?;
            }
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = mpsc::channel();
        self.tx
            .send(Cmd::Add {
                key,
                job: job.clone(),
                pipes: [stdout, stderr],
                log,
                notify,
                reply,
            })
            .map_err(|_| CaptureError::EngineGone { job: job.clone() })?;
        wake(&self.wake);
        Ok(CaptureHandle {
            job,
            key,
            rx,
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        })
    }

    /// Stops the engine after every job's capture finished (or detached).
    pub fn shutdown(mut self) -> Result<(), CaptureError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), CaptureError> {
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        let _ = self.tx.send(Cmd::Shutdown);
        wake(&self.wake);
        t.join().unwrap_or(Ok(()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl CaptureHandle {
    /// The job.
    pub fn job(&self) -> &JobId {
        &self.job
    }

    /// Waits until both pipes reached end of file and everything read is stored, followed by
    /// the end chunk, synced to disk.
    pub fn wait(self) -> Result<CaptureSummary, CaptureError> {
        match self.rx.recv() {
            Ok(Outcome::Finished(s)) => Ok(s),
            _ => Err(CaptureError::EngineGone { job: self.job }),
        }
    }

    /// Takes the job out of the engine: no new read starts, in-flight reads are cancelled, and
    /// what they had read is stored. Returns the pipes and where the log continues. If the job
    /// finished meanwhile, its summary is returned instead.
    pub fn detach(self) -> Result<Result<Detached, CaptureSummary>, CaptureError> {
        let _ = self.tx.send(Cmd::Detach { key: self.key });
        wake(&self.wake);
        match self.rx.recv() {
            Ok(Outcome::Detached(d)) => Ok(Ok(d)),
            Ok(Outcome::Finished(s)) => Ok(Err(s)),
            _ => Err(CaptureError::EngineGone { job: self.job }),
        }
    }
}

// ---- the engine thread ----

const OP_READ_OUT: u64 = 0;
const OP_READ_ERR: u64 = 1;
const OP_WRITE: u64 = 2;
const OP_SYNC: u64 = 3;
const OP_CANCEL: u64 = 4;
const TAG_WAKE: u64 = u64::MAX - 1;

fn tag(slot: usize, op: u64) -> u64 {
    ((slot as u64) << 4) | op
}

#[derive(Debug, Default)]
struct Pipe {
    fd: Option<Arc<OwnedFd>>,
    reading: bool,
    starved: bool,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    Running,
    Detaching,
    /// The end chunk's write is in flight.
    Ending,
    /// The final fdatasync is in flight.
    FinalSync,
}

#[derive(Debug)]
struct Pending {
    stream: Stream,
    buf: Buf,
    len: u32,
}

#[derive(Debug)]
struct Job {
    /// An eventfd signalled after each write of this job's log and at its end, for a follower
    /// in this process (`Follower::with_eventfd`).
    notify: Option<OwnedFd>,
    key: u64,
    id: JobId,
    pipes: [Pipe; 2],
    log: LogWriter,
    queue: VecDeque<Pending>,
    /// (stream, payload length) of each chunk of the write in flight.
    in_write: Vec<(Stream, u32)>,
    writing: bool,
    syncing: bool,
    held: usize,
    /// Bytes of this job's log, counting queued chunks.
    accounted: u64,
    stored: [u64; 2],
    lost_total: [u64; 2],
    /// Dropped since the last marker written.
    lost_unmarked: [u64; 2],
    truncated: Option<(TruncationReason, String)>,
    marker_due: bool,
    unsynced: u64,
    oldest_unsynced: Option<Instant>,
    phase: Phase,
    end_seq: u64,
    write_error: Option<StoreError>,
    reply: mpsc::Sender<Outcome>,
}

fn idx(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

struct Engine {
    ring: Ring,
    rx: mpsc::Receiver<Cmd>,
    wake: Arc<OwnedFd>,
    config: CaptureConfig,
    jobs: Vec<Option<Job>>,
    free: Vec<usize>,
    keys: HashMap<u64, usize>,
    starved: VecDeque<(usize, usize)>,
    dirty: Vec<usize>,
    total_accounted: u64,
    shutdown: bool,
    per_job_bufs: usize,
}

impl Engine {
    fn new(ring: Ring, rx: mpsc::Receiver<Cmd>, wake: Arc<OwnedFd>, config: CaptureConfig) -> Self {
        let per_job_bufs = (usize::from(ring.buf_count()) / 2).max(2);
        Engine {
            ring,
            rx,
            wake,
            config,
            jobs: Vec::new(),
            free: Vec::new(),
            keys: HashMap::new(),
            starved: VecDeque::new(),
            dirty: Vec::new(),
            total_accounted: 0,
            shutdown: false,
            per_job_bufs,
        }
    }

    fn run(mut self) -> Result<(), CaptureError> {
        let res = self.run_loop();
        // On a ring failure every job still attached learns it (its handle returns EngineGone).
        for job in self.jobs.iter_mut().filter_map(Option::take) {
            let _ = job.reply.send(Outcome::Gone);
        }
        res
    }

    fn run_loop(&mut self) -> Result<(), CaptureError> {
        self.ring
            .read_owned(self.wake.clone(), Box::new([0u8; 8]), TAG_WAKE)
            .map_err(CaptureError::Ring)?;
        self.commands()?;
        let mut completions = Vec::new();
        loop {
            if self.shutdown && self.keys.is_empty() {
                return Ok(());
            }
            let timeout = self.sync_timeout();
            self.ring
                .submit_and_wait(1, timeout)
                .map_err(CaptureError::Ring)?;
            completions.clear();
            self.ring.completions(&mut completions);
            for c in completions.drain(..) {
                self.complete(c)?;
            }
            if timeout.is_some() {
                self.sync_due();
            }
            // A read may have failed with ENOBUFS after the completion that freed buffers was
            // handled in the same batch: retry starved pipes whenever buffers are free.
            self.unstarve();
            self.pump_dirty()?;
        }
    }

    fn commands(&mut self) -> Result<(), CaptureError> {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Add {
                    key,
                    job,
                    pipes,
                    log,
                    notify,
                    reply,
                } => {
                    let [out, err] = pipes;
                    let accounted = log.len();
                    let j = Job {
                        key,
                        id: job,
                        pipes: [
                            Pipe {
                                fd: out.map(Arc::new),
                                ..Pipe::default()
                            },
                            Pipe {
                                fd: err.map(Arc::new),
                                ..Pipe::default()
                            },
                        ],
                        log,
                        queue: VecDeque::new(),
                        in_write: Vec::new(),
                        writing: false,
                        syncing: false,
                        held: 0,
                        accounted,
                        stored: [0; 2],
                        lost_total: [0; 2],
                        lost_unmarked: [0; 2],
                        truncated: None,
                        marker_due: false,
                        unsynced: 0,
                        oldest_unsynced: None,
                        phase: Phase::Running,
                        end_seq: 0,
                        write_error: None,
                        notify,
                        reply,
                    };
                    let slot = match self.free.pop() {
                        Some(s) => {
                            self.jobs[s] = Some(j);
                            s
                        }
                        None => {
                            self.jobs.push(Some(j));
                            self.jobs.len() - 1
                        }
                    };
                    self.keys.insert(key, slot);
                    self.dirty.push(slot);
                }
                Cmd::Detach { key } => {
                    if let Some(&slot) = self.keys.get(&key) {
                        let job = self.jobs[slot].as_mut().expect("live slot");
                        if job.phase == Phase::Running {
                            job.phase = Phase::Detaching;
                            for (i, p) in job.pipes.iter_mut().enumerate() {
                                p.starved = false;
                                if p.reading
                                    && let Some(fd) = &p.fd
                                {
                                    self.ring
                                        .cancel_fd(fd, tag(slot, OP_CANCEL))
                                        .map_err(CaptureError::Ring)?;
                                    let _ = i;
                                }
                            }
                            self.dirty.push(slot);
                        }
                    }
                }
                Cmd::Shutdown => self.shutdown = true,
            }
        }
        Ok(())
    }

    fn sync_timeout(&self) -> Option<Duration> {
        // Only jobs with unsynced data need the loop to wake up on its own.
        self.jobs
            .iter()
            .flatten()
            .filter_map(|j| j.oldest_unsynced)
            .min()
            .map(|t| (t + self.config.sync_interval).saturating_duration_since(Instant::now()))
            .map(|d| d.max(Duration::from_millis(1)))
    }

    fn sync_due(&mut self) {
        let interval = self.config.sync_interval;
        for slot in 0..self.jobs.len() {
            if let Some(j) = &self.jobs[slot]
                && j.oldest_unsynced.is_some_and(|t| t.elapsed() >= interval)
                && !j.syncing
            {
                self.dirty.push(slot);
            }
        }
    }

    fn complete(&mut self, c: Completion) -> Result<(), CaptureError> {
        if c.tag == TAG_WAKE {
            self.commands()?;
            if let Owned::Read(fd, buf) = c.owned {
                self.ring
                    .read_owned(fd, buf, TAG_WAKE)
                    .map_err(CaptureError::Ring)?;
            }
            return Ok(());
        }
        if c.tag == u64::MAX {
            return Ok(());
        }
        let slot = (c.tag >> 4) as usize;
        let op = c.tag & 0xf;
        self.dirty.push(slot);
        match op {
            OP_READ_OUT | OP_READ_ERR => self.read_done(slot, op as usize, c),
            OP_WRITE => self.write_done(slot, c),
            OP_SYNC => {
                let job = self.jobs[slot].as_mut().expect("live slot");
                job.syncing = false;
                if let Err(e) = c.result
                    && job.write_error.is_none()
                {
                    job.write_error = Some(StoreError::Sync {
                        path: job.log.path().to_owned(),
                        source: e,
                    });
                }
                if job.phase == Phase::FinalSync {
                    self.finish(slot);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn read_done(&mut self, slot: usize, i: usize, c: Completion) {
        let stream = if i == 0 {
            Stream::Stdout
        } else {
            Stream::Stderr
        };
        let job = self.jobs[slot].as_mut().expect("live slot");
        job.pipes[i].reading = false;
        match (c.result, c.buf) {
            (Ok(n), Some(buf)) if n > 0 => {
                job.held += 1;
                self.accept(slot, stream, buf);
            }
            (res, buf) => {
                if let Some(buf) = buf {
                    self.ring.recycle(buf);
                }
                let job = self.jobs[slot].as_mut().expect("live slot");
                match res {
                    Ok(_) => job.pipes[i].fd = None,
                    Err(e) => match e.raw_os_error() {
                        Some(libc::ENOBUFS) => {
                            job.pipes[i].starved = true;
                            self.starved.push_back((slot, i));
                        }
                        Some(libc::ECANCELED | libc::EINTR | libc::EAGAIN) => {}
                        // Any other read error ends the stream like end of file would.
                        _ => job.pipes[i].fd = None,
                    },
                }
            }
        }
    }

    /// Queues a read buffer as a chunk, applying the caps.
    fn accept(&mut self, slot: usize, stream: Stream, buf: Buf) {
        let job = self.jobs[slot].as_mut().expect("live slot");
        let len = buf.len() as u64;
        if job.truncated.is_some() {
            job.lost_total[idx(stream)] += len;
            job.lost_unmarked[idx(stream)] += len;
            job.held -= 1;
            self.ring.recycle(buf);
            return;
        }
        let cost = CHUNK_HEADER_LEN as u64 + len;
        let mut keep = len;
        let header = CHUNK_HEADER_LEN as u64;
        let room =
            |used: u64, cap: Option<u64>| cap.map(|cap| cap.saturating_sub(used + MARKER_RESERVE));
        let job_room = room(job.accounted, self.config.job_cap);
        let total_room = room(self.total_accounted, self.config.total_cap);
        let mut reason = None;
        if let Some(r) = job_room
            && r < cost
        {
            keep = r.saturating_sub(header);
            reason = Some((
                TruncationReason::JobCap,
                format!(
                    "the log of job {} reached its cap of {} bytes",
                    job.id,
                    self.config.job_cap.unwrap_or(0)
                ),
            ));
        }
        if let Some(r) = total_room
            && r < CHUNK_HEADER_LEN as u64 + keep
        {
            keep = r.saturating_sub(header);
            reason = Some((
                TruncationReason::TotalCap,
                format!(
                    "the logs of all jobs reached the total cap of {} bytes",
                    self.config.total_cap.unwrap_or(0)
                ),
            ));
        }
        if let Some(reason) = reason {
            let lost = len - keep;
            job.lost_total[idx(stream)] += lost;
            job.lost_unmarked[idx(stream)] += lost;
            job.truncated = Some(reason);
            job.marker_due = true;
        }
        if keep == 0 {
            job.held -= 1;
            self.ring.recycle(buf);
            return;
        }
        let keep32 = keep as u32;
        job.accounted += header + keep;
        self.total_accounted += header + keep;
        job.queue.push_back(Pending {
            stream,
            buf,
            len: keep32,
        });
    }

    fn write_done(&mut self, slot: usize, c: Completion) {
        let job = self.jobs[slot].as_mut().expect("live slot");
        job.writing = false;
        let Owned::Write(fd, mut batch) = c.owned else {
            unreachable!("write completion without its batch")
        };
        let total = batch.total();
        let done = batch.done
            + match &c.result {
                Ok(n) => *n as usize,
                Err(_) => 0,
            };
        // Short write: continue where it stopped. EINTR/EAGAIN are transient (seen on Linux
        // 6.1 for io-wq writes under load, in the VM lane): resubmit the unwritten rest.
        let retry = match &c.result {
            Ok(n) => *n > 0 && done < total,
            Err(e) => matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)),
        };
        if retry {
            batch.done = done;
            let offset = job.log.offset() + done as u64;
            job.writing = true;
            if let Err(e) = self.ring.writev(fd, offset, batch, tag(slot, OP_WRITE)) {
                // The batch went back to the ring's table only if the push succeeded; a failed
                // push means the submission itself failed: treat as a write error below.
                let job = self.jobs[slot].as_mut().expect("live slot");
                job.writing = false;
                job.write_error.get_or_insert(StoreError::Write {
                    path: job.log.path().to_owned(),
                    source: e,
                });
            }
            return;
        }
        let in_write = std::mem::take(&mut job.in_write);
        if job.phase == Phase::Ending {
            match c.result {
                Ok(_) if done == total && !self.config.sync_on_end => {
                    job.log.committed(total as u64, total as u64, 0);
                    self.finish(slot);
                }
                Ok(_) if done == total => {
                    job.log.committed(total as u64, total as u64, 0);
                    job.phase = Phase::FinalSync;
                    job.syncing = true;
                    let fd = job.log.fd().clone();
                    if self.ring.fdatasync(fd, tag(slot, OP_SYNC)).is_err() {
                        self.finish(slot);
                    }
                }
                res => {
                    let _ = job.log.cut_to_offset();
                    job.log.untake_seqs(1);
                    job.end_seq = 0;
                    let source = res.err().unwrap_or_else(|| io::ErrorKind::WriteZero.into());
                    job.write_error.get_or_insert(StoreError::Write {
                        path: job.log.path().to_owned(),
                        source,
                    });
                    self.finish(slot);
                }
            }
            return;
        }
        // Complete chunks are kept even when the batch failed part way: a reader may already
        // have returned them.
        let mut kept_bytes = 0usize;
        let mut kept = 0usize;
        for (_, len) in &in_write {
            let chunk = CHUNK_HEADER_LEN + *len as usize;
            if kept_bytes + chunk > done {
                break;
            }
            kept_bytes += chunk;
            kept += 1;
        }
        let last_len = in_write[..kept]
            .last()
            .map_or(0, |(_, len)| (CHUNK_HEADER_LEN + *len as usize) as u64);
        job.log.committed(kept_bytes as u64, last_len, 0);
        poke(job);
        for (stream, len) in &in_write[..kept] {
            job.stored[idx(*stream)] += u64::from(*len);
        }
        job.unsynced += kept_bytes as u64;
        if kept_bytes > 0 && job.oldest_unsynced.is_none() {
            job.oldest_unsynced = Some(Instant::now());
        }
        if kept < in_write.len() {
            let err = c
                .result
                .err()
                .unwrap_or_else(|| io::ErrorKind::WriteZero.into());
            let lost_chunks = &in_write[kept..];
            job.log.untake_seqs(lost_chunks.len() as u64);
            let _ = job.log.cut_to_offset();
            let mut unwritten = 0;
            for (stream, len) in lost_chunks {
                job.lost_total[idx(*stream)] += u64::from(*len);
                job.lost_unmarked[idx(*stream)] += u64::from(*len);
                unwritten += CHUNK_HEADER_LEN as u64 + u64::from(*len);
            }
            job.accounted -= unwritten;
            self.total_accounted -= unwritten;
            Self::fail_writes(job, err);
        }
        for part in batch.into_parts() {
            if let Part::Buf { buf, .. } = part {
                job.held -= 1;
                self.ring.recycle(buf);
            }
        }
        self.unstarve();
    }

    /// After a failed write: drop the queue, keep draining the pipes, and mark the loss.
    fn fail_writes(job: &mut Job, err: io::Error) {
        let full = matches!(
            err.raw_os_error(),
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
        );
        let why = format!("writing {} failed: {err}", job.log.path().display());
        job.truncated = Some((
            if full {
                TruncationReason::DiskFull
            } else {
                TruncationReason::WriteError
            },
            why,
        ));
        job.marker_due = true;
        job.write_error.get_or_insert(StoreError::Write {
            path: job.log.path().to_owned(),
            source: err,
        });
    }

    fn unstarve(&mut self) {
        while self.ring.held_bufs() < usize::from(self.ring.buf_count())
            && let Some((slot, i)) = self.starved.pop_front()
        {
            if let Some(job) = self.jobs[slot].as_mut() {
                job.pipes[i].starved = false;
                self.dirty.push(slot);
            }
        }
    }

    fn pump_dirty(&mut self) -> Result<(), CaptureError> {
        while let Some(slot) = self.dirty.pop() {
            if self.jobs[slot].is_some() {
                self.pump(slot)?;
            }
        }
        Ok(())
    }

    fn pump(&mut self, slot: usize) -> Result<(), CaptureError> {
        let job = self.jobs[slot].as_mut().expect("live slot");
        if matches!(job.phase, Phase::Ending | Phase::FinalSync) {
            return Ok(());
        }
        if !job.writing && !job.queue.is_empty() {
            self.write_queue(slot)?;
        }
        let job = self.jobs[slot].as_mut().expect("live slot");
        if !job.writing && job.queue.is_empty() && job.marker_due {
            Self::write_marker(job);
        }
        // Periodic durability.
        if !job.syncing
            && job.unsynced > 0
            && (job.unsynced >= self.config.sync_every_bytes
                || job
                    .oldest_unsynced
                    .is_some_and(|t| t.elapsed() >= self.config.sync_interval))
        {
            job.syncing = true;
            job.unsynced = 0;
            job.oldest_unsynced = None;
            let fd = job.log.fd().clone();
            self.ring
                .fdatasync(fd, tag(slot, OP_SYNC))
                .map_err(CaptureError::Ring)?;
        }
        let job = self.jobs[slot].as_mut().expect("live slot");
        if job.phase == Phase::Running {
            for i in 0..2 {
                let p = &mut job.pipes[i];
                if p.reading || p.starved || job.held >= self.per_job_bufs {
                    continue;
                }
                if let Some(fd) = &p.fd {
                    p.reading = true;
                    self.ring
                        .read_provided(fd.clone(), tag(slot, i as u64))
                        .map_err(CaptureError::Ring)?;
                }
            }
        }
        let job = self.jobs[slot].as_mut().expect("live slot");
        // Quiet: nothing of the job is in flight, so its slot may be freed.
        let quiet = !job.writing
            && !job.syncing
            && job.queue.is_empty()
            && !job.marker_due
            && job.pipes.iter().all(|p| !p.reading);
        if quiet && job.phase == Phase::Detaching {
            self.detach(slot);
        } else if quiet && job.phase == Phase::Running && job.pipes.iter().all(|p| p.fd.is_none()) {
            // Both streams ended: the end chunk, then a final sync.
            let header = job.log.end_header();
            job.end_seq = job.log.next_seq() - 1;
            job.phase = Phase::Ending;
            job.writing = true;
            let fd = job.log.fd().clone();
            if job.log.make_room(CHUNK_HEADER_LEN as u64).is_err() {
                // The reserve (MARKER_RESERVE) still holds it; write it anyway.
            }
            let batch = WriteBatch::new(vec![Part::Bytes(Box::new(header))]);
            let offset = job.log.offset();
            self.ring
                .writev(fd, offset, batch, tag(slot, OP_WRITE))
                .map_err(CaptureError::Ring)?;
        }
        Ok(())
    }

    fn write_queue(&mut self, slot: usize) -> Result<(), CaptureError> {
        let job = self.jobs[slot].as_mut().expect("live slot");
        // At most 512 chunks (1024 iovecs, the kernel's IOV_MAX) per write.
        let n = job.queue.len().min(512);
        let bytes: u64 = job
            .queue
            .iter()
            .take(n)
            .map(|p| CHUNK_HEADER_LEN as u64 + u64::from(p.len))
            .sum();
        if let Err(e) = job.log.make_room(bytes) {
            // No room can be reserved: the disk is (nearly) full. Nothing of the queue is
            // written; the marker goes into the room reserved earlier.
            let pending: Vec<Pending> = job.queue.drain(..).collect();
            let mut unwritten = 0;
            for p in pending {
                job.lost_total[idx(p.stream)] += u64::from(p.len);
                job.lost_unmarked[idx(p.stream)] += u64::from(p.len);
                unwritten += CHUNK_HEADER_LEN as u64 + u64::from(p.len);
                job.held -= 1;
                self.ring.recycle(p.buf);
            }
            job.accounted -= unwritten;
            self.total_accounted -= unwritten;
            Self::fail_writes(job, e);
            self.unstarve();
            return Ok(());
        }
        let mut parts = Vec::with_capacity(2 * n);
        let now = crate::store::now_ns();
        for p in job.queue.drain(..n) {
            let data = &self.ring.data(&p.buf)[..p.len as usize];
            let seq = job.log.take_seq();
            let header = format::encode_header(format::stream_kind(p.stream), seq, now, &[data]);
            parts.push(Part::Bytes(Box::new(header)));
            job.in_write.push((p.stream, p.len));
            parts.push(Part::Buf {
                buf: p.buf,
                start: 0,
                len: p.len,
            });
        }
        job.writing = true;
        let fd = job.log.fd().clone();
        let offset = job.log.offset();
        if self.config.inline_writes {
            let c = self
                .ring
                .writev_now(fd, offset, WriteBatch::new(parts), tag(slot, OP_WRITE));
            self.write_done(slot, c);
            return Ok(());
        }
        self.ring
            .writev(fd, offset, WriteBatch::new(parts), tag(slot, OP_WRITE))
            .map_err(CaptureError::Ring)
    }

    fn write_marker(job: &mut Job) {
        job.marker_due = false;
        let Some((reason, message)) = job.truncated.clone() else {
            return;
        };
        let marker = Marker {
            reason,
            lost_stdout: job.lost_unmarked[0],
            lost_stderr: job.lost_unmarked[1],
            message,
        };
        let before = job.log.len();
        match job.log.write_marker(&marker) {
            Ok(_) => {
                job.lost_unmarked = [0; 2];
                job.accounted += job.log.len() - before;
                poke(job);
            }
            Err(e) => {
                job.write_error.get_or_insert(e);
            }
        }
    }

    fn finish(&mut self, slot: usize) {
        let mut job = self.jobs[slot].take().expect("live slot");
        self.free.push(slot);
        self.keys.remove(&job.key);
        // Data dropped after the last marker (while the end was pending) gets a final marker.
        if job.lost_unmarked.iter().any(|&n| n > 0) {
            job.marker_due = true;
            Self::write_marker(&mut job);
        }
        job.log.release_reserve();
        let summary = CaptureSummary {
            stdout_bytes: job.stored[0],
            stderr_bytes: job.stored[1],
            lost_stdout: job.lost_total[0],
            lost_stderr: job.lost_total[1],
            end_seq: job.end_seq,
            write_error: job.write_error.take(),
        };
        poke(&job);
        let _ = job.reply.send(Outcome::Finished(summary));
    }

    fn detach(&mut self, slot: usize) {
        let Job {
            key,
            id,
            pipes,
            mut log,
            reply,
            ..
        } = self.jobs[slot].take().expect("live slot");
        self.free.push(slot);
        self.keys.remove(&key);
        log.release_reserve();
        let [stdout, stderr] = pipes.map(|p| {
            p.fd.map(|fd| Arc::try_unwrap(fd).expect("no operation holds a detached pipe"))
        });
        let d = Detached {
            job: id,
            stdout,
            stderr,
            log_path: log.path().to_owned(),
            next_seq: log.next_seq(),
            log_len: log.len(),
            last_chunk: log.end().last_chunk,
        };
        // Nothing of the job is in flight (it is quiet), so this closes the log and releases the
        // writer's lock before the caller learns it may reopen the log, here or elsewhere.
        debug_assert_eq!(Arc::strong_count(log.fd()), 1);
        drop(log);
        let _ = reply.send(Outcome::Detached(d));
    }
}

pub mod handoff;

#[cfg(test)]
mod tests;

/// Wakes the job's in-process follower, if any. The eventfd counter saturates harmlessly: the
/// follower only needs to know that something changed since it last looked.
fn poke(job: &Job) {
    if let Some(fd) = &job.notify {
        let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
    }
}
