/* SPDX-License-Identifier: Apache-2.0 */
/*
 * joblet's per-job scheduler probes. Design and attribution rules: docs/design/telemetry.md.
 *
 * Every event is charged to the task it is about (the task that waits, runs or exits), read from
 * the raw tracepoint's task_struct arguments, never to whichever task is current: sched_wakeup
 * and sched_switch run in another task's context. A task belongs to a job when its cgroup v2 id
 * (task->cgroups->dfl_cgrp->kn->id, read with CO-RE, or bpf_get_current_cgroup_id() when the
 * task is the current one) is a key of `jobs`. Events in the task's own context (switch-out,
 * fork, exec, exit) filter host tasks by that cgroup id; events about another task (switch-in,
 * wakeups) first find the task's state by its task_struct address, which the fork probe and the
 * task's first switch-out fill in (in `tasks`, or for a job's first task in its job slot, named
 * by the task's `task_filter` word), and the cgroup is read only to confirm a hit.
 * Counting filters in front of `jobs` and `tasks` (`cgroup_filter`, `task_filter`) answer "not
 * a key" for nearly every host task with one array load: no hash lookup, no CO-RE read.
 * A job's figures live in a slot of `job_slots`, an array userspace maps into its memory: it
 * resets the slot before the spawn and reads it after the exit without a syscall, and binds the
 * cgroup to the slot (`jobs`) once per cgroup. The fork probe stamps the job's start when the
 * loading process clones a task into another cgroup (joblet's spawn: clone3 with
 * CLONE_INTO_CGROUP); userspace can also reset a slot for a job it did not spawn (`watch`).
 *
 * Block I/O is timed per bio, from block_bio_queue in the submitting task's context (a job's
 * task: its cgroup is a key of `jobs`) to the completion of its request or of the bio itself,
 * into a per-job histogram in `bio_jobs` that only jobs doing block I/O get.
 *
 * Only raw tracepoints, CO-RE reads, the ring buffer and XADD atomics are used, so the object
 * loads on any kernel >= 5.8 with BTF (no fentry, tp_btf or BPF atomics beyond add).
 */
#include "vmlinux_min.h"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "joblet.h"

char LICENSE[] SEC("license") = "GPL";

#ifdef JOBLET_BENCH_STUB
/*
 * Benchmark variant only (docs/PERFORMANCE.md, "Fifth session"): every program returns at once,
 * except that the fork probe still starts jobs (so the runtime's `finish` works): what attaching
 * the programs and the runtime's own telemetry work cost, without the probes' work.
 */
#define BENCH_STUB() return 0
#else
#define BENCH_STUB() do {} while (0)
#endif

/*
 * The loading process ("owner"), set by the loader before verification (frozen .rodata, so the
 * verifier prunes the branch not taken). Its tgid as seen in the pid namespace (dev, ino), or,
 * when owner_pidns_ino is 0, the global tgid. A tgid of 0 means no owner: only `watch` counts.
 */
const volatile u32 owner_tgid = 0;
const volatile u64 owner_pidns_dev = 0;
const volatile u64 owner_pidns_ino = 0;

/* Per-thread scheduling state (values of `tasks.state`). */
enum {
	ST_UNKNOWN = 0, /* created at fork, not scheduled yet */
	ST_ONCPU = 1,   /* ts = switched in */
	ST_RUNQ = 2,    /* ts = became runnable (woken, new, or preempted) */
	ST_BLOCKED = 3, /* ts = switched out while sleeping */
};

/*
 * A task's state (struct joblet_task) lives in its job's slot for the job's first task (the one
 * the fork probe started the job with), and in `tasks` for every other task of a job. Entries
 * carry the cgroup id and job generation they were made for, and a hit is confirmed against the
 * task's current cgroup and its job: an entry of a task that left the job, or of a task that
 * exited after its job was finished (its task_struct since reused), is stale and is dropped or
 * reset, never counted. A task's state is dropped at its exit and last switch, whatever the
 * task's cgroup then (`task_filter` makes that check one load for host tasks), and at the task's
 * next switch-in or wakeup once it left its job or the job finished: `tasks` is a plain hash (an
 * LRU insert cost ~0.3 µs more per fork), whose entries are bounded by the live tasks that have
 * one. `procs` is an LRU: its entries are rarer, and a process's entry is only deleted at its
 * exit in the job.
 */

struct proc_entry {
	u64 cgid;
	u64 gen;
	u64 fork_ns; /* 0 when the process entered the job by migration */
	u64 exec_ns; /* 0 before its first exec in the job */
};

/* Ring buffer size, and the amount of pending data that makes a submit wake the reader. */
#define RINGBUF_BYTES (1 << 20)
#define WAKEUP_THRESHOLD (RINGBUF_BYTES / 4)

/*
 * A job's figures live in a slot of `job_slots`, which userspace maps into its memory
 * (BPF_F_MMAPABLE): it resets a slot before the job's spawn and reads it after the job's exit
 * with plain loads and stores, so a job costs no map syscall and no 2.8 KiB copy in or out of
 * the kernel. `jobs` binds a cgroup v2 id to its slot; userspace makes the binding at a cgroup's
 * first job and keeps it while the cgroup is reused (a pooled cgroup's jobs make no syscall at
 * all). A slot whose `gen` is 0 is idle (its job finished, or none started yet): the probes
 * ignore it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, JOBLET_JOB_SLOTS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, u32);
	__type(value, struct joblet_job);
} job_slots SEC(".maps");

/* Preallocated: userspace's inserts and deletes take and return free-list elements. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, JOBLET_JOB_SLOTS);
	__type(key, u64);   /* the cgroup v2 id */
	__type(value, u32); /* its index in job_slots */
} jobs SEC(".maps");

/* Counts of `jobs` keys per filter slot, kept by userspace through a memory mapping. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, u32);
	__type(value, struct joblet_filter);
} cgroup_filter SEC(".maps");

/*
 * Per filter slot of a task_struct address: the count of `tasks` keys there (raised before an
 * insert, lowered after a successful delete; a stale entry is reset in place, not replaced, so
 * the count is exact), and in the high field (JOBLET_FIRST_SHIFT) the slot of the job whose
 * first task has that address. Kept by the probes; memory-mapped by userspace to check that
 * nothing leaks (Telemetry::first_tasks) and to drop a first task whose exit the probes missed.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, u32);
	__type(value, struct joblet_filter);
} task_filter SEC(".maps");

#define FILTER_COUNT_MASK ((1U << JOBLET_FIRST_SHIFT) - 1)

/* errno's EEXIST: a BPF_NOEXIST update of a key that is there. */
#define EEXIST 17

/* Preallocated: inserts take an element from a per-CPU free list, with no allocation. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__type(key, u64); /* the task_struct's address */
	__type(value, struct joblet_task);
} tasks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, u32); /* tgid */
	__type(value, struct proc_entry);
} procs SEC(".maps");

/*
 * Block I/O latency per job, apart from its job slot (2.8 KiB, reset at every spawn): made by
 * the bio probe at the job's first bio, flagged in the job's slot (JOBLET_JOB_BLOCK_IO) so
 * userspace only looks here for jobs that did block I/O. Preallocated: the probe inserts
 * without allocating.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, u64);
	__type(value, struct joblet_bio_job);
} bio_jobs SEC(".maps");

/* A bio a job submitted, until it completes (the values of `bios`). */
struct bio_entry {
	u64 cgid;
	u64 gen; /* the job's generation: a late completion never counts toward a later job */
	u64 ts;  /* submission (block_bio_queue) */
	u32 bytes;
	u32 _pad;
};

/*
 * In-flight bios of jobs, by the struct bio's address, deleted at completion. LRU: a bio whose
 * completion the probes miss (beyond MAX_BIOS_PER_RQ in one request) would otherwise stay forever.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, u64);
	__type(value, struct bio_entry);
} bios SEC(".maps");

/* The value new `bio_jobs` entries are copied from (2 KiB do not fit on the BPF stack). */
struct joblet_bio_job zero_bio_job = {};

/*
 * Entries put into `bios` minus entries deleted from it, never less than the entries there (an
 * entry evicted or overwritten is not subtracted). While it is 0, which is always unless a job
 * does block I/O, the completion probes return after this one load: host I/O completions cost
 * no map lookup.
 */
u64 bios_in_flight = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RINGBUF_BYTES);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, JOBLET_COUNTER_MAX);
	__type(key, u32);
	__type(value, u64);
} counters SEC(".maps");

static __always_inline void count(u32 which)
{
	u64 *c = bpf_map_lookup_elem(&counters, &which);
	if (c)
		__sync_fetch_and_add(c, 1);
}

static __always_inline u64 cgroup_of(struct task_struct *t)
{
	return BPF_CORE_READ(t, cgroups, dfl_cgrp, kn, id);
}

/* The filter count of `key`'s slot (the mask only tells the verifier the index is in bounds). */
static __always_inline u32 *filter_count(struct joblet_filter *f, u64 key)
{
	return &f->counts[joblet_filter_slot(key) & ((1 << JOBLET_FILTER_BITS) - 1)];
}

/*
 * The job running in cgroup `cgid`: its slot (and the slot's index in `*slot`), when the cgroup
 * is bound to one and the slot is active.
 */
static __always_inline struct joblet_job *job_of_cgroup(u64 *cgid, u32 *slot)
{
	struct joblet_filter *f;
	struct joblet_job *job;
	u32 zero = 0, *s;

	f = bpf_map_lookup_elem(&cgroup_filter, &zero);
	if (!f || !*filter_count(f, *cgid))
		return NULL;
	s = bpf_map_lookup_elem(&jobs, cgid);
	if (!s)
		return NULL;
	*slot = *s;
	job = bpf_map_lookup_elem(&job_slots, s);
	return job && job->gen ? job : NULL;
}

/* The `task_filter` word of task `key` (never NULL in practice: the map has its one element). */
static __always_inline u32 *task_word(u64 key)
{
	u32 zero = 0;
	struct joblet_filter *f = bpf_map_lookup_elem(&task_filter, &zero);

	return f ? filter_count(f, key) : NULL;
}

/* Deletes a task's entry, keeping `task_filter` in step. */
static __always_inline void task_delete(u64 *key, u32 *w)
{
	if (!bpf_map_delete_elem(&tasks, key))
		__sync_fetch_and_add(w, -1);
}

/* The key of a task in `tasks`: its task_struct's address. */
static __always_inline u64 task_key(struct task_struct *t)
{
	return (u64)t;
}

/*
 * The job whose first task is `key`, named by the high field of the key's `task_filter` word
 * `w` (the slot, its first task and its generation still agree), or NULL.
 */
static __always_inline struct joblet_job *first_job(u32 w, u64 key)
{
	struct joblet_job *job;
	u32 slot = (w >> JOBLET_FIRST_SHIFT) - 1;

	if (!(w >> JOBLET_FIRST_SHIFT))
		return NULL;
	job = bpf_map_lookup_elem(&job_slots, &slot);
	return job && job->first_task == key && job->gen && job->first.gen == job->gen ? job : NULL;
}

/*
 * Forgets `job`'s first task (at its exit, or once it left the job): its address no longer
 * finds the slot. Called only from the task's own events (and the fork probe re-adopting the
 * slot), so the mapping is subtracted once.
 */
static __always_inline void drop_first(struct joblet_job *job, u32 *w)
{
	u32 mapped = job->first.mapped;

	job->first_task = 0;
	if (mapped && w) {
		job->first.mapped = 0;
		__sync_fetch_and_add(w, -(mapped << JOBLET_FIRST_SHIFT));
	}
}

/* Drops whatever state task `key` has (its `task_filter` word `w`): at its exit or last switch. */
static __always_inline void forget_task(u64 *key, u32 *w)
{
	struct joblet_job *job;

	if (!w || !*w)
		return;
	job = first_job(*w, *key);
	if (job)
		drop_first(job, w);
	if (*w & FILTER_COUNT_MASK)
		task_delete(key, w);
}

/*
 * Makes a `tasks` entry current for the job in cgroup `cgid`: one made for an earlier job
 * (another cgroup or generation) is reset in place, state unknown, rather than replaced (which
 * would count its key twice in `task_filter`).
 */
static __always_inline void renew(struct joblet_task *te, u64 cgid, struct joblet_job *job)
{
	if (te->cgid != cgid || te->gen != job->gen) {
		te->cgid = cgid;
		te->gen = job->gen;
		te->ts = 0;
		te->state = ST_UNKNOWN;
	}
}

/* The thread's entry in `tasks` (`w` its filter word), renewed for this job; NULL when none. */
static __always_inline struct joblet_task *task_entry(u64 *key, u32 *w, u64 cgid,
						      struct joblet_job *job)
{
	struct joblet_task *te;

	if (!w || !(*w & FILTER_COUNT_MASK))
		return NULL;
	te = bpf_map_lookup_elem(&tasks, key);
	if (te)
		renew(te, cgid, job);
	return te;
}

/*
 * The job of task `t`, which is not the current task, with `*te` its state, for the events that
 * fire in another task's context (switch-in, wakeups). Tasks without state are not looked at
 * further: a host task costs a `task_filter` load (a lookup on a filter collision). A job's
 * first task is found through the high field of its word; any other job task has an entry in
 * `tasks` from its fork, or from its first switch-out as a job task (a task moved into the
 * job's cgroup, or running when the job was watched: it is measured from then on). A hit is
 * confirmed by the task's cgroup: the event of a task that left the job is not counted (and its
 * `tasks` entry is dropped; a first task's state is dropped by its own next event), an entry of
 * an earlier job in the same cgroup is reset.
 */
static __always_inline struct joblet_job *job_of_other(struct task_struct *t, u64 *key, u64 *cgid,
							struct joblet_task **te, u32 **wp)
{
	struct joblet_job *job;
	u32 *w = task_word(*key), word, slot;

	*te = NULL;
	*wp = w;
	if (!w || !(word = *w))
		return NULL;
	job = first_job(word, *key);
	if (job) {
		*cgid = cgroup_of(t);
		if (job->first.cgid == *cgid) {
			*te = &job->first;
			return job;
		}
		/*
		 * Not in its job now: not counted. Its state is dropped by its own next event (switch-out
		 * or exit), which reads its cgroup with one helper call, not four pointer reads.
		 */
		count(JOBLET_COUNTER_FIRST_TASK_LEFT);
		return NULL;
	}
	if (!(word & FILTER_COUNT_MASK))
		return NULL;
	*te = bpf_map_lookup_elem(&tasks, key);
	if (!*te)
		return NULL;
	*cgid = cgroup_of(t);
	job = job_of_cgroup(cgid, &slot);
	if (!job) {
		task_delete(key, w);
		*te = NULL;
		return NULL;
	}
	renew(*te, *cgid, job);
	return job;
}

/* The process's entry if it was made for this job. */
static __always_inline struct proc_entry *proc_entry(u32 tgid, u64 cgid, struct joblet_job *job)
{
	struct proc_entry *pe = bpf_map_lookup_elem(&procs, &tgid);

	return pe && pe->cgid == cgid && pe->gen == job->gen ? pe : NULL;
}

/* The job of the current task: one helper call (another task's cgroup takes four CO-RE reads). */
static __always_inline struct joblet_job *job_of_current(u64 *cgid)
{
	u32 slot;

	*cgid = bpf_get_current_cgroup_id();
	return job_of_cgroup(cgid, &slot);
}

/*
 * The job of the current task `*key`, with `*te` its state (NULL when it has none yet) and `*w`
 * its `task_filter` word. A job's first task is found from its word, without the `jobs`
 * lookup; the others through their cgroup. Only these events of the task itself (one CPU at a
 * time) drop a first task's mapping, so it is never subtracted twice.
 */
static __always_inline struct joblet_job *job_of_current_task(u64 *key, u64 *cgid,
							       struct joblet_task **te, u32 **w)
{
	struct joblet_job *job;

	*cgid = bpf_get_current_cgroup_id();
	*w = task_word(*key);
	*te = NULL;
	if (*w && (**w >> JOBLET_FIRST_SHIFT)) {
		job = first_job(**w, *key);
		if (job && job->first.cgid == *cgid) {
			*te = &job->first;
			return job;
		}
		/* It left its job: forget it there (below, it may be another job's task now). */
		if (job) {
			count(JOBLET_COUNTER_FIRST_TASK_LEFT);
			drop_first(job, *w);
		}
	}
	job = job_of_current(cgid);
	if (job)
		*te = task_entry(key, *w, *cgid, job);
	return job;
}

static __always_inline bool current_is_owner(void)
{
	if (!owner_tgid)
		return false;
	if (owner_pidns_ino) {
		struct bpf_pidns_info ns = {};

		if (bpf_get_ns_current_pid_tgid(owner_pidns_dev, owner_pidns_ino, &ns, sizeof(ns)))
			return false;
		return ns.tgid == owner_tgid;
	}
	return (u32)(bpf_get_current_pid_tgid() >> 32) == owner_tgid;
}

/*
 * A job starts in cgroup `cgid`: the loading process cloned its first task there. Userspace
 * reset the cgroup's slot (Telemetry::mark_spawn) before the clone, so this only stamps the
 * start, which is also the job's generation. A spawn into a cgroup without an active slot (no
 * mark_spawn, or no free slot) is counted and not measured.
 */
static __always_inline struct joblet_job *start_job(u64 cgid, u64 now, u32 *slot)
{
	struct joblet_job *job = job_of_cgroup(&cgid, slot);

	if (!job) {
		count(JOBLET_COUNTER_JOB_MAP_FULL);
		return NULL;
	}
	/* The child is not runnable yet (wake_up_new_task comes after this tracepoint). */
	job->gen = now;
	return job;
}

static __always_inline long task_state(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return BPF_CORE_READ(t, __state);
	return BPF_CORE_READ((struct task_struct___pre514 *)t, state);
}

/* Branch-free floor(log2(v)) for v > 0 (the verifier dislikes unbounded loops before 5.3). */
static __always_inline u32 log2_u32(u32 v)
{
	u32 r, shift;

	r = (v > 0xFFFF) << 4;
	v >>= r;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	r |= (v >> 1);
	return r;
}

static __always_inline u32 log2_u64(u64 v)
{
	u32 hi = v >> 32;

	if (hi)
		return log2_u32(hi) + 32;
	return log2_u32((u32)v);
}

static __always_inline u32 bucket_of(u64 v)
{
	u32 k;

	if (v < 4)
		return (u32)v;
	k = log2_u64(v);
	return 4 * (k - 1) + (u32)((v >> (k - 2)) & 3);
}

static __always_inline void hist_add(struct joblet_hist *h, u64 v)
{
	u32 idx = bucket_of(v);

	idx = idx < JOBLET_HIST_FIRST ? 0 : idx - JOBLET_HIST_FIRST;
	if (idx >= JOBLET_HIST_BUCKETS)
		idx = JOBLET_HIST_BUCKETS - 1;

	__sync_fetch_and_add(&h->buckets[idx], 1);
	/* Flagged after the bucket and before the count: see struct joblet_hist. */
	if (!(h->groups & (1ULL << (idx / JOBLET_HIST_GROUP))))
		h->groups |= 1ULL << (idx / JOBLET_HIST_GROUP);
	__sync_fetch_and_add(&h->count, 1);
	__sync_fetch_and_add(&h->total, v);
	if (v > h->max)
		h->max = v;
}

/*
 * Moves a thread to `state`. An existing entry is written in place: a hash update would swap in
 * a fresh element on every context switch. The two stores are not atomic together, but a
 * thread's transitions are serialised by the scheduler (its wakeup waits for the switch-out to
 * finish, see p->on_cpu in try_to_wake_up), so no reader sees a half-written entry that matters.
 */
static __always_inline void set_task(struct joblet_task *te, u64 *key, u32 *w, u64 cgid,
				     struct joblet_job *job, u32 state, u64 ts)
{
	struct joblet_task e = { .cgid = cgid, .gen = job->gen, .ts = ts, .state = state };

	if (te) {
		te->ts = ts;
		te->state = state;
		return;
	}
	if (!w)
		return;
	/* Counted first: the filter must never be 0 while the entry exists. */
	__sync_fetch_and_add(w, 1);
	if (bpf_map_update_elem(&tasks, key, &e, BPF_ANY)) {
		__sync_fetch_and_add(w, -1);
		count(JOBLET_COUNTER_TASK_MAP_FULL);
	}
}

/*
 * Keeps the state of the job's first task `key` in its slot (`slot`), found from the task's
 * address through the high field of its `task_filter` word `w`; false when another job's first
 * task has that field (the task then gets a `tasks` entry like any other).
 */
static __always_inline bool adopt_first(struct joblet_job *job, u32 slot, u64 key, u64 cgid,
					u32 *w)
{
	if (!w || (*w >> JOBLET_FIRST_SHIFT) || slot >= JOBLET_JOB_SLOTS)
		return false;
	/* A task the owner cloned into the cgroup earlier (see the design's blind spots). */
	if (job->first.mapped)
		drop_first(job, task_word(job->first_task));
	job->first.cgid = cgid;
	job->first.gen = job->gen;
	job->first.ts = 0;
	job->first.state = ST_UNKNOWN;
	job->first.mapped = slot + 1;
	job->first_task = key;
	__sync_fetch_and_add(w, (slot + 1) << JOBLET_FIRST_SHIFT);
	return true;
}

/*
 * A job task switched out (or exiting) that the probes never saw switched in: its state is still
 * what its last switch-out or wakeup made it, `gap` ago. The switch-in's tracepoint did not reach
 * the probes (some hosts do not fire tracepoints while their own agent's threads run, and the
 * switch away from such a thread goes unseen). What it ran since the fair class picked it comes
 * from the kernel's own accounting (sum_exec_runtime since set_next_entity, as schedstat counts
 * it); the rest of the gap was the wait before it (or the sleep and the wait, when its wakeup was
 * missed too). Other classes do not keep prev_sum_exec_runtime: the clamp then makes the gap
 * on-CPU time.
 */
static __always_inline void recover_switch_in(struct joblet_job *job, struct joblet_task *te,
					      struct task_struct *t, u64 now)
{
	u64 gap = now - te->ts;
	u64 ran = BPF_CORE_READ(t, se.sum_exec_runtime) - BPF_CORE_READ(t, se.prev_sum_exec_runtime);

	if (ran > gap)
		ran = gap;
	count(JOBLET_COUNTER_MISSED_SWITCH_IN);
	__sync_fetch_and_add(&job->on_cpu_ns, ran);
	if (te->state == ST_RUNQ)
		hist_add(&job->runq, gap - ran);
	else if (te->state == ST_BLOCKED)
		hist_add(&job->off_cpu, gap - ran);
}

/*
 * Reserves a ring buffer record, counting a failure against the job. Records are submitted
 * without waking the reader (BPF_RB_NO_WAKEUP) unless it matters: see submit().
 */
static __always_inline struct joblet_event *reserve(struct joblet_job *job)
{
	struct joblet_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		__sync_fetch_and_add(&job->events_lost, 1);
		count(JOBLET_COUNTER_RINGBUF_DROPS);
	}
	return e;
}

static __always_inline void submit(struct joblet_event *e)
{
	u64 flags = BPF_RB_NO_WAKEUP;

	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= WAKEUP_THRESHOLD)
		flags = BPF_RB_FORCE_WAKEUP;
#ifdef JOBLET_BENCH_WAKEUP_EVERY_EVENT
	/* Benchmark variant only (docs/perf-telemetry.md): what batching saves. */
	flags = BPF_RB_FORCE_WAKEUP;
#endif
	bpf_ringbuf_submit(e, flags);
}

/*
 * One lifecycle record of the current task (exec or exit) into the ring buffer, or a lost event
 * counted on the job. No forced wakeup per job: Telemetry::finish drains the ring itself after
 * the job is reaped, and a wakeup per job cost ~10% of the spawn rate (docs/PERFORMANCE.md).
 */
static __always_inline void emit(struct joblet_job *job, u64 cgid, u64 now, u64 delta, u32 kind,
				 u32 tgid, u32 flags)
{
	struct joblet_event *e = reserve(job);

	if (!e)
		return;
	e->cgroup_id = cgid;
	e->ts_ns = now;
	e->delta_ns = delta;
	e->kind = kind;
	e->tgid = tgid;
	e->flags = flags;
	e->_pad = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	__sync_fetch_and_add(&job->records, 1);
	submit(e);
}

/*
 * raw_tracepoint/sched_switch: (bool preempt, prev, next[, unsigned int prev_state since 5.18]),
 * in prev's context: prev is the current task. Host tasks cost a cgroup id (one helper call) and
 * two filter loads, no map lookup and no clock read.
 */
SEC("raw_tracepoint/sched_switch")
int joblet_sched_switch(struct bpf_raw_tracepoint_args *ctx)
{
	BENCH_STUB();
	bool preempt = (bool)(ctx->args[0] & 0xff);
	struct task_struct *prev = (struct task_struct *)ctx->args[1];
	struct task_struct *next = (struct task_struct *)ctx->args[2];
	struct joblet_job *job;
	struct joblet_task *te;
	u64 cgid, key = task_key(prev), now = 0;
	u32 *w;

	job = job_of_current_task(&key, &cgid, &te, &w);
	if (job) {
		now = bpf_ktime_get_ns();
		if (te && te->state == ST_ONCPU)
			__sync_fetch_and_add(&job->on_cpu_ns, now - te->ts);
		else if (te && te->ts)
			recover_switch_in(job, te, prev, now);
		if (BPF_CORE_READ(prev, exit_state)) {
			/*
			 * The task's last switch. sched_process_exit dropped its state, but a
			 * preemption or sleep between that tracepoint and exit_notify() may have
			 * made an entry: drop it, stale or not, before the task_struct is reused.
			 */
			forget_task(&key, w);
		} else if (!preempt && task_state(prev) != 0) {
			/* The kernel's own rule for nvcsw / nivcsw in __schedule(). */
			__sync_fetch_and_add(&job->voluntary_switches, 1);
			set_task(te, &key, w, cgid, job, ST_BLOCKED, now);
		} else {
			__sync_fetch_and_add(&job->involuntary_switches, 1);
			set_task(te, &key, w, cgid, job, ST_RUNQ, now);
		}
	} else if (w && *w && BPF_CORE_READ(prev, exit_state)) {
		/* A task with state, outside its job now: its last switch drops it. */
		forget_task(&key, w);
	}

	key = task_key(next);
	job = job_of_other(next, &key, &cgid, &te, &w);
	if (job) {
		if (!now)
			now = bpf_ktime_get_ns();
		if (te && te->ts) {
			if (te->state == ST_RUNQ)
				hist_add(&job->runq, now - te->ts);
			else if (te->state == ST_BLOCKED)
				/* Its wakeup was missed (watch() came in between): charge the gap as off-CPU. */
				hist_add(&job->off_cpu, now - te->ts);
		}
		set_task(te, &key, w, cgid, job, ST_ONCPU, now);
	}
	return 0;
}

static __always_inline int on_wakeup(struct task_struct *p)
{
	struct joblet_job *job;
	struct joblet_task *te;
	u64 now, cgid, key = task_key(p);
	u32 *w;

	job = job_of_other(p, &key, &cgid, &te, &w);
	if (!job)
		return 0;
	now = bpf_ktime_get_ns();
	if (te) {
		/* A wakeup of a task that has not switched out yet cancels its sleep: nothing waits. */
		if (te->state == ST_ONCPU || te->state == ST_RUNQ)
			return 0;
		if (te->state == ST_BLOCKED && te->ts)
			hist_add(&job->off_cpu, now - te->ts);
	}
	set_task(te, &key, w, cgid, job, ST_RUNQ, now);
	return 0;
}

/* raw_tracepoint/sched_wakeup: (struct task_struct *p), fired in the waker's context. */
SEC("raw_tracepoint/sched_wakeup")
int joblet_sched_wakeup(struct bpf_raw_tracepoint_args *ctx)
{
	BENCH_STUB();
	return on_wakeup((struct task_struct *)ctx->args[0]);
}

/*
 * raw_tracepoint/sched_wakeup_new: (struct task_struct *p), a new task's first enqueue. A job's
 * new task has the entry the fork probe made; tasks created without that tracepoint (io_uring
 * workers) are measured from their first switch-out.
 */
SEC("raw_tracepoint/sched_wakeup_new")
int joblet_sched_wakeup_new(struct bpf_raw_tracepoint_args *ctx)
{
	BENCH_STUB();
	return on_wakeup((struct task_struct *)ctx->args[0]);
}

/*
 * raw_tracepoint/sched_process_fork: (parent, child), in the parent's context, for every new
 * process and thread. A child cloned by the owner into another cgroup than the owner's starts a
 * job there, and keeps its state in the job's slot. Every other new task of a job gets its entry
 * in `tasks` here, before its first wakeup.
 */
SEC("raw_tracepoint/sched_process_fork")
int joblet_sched_process_fork(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *child = (struct task_struct *)ctx->args[1];
	struct joblet_job *job;
	u64 cgid, now, key = task_key(child);
	u32 pid, tgid, slot = 0, *w;

	/* The child's cgroup, not the parent's: with CLONE_INTO_CGROUP they differ. */
	cgid = cgroup_of(child);
	now = 0;
	if (cgid != bpf_get_current_cgroup_id() && current_is_owner()) {
		now = bpf_ktime_get_ns();
		job = start_job(cgid, now, &slot);
	} else {
		job = job_of_cgroup(&cgid, &slot);
	}
	BENCH_STUB();
	if (!job)
		return 0;
	pid = BPF_CORE_READ(child, pid);
	tgid = BPF_CORE_READ(child, tgid);
	w = task_word(key);
	if (!(pid == tgid && now && adopt_first(job, slot, key, cgid, w)))
		set_task(NULL, &key, w, cgid, job, ST_UNKNOWN, 0);
	if (pid == tgid && now) {
		/* The job's first process: its fork and exec times live in the job's slot. */
		job->origin_tgid = tgid;
		__sync_fetch_and_add(&job->forks, 1);
	} else if (pid == tgid) {
		struct proc_entry pe = { .cgid = cgid, .gen = job->gen, .fork_ns = bpf_ktime_get_ns() };

		__sync_fetch_and_add(&job->forks, 1);
		if (bpf_map_update_elem(&procs, &tgid, &pe, BPF_ANY))
			count(JOBLET_COUNTER_TASK_MAP_FULL);
	} else {
		__sync_fetch_and_add(&job->threads, 1);
	}
	return 0;
}

/* raw_tracepoint/sched_process_exec: (p, old_pid, bprm), in p's context after the new image. */
SEC("raw_tracepoint/sched_process_exec")
int joblet_sched_process_exec(struct bpf_raw_tracepoint_args *ctx)
{
	BENCH_STUB();
	struct task_struct *p = (struct task_struct *)ctx->args[0];
	struct joblet_job *job;
	struct proc_entry *pe;
	u64 now, cgid, key = task_key(p);
	u32 tgid, flags = 0;
	u64 delta = 0;
	bool leader = false;
	struct joblet_task *te;
	u32 *w;

	/* p is the current task. */
	job = job_of_current_task(&key, &cgid, &te, &w);
	if (!job)
		return 0;
	now = bpf_ktime_get_ns();
	tgid = (u32)(bpf_get_current_pid_tgid() >> 32);
	__sync_fetch_and_add(&job->execs, 1);

	/* Jobs start as a single process, so two first execs cannot race. */
	if (!job->first_exec_ns) {
		job->first_exec_ns = now;
		job->leader_tgid = tgid;
		leader = true;
	}
	if (tgid == job->origin_tgid) {
		/* Forked at the job's start (gen); a watched job has no origin (0 is no process's). */
		if (!job->origin_exec_ns) {
			delta = now - job->gen;
			flags |= JOBLET_EVENT_HAVE_DELTA;
		}
		job->origin_exec_ns = now;
	} else if ((pe = proc_entry(tgid, cgid, job))) {
		if (pe->fork_ns && !pe->exec_ns) {
			delta = now - pe->fork_ns;
			flags |= JOBLET_EVENT_HAVE_DELTA;
		}
		pe->exec_ns = now;
	} else {
		/* Entered the job by migration (cgroup.procs), not by fork. */
		struct proc_entry fresh = { .cgid = cgid, .gen = job->gen, .exec_ns = now };

		if (bpf_map_update_elem(&procs, &tgid, &fresh, BPF_ANY))
			count(JOBLET_COUNTER_TASK_MAP_FULL);
	}
	/* The task is running: start its on-CPU interval if it was never switched in as a job task. */
	if (!te || !te->ts)
		set_task(te, &key, w, cgid, job, ST_ONCPU, now);

	/* The command's figures go into its job's slot: no ring buffer record on every job's path. */
	if (leader) {
		if (flags & JOBLET_EVENT_HAVE_DELTA) {
			job->leader_exec_delta_ns = delta;
			job->leader_flags |= JOBLET_LEADER_EXEC_DELTA;
		}
		return 0;
	}
	emit(job, cgid, now, delta, JOBLET_EVENT_EXEC, tgid, flags);
	return 0;
}

/* raw_tracepoint/sched_process_exit: (p[, group_dead]), in the exiting thread's context. */
SEC("raw_tracepoint/sched_process_exit")
int joblet_sched_process_exit(struct bpf_raw_tracepoint_args *ctx)
{
	BENCH_STUB();
	struct task_struct *p = (struct task_struct *)ctx->args[0];
	struct joblet_job *job;
	struct joblet_task *te;
	struct proc_entry *pe;
	u64 now, cgid, delta = 0, key = task_key(p);
	u32 tgid, flags = 0, *w;
	bool leader;

	/*
	 * p is the current task. Host tasks return here, after dropping the state of a task that
	 * left its job or outlived it (one filter load for the others).
	 */
	job = job_of_current_task(&key, &cgid, &te, &w);
	if (!job) {
		forget_task(&key, w);
		return 0;
	}
	now = bpf_ktime_get_ns();
	tgid = (u32)(bpf_get_current_pid_tgid() >> 32);
	/* Its last on-CPU stretch: the final switch-out comes after its state is gone. */
	if (te && te->state == ST_ONCPU)
		__sync_fetch_and_add(&job->on_cpu_ns, now - te->ts);
	else if (te && te->ts)
		recover_switch_in(job, te, p, now);
	forget_task(&key, w);

	/* signal->live was decremented before this tracepoint: 0 means the whole process is gone. */
	if (BPF_CORE_READ(p, signal, live.counter) != 0)
		return 0;
	__sync_fetch_and_add(&job->exits, 1);
	if (tgid == job->origin_tgid) {
		if (job->origin_exec_ns) {
			delta = now - job->origin_exec_ns;
			flags |= JOBLET_EVENT_HAVE_DELTA;
		}
		/* A later process of the job may get its tgid (no PID namespace). */
		job->origin_tgid = 0;
	} else {
		pe = proc_entry(tgid, cgid, job);
		if (pe && pe->exec_ns) {
			delta = now - pe->exec_ns;
			flags |= JOBLET_EVENT_HAVE_DELTA;
		}
		bpf_map_delete_elem(&procs, &tgid);
	}
	leader = job->first_exec_ns && tgid == job->leader_tgid;
	if (leader) {
		if (flags & JOBLET_EVENT_HAVE_DELTA) {
			job->leader_exit_delta_ns = delta;
			job->leader_flags |= JOBLET_LEADER_EXIT_DELTA;
		}
		job->leader_exit_ns = now;
		return 0;
	}

	emit(job, cgid, now, delta, JOBLET_EVENT_EXIT, tgid, flags);
	return 0;
}

/*
 * The job's `bio_jobs` entry exists for its generation: made at its first bio (the flag in the
 * job's slot says so after that, without a lookup). False when `bio_jobs` is full.
 */
static __always_inline bool start_bio_job(u64 *cgid, struct joblet_job *job)
{
	struct joblet_bio_job *bj;

	if (job->flags & JOBLET_JOB_BLOCK_IO)
		return true;
	/* BPF_NOEXIST: the first bios of a job on two CPUs at once make one entry. */
	if (bpf_map_update_elem(&bio_jobs, cgid, &zero_bio_job, BPF_NOEXIST)) {
		bj = bpf_map_lookup_elem(&bio_jobs, cgid);
		if (!bj) {
			count(JOBLET_COUNTER_BIO_MAP_FULL);
			return false;
		}
		/*
		 * An entry of an earlier job in the same (pooled) cgroup, never finished: replace it.
		 * gen 0 is an entry another CPU is making for this job right now.
		 */
		if (bj->gen && bj->gen != job->gen &&
		    bpf_map_update_elem(&bio_jobs, cgid, &zero_bio_job, BPF_ANY)) {
			count(JOBLET_COUNTER_BIO_MAP_FULL);
			return false;
		}
	}
	bj = bpf_map_lookup_elem(&bio_jobs, cgid);
	if (!bj)
		return false;
	bj->gen = job->gen;
	/* Only this probe writes `flags`, and only this bit. */
	job->flags |= JOBLET_JOB_BLOCK_IO;
	return true;
}

/*
 * A bio submitted by the current task: counted when the task belongs to a job (its own cgroup,
 * bpf_get_current_cgroup_id(): never the bio's blkcg, which is the v1 blkio one on hybrid hosts).
 * Host I/O costs one helper call and one failed lookup.
 */
static __always_inline int on_bio_queue(struct bio *bio)
{
	struct task_struct *task;
	struct joblet_bio_job *bj;
	struct joblet_job *job;
	struct bio_entry e = {};
	long err;
	u64 cgid, key = (u64)bio;

	job = job_of_current(&cgid);
	if (!job)
		return 0;
	/*
	 * Queued while a stacked driver (dm, md) runs its ->submit_bio in this task: a child of a
	 * bio already counted at the device the job submitted it to.
	 */
	task = (struct task_struct *)bpf_get_current_task();
	if (BPF_CORE_READ(task, bio_list))
		return 0;
	if (!start_bio_job(&cgid, job))
		return 0;
	bj = bpf_map_lookup_elem(&bio_jobs, &cgid);
	if (bj)
		__sync_fetch_and_add(&bj->queued, 1);
	e.cgid = cgid;
	e.gen = job->gen;
	e.bytes = BPF_CORE_READ(bio, bi_iter.bi_size);
	e.ts = bpf_ktime_get_ns();
	/*
	 * Counted first: a completion must never see 0 while the entry exists. An entry already
	 * there is a bio at this address whose completion went unseen: it is replaced, and stays
	 * counted once, so `bios_in_flight` returns to 0 once the job's bios are done.
	 */
	__sync_fetch_and_add(&bios_in_flight, 1);
	err = bpf_map_update_elem(&bios, &key, &e, BPF_NOEXIST);
	if (err) {
		__sync_fetch_and_add(&bios_in_flight, -1);
		if (err != -EEXIST || bpf_map_update_elem(&bios, &key, &e, BPF_EXIST))
			count(JOBLET_COUNTER_BIO_MAP_FULL);
	}
	return 0;
}

/* raw_tracepoint/block_bio_queue: (struct bio *bio) since 5.11, in the submitter's context. */
SEC("raw_tracepoint/block_bio_queue")
int joblet_block_bio_queue(struct bpf_raw_tracepoint_args *ctx)
{
	BENCH_STUB();
	return on_bio_queue((struct bio *)ctx->args[0]);
}

/*
 * raw_tracepoint/block_bio_queue before 5.11: (struct request_queue *q, struct bio *bio). The
 * loader attaches this one first: reading a second argument fails to attach (EINVAL) where the
 * tracepoint has one, which is how the loader tells the two signatures apart.
 */
SEC("raw_tracepoint/block_bio_queue")
int joblet_block_bio_queue_pre511(struct bpf_raw_tracepoint_args *ctx)
{
	BENCH_STUB();
	return on_bio_queue((struct bio *)ctx->args[1]);
}

/* A bio is done: its latency goes to its job, if that job is still the cgroup's current one. */
static __always_inline void bio_done(u64 key)
{
	struct bio_entry *e = bpf_map_lookup_elem(&bios, &key);
	struct joblet_bio_job *bj;
	u64 now;

	if (!e)
		return;
	now = bpf_ktime_get_ns();
	bj = bpf_map_lookup_elem(&bio_jobs, &e->cgid);
	if (bj && bj->gen == e->gen && now > e->ts) {
		hist_add(&bj->latency, now - e->ts);
		__sync_fetch_and_add(&bj->bytes, e->bytes);
	}
	if (!bpf_map_delete_elem(&bios, &key))
		__sync_fetch_and_add(&bios_in_flight, -1);
}

/* Bios of one request looked at on its completion: requests of more (merged) bios are rare. */
#define MAX_BIOS_PER_RQ 16

/*
 * raw_tracepoint/block_rq_complete: (struct request *rq, error, unsigned int nr_bytes), when a
 * request-based (blk-mq) device completes nr_bytes of rq, before its bios are ended. The bios
 * that are wholly done are the first ones of rq->bio's chain whose sizes fit in nr_bytes (as
 * blk_update_request walks them); blk_update_request then clears their BIO_TRACE_COMPLETION, so
 * block_bio_complete never fires for them.
 */
SEC("raw_tracepoint/block_rq_complete")
int joblet_block_rq_complete(struct bpf_raw_tracepoint_args *ctx)
{
	BENCH_STUB();
	struct request *rq = (struct request *)ctx->args[0];
	u32 left = (u32)ctx->args[2];
	struct bio *bio;
	u32 size;
	int i;

	if (!*(volatile u64 *)&bios_in_flight)
		return 0;
	bio = BPF_CORE_READ(rq, bio);
	for (i = 0; i < MAX_BIOS_PER_RQ && bio; i++) {
		size = BPF_CORE_READ(bio, bi_iter.bi_size);
		if (size > left)
			break;
		bio_done((u64)bio);
		left -= size;
		if (!left)
			break;
		bio = BPF_CORE_READ(bio, bi_next);
	}
	return 0;
}

/*
 * raw_tracepoint/block_bio_complete: (struct request_queue *q, struct bio *bio), from bio_endio
 * of a bio that block_bio_queue traced and no request completion did: bios of bio-based devices
 * (dm, md, nvme multipath heads, brd, zram) and bios ended without reaching a request (errors).
 */
SEC("raw_tracepoint/block_bio_complete")
int joblet_block_bio_complete(struct bpf_raw_tracepoint_args *ctx)
{
	BENCH_STUB();
	if (!*(volatile u64 *)&bios_in_flight)
		return 0;
	bio_done((u64)ctx->args[1]);
	return 0;
}
