/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Structures shared between the probes (joblet.bpf.c) and their loader
 * (runtime/src/sys/bpf.rs mirrors every one of them with #[repr(C)]; keep the two in sync).
 * All fields are naturally aligned, with explicit padding, so the C and Rust layouts agree.
 */
#ifndef JOBLET_SHARED_H
#define JOBLET_SHARED_H

/*
 * Log-linear histogram: every power of two [2^k, 2^(k+1)) is split into 4 equal sub-buckets, so
 * a bucket's width is at most 25% of its lower bound: bucket_of() gives 4*(k-1)+s for k >= 2, s
 * the two bits after the leading one (values 0..3 have a bucket each). A job's histograms keep
 * bucket_of 16 to 183: values below 32 ns share the first kept bucket, values from 7 * 2^44 ns
 * (about 34 h) the last (the exact max bounds it). 168 buckets where all of u64 takes 252: a job
 * slot is reset at every spawn and read at every finish.
 */
#define JOBLET_HIST_FIRST 16
#define JOBLET_HIST_BUCKETS 168
/*
 * Buckets per group of `groups`: 8 counters, a cache line. Userspace reads (and clears) only the
 * groups a job used: a few of a histogram's 21.
 */
#define JOBLET_HIST_GROUP 8

struct joblet_hist {
	__u64 total; /* sum of the recorded values, ns */
	__u64 count;
	__u64 max; /* updated without atomics: two CPUs racing may lose the larger value */
	/*
	 * Bit g: buckets [8g, 8g + 8) may be non-zero. Set without atomics (-mcpu=v2 has no atomic
	 * or): two CPUs racing may lose a bit, which userspace detects (the flagged buckets then
	 * sum to less than `count`) and reads every bucket.
	 */
	__u64 groups;
	__u64 buckets[JOBLET_HIST_BUCKETS];
};

/* Slots of `job_slots`, and cgroup bindings in `jobs`: the jobs measured at once. */
#define JOBLET_JOB_SLOTS 1024

/*
 * Counting filters in front of the `jobs` and `tasks` hash maps, so that host tasks, which are
 * most of what the scheduler probes see, cost an array load instead of a failed hash lookup:
 * counts[joblet_filter_slot(key)] is at least the number of the map's keys with that slot, so 0
 * means "not a key". `cgroup_filter` counts `jobs` keys (cgroup ids, kept by userspace, which
 * alone updates `jobs`), the probes' `task_filter` counts `tasks` keys (task_struct addresses).
 */
#define JOBLET_FILTER_BITS 12

struct joblet_filter {
	__u32 counts[1 << JOBLET_FILTER_BITS];
};

/*
 * `task_filter` words hold two fields. The low JOBLET_FIRST_SHIFT bits count `tasks` keys; the
 * high bits hold 1 + the index of the job slot whose first task (joblet_job.first_task) has that
 * filter slot, or 0. Both fields change only by atomic adds of what was added before, so a
 * race on the high field (two first tasks with one filter slot at once) leaves a value that
 * names no matching slot, costing a lookup, never the count below.
 */
#define JOBLET_FIRST_SHIFT 20

/* Fibonacci hashing of a key to a filter slot (runtime/src/sys/bpf.rs has the same). */
static inline __u32 joblet_filter_slot(__u64 key)
{
	return (__u32)((key * 0x9E3779B97F4A7C15ULL) >> (64 - JOBLET_FILTER_BITS));
}

/* A task's scheduling state (the values of `tasks`, and a job slot's first task). */
struct joblet_task {
	__u64 cgid;
	__u64 gen; /* the job's generation (joblet_job.gen): another job in the same cgroup differs */
	__u64 ts;
	__u32 state;
	/* joblet_job.first only: 1 + its slot's index, while `task_filter` holds that (else 0). */
	__u32 mapped;
};

/*
 * A slot of the `job_slots` array (memory-mapped by userspace), bound to the job's cgroup v2 id
 * by the `jobs` map. Userspace zeroes it and sets `gen` before the job's spawn (or `watch`), and
 * sets `gen` to 0 (idle) once it read the figures after the job's exit.
 */
struct joblet_job {
	/*
	 * Tells this job from earlier ones in the same (pooled) cgroup: per-task and per-process
	 * entries carry the generation they were made in, and others are stale. 0: the slot is
	 * idle, and the probes ignore it. The fork probe sets it to the job's start.
	 */
	__u64 gen;
	__u64 on_cpu_ns;
	__u64 voluntary_switches;
	__u64 involuntary_switches;
	__u64 forks;   /* new processes created in the job */
	__u64 threads; /* new threads created in the job */
	__u64 execs;
	__u64 exits; /* processes (thread groups) that exited */
	__u64 events_lost; /* ring buffer reservations that failed */
	__u64 first_exec_ns; /* bpf_ktime_get_ns() of the job's first exec, 0 before */
	__u64 leader_exit_ns; /* exit of the process that made the first exec, 0 before */
	__u32 leader_tgid;
	__u32 leader_flags; /* JOBLET_LEADER_*: which of the two deltas below are valid */
	/*
	 * The command's own lifecycle figures, kept here instead of in ring buffer records (which
	 * cost a reserve and a submit each, on every job): fork-to-exec of its first exec, and
	 * exec-to-exit (from its last exec).
	 */
	__u64 leader_exec_delta_ns;
	__u64 leader_exit_delta_ns;
	/*
	 * The process the fork probe started the job with (0 for a watched job, or once it
	 * exited), and its last exec (0 before). Its fork is the job's start (`gen`). Kept here
	 * instead of in `procs`: one LRU insert, lookup and delete less per job.
	 */
	__u32 origin_tgid;
	__u32 flags; /* JOBLET_JOB_*: set by the probes, read by userspace */
	__u64 origin_exec_ns;
	/*
	 * Ring buffer records submitted for the job (other processes' exec and exit): when 0,
	 * userspace has nothing of this job to drain from the ring at `finish`.
	 */
	__u64 records;
	/*
	 * The task the fork probe started the job with (its task_struct's address; 0 for a watched
	 * job, once it exited, or when its filter slot was taken), whose scheduling state is kept
	 * here instead of in `tasks`: no hash insert, delete or lookup for the task of a job that
	 * forks nothing. The probes find it from its address through `task_filter`'s high field.
	 */
	__u64 first_task;
	struct joblet_task first;
	struct joblet_hist runq;
	struct joblet_hist off_cpu;
};

enum joblet_job_flags {
	/*
	 * The job submitted block I/O: its `bio_jobs` entry exists (made for this generation), so
	 * userspace reads (and at `finish` deletes) it. Jobs without the flag cost no extra syscall.
	 */
	JOBLET_JOB_BLOCK_IO = 1,
};

/*
 * Value of the `bio_jobs` map, keyed by the job's cgroup v2 id: its block I/O latency, kept apart
 * from `struct joblet_job` (reset at every spawn) and made by the bio probe at the job's first
 * bio, so jobs without block I/O never pay for it.
 */
struct joblet_bio_job {
	__u64 gen;   /* the job's generation (joblet_job.gen) when the entry was made */
	__u64 bytes; /* sizes (at submission) of the job's bios that completed */
	/*
	 * The job's bios the probes saw submitted: those of them whose completion they did not see
	 * (queued - latency.count once the job is over) are reported as unseen.
	 */
	__u64 queued;
	/* From each bio's submission (block_bio_queue) to its completion. */
	struct joblet_hist latency;
};

enum joblet_event_kind {
	JOBLET_EVENT_EXEC = 1,
	JOBLET_EVENT_EXIT = 2,
};

enum joblet_event_flags {
	/* 1 marked the command's records, which are no longer sent (joblet_job.leader_flags). */
	/* `delta_ns` is valid: fork-to-exec for an exec, exec-to-exit for an exit. */
	JOBLET_EVENT_HAVE_DELTA = 2,
};

enum joblet_leader_flags {
	JOBLET_LEADER_EXEC_DELTA = 1, /* leader_exec_delta_ns is valid */
	JOBLET_LEADER_EXIT_DELTA = 2, /* leader_exit_delta_ns is valid */
};

/* A ring buffer record: the exec or exit of a process of a job other than its command. */
struct joblet_event {
	__u64 cgroup_id;
	__u64 ts_ns;
	__u64 delta_ns;
	__u32 kind;
	__u32 tgid;
	__u32 flags;
	__u32 _pad;
	char comm[16];
};

/* Indexes of the global `counters` array. */
enum joblet_counter {
	JOBLET_COUNTER_RINGBUF_DROPS = 0,
	JOBLET_COUNTER_TASK_MAP_FULL = 1,
	/* Spawns the fork probe could not start measuring: the cgroup had no active slot. */
	JOBLET_COUNTER_JOB_MAP_FULL = 2,
	/* Block I/O a job submitted that could not be measured (`bio_jobs` or `bios` insert failed). */
	JOBLET_COUNTER_BIO_MAP_FULL = 3,
	/*
	 * A job's first task met outside its job's cgroup: in its own context its state is dropped;
	 * about it from another context (a cgroup read through four pointers), the event is only
	 * not counted.
	 */
	JOBLET_COUNTER_FIRST_TASK_LEFT = 4,
	/*
	 * A job task switched out (or exiting) that the probes never saw switched in: its switch-in
	 * tracepoint did not reach them. Its stretch is taken from the kernel's own accounting.
	 */
	JOBLET_COUNTER_MISSED_SWITCH_IN = 5,
	JOBLET_COUNTER_MAX = 6,
};

#endif
