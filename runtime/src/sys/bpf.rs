//! The memory layout shared with joblet's eBPF probes: `#[repr(C)]` mirrors of the structs in
//! `ebpf/joblet.h`, and the `aya::Pod` impls that let aya copy them in and out of BPF maps.
//!
//! It also holds what aya does not offer: the `BPF_MAP_LOOKUP_AND_DELETE_ELEM` syscall for hash
//! maps ([`lookup_and_delete`]), and the memory mapping of the `job_slots` array ([`JobSlots`]).
//!
//! The `Pod` impls are the other unsafe part of the telemetry: `Pod` promises that every bit pattern
//! is a valid value and that the type has no padding the kernel could leave uninitialised. Both
//! hold for structs of plain integers with explicit padding fields, which the size assertions
//! below pin to the C layout (a mismatch fails the build, not the verifier).

/// Buckets of a probe histogram (`JOBLET_HIST_BUCKETS`).
pub(crate) const HIST_BUCKETS: usize = 168;
/// The `bucket_of` index of a probe histogram's first bucket (`JOBLET_HIST_FIRST`).
pub(crate) const HIST_FIRST: usize = 16;

/// `struct joblet_hist`: a log-linear histogram of nanoseconds, filled in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hist {
    pub(crate) total: u64,
    pub(crate) count: u64,
    pub(crate) max: u64,
    pub(crate) buckets: [u64; HIST_BUCKETS],
}

/// `JOBLET_JOB_SLOTS`: slots of `job_slots`, and the most cgroups `jobs` binds.
pub(crate) const JOB_SLOTS: u32 = 1024;

/// `struct joblet_job`: a slot of the `job_slots` array, bound to the job's cgroup v2 id by `jobs`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Job {
    /// `gen` in C: tells this job from earlier ones in the same cgroup; 0 for an idle slot.
    pub(crate) generation: u64,
    pub(crate) on_cpu_ns: u64,
    pub(crate) voluntary_switches: u64,
    pub(crate) involuntary_switches: u64,
    pub(crate) forks: u64,
    pub(crate) threads: u64,
    pub(crate) execs: u64,
    pub(crate) exits: u64,
    pub(crate) events_lost: u64,
    pub(crate) first_exec_ns: u64,
    pub(crate) leader_exit_ns: u64,
    pub(crate) leader_tgid: u32,
    /// `LEADER_*`: which of the two deltas below are valid.
    pub(crate) leader_flags: u32,
    /// The command's fork-to-exec (its first exec), when it was forked in the job.
    pub(crate) leader_exec_delta_ns: u64,
    /// The command's exec-to-exit, from its last exec.
    pub(crate) leader_exit_delta_ns: u64,
    /// The process the fork probe started the job with (probe-internal).
    pub(crate) origin_tgid: u32,
    /// `JOB_*` flags, set by the probes.
    pub(crate) flags: u32,
    /// Its last exec (probe-internal).
    pub(crate) origin_exec_ns: u64,
    /// Ring buffer records the probes submitted for the job.
    pub(crate) records: u64,
    pub(crate) runq: Hist,
    pub(crate) off_cpu: Hist,
}

/// `struct joblet_bio_job`: the value of the `bio_jobs` map, keyed by the job's cgroup v2 id,
/// made by the probes at the job's first bio (then `Job::flags` has [`JOB_BLOCK_IO`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BioJob {
    /// `gen` in C: the job generation (`Job::generation`) the entry was made for.
    pub(crate) generation: u64,
    /// Bytes of the completed bios, as submitted.
    pub(crate) bytes: u64,
    /// Submission to completion of each bio.
    pub(crate) latency: Hist,
}

impl Hist {
    #[cfg(test)]
    const ZERO: Hist = Hist {
        total: 0,
        count: 0,
        max: 0,
        buckets: [0; HIST_BUCKETS],
    };
}

impl BioJob {
    /// An entry with nothing recorded (for tests of the report).
    #[cfg(test)]
    pub(crate) const ZERO: BioJob = BioJob {
        generation: 0,
        bytes: 0,
        latency: Hist::ZERO,
    };
}

impl Job {
    /// The all-zero entry (for tests of the report).
    #[cfg(test)]
    pub(crate) const ZERO: Job = Job {
        generation: 0,
        on_cpu_ns: 0,
        voluntary_switches: 0,
        involuntary_switches: 0,
        forks: 0,
        threads: 0,
        execs: 0,
        exits: 0,
        events_lost: 0,
        first_exec_ns: 0,
        leader_exit_ns: 0,
        leader_tgid: 0,
        leader_flags: 0,
        leader_exec_delta_ns: 0,
        leader_exit_delta_ns: 0,
        origin_tgid: 0,
        flags: 0,
        origin_exec_ns: 0,
        records: 0,
        runq: Hist::ZERO,
        off_cpu: Hist::ZERO,
    };
}

/// `JOBLET_EVENT_EXEC`.
pub(crate) const EVENT_EXEC: u32 = 1;
/// `JOBLET_EVENT_EXIT`.
pub(crate) const EVENT_EXIT: u32 = 2;
/// `JOBLET_EVENT_HAVE_DELTA`: `delta_ns` is valid.
pub(crate) const EVENT_FLAG_HAVE_DELTA: u32 = 2;
/// `JOBLET_JOB_BLOCK_IO`: the job has a `bio_jobs` entry.
pub(crate) const JOB_BLOCK_IO: u32 = 1;
/// `JOBLET_LEADER_EXEC_DELTA`: `Job::leader_exec_delta_ns` is valid.
pub(crate) const LEADER_EXEC_DELTA: u32 = 1;
/// `JOBLET_LEADER_EXIT_DELTA`: `Job::leader_exit_delta_ns` is valid.
pub(crate) const LEADER_EXIT_DELTA: u32 = 2;

/// `JOBLET_COUNTER_RINGBUF_DROPS`: index in the `counters` array.
pub(crate) const COUNTER_RINGBUF_DROPS: u32 = 0;
/// `JOBLET_COUNTER_TASK_MAP_FULL`.
pub(crate) const COUNTER_TASK_MAP_FULL: u32 = 1;
/// `JOBLET_COUNTER_JOB_MAP_FULL`.
pub(crate) const COUNTER_JOB_MAP_FULL: u32 = 2;
/// `JOBLET_COUNTER_BIO_MAP_FULL`.
pub(crate) const COUNTER_BIO_MAP_FULL: u32 = 3;

/// `struct joblet_event`: one ring buffer record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) cgroup_id: u64,
    pub(crate) ts_ns: u64,
    pub(crate) delta_ns: u64,
    pub(crate) kind: u32,
    pub(crate) tgid: u32,
    pub(crate) flags: u32,
    pub(crate) comm: [u8; 16],
}

/// Size of `struct joblet_event`.
pub(crate) const EVENT_SIZE: usize = 56;

impl Event {
    /// Decodes a ring buffer record (native endian, as the kernel wrote it); `None` when it is too
    /// short, which only a layout mismatch between probe and loader could cause.
    pub(crate) fn parse(raw: &[u8]) -> Option<Event> {
        if raw.len() < EVENT_SIZE {
            return None;
        }
        let u64_at = |o: usize| u64::from_ne_bytes(raw[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_ne_bytes(raw[o..o + 4].try_into().expect("4 bytes"));
        Some(Event {
            cgroup_id: u64_at(0),
            ts_ns: u64_at(8),
            delta_ns: u64_at(16),
            kind: u32_at(24),
            tgid: u32_at(28),
            flags: u32_at(32),
            comm: raw[40..56].try_into().expect("16 bytes"),
        })
    }
}

const _: () = assert!(size_of::<Hist>() == 24 + 8 * HIST_BUCKETS);
const _: () = assert!(size_of::<Job>() == 8 * 15 + 8 * 2 + 2 * size_of::<Hist>());
const _: () = assert!(size_of::<BioJob>() == 8 * 2 + size_of::<Hist>());

// SAFETY: `Hist` is `#[repr(C)]`, made only of `u64`s (no padding, every bit pattern valid).
unsafe impl aya::Pod for Hist {}
// SAFETY: `Job` is `#[repr(C)]` of `u64`s, two `u32`s that together fill 8 bytes, and `Hist`s; its
// size (asserted above) equals the sum of its fields, so it has no padding, and every bit pattern
// is a valid value.
unsafe impl aya::Pod for Job {}
// SAFETY: `BioJob` is `#[repr(C)]` of `u64`s and a `Hist` (asserted size: no padding); every bit
// pattern is a valid value.
unsafe impl aya::Pod for BioJob {}

/// Words (`u64`) of a [`Job`]: the kernel's element size of `job_slots` (the value size rounded
/// up to 8, which it already is) in words.
const JOB_WORDS: usize = size_of::<Job>() / 8;
const _: () = assert!(size_of::<Job>().is_multiple_of(8) && align_of::<Job>() == 8);
// `set_generation` writes word 0.
const _: () = assert!(std::mem::offset_of!(Job, generation) == 0);

/// The `job_slots` array (`BPF_F_MMAPABLE`) mapped into this process: the probes and this process
/// read and write the same memory, so a job's slot is reset and read without a syscall. Every
/// access is an atomic load or store of one aligned `u64`, since the probes update slots from
/// other CPUs at any time (with atomic adds, or plain stores of whole words).
pub(crate) struct JobSlots {
    base: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is shared memory reached only through atomic operations (see `word`), which
// any thread may perform; it is unmapped once, by `Drop`.
unsafe impl Send for JobSlots {}
// SAFETY: as for `Send`: `&JobSlots` only allows atomic loads and stores.
unsafe impl Sync for JobSlots {}

impl JobSlots {
    /// Maps the array map `fd`, which must be `job_slots` as the object defines it (an mmapable
    /// `BPF_MAP_TYPE_ARRAY` of [`JOB_SLOTS`] [`Job`]s: the caller checks the map's definition).
    /// The mapping keeps the map alive after `fd` is closed.
    pub(crate) fn map(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<JobSlots> {
        let page = rustix::param::page_size();
        let len = (JOB_SLOTS as usize * size_of::<Job>()).div_ceil(page) * page;
        // SAFETY: a new shared mapping at an address the kernel picks, so it overlaps no Rust
        // object; the kernel checks `len` against the map's size and that it is mmapable.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        let base = std::ptr::NonNull::new(ptr.cast())
            .ok_or_else(|| std::io::Error::other("mmap of job_slots returned null"))?;
        Ok(JobSlots { base, len })
    }

    /// Word `i` of slot `slot`.
    fn word(&self, slot: u32, i: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(
            slot < JOB_SLOTS && i < JOB_WORDS,
            "job slot {slot} word {i} out of range"
        );
        // SAFETY: the mapping holds JOB_SLOTS slots of JOB_WORDS words (its length covers them,
        // see `map`), so the offset is in bounds; it is page-aligned, so every word is 8-byte
        // aligned; and it lives as long as `self`. Kernel and probes access the words
        // atomically or as whole aligned words, so sharing them as `AtomicU64` is sound.
        unsafe { self.base.add(slot as usize * JOB_WORDS + i).as_ref() }
    }

    /// A copy of slot `slot`. Counters the probes are updating at the same time may be torn
    /// between words (a histogram's count against its buckets), never within one.
    pub(crate) fn read(&self, slot: u32) -> Job {
        let mut words = [0u64; JOB_WORDS];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self
                .word(slot, i)
                .load(std::sync::atomic::Ordering::Acquire);
        }
        // SAFETY: `words` is JOB_WORDS initialised u64s, exactly `size_of::<Job>()` bytes, and
        // `Job: Pod` (every bit pattern valid, no padding); read_unaligned needs no alignment.
        unsafe { std::ptr::read_unaligned(words.as_ptr().cast::<Job>()) }
    }

    /// Zeroes slot `slot` and sets its generation last (a non-zero one makes the probes count
    /// into it; 0 makes it idle).
    pub(crate) fn reset(&self, slot: u32, generation: u64) {
        for i in 1..JOB_WORDS {
            self.word(slot, i)
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
        self.set_generation(slot, generation);
    }

    /// Sets slot `slot`'s generation (word 0) without touching its figures.
    pub(crate) fn set_generation(&self, slot: u32, generation: u64) {
        self.word(slot, 0)
            .store(generation, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for JobSlots {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` are the mapping made in `map`, unmapped only here; no
        // reference into it outlives `self` (`word` borrows `self`).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (enum bpf_cmd).
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The map element part of `union bpf_attr`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads and deletes `key`'s entry of the hash map `map` in one syscall (hash maps support it
/// since 5.14; older kernels fail with `EINVAL` or `ENOTSUPP`, and the caller falls back to a
/// lookup and a delete). `ENOENT` means no such key.
pub(crate) fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    key: &K,
) -> std::io::Result<V> {
    use std::os::fd::AsRawFd;
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // `attr` is a valid, fully initialised bpf_attr prefix of the size passed; the kernel reads
    // `size_of::<K>()` bytes at `key` (a live `&K`) and writes the map's value size, which is
    // `size_of::<V>()` for the maps this is called on (checked by aya when it opened them as
    // HashMap<_, K, V>), into `value`, which is that large. `map` is an open fd for the call.
    // SAFETY: as just said.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            std::ptr::from_ref(&attr),
            size_of::<MapElemAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall succeeded, so the kernel filled `value` with the entry; `V: Pod`, so
    // every bit pattern is a valid `V`.
    Ok(unsafe { value.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode_the_c_layout() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&7u64.to_ne_bytes()); // cgroup_id
        raw.extend_from_slice(&100u64.to_ne_bytes()); // ts_ns
        raw.extend_from_slice(&42u64.to_ne_bytes()); // delta_ns
        raw.extend_from_slice(&EVENT_EXIT.to_ne_bytes());
        raw.extend_from_slice(&1234u32.to_ne_bytes()); // tgid
        raw.extend_from_slice(&EVENT_FLAG_HAVE_DELTA.to_ne_bytes());
        raw.extend_from_slice(&0u32.to_ne_bytes()); // _pad
        raw.extend_from_slice(b"sleep\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(raw.len(), EVENT_SIZE);
        let e = Event::parse(&raw).expect("decodes");
        assert_eq!(
            e,
            Event {
                cgroup_id: 7,
                ts_ns: 100,
                delta_ns: 42,
                kind: EVENT_EXIT,
                tgid: 1234,
                flags: EVENT_FLAG_HAVE_DELTA,
                comm: *b"sleep\0\0\0\0\0\0\0\0\0\0\0",
            }
        );
        assert_eq!(Event::parse(&raw[..EVENT_SIZE - 1]), None);
    }

    #[test]
    fn the_zero_job_is_all_zero_bytes() {
        assert_eq!(Job::ZERO.runq.buckets, [0; HIST_BUCKETS]);
        assert_eq!(Job::ZERO.first_exec_ns, 0);
        assert_eq!(Job::ZERO.flags, 0);
    }
}
