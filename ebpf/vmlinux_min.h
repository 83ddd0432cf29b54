/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The few kernel types joblet's probes read, declared by hand instead of a generated vmlinux.h.
 *
 * Every struct carries preserve_access_index, so clang emits a CO-RE relocation for each field
 * access: the loader (aya) looks the field up by name in the running kernel's BTF
 * (/sys/kernel/btf/vmlinux) and patches the real offset in. The layouts below therefore only
 * need the right field names and types, never the right offsets, and stay valid across kernels.
 * Declaring only what is read keeps the object small and the source independent of the build
 * machine's kernel (a generated vmlinux.h would be 3 MB and differ per kernel).
 */
#ifndef JOBLET_VMLINUX_MIN_H
#define JOBLET_VMLINUX_MIN_H

#include <linux/types.h>

typedef __u8 u8;
typedef __u32 u32;
typedef __s32 s32;
typedef __u64 u64;
typedef __s64 s64;
typedef _Bool bool;
#define true 1
#define false 0

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct kernfs_node {
	/* u64 since 5.5 (it was a union before): the cgroup id bpf_get_current_cgroup_id() returns. */
	u64 id;
};

struct cgroup {
	struct kernfs_node *kn;
};

struct css_set {
	/* The task's cgroup on the default (v2) hierarchy, also on hybrid hosts. */
	struct cgroup *dfl_cgrp;
};

typedef struct {
	int counter;
} atomic_t;

struct signal_struct {
	/* Live threads of the thread group: 0 at sched_process_exit of the last one. */
	atomic_t live;
};

struct bio_list;

struct sched_entity {
	/* On-CPU time so far (ns of the run-queue's task clock), as /proc/PID/schedstat shows it. */
	u64 sum_exec_runtime;
	/* sum_exec_runtime when the fair class last picked the task to run (set_next_entity). */
	u64 prev_sum_exec_runtime;
};

struct task_struct {
	/* Named __state since 5.14; see task_struct___pre514. */
	unsigned int __state;
	int exit_state;
	s32 pid;
	s32 tgid;
	struct css_set *cgroups;
	struct signal_struct *signal;
	/* Set while the task runs a block driver's ->submit_bio: bios queued then are its children. */
	struct bio_list *bio_list;
	struct sched_entity se;
};

struct bvec_iter {
	/* Bytes left to transfer: the whole bio at submission, the rest at completion. */
	unsigned int bi_size;
};

struct bio {
	struct bio *bi_next; /* the next bio of the same request */
	struct bvec_iter bi_iter;
};

struct request {
	struct bio *bio; /* the first bio not completed yet */
};

/* Kernels before 5.14 call the scheduler state `state` (and make it a long). */
struct task_struct___pre514 {
	long state;
};

#pragma clang attribute pop

#endif
