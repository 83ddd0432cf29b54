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
    /// Bit g: buckets `[8g, 8g + 8)` may be non-zero (may miss a bit: see `JobSlots::read`).
    pub(crate) groups: u64,
    pub(crate) buckets: [u64; HIST_BUCKETS],
}

/// `JOBLET_HIST_GROUP`: buckets per bit of `Hist::groups`.
const HIST_GROUP: usize = 8;

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
    /// The job's first task's address (probe-internal).
    pub(crate) first_task: u64,
    /// The job's first task's scheduling state (probe-internal).
    pub(crate) first: Task,
    pub(crate) runq: Hist,
    pub(crate) off_cpu: Hist,
}

/// `struct joblet_task`: a task's scheduling state (probe-internal; here for the layout).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Task {
    pub(crate) cgid: u64,
    pub(crate) generation: u64,
    pub(crate) ts: u64,
    pub(crate) state: u32,
    pub(crate) mapped: u32,
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
    /// Bios of the job the probes saw submitted, completed or not.
    pub(crate) queued: u64,
    /// Submission to completion of each bio.
    pub(crate) latency: Hist,
}

impl Hist {
    #[cfg(test)]
    const ZERO: Hist = Hist {
        total: 0,
        count: 0,
        max: 0,
        groups: 0,
        buckets: [0; HIST_BUCKETS],
    };
}

impl BioJob {
    /// An entry with nothing recorded (for tests of the report).
    #[cfg(test)]
    pub(crate) const ZERO: BioJob = BioJob {
        generation: 0,
        bytes: 0,
        queued: 0,
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
        first_task: 0,
        first: Task {
            cgid: 0,
            generation: 0,
            ts: 0,
            state: 0,
            mapped: 0,
        },
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
/// `JOBLET_COUNTER_FIRST_TASK_LEFT`.
pub(crate) const COUNTER_FIRST_TASK_LEFT: u32 = 4;
/// `JOBLET_COUNTER_MISSED_SWITCH_IN`.
pub(crate) const COUNTER_MISSED_SWITCH_IN: u32 = 5;

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

const _: () = assert!(size_of::<Hist>() == 32 + 8 * HIST_BUCKETS);
const _: () = assert!(size_of::<Task>() == 8 * 4);
const _: () =
    assert!(size_of::<Job>() == 8 * 15 + 8 * 2 + 8 + size_of::<Task>() + 2 * size_of::<Hist>());
const _: () = assert!(size_of::<BioJob>() == 8 * 3 + size_of::<Hist>());

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

/// Word offsets of a job slot's parts: the counters before the histograms, and each histogram's
/// header fields and buckets.
mod words {
    use super::{HIST_BUCKETS, Hist, Job};
    use std::mem::offset_of;

    /// The words before the first histogram (generation, counters, command figures).
    pub(super) const COUNTERS: usize = offset_of!(Job, runq) / 8;
    /// Where each of the slot's histograms starts.
    pub(super) const HISTS: [usize; 2] = [offset_of!(Job, runq) / 8, offset_of!(Job, off_cpu) / 8];
    /// Within a histogram: its header (total, count, max, groups), then its buckets.
    pub(super) const COUNT: usize = offset_of!(Hist, count) / 8;
    pub(super) const GROUPS: usize = offset_of!(Hist, groups) / 8;
    pub(super) const BUCKETS: usize = offset_of!(Hist, buckets) / 8;
    pub(super) const HIST: usize = BUCKETS + HIST_BUCKETS;

    const _: () = assert!(HISTS[0] == COUNTERS && HISTS[1] == HISTS[0] + HIST);
    const _: () = assert!(HISTS[1] + HIST == super::JOB_WORDS);
}

/// The `job_slots` array (`BPF_F_MMAPABLE`) mapped into this process: the probes and this process
/// read and write the same memory, so a job's slot is reset and read without a syscall. Every
/// access is an atomic load or store of one aligned `u64`, since the probes update slots from
/// other CPUs at any time (with atomic adds, or plain stores of whole words).
///
/// Reads touch only the histogram buckets a job used (flagged in `Hist::groups`): a few cache
/// lines of the slot's 45.
pub(crate) struct JobSlots(Mapping);

/// A shared, read-write memory mapping of a `BPF_F_MMAPABLE` array map, accessed only through
/// atomics of its element type (`u64` or `u32`), since the probes update it from other CPUs.
struct Mapping {
    base: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is shared memory reached only through atomic operations (see `JobSlots::word`
// and `CgroupFilter::count`), which any thread may perform; it is unmapped once, by `Drop`.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: `&Mapping` only allows atomic loads and stores.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `bytes` (rounded up to pages) of the mmapable array map `fd`. The mapping
    /// keeps the map alive after `fd` is closed.
    fn new(fd: std::os::fd::BorrowedFd<'_>, bytes: usize, name: &str) -> std::io::Result<Mapping> {
        let page = rustix::param::page_size();
        let len = bytes.div_ceil(page) * page;
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
            .ok_or_else(|| std::io::Error::other(format!("mmap of {name} returned null")))?;
        Ok(Mapping { base, len })
    }

    /// The `i`th `u32` of the mapping.
    fn u32_at(&self, i: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(
            i < self.len / 4,
            "u32 {i} beyond a mapping of {} bytes",
            self.len
        );
        // The base is page-aligned, so every u32 is 4-byte aligned; the mapping lives as long
        // as `self`.
        // SAFETY: `i` is in bounds and aligned (above); the probes access the words atomically
        // or as whole aligned words, so sharing them as `AtomicU32` is sound.
        unsafe {
            self.base
                .cast::<std::sync::atomic::AtomicU32>()
                .add(i)
                .as_ref()
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` are the mapping made in `new`, unmapped only here; no
        // reference into it outlives `self` (the accessors borrow their owner).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl JobSlots {
    /// Maps the array map `fd`, which must be `job_slots` as the object defines it (an mmapable
    /// `BPF_MAP_TYPE_ARRAY` of [`JOB_SLOTS`] [`Job`]s: the caller checks the map's definition).
    pub(crate) fn map(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<JobSlots> {
        Mapping::new(fd, JOB_SLOTS as usize * size_of::<Job>(), "job_slots").map(JobSlots)
    }

    /// Word `i` of slot `slot`.
    fn word(&self, slot: u32, i: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(
            slot < JOB_SLOTS && i < JOB_WORDS,
            "job slot {slot} word {i} out of range"
        );
        // The mapping holds JOB_SLOTS slots of JOB_WORDS words (its length covers them, see
        // `map`) and is page-aligned, so every word is 8-byte aligned; it lives as long as `self`.
        // SAFETY: the offset is in bounds and aligned (above); kernel and probes access the
        // words atomically or as whole aligned words, so sharing them as `AtomicU64` is sound.
        unsafe {
            self.0
                .base
                .cast::<std::sync::atomic::AtomicU64>()
                .add(slot as usize * JOB_WORDS + i)
                .as_ref()
        }
    }

    fn load(&self, slot: u32, i: usize) -> u64 {
        self.word(slot, i)
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The slot's figures so far (the probes may be adding to them: counters can be torn
    /// between words, a histogram's count against its buckets, never within one).
    pub(crate) fn read(&self, slot: u32) -> Job {
        let mut words = [0u64; JOB_WORDS];
        self.read_into(slot, &mut words);
        job_of(&words)
    }

    /// Reads the slot's job and leaves the slot all zero (idle, generation 0, ready for the
    /// next job), touching only the words the job used. Only for a job whose tasks are gone:
    /// a probe writing meanwhile could leave a word behind.
    pub(crate) fn take(&self, slot: u32) -> Job {
        use std::sync::atomic::Ordering;
        // Idle first: from here on the probes ignore the slot.
        let generation = self.word(slot, 0).swap(0, Ordering::AcqRel);
        let mut words = [0u64; JOB_WORDS];
        let flagged = self.read_into(slot, &mut words);
        let clear = |range: std::ops::Range<usize>| {
            for i in range {
                if words[i] != 0 {
                    self.word(slot, i).store(0, Ordering::Relaxed);
                }
            }
        };
        if flagged {
            clear(1..words::COUNTERS);
            for h in words::HISTS {
                clear(h..h + words::BUCKETS);
                for g in groups(words[h + words::GROUPS]) {
                    clear(bucket_range(h, g));
                }
            }
        } else {
            clear(1..JOB_WORDS);
        }
        words[0] = generation;
        job_of(&words)
    }

    /// Reads the slot into `words`: the counters, each histogram's header and the buckets its
    /// `groups` flags. A histogram whose flagged buckets do not add up to its count (a flag
    /// lost to a race, or the probes updating it right now) is read whole, and then `false`
    /// is returned: buckets outside the flagged groups may be non-zero.
    fn read_into(&self, slot: u32, words: &mut [u64; JOB_WORDS]) -> bool {
        let mut flagged = true;
        for (i, w) in words.iter_mut().enumerate().take(words::COUNTERS) {
            *w = self.load(slot, i);
        }
        for h in words::HISTS {
            for i in h..h + words::BUCKETS {
                words[i] = self.load(slot, i);
            }
            let mut sum = 0u64;
            for g in groups(words[h + words::GROUPS]) {
                for i in bucket_range(h, g) {
                    words[i] = self.load(slot, i);
                    sum = sum.wrapping_add(words[i]);
                }
            }
            if sum != words[h + words::COUNT] {
                flagged = false;
                for i in h + words::BUCKETS..h + words::HIST {
                    words[i] = self.load(slot, i);
                }
            }
        }
        flagged
    }

    /// Zeroes slot `slot` whole and sets its generation last (a non-zero one makes the probes
    /// count into it; 0 makes it idle).
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

/// The groups flagged in a histogram's `groups` word (bits beyond the last group ignored).
fn groups(flags: u64) -> impl Iterator<Item = usize> {
    (0..HIST_BUCKETS.div_ceil(HIST_GROUP)).filter(move |g| flags & (1 << g) != 0)
}

/// The words of group `g`'s buckets, in the histogram starting at word `h`.
fn bucket_range(h: usize, g: usize) -> std::ops::Range<usize> {
    let first = h + words::BUCKETS + g * HIST_GROUP;
    first..(first + HIST_GROUP).min(h + words::HIST)
}

/// The job whose words these are.
fn job_of(words: &[u64; JOB_WORDS]) -> Job {
    // SAFETY: `words` is JOB_WORDS initialised u64s, exactly `size_of::<Job>()` bytes, and
    // `Job: Pod` (every bit pattern valid, no padding); read_unaligned needs no alignment.
    unsafe { std::ptr::read_unaligned(words.as_ptr().cast::<Job>()) }
}

/// `JOBLET_FILTER_BITS`: a filter has `1 << FILTER_BITS` counts.
const FILTER_BITS: u32 = 12;
const FILTER_SLOTS: usize = 1 << FILTER_BITS;

/// Bytes of `struct joblet_filter`.
pub(crate) const FILTER_BYTES: usize = FILTER_SLOTS * 4;

/// `JOBLET_FIRST_SHIFT`: the low bits of a `task_filter` word count `tasks` keys, the high bits
/// name a job slot whose first task has that filter slot.
const FIRST_SHIFT: u32 = 20;

/// `joblet_filter_slot` in `ebpf/joblet.h`: Fibonacci hashing of a key to a filter slot.
fn filter_slot(key: u64) -> usize {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - FILTER_BITS)) as usize
}

/// The `task_filter` array map (`BPF_F_MMAPABLE`, one `struct joblet_filter`) mapped into this
/// process. The probes keep it (see `ebpf/joblet.h`); this process reads it to check for leaks
/// and subtracts a first task's mapping only when the probes missed the task's exit.
pub(crate) struct TaskFilter(Mapping);

impl TaskFilter {
    /// Maps the array map `fd`, which must be `task_filter` as the object defines it (the
    /// caller checks the map's definition).
    pub(crate) fn map(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<TaskFilter> {
        Mapping::new(fd, FILTER_BYTES, "task_filter").map(TaskFilter)
    }

    /// Drops the probes' mapping of a job's first task `key`, `mapped` (its `Task::mapped`):
    /// for a task that exited while the probes were detached, whose exit probe did not.
    pub(crate) fn unmap(&self, key: u64, mapped: u32) {
        self.0
            .u32_at(filter_slot(key))
            .fetch_sub(mapped << FIRST_SHIFT, std::sync::atomic::Ordering::SeqCst);
    }

    /// Filter slots that name a job's first task: one per running job's first task (fewer
    /// when two first tasks share a filter slot).
    pub(crate) fn first_tasks(&self) -> usize {
        (0..FILTER_SLOTS)
            .filter(|&i| {
                self.0.u32_at(i).load(std::sync::atomic::Ordering::Relaxed) >> FIRST_SHIFT != 0
            })
            .count()
    }
}

/// The `cgroup_filter` array map (`BPF_F_MMAPABLE`, one `struct joblet_filter`) mapped into this
/// process: per filter slot, at least as many as the `jobs` keys (cgroup ids) in it, so the
/// probes skip the `jobs` lookup for a cgroup whose count is 0. Only this process changes it:
/// up before it inserts a key into `jobs`, down after it deleted one.
pub(crate) struct CgroupFilter(Mapping);

impl CgroupFilter {
    /// Maps the array map `fd`, which must be `cgroup_filter` as the object defines it (the
    /// caller checks the map's definition).
    pub(crate) fn map(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<CgroupFilter> {
        Mapping::new(fd, FILTER_BYTES, "cgroup_filter").map(CgroupFilter)
    }

    fn count(&self, cgroup_id: u64) -> &std::sync::atomic::AtomicU32 {
        self.0.u32_at(filter_slot(cgroup_id))
    }

    /// Counts `cgroup_id` in (before its `jobs` insert).
    pub(crate) fn add(&self, cgroup_id: u64) {
        self.count(cgroup_id)
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Counts `cgroup_id` out (after its `jobs` delete, or a failed insert).
    pub(crate) fn remove(&self, cgroup_id: u64) {
        self.count(cgroup_id)
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// `cgroup_id`'s slot's count.
    #[cfg(test)]
    pub(crate) fn get(&self, cgroup_id: u64) -> u32 {
        self.count(cgroup_id)
            .load(std::sync::atomic::Ordering::SeqCst)
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

    /// Slots over a memfd instead of the BPF map: the same shared-memory accesses.
    fn memfd_slots() -> JobSlots {
        let fd = rustix::fs::memfd_create("job-slots-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        let page = rustix::param::page_size();
        let len = (JOB_SLOTS as usize * size_of::<Job>()).div_ceil(page) * page;
        rustix::fs::ftruncate(&fd, len as u64).expect("ftruncate");
        JobSlots::map(std::os::fd::AsFd::as_fd(&fd)).expect("map")
    }

    fn store(slots: &JobSlots, slot: u32, i: usize, v: u64) {
        slots
            .word(slot, i)
            .store(v, std::sync::atomic::Ordering::Relaxed);
    }

    fn all_zero(slots: &JobSlots, slot: u32) -> bool {
        (0..JOB_WORDS).all(|i| slots.load(slot, i) == 0)
    }

    /// Word of bucket `b` of histogram `h` (0: runq, 1: off_cpu).
    fn bucket_word(h: usize, b: usize) -> usize {
        words::HISTS[h] + words::BUCKETS + b
    }

    #[test]
    fn a_taken_slot_returns_every_figure_and_is_left_all_zero() {
        let slots = memfd_slots();
        let slot = 3;
        slots.reset(slot, 77);
        // As the probes would: counters, and two runq buckets in different groups, flagged.
        let voluntary = std::mem::offset_of!(Job, voluntary_switches) / 8;
        store(&slots, slot, voluntary, 5);
        store(&slots, slot, bucket_word(0, 2), 4);
        store(&slots, slot, bucket_word(0, 100), 1);
        store(&slots, slot, words::HISTS[0] + words::COUNT, 5);
        store(
            &slots,
            slot,
            words::HISTS[0] + words::GROUPS,
            1 | 1 << (100 / HIST_GROUP),
        );
        let job = slots.read(slot);
        assert_eq!((job.generation, job.voluntary_switches), (77, 5));
        assert_eq!((job.runq.buckets[2], job.runq.buckets[100]), (4, 1));
        let taken = slots.take(slot);
        assert_eq!(taken.generation, 77);
        assert_eq!(taken.runq.count, 5);
        assert_eq!(taken.runq.buckets, job.runq.buckets);
        assert!(all_zero(&slots, slot), "take leaves the slot all zero");
        assert!(all_zero(&slots, slot - 1) && all_zero(&slots, slot + 1));
    }

    #[test]
    fn a_bucket_whose_flag_was_lost_is_still_read_and_cleared() {
        let slots = memfd_slots();
        let slot = JOB_SLOTS - 1;
        slots.reset(slot, 9);
        // Two CPUs raced on `groups`: the off-CPU bucket 50 counted, its group not flagged.
        store(&slots, slot, bucket_word(1, 3), 2);
        store(&slots, slot, bucket_word(1, 50), 1);
        store(&slots, slot, words::HISTS[1] + words::COUNT, 3);
        store(&slots, slot, words::HISTS[1] + words::GROUPS, 1);
        let job = slots.take(slot);
        assert_eq!((job.off_cpu.buckets[3], job.off_cpu.buckets[50]), (2, 1));
        assert!(all_zero(&slots, slot), "take clears unflagged buckets too");
    }

    #[test]
    fn the_filter_hash_is_the_probes_and_spreads_consecutive_ids() {
        // Values of joblet_filter_slot() in ebpf/joblet.h, worked out by hand:
        // (key * 0x9E3779B97F4A7C15 mod 2^64) >> 52.
        assert_eq!(filter_slot(0), 0);
        assert_eq!(filter_slot(1), 0x9E3);
        assert_eq!(filter_slot(2), (0x3C6E_F372_FE94_F82Au64 >> 52) as usize);
        let slots: std::collections::BTreeSet<_> = (5000..5064).map(filter_slot).collect();
        assert_eq!(slots.len(), 64, "consecutive cgroup ids share no slot");
    }

    #[test]
    fn cgroup_filter_counts_go_up_and_down() {
        let fd = rustix::fs::memfd_create("cgroup-filter-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        rustix::fs::ftruncate(&fd, rustix::param::page_size() as u64 * 4).expect("ftruncate");
        let f = CgroupFilter::map(std::os::fd::AsFd::as_fd(&fd)).expect("map");
        f.add(42);
        f.add(42);
        assert_eq!(f.get(42), 2);
        f.remove(42);
        assert_eq!((f.get(42), f.get(43)), (1, 0));
    }

    #[test]
    fn task_filter_first_tasks_are_counted_and_unmapped_apart_from_the_counts() {
        let fd = rustix::fs::memfd_create("task-filter-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        rustix::fs::ftruncate(&fd, rustix::param::page_size() as u64 * 4).expect("ftruncate");
        let f = TaskFilter::map(std::os::fd::AsFd::as_fd(&fd)).expect("map");
        let word = |key| f.0.u32_at(filter_slot(key));
        // What the probes do: two `tasks` keys counted in key 7's word, and the first task of
        // job slot 1023 (mapped = 1024) there too; another first task elsewhere.
        word(7).fetch_add(2, std::sync::atomic::Ordering::SeqCst);
        word(7).fetch_add(1024 << FIRST_SHIFT, std::sync::atomic::Ordering::SeqCst);
        word(8).fetch_add(5 << FIRST_SHIFT, std::sync::atomic::Ordering::SeqCst);
        assert_ne!(filter_slot(7), filter_slot(8));
        assert_eq!(f.first_tasks(), 2);
        f.unmap(7, 1024);
        assert_eq!(f.first_tasks(), 1);
        assert_eq!(
            word(7).load(std::sync::atomic::Ordering::SeqCst),
            2,
            "counts kept"
        );
        f.unmap(8, 5);
        assert_eq!(f.first_tasks(), 0);
    }

    #[test]
    fn the_zero_job_is_all_zero_bytes() {
        assert_eq!(Job::ZERO.runq.buckets, [0; HIST_BUCKETS]);
        assert_eq!(Job::ZERO.first_exec_ns, 0);
        assert_eq!(Job::ZERO.flags, 0);
    }
}
