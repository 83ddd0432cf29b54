//! Handing a running job's capture to another process (a daemon restart): the wire protocol,
//! its fds in `SCM_RIGHTS`, and the ownership rule that stops two processes from capturing the
//! same job.
//!
//! The sender detaches the job from its engine ([`CaptureHandle::detach`]: what was read is
//! stored, what was not stays in the pipe), then [`hand_over`] sends one message over a
//! connected unix stream socket carrying the pipes' read ends (and the job's pidfd) and waits
//! for the answer. The receiver takes it with [`receive`] and [`Incoming::attach`]: it reopens
//! the log with [`LogWriter::reopen_at`] (which takes the log's writer lock, checks that the log
//! ends where the message says and cuts a torn tail), adds the pipes to its own engine (numbering
//! continues), and only then acknowledges.
//!
//! Who owns the job is decided by the log's writer lock (`flock`, see [`LogWriter`]), not by the
//! messages: the receiver takes the lock before it reads anything from the pipes, and a sender
//! that got no acknowledgement tries to take it back. Whoever holds the lock captures; the other
//! closes its copies of the fds. So a lost acknowledgement can neither lose the job (the sender
//! keeps its fds until it knows) nor make two processes read the same pipe.
//!
//! The protocol is described in `docs/design/capture.md`, "Hand-off to another process".

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use super::{Capture, CaptureError, CaptureHandle, Detached};
use crate::job::JobId;
use crate::store::{LogEnd, LogWriter, Recovery, StateDir, StoreError};

/// First bytes of every message.
pub const MAGIC: [u8; 8] = *b"JOBLETHO";
/// The protocol version this code speaks; a message of another version is refused.
pub const VERSION: u16 = 1;
/// Length of a message header.
pub const HEADER_LEN: usize = 16;
/// Largest body accepted (a message is a few hundred bytes; this bounds a hostile peer).
pub const MAX_BODY: u32 = 64 << 10;
/// Most fds one message carries: stdout, stderr, pidfd.
pub const MAX_FDS: usize = 3;
/// Room for more fds than allowed, so a peer sending too many is told apart from a truncated
/// control message.
const FD_ROOM: usize = 8;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A job: [`Offer`] in the body, its fds in `SCM_RIGHTS`.
    Offer = 1,
    /// The receiver captures the job now: [`Ack`] in the body.
    Ack = 2,
    /// The receiver did not take the job: [`Refusal`] in the body.
    Refusal = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Offer),
            2 => Some(Kind::Ack),
            3 => Some(Kind::Refusal),
            _ => None,
        }
    }
}

/// What one of an offer's fds is, in the order they travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FdRole {
    /// The read end of the job's stdout pipe.
    Stdout,
    /// The read end of the job's stderr pipe.
    Stderr,
    /// A pidfd of the job's main process, so the receiver can learn when it exits.
    Pidfd,
}

/// The body of an offer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// The job's id.
    pub job: String,
    /// The roles of the fds in `SCM_RIGHTS`, in order (a stream that reached end of file has
    /// no fd).
    pub fds: Vec<FdRole>,
    /// The job's log: `<state>/jobs/<id>/log`.
    pub log_path: PathBuf,
    /// The sequence number the next chunk gets.
    pub next_seq: u64,
    /// Length of the log's complete chunks: where the next chunk goes.
    pub log_len: u64,
    /// Offset of the log's last chunk (`null` when it has none): the receiver checks that chunk.
    pub last_chunk: Option<u64>,
}

/// The body of an acknowledgement.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The job's id.
    pub job: String,
    /// The sequence number the receiver's next chunk gets (the offer's `next_seq`).
    pub next_seq: u64,
}

/// The body of a refusal.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// The job's id.
    pub job: String,
    /// Why, as the receiver's error chain.
    pub error: String,
}

/// Errors of a hand-off. Messages name the job where one is known.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// A message could not be sent.
    #[error("failed to send a hand-off message for job {job}")]
    Send {
        /// The job.
        job: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be read.
    #[error("failed to receive a hand-off message")]
    Receive(#[source] std::io::Error),
    /// The peer closed the connection between two messages.
    #[error("the hand-off peer closed the connection")]
    Closed,
    /// The peer closed the connection inside a message.
    #[error("the hand-off peer closed the connection after {got} of {want} bytes of a message")]
    ShortMessage {
        /// Bytes received.
        got: usize,
        /// Bytes the message has.
        want: usize,
    },
    /// No complete message arrived in time.
    #[error("no hand-off message within {0:?}")]
    Timeout(Duration),
    /// The kernel cut the control data (`MSG_CTRUNC`): more fds were sent than fit.
    #[error("the hand-off message carried more file descriptors than fit (control data truncated)")]
    Truncated,
    /// The number of fds received is not the one the message declares.
    #[error("the hand-off message declares {declared} file descriptors but carried {received}")]
    FdCount {
        /// What the header (and body) says.
        declared: usize,
        /// What arrived.
        received: usize,
    },
    /// The header is not a valid version 1 header.
    #[error("invalid hand-off message header: {0}")]
    Header(String),
    /// The body is not the JSON its kind requires.
    #[error("invalid hand-off message body")]
    Body(#[source] serde_json::Error),
    /// A message arrived where another kind was expected.
    #[error("expected a hand-off {want:?} message, got {got:?}")]
    Unexpected {
        /// The kind expected.
        want: Kind,
        /// The kind received.
        got: Kind,
    },
    /// The offer names an invalid job id, or an answer names another job.
    #[error("hand-off message for job {got:?} where {want:?} was expected")]
    Job {
        /// The id expected (empty if any valid id would do).
        want: String,
        /// The id received.
        got: String,
    },
    /// The offered log is not the job's log in this receiver's state dir.
    #[error("job {job}'s offered log {path} is not {expected}")]
    LogPath {
        /// The job.
        job: JobId,
        /// The path offered.
        path: PathBuf,
        /// The job's log in the receiver's state dir.
        expected: PathBuf,
    },
    /// The log could not be reopened (or retaken by the sender), or it does not end where the
    /// offer says ([`StoreError::NotAt`]).
    #[error("failed to reopen the log of job {job}")]
    Reopen {
        /// The job.
        job: JobId,
        /// The cause.
        #[source]
        source: StoreError,
    },
    /// The receiver's engine did not take the job.
    #[error("failed to add job {job} to the capture engine")]
    Attach {
        /// The job.
        job: JobId,
        /// The cause.
        #[source]
        source: CaptureError,
    },
    /// The receiver refused the job.
    #[error("the receiver refused job {job}: {reason}")]
    Refused {
        /// The job.
        job: String,
        /// The receiver's error.
        reason: String,
    },
}

// ---- framing ----

fn encode_header(kind: Kind, nfds: usize, body_len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10] = kind as u8;
    h[11] = nfds as u8;
    h[12..16].copy_from_slice(&(body_len as u32).to_le_bytes());
    h
}

/// Sends one message: header and body in one `sendmsg`, the fds attached to its first byte.
/// `declared` is the fd count written into the header (tests lie with it).
fn send_frame(
    socket: BorrowedFd<'_>,
    kind: Kind,
    declared: usize,
    body: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let header = encode_header(kind, declared, body.len());
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(32))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Errno::TOOMANYREFS.into());
    }
    let whole = [&header[..], body].concat();
    let mut sent = loop {
        match rustix::net::sendmsg(
            socket,
            &[IoSlice::new(&whole)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Err(Errno::INTR) => continue,
            r => break r?,
        }
    };
    // A stream socket may take part of the bytes; the rest follows without fds (they are
    // attached to the first byte, which went).
    while sent < whole.len() {
        match rustix::net::send(socket, &whole[sent..], SendFlags::NOSIGNAL) {
            Ok(n) => sent += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One received message.
struct Frame {
    kind: Kind,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Reads exactly `buf.len()` bytes, collecting any fds that arrive (close-on-exec). `Ok(false)`
/// when the peer closed before the first byte.
fn recv_exact(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    deadline: Option<Instant>,
) -> Result<bool, HandoffError> {
    let mut got = 0;
    while got < buf.len() {
        if let Some(deadline) = deadline {
            wait_readable(socket, deadline)?;
        }
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FD_ROOM))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = match rustix::net::recvmsg(
            socket,
            &mut [IoSliceMut::new(&mut buf[got..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(HandoffError::Receive(e.into())),
        };
        // Every fd that arrived becomes an OwnedFd here, so an error below closes them all.
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            return Err(HandoffError::Truncated);
        }
        if msg.bytes == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(HandoffError::ShortMessage {
                got,
                want: buf.len(),
            });
        }
        got += msg.bytes;
    }
    Ok(true)
}

fn wait_readable(socket: BorrowedFd<'_>, deadline: Instant) -> Result<(), HandoffError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandoffError::Timeout(left));
        }
        let ts = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut pfd = [PollFd::new(&socket, PollFlags::IN)];
        match rustix::event::poll(&mut pfd, Some(&ts)) {
            Ok(0) => {}
            // Readable, hung up or in error: recvmsg says which.
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => {}
            Err(e) => return Err(HandoffError::Receive(e.into())),
        }
    }
}

/// Receives one whole message. `Ok(None)` when the peer closed the connection between messages.
fn recv_frame(
    socket: BorrowedFd<'_>,
    deadline: Option<Instant>,
) -> Result<Option<Frame>, HandoffError> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    if !recv_exact(socket, &mut header, &mut fds, deadline)? {
        return Ok(None);
    }
    if header[0..8] != MAGIC {
        return Err(HandoffError::Header("bad magic".into()));
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != VERSION {
        return Err(HandoffError::Header(format!(
            "version {version}, this joblet speaks {VERSION}"
        )));
    }
    let kind = Kind::from_u8(header[10])
        .ok_or_else(|| HandoffError::Header(format!("unknown kind {}", header[10])))?;
    let declared = usize::from(header[11]);
    let body_len = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if body_len > MAX_BODY {
        return Err(HandoffError::Header(format!(
            "body of {body_len} bytes, the limit is {MAX_BODY}"
        )));
    }
    let mut body = vec![0u8; body_len as usize];
    if !recv_exact(socket, &mut body, &mut fds, deadline)? && !body.is_empty() {
        return Err(HandoffError::ShortMessage {
            got: HEADER_LEN,
            want: HEADER_LEN + body.len(),
        });
    }
    let allowed = if kind == Kind::Offer { MAX_FDS } else { 0 };
    if fds.len() != declared || declared > allowed {
        return Err(HandoffError::FdCount {
            declared,
            received: fds.len(),
        });
    }
    Ok(Some(Frame { kind, body, fds }))
}

fn send_json<T: serde::Serialize>(
    socket: BorrowedFd<'_>,
    kind: Kind,
    job: &str,
    body: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), HandoffError> {
    let body = serde_json::to_vec(body).map_err(HandoffError::Body)?;
    send_frame(socket, kind, fds.len(), &body, fds).map_err(|source| HandoffError::Send {
        job: job.to_owned(),
        source,
    })
}

// ---- the sender ----

/// Sends a detached job (and its pidfd, if given) as an offer. The caller keeps its fds:
/// `SCM_RIGHTS` gives the receiver copies. Most callers want [`hand_over`], which also waits for
/// the answer and settles who owns the job.
pub fn send(
    socket: BorrowedFd<'_>,
    detached: &Detached,
    pidfd: Option<BorrowedFd<'_>>,
) -> Result<(), HandoffError> {
    let mut roles = Vec::new();
    let mut fds = Vec::new();
    for (role, fd) in [
        (FdRole::Stdout, detached.stdout.as_ref().map(|f| f.as_fd())),
        (FdRole::Stderr, detached.stderr.as_ref().map(|f| f.as_fd())),
        (FdRole::Pidfd, pidfd),
    ] {
        if let Some(fd) = fd {
            roles.push(role);
            fds.push(fd);
        }
    }
    let offer = Offer {
        job: detached.job.as_str().to_owned(),
        fds: roles,
        log_path: detached.log_path.clone(),
        next_seq: detached.next_seq,
        log_len: detached.log_len,
        last_chunk: detached.last_chunk,
    };
    send_json(socket, Kind::Offer, &offer.job, &offer, &fds)
}

/// The receiver's answer to an offer.
#[derive(Debug)]
pub enum Answer {
    /// The receiver captures the job.
    Ack(Ack),
    /// It does not.
    Refusal(Refusal),
}

/// Waits up to `timeout` for the answer to the offer of `job`.
pub fn wait_answer(
    socket: BorrowedFd<'_>,
    job: &JobId,
    timeout: Duration,
) -> Result<Answer, HandoffError> {
    let frame = recv_frame(socket, Some(Instant::now() + timeout))
        .map_err(|e| match e {
            HandoffError::Timeout(_) => HandoffError::Timeout(timeout),
            e => e,
        })?
        .ok_or(HandoffError::Closed)?;
    let (answer, named) = match frame.kind {
        Kind::Ack => {
            let a: Ack = serde_json::from_slice(&frame.body).map_err(HandoffError::Body)?;
            let j = a.job.clone();
            (Answer::Ack(a), j)
        }
        Kind::Refusal => {
            let r: Refusal = serde_json::from_slice(&frame.body).map_err(HandoffError::Body)?;
            let j = r.job.clone();
            (Answer::Refusal(r), j)
        }
        got => {
            return Err(HandoffError::Unexpected {
                want: Kind::Ack,
                got,
            });
        }
    };
    if named != job.as_str() {
        return Err(HandoffError::Job {
            want: job.as_str().to_owned(),
            got: named,
        });
    }
    Ok(answer)
}

/// How a [`hand_over`] ended.
#[derive(Debug)]
pub enum HandOver {
    /// The receiver acknowledged: it captures the job from sequence number `next_seq` on. The
    /// sender's copies of the fds are closed.
    Accepted {
        /// The receiver's next sequence number.
        next_seq: u64,
    },
    /// The receiver did not take the job (it refused, died, or did not answer in time and does
    /// not hold the log): the sender still owns it, with the log reopened and locked.
    /// [`Kept::resume`] adds it back to an engine.
    Kept(Box<Kept>),
    /// No acknowledgement arrived, but another process holds the log's writer lock (or the log
    /// is already complete): the receiver took the job and its answer was lost. The sender's
    /// fds are closed.
    TakenOver {
        /// What went wrong with the answer.
        reason: HandoffError,
    },
}

/// A job whose hand-off did not happen: everything needed to go on capturing it here.
#[derive(Debug)]
pub struct Kept {
    /// The pipes; `log_len` and `next_seq` are the reopened log's (a receiver that died after
    /// taking the job may have written more).
    pub detached: Detached,
    /// The pidfd given to [`hand_over`].
    pub pidfd: Option<OwnedFd>,
    /// The log, reopened (torn tail cut) and locked by this process.
    pub log: LogWriter,
    /// Why the hand-off did not happen.
    pub reason: HandoffError,
}

impl Kept {
    /// Adds the job back to `capture`; returns its handle and the pidfd.
    pub fn resume(
        self,
        capture: &Capture,
    ) -> Result<(CaptureHandle, Option<OwnedFd>), CaptureError> {
        let d = self.detached;
        let handle = capture.add(d.job, d.stdout, d.stderr, self.log)?;
        Ok((handle, self.pidfd))
    }
}

/// Hands a detached job to the process at the other end of `socket`: sends the offer, waits up
/// to `timeout` for the answer, and keeps the fds until the answer says the receiver captures
/// the job. Without an answer the log's writer lock decides (see the module docs).
///
/// `Err` only when the job was not handed over and its log cannot be reopened here either
/// (not locked by anyone, but e.g. unreadable): the fds are closed then; treat it like a crash
/// of the capturing process.
///
/// After anything but [`HandOver::Accepted`], the connection's state is unknown (a late answer
/// may still arrive): close it.
pub fn hand_over(
    socket: BorrowedFd<'_>,
    detached: Detached,
    pidfd: Option<OwnedFd>,
    timeout: Duration,
) -> Result<HandOver, HandoffError> {
    let reason = match send(socket, &detached, pidfd.as_ref().map(|f| f.as_fd())) {
        Ok(()) => match wait_answer(socket, &detached.job, timeout) {
            Ok(Answer::Ack(ack)) => {
                // The receiver captures: our copies go (dropping `detached` and `pidfd`).
                return Ok(HandOver::Accepted {
                    next_seq: ack.next_seq,
                });
            }
            Ok(Answer::Refusal(r)) => HandoffError::Refused {
                job: r.job,
                reason: r.error,
            },
            Err(e) => e,
        },
        Err(e) => e,
    };
    reclaim(detached, pidfd, reason)
}

/// After a hand-off without acknowledgement: whoever holds the log's writer lock owns the job.
fn reclaim(
    mut detached: Detached,
    pidfd: Option<OwnedFd>,
    reason: HandoffError,
) -> Result<HandOver, HandoffError> {
    match LogWriter::open(&detached.log_path) {
        Ok((log, _)) => {
            let end = log.end();
            detached.next_seq = end.next_seq;
            detached.log_len = end.len;
            detached.last_chunk = end.last_chunk;
            Ok(HandOver::Kept(Box::new(Kept {
                detached,
                pidfd,
                log,
                reason,
            })))
        }
        // Held by another writer, or already complete (the receiver captured the job to its
        // end and let go): either way the job is not ours any more.
        Err(StoreError::Locked { .. } | StoreError::Ended { .. }) => {
            Ok(HandOver::TakenOver { reason })
        }
        Err(source) => Err(HandoffError::Reopen {
            job: detached.job,
            source,
        }),
    }
}

// ---- the receiver ----

/// An offer received: the job, where its log continues, and its fds (close-on-exec).
#[derive(Debug)]
pub struct Incoming {
    /// The job.
    pub job: JobId,
    /// The log, as the sender named it.
    pub log_path: PathBuf,
    /// The sequence number the next chunk gets.
    pub next_seq: u64,
    /// Where the next chunk goes.
    pub log_len: u64,
    /// Where the last chunk starts (`None` if the log has none).
    pub last_chunk: Option<u64>,
    /// The stdout read end, if the stream had not ended.
    pub stdout: Option<OwnedFd>,
    /// The stderr read end, if the stream had not ended.
    pub stderr: Option<OwnedFd>,
    /// The job's pidfd, if the sender had one.
    pub pidfd: Option<OwnedFd>,
}

/// Receives one offer. `Ok(None)` when the peer closed the connection instead (nothing more to
/// hand over). Every fd received is close-on-exec (`MSG_CMSG_CLOEXEC`); on any error every fd
/// that arrived is closed.
pub fn receive(socket: BorrowedFd<'_>) -> Result<Option<Incoming>, HandoffError> {
    let Some(frame) = recv_frame(socket, None)? else {
        return Ok(None);
    };
    if frame.kind != Kind::Offer {
        return Err(HandoffError::Unexpected {
            want: Kind::Offer,
            got: frame.kind,
        });
    }
    let offer: Offer = serde_json::from_slice(&frame.body).map_err(HandoffError::Body)?;
    let job = JobId::parse(&offer.job).ok_or_else(|| HandoffError::Job {
        want: String::new(),
        got: offer.job.clone(),
    })?;
    let mut roles = offer.fds.clone();
    if roles.len() != frame.fds.len() {
        return Err(HandoffError::FdCount {
            declared: roles.len(),
            received: frame.fds.len(),
        });
    }
    let mut incoming = Incoming {
        job,
        log_path: offer.log_path,
        next_seq: offer.next_seq,
        log_len: offer.log_len,
        last_chunk: offer.last_chunk,
        stdout: None,
        stderr: None,
        pidfd: None,
    };
    for (role, fd) in roles.drain(..).zip(frame.fds) {
        let slot = match role {
            FdRole::Stdout => &mut incoming.stdout,
            FdRole::Stderr => &mut incoming.stderr,
            FdRole::Pidfd => &mut incoming.pidfd,
        };
        if slot.replace(fd).is_some() {
            return Err(HandoffError::Header(format!(
                "fd role {role:?} given twice"
            )));
        }
    }
    Ok(Some(incoming))
}

/// A job taken over by [`Incoming::attach`].
#[derive(Debug)]
pub struct Attached {
    /// Its capture in the receiver's engine.
    pub handle: CaptureHandle,
    /// Its pidfd, if the sender sent one.
    pub pidfd: Option<OwnedFd>,
    /// What reopening the log found (a torn tail cut, the chunks counted).
    pub recovery: Recovery,
}

impl Incoming {
    /// Takes the job over: reopens its log (which must be the job's log in `state`) with
    /// [`LogWriter::reopen_at`] (taking its writer lock, checking that its last chunk is the
    /// offered one and nothing follows, cutting a torn tail), adds the pipes to `capture` (numbering continues)
    /// and acknowledges on `socket`. On failure it sends a refusal, closes its fds and returns
    /// the error: the sender still has its copies and goes on capturing.
    pub fn attach(
        self,
        socket: BorrowedFd<'_>,
        capture: &Capture,
        state: &StateDir,
    ) -> Result<Attached, HandoffError> {
        let job = self.job.clone();
        let next_seq = self.next_seq;
        match self.take(capture, state) {
            Ok(attached) => {
                let ack = Ack {
                    job: job.as_str().to_owned(),
                    next_seq,
                };
                // An ack that cannot be sent is not a failure: the sender sees no answer, finds
                // the log locked by us, and lets the job go (`HandOver::TakenOver`).
                let _ = send_json(socket, Kind::Ack, job.as_str(), &ack, &[]);
                Ok(attached)
            }
            Err(e) => {
                // `take` dropped the log (and its lock) and the fds before this refusal, so a
                // sender reading it can retake the log at once.
                let refusal = Refusal {
                    job: job.as_str().to_owned(),
                    error: error_chain(&e),
                };
                let _ = send_json(socket, Kind::Refusal, job.as_str(), &refusal, &[]);
                Err(e)
            }
        }
    }

    fn take(self, capture: &Capture, state: &StateDir) -> Result<Attached, HandoffError> {
        let expected = state.log_path(&self.job);
        if self.log_path != expected {
            return Err(HandoffError::LogPath {
                job: self.job,
                path: self.log_path,
                expected,
            });
        }
        let end = LogEnd {
            len: self.log_len,
            next_seq: self.next_seq,
            last_chunk: self.last_chunk,
        };
        let (log, recovery) =
            LogWriter::reopen_at(&self.log_path, end).map_err(|source| HandoffError::Reopen {
                job: self.job.clone(),
                source,
            })?;
        let handle = capture
            .add(self.job.clone(), self.stdout, self.stderr, log)
            .map_err(|source| HandoffError::Attach {
                job: self.job,
                source,
            })?;
        Ok(Attached {
            handle,
            pidfd: self.pidfd,
            recovery,
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests;
