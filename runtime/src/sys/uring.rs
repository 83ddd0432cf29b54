//! A safe io_uring for the capture engine: one ring, one pool of provided buffers, and an
//! in-flight table that owns every resource an operation uses until its completion arrives.
//!
//! The model is tokio-uring's driver: submitting an operation moves its fd (an `Arc<OwnedFd>`)
//! and its buffers into the ring's in-flight table; the completion hands them back. Nothing the
//! kernel may still read or write is ever freed or reused by the caller: a read's buffer is
//! picked by the kernel from the provided-buffer ring and becomes the caller's only through a
//! [`Buf`] token taken from a completion; a write's memory lives in the in-flight table until
//! the write completes. Dropping the ring cancels and waits for every operation before the
//! buffer memory is released (or leaks it if the kernel does not let go).

use std::alloc::Layout;
use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, FsyncFlags, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};

/// The buffer group id of the ring's provided buffers.
const BGID: u16 = 0;

static NEXT_RING_ID: AtomicU64 = AtomicU64::new(1);

/// A provided buffer handed to the caller by a read completion: `len` bytes of data at the
/// start. The kernel does not touch it until it is given back with [`Ring::recycle`] (directly,
/// or after the write that carries it completes).
#[derive(Debug)]
pub(crate) struct Buf {
    ring_id: u64,
    bid: u16,
    len: u32,
}

impl Buf {
    /// Bytes of data in the buffer.
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }
}

/// One piece of a write: bytes owned here, or a slice of a provided buffer.
#[derive(Debug)]
pub(crate) enum Part {
    /// Small owned bytes (chunk headers).
    Bytes(Box<[u8]>),
    /// `buf[start..start + len]`.
    Buf {
        /// The buffer.
        buf: Buf,
        /// Offset of the slice in the buffer.
        start: u32,
        /// Length of the slice.
        len: u32,
    },
}

impl Part {
    fn len(&self) -> usize {
        match self {
            Part::Bytes(b) => b.len(),
            Part::Buf { len, .. } => *len as usize,
        }
    }
}

/// A vectored write: its parts, and how many leading bytes were already written by an earlier,
/// short attempt.
#[derive(Debug, Default)]
pub(crate) struct WriteBatch {
    /// The data, in file order.
    pub(crate) parts: Vec<Part>,
    /// Bytes of `parts` already written.
    pub(crate) done: usize,
    iovecs: Vec<libc::iovec>,
}

impl WriteBatch {
    /// A batch of `parts`, nothing written yet.
    pub(crate) fn new(parts: Vec<Part>) -> Self {
        WriteBatch {
            parts,
            done: 0,
            iovecs: Vec::new(),
        }
    }

    /// Total bytes of the batch.
    pub(crate) fn total(&self) -> usize {
        self.parts.iter().map(Part::len).sum()
    }

    /// Gives the batch's buffers and parts back (after its completion).
    pub(crate) fn into_parts(self) -> Vec<Part> {
        self.parts
    }
}

// SAFETY: the raw pointers in `iovecs` point into `parts` (owned by the batch) or into the
// ring's buffer memory, which outlives every batch; they are only dereferenced by the kernel.
unsafe impl Send for WriteBatch {}

/// What an in-flight operation owns, given back with its completion.
#[derive(Debug)]
pub(crate) enum Owned {
    /// A read into a provided buffer, or an fsync: only the fd (kept open until the completion).
    Fd(#[expect(dead_code, reason = "held, never read: keeps the fd open")] Arc<OwnedFd>),
    /// A read into owned bytes.
    Read(Arc<OwnedFd>, Box<[u8]>),
    /// A vectored write.
    Write(Arc<OwnedFd>, WriteBatch),
    /// A cancellation request.
    Cancel,
}

/// A completed operation.
#[derive(Debug)]
pub(crate) struct Completion {
    /// The caller's tag given at submission.
    pub(crate) tag: u64,
    /// The kernel's result: bytes transferred, or an error.
    pub(crate) result: io::Result<u32>,
    /// The provided buffer the kernel filled, for reads with buffer selection.
    pub(crate) buf: Option<Buf>,
    /// The resources the operation owned.
    pub(crate) owned: Owned,
}

/// The provided-buffer ring: `count` buffers of `size` bytes registered as group [`BGID`].
#[derive(Debug)]
struct BufRing {
    entries: NonNull<BufRingEntry>,
    entries_layout: Layout,
    mem: NonNull<u8>,
    mem_layout: Layout,
    count: u16,
    size: u32,
    /// Our copy of the ring tail (the kernel only reads it).
    tail: u16,
}

/// One io_uring with its provided buffers and in-flight table.
pub(crate) struct Ring {
    id: u64,
    uring: Option<IoUring>,
    bufs: BufRing,
    registered: bool,
    inflight: Vec<Option<(u64, Owned)>>,
    free: Vec<usize>,
    live: usize,
    held_bufs: usize,
}

impl Ring {
    /// A ring of `entries` submission slots and `buf_count` (a power of two, at most 32768)
    /// provided buffers of `buf_size` bytes each.
    pub(crate) fn new(entries: u32, buf_count: u16, buf_size: u32) -> io::Result<Ring> {
        if !buf_count.is_power_of_two() || buf_count > 32768 || buf_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer count must be a power of two up to 32768 and size non-zero",
            ));
        }
        let uring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        let page = rustix::param::page_size();
        let entries_layout = Layout::from_size_align(
            usize::from(buf_count) * std::mem::size_of::<BufRingEntry>(),
            page,
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mem_layout = Layout::from_size_align(usize::from(buf_count) * buf_size as usize, page)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: both layouts have a non-zero size (count >= 1, size >= 1).
        let entries_ptr = unsafe { std::alloc::alloc_zeroed(entries_layout) };
        let entries_ptr = NonNull::new(entries_ptr.cast::<BufRingEntry>())
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: as above. Left uninitialised on purpose: touching 100s of MiB up front would
        // cost memory the workload may never need; the kernel writes before anyone reads.
        let mem_ptr = unsafe { std::alloc::alloc(mem_layout) };
        let Some(mem) = NonNull::new(mem_ptr) else {
            // SAFETY: allocated just above with this layout.
            unsafe { std::alloc::dealloc(entries_ptr.as_ptr().cast(), entries_layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        };
        let mut ring = Ring {
            id: NEXT_RING_ID.fetch_add(1, Ordering::Relaxed),
            uring: Some(uring),
            bufs: BufRing {
                entries: entries_ptr,
                entries_layout,
                mem,
                mem_layout,
                count: buf_count,
                size: buf_size,
                tail: 0,
            },
            registered: false,
            inflight: Vec::new(),
            free: Vec::new(),
            live: 0,
            held_bufs: 0,
        };
        // SAFETY: the entries memory is page aligned, zeroed, `buf_count` entries long, and lives
        // until after the ring is unregistered in Drop.
        unsafe {
            ring.uring().submitter().register_buf_ring_with_flags(
                entries_ptr.as_ptr() as u64,
                buf_count,
                BGID,
                0,
            )?;
        }
        ring.registered = true;
        for bid in 0..buf_count {
            ring.push_buf(bid);
        }
        ring.publish_tail();
        Ok(ring)
    }

    fn uring(&mut self) -> &mut IoUring {
        self.uring.as_mut().expect("ring is open until drop")
    }

    /// Number of provided buffers.
    pub(crate) fn buf_count(&self) -> u16 {
        self.bufs.count
    }

    /// Buffers currently held by the caller (not available to the kernel).
    pub(crate) fn held_bufs(&self) -> usize {
        self.held_bufs
    }

    /// Operations submitted and not yet completed.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.live
    }

    /// The data of a buffer the caller holds.
    pub(crate) fn data(&self, buf: &Buf) -> &[u8] {
        assert_eq!(buf.ring_id, self.id, "buffer of another ring");
        // The caller holds the only token for this buffer, so the kernel does not write into it
        // until it is recycled, and the first `len` bytes were written by the kernel's read.
        // SAFETY: `bid < count`, so the slice lies within the buffer memory; see above.
        unsafe {
            std::slice::from_raw_parts(
                self.bufs
                    .mem
                    .as_ptr()
                    .add(usize::from(buf.bid) * self.bufs.size as usize),
                buf.len as usize,
            )
        }
    }

    /// Gives a buffer back to the kernel.
    pub(crate) fn recycle(&mut self, buf: Buf) {
        assert_eq!(buf.ring_id, self.id, "buffer of another ring");
        self.held_bufs -= 1;
        self.push_buf(buf.bid);
        self.publish_tail();
    }

    fn push_buf(&mut self, bid: u16) {
        let mask = self.bufs.count - 1;
        let idx = usize::from(self.bufs.tail & mask);
        // SAFETY: `idx < count`: within the entries allocation. The kernel only reads entries
        // between its head and our published tail, and this slot is past the published tail.
        let entry = unsafe { &mut *self.bufs.entries.as_ptr().add(idx) };
        entry.set_addr(
            // SAFETY: `bid < count`: within the buffer memory.
            unsafe {
                self.bufs
                    .mem
                    .as_ptr()
                    .add(usize::from(bid) * self.bufs.size as usize)
            } as u64,
        );
        entry.set_len(self.bufs.size);
        entry.set_bid(bid);
        self.bufs.tail = self.bufs.tail.wrapping_add(1);
    }

    fn publish_tail(&mut self) {
        // SAFETY: the tail field overlays entry 0's reserved field; the entries memory is valid,
        // aligned for u16, and only accessed atomically by the kernel for this field.
        let tail = unsafe {
            AtomicU16::from_ptr(BufRingEntry::tail(self.bufs.entries.as_ptr()).cast_mut())
        };
        tail.store(self.bufs.tail, Ordering::Release);
    }

    fn slot(&mut self, tag: u64, owned: Owned) -> u64 {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.inflight[i] = Some((tag, owned));
                i as u64
            }
            None => {
                self.inflight.push(Some((tag, owned)));
                (self.inflight.len() - 1) as u64
            }
        }
    }

    /// Pushes an entry, submitting first when the submission queue is full.
    ///
    /// # Safety
    ///
    /// Every pointer in `entry` must stay valid until its completion: the caller must have moved
    /// what it points to into the in-flight table under the entry's user data.
    unsafe fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.uring().submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            match self.uring().submit() {
                Ok(_) => {}
                // A signal or pending task work interrupted io_uring_enter (seen on Linux 6.1
                // with many jobs); nothing was lost, submit again.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads from `fd` into a buffer the kernel picks from the provided ring when data arrives
    /// (no buffer is held while the pipe is empty). Completes with `ENOBUFS` when none is free.
    pub(crate) fn read_provided(&mut self, fd: Arc<OwnedFd>, tag: u64) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        let size = self.bufs.size;
        let ud = self.slot(tag, Owned::Fd(fd));
        let entry = opcode::Read::new(Fd(raw), std::ptr::null_mut(), size)
            .buf_group(BGID)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(ud);
        // SAFETY: the entry holds no pointer; the fd is kept open by the in-flight table.
        unsafe { self.push(entry) }
    }

    /// Reads from `fd` into `buf` (owned until the completion).
    pub(crate) fn read_owned(
        &mut self,
        fd: Arc<OwnedFd>,
        mut buf: Box<[u8]>,
        tag: u64,
    ) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        let (ptr, len) = (
            buf.as_mut_ptr(),
            u32::try_from(buf.len()).unwrap_or(u32::MAX),
        );
        let ud = self.slot(tag, Owned::Read(fd, buf));
        let entry = opcode::Read::new(Fd(raw), ptr, len).build().user_data(ud);
        // SAFETY: `ptr..ptr+len` is the boxed buffer, moved (not reallocated) into the in-flight
        // table until the completion; the fd is kept open there too.
        unsafe { self.push(entry) }
    }

    /// Writes `batch` (from its `done` byte on) to `fd` at `offset`.
    pub(crate) fn writev(
        &mut self,
        fd: Arc<OwnedFd>,
        offset: u64,
        mut batch: WriteBatch,
        tag: u64,
    ) -> io::Result<()> {
        let mut skip = batch.done;
        let mut iovecs = std::mem::take(&mut batch.iovecs);
        iovecs.clear();
        for part in &batch.parts {
            let (ptr, len) = match part {
                Part::Bytes(b) => (b.as_ptr(), b.len()),
                Part::Buf { buf, start, len } => {
                    assert_eq!(buf.ring_id, self.id, "buffer of another ring");
                    assert!(start + len <= self.bufs.size);
                    // SAFETY: `bid < count` and `start + len <= size`: within the buffer memory.
                    let p = unsafe {
                        self.bufs
                            .mem
                            .as_ptr()
                            .add(usize::from(buf.bid) * self.bufs.size as usize + *start as usize)
                    };
                    (p.cast_const(), *len as usize)
                }
            };
            if skip >= len {
                skip -= len;
                continue;
            }
            iovecs.push(libc::iovec {
                // SAFETY: `skip < len`: within the part.
                iov_base: unsafe { ptr.add(skip) }.cast_mut().cast(),
                iov_len: len - skip,
            });
            skip = 0;
        }
        let raw = fd.as_raw_fd();
        let (iov_ptr, iov_len) = (iovecs.as_ptr(), iovecs.len() as u32);
        batch.iovecs = iovecs;
        let ud = self.slot(tag, Owned::Write(fd, batch));
        let entry = opcode::Writev::new(Fd(raw), iov_ptr, iov_len)
            .offset(offset)
            .build()
            .user_data(ud);
        // The iovec array and every byte it points to (boxed header bytes, or held provided
        // buffers) are owned by the batch; moving the batch does not move that heap memory.
        // SAFETY: the batch sits in the in-flight table until the completion arrives.
        unsafe { self.push(entry) }
    }

    /// Writes `batch` (from its `done` byte on) to `fd` at `offset` right now, with a blocking
    /// `pwritev` on this thread, and hands back a completion as if the ring had done it. Used
    /// where the ring would punt the write to a worker thread anyway (buffered writes on ext4
    /// do not support `IOCB_NOWAIT`): writing from the thread whose cache holds the data is
    /// cheaper than waking a worker on the other core.
    pub(crate) fn writev_now(
        &mut self,
        fd: Arc<OwnedFd>,
        offset: u64,
        batch: WriteBatch,
        tag: u64,
    ) -> Completion {
        let mut skip = batch.done;
        let mut slices = Vec::with_capacity(batch.parts.len());
        for part in &batch.parts {
            let bytes: &[u8] = match part {
                Part::Bytes(b) => b,
                Part::Buf { buf, start, len } => {
                    &self.data(buf)[*start as usize..(*start + *len) as usize]
                }
            };
            if skip >= bytes.len() {
                skip -= bytes.len();
                continue;
            }
            slices.push(io::IoSlice::new(&bytes[skip..]));
            skip = 0;
        }
        let result = loop {
            match rustix::io::pwritev(&*fd, &slices, offset) {
                Err(rustix::io::Errno::INTR) => continue,
                Ok(n) => break Ok(n as u32),
                Err(e) => break Err(io::Error::from(e)),
            }
        };
        drop(slices);
        Completion {
            tag,
            result,
            buf: None,
            owned: Owned::Write(fd, batch),
        }
    }

    /// `fdatasync(fd)`.
    pub(crate) fn fdatasync(&mut self, fd: Arc<OwnedFd>, tag: u64) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        let ud = self.slot(tag, Owned::Fd(fd));
        let entry = opcode::Fsync::new(Fd(raw))
            .flags(FsyncFlags::DATASYNC)
            .build()
            .user_data(ud);
        // SAFETY: no pointer; the fd is kept open by the in-flight table.
        unsafe { self.push(entry) }
    }

    /// Cancels every operation on `fd`. Each still completes (with `ECANCELED` or its result if
    /// it raced), handing back what it owns.
    pub(crate) fn cancel_fd(&mut self, fd: &Arc<OwnedFd>, tag: u64) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        let ud = self.slot(tag, Owned::Cancel);
        let entry = opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(raw)).all())
            .build()
            .user_data(ud);
        // SAFETY: no pointer. The operations being cancelled keep their fd alive themselves.
        unsafe { self.push(entry) }
    }

    /// Submits what was pushed and waits for at least `want` completions, or `timeout`.
    pub(crate) fn submit_and_wait(
        &mut self,
        want: usize,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let res = match timeout {
            None => self.uring().submitter().submit_and_wait(want),
            Some(t) => {
                let ts = Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                let args = SubmitArgs::new().timespec(&ts);
                self.uring().submitter().submit_with_args(want, &args)
            }
        };
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Moves every available completion into `out`.
    pub(crate) fn completions(&mut self, out: &mut Vec<Completion>) {
        let id = self.id;
        let mut cqes = Vec::new();
        cqes.extend(
            self.uring()
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for (ud, res, flags) in cqes {
            let (tag, owned) = self.inflight[ud as usize]
                .take()
                .expect("completion of a live operation");
            self.free.push(ud as usize);
            self.live -= 1;
            let buf = cqueue::buffer_select(flags).map(|bid| {
                self.held_bufs += 1;
                Buf {
                    ring_id: id,
                    bid,
                    len: u32::try_from(res.max(0)).unwrap_or(0),
                }
            });
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as u32)
            };
            out.push(Completion {
                tag,
                result,
                buf,
                owned,
            });
        }
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("id", &self.id)
            .field("bufs", &self.bufs)
            .field("live", &self.live)
            .field("held_bufs", &self.held_bufs)
            .finish_non_exhaustive()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Cancel everything and wait for every completion: only then may the buffers go.
        let mut drained = self.live == 0;
        if !drained {
            let ud = self.slot(u64::MAX, Owned::Cancel);
            let entry = opcode::AsyncCancel2::new(CancelBuilder::any().all())
                .build()
                .user_data(ud);
            // SAFETY: no pointer.
            let pushed = unsafe { self.push(entry) }.is_ok();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let mut sink = Vec::new();
            while pushed && self.live > 0 && std::time::Instant::now() < deadline {
                if self
                    .submit_and_wait(1, Some(Duration::from_millis(100)))
                    .is_err()
                {
                    break;
                }
                sink.clear();
                self.completions(&mut sink);
            }
            drained = self.live == 0;
        }
        if self.registered {
            let _ = self.uring().submitter().unregister_buf_ring(BGID);
        }
        drop(self.uring.take());
        if drained {
            // SAFETY: allocated in `new` with these layouts; no operation is in flight and the
            // buffer ring is unregistered, so the kernel no longer refers to either.
            unsafe {
                std::alloc::dealloc(self.bufs.entries.as_ptr().cast(), self.bufs.entries_layout);
                std::alloc::dealloc(self.bufs.mem.as_ptr(), self.bufs.mem_layout);
            }
        }
        // Otherwise the memory is leaked on purpose: the kernel might still write into it.
    }
}

// SAFETY: the ring owns its memory exclusively; the raw pointers are only handed to the kernel.
// It is created on one thread and used there (single issuer), but may be moved before first use.
unsafe impl Send for Ring {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_pipe_into_a_provided_buffer_and_writes_it_back_out() {
        let Ok(mut ring) = Ring::new(8, 2, 4096) else {
            assert!(
                !crate::testsupport::privileged("io_uring", || Err("ring setup failed".into())),
                "io_uring unavailable"
            );
            return;
        };
        let (r, w) = rustix::pipe::pipe().unwrap();
        rustix::io::write(&w, b"hello ring").unwrap();
        ring.read_provided(Arc::new(r), 7).unwrap();
        ring.submit_and_wait(1, None).unwrap();
        let mut out = Vec::new();
        ring.completions(&mut out);
        assert_eq!(out.len(), 1);
        let c = out.pop().unwrap();
        assert_eq!((c.tag, c.result.as_ref().copied().unwrap()), (7, 10));
        let buf = c.buf.unwrap();
        assert_eq!(ring.data(&buf), b"hello ring");
        assert_eq!(ring.held_bufs(), 1);

        let (r2, w2) = rustix::pipe::pipe().unwrap();
        let batch = WriteBatch {
            parts: vec![
                Part::Bytes(Box::new(*b"<")),
                Part::Buf {
                    buf,
                    start: 6,
                    len: 4,
                },
            ],
            done: 0,
            iovecs: Vec::new(),
        };
        ring.writev(Arc::new(w2), 0, batch, 8).unwrap();
        ring.submit_and_wait(1, None).unwrap();
        ring.completions(&mut out);
        let c = out.pop().unwrap();
        assert_eq!(c.result.unwrap(), 5);
        let Owned::Write(_, batch) = c.owned else {
            panic!("not a write")
        };
        for p in batch.into_parts() {
            if let Part::Buf { buf, .. } = p {
                ring.recycle(buf);
            }
        }
        assert_eq!(ring.held_bufs(), 0);
        let mut got = [0u8; 5];
        rustix::io::read(&r2, &mut got).unwrap();
        assert_eq!(&got, b"<ring");
    }

    #[test]
    fn dropping_the_ring_with_reads_pending_waits_for_them() {
        let Ok(mut ring) = Ring::new(8, 2, 4096) else {
            return;
        };
        let (r, _w) = rustix::pipe::pipe().unwrap();
        ring.read_provided(Arc::new(r), 1).unwrap();
        ring.submit_and_wait(0, None).unwrap();
        assert_eq!(ring.in_flight(), 1);
        drop(ring);
    }
}
