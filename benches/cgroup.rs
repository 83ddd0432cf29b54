//! Cost of a job's cgroup set: create (mkdir + limits + join fds) and remove, per job, on this
//! host's real hierarchy, with new sets (`fresh`) and with sets reused from a pool (`pooled`:
//! limit rewrite, baseline reads, emptiness check). Needs root; prints why and does nothing
//! otherwise.
//!
//! `cargo bench --bench cgroup`

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use joblet_runtime::cgroup::{self, CgroupDriver};
use joblet_runtime::job::{CpuList, Limits};

fn limit_sets() -> [(&'static str, Limits); 3] {
    [
        ("no_limits", Limits::default()),
        (
            "memory",
            Limits {
                memory_bytes: Some(256 << 20),
                ..Limits::default()
            },
        ),
        (
            "memory_cpu_pids_cores",
            Limits {
                memory_bytes: Some(256 << 20),
                cpu_percent: Some(50),
                pids: Some(64),
                cores: Some(CpuList::new(vec![0])),
                ..Limits::default()
            },
        ),
    ]
}

fn driver() -> Option<Box<dyn CgroupDriver>> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("cgroup bench skipped: needs root");
        return None;
    }
    match cgroup::detect(Path::new("/sys/fs/cgroup")) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("cgroup bench skipped: {e}");
            None
        }
    }
}

fn create_remove(c: &mut Criterion) {
    let (Some(fresh), Some(mut pooled)) = (driver(), driver()) else {
        return;
    };
    pooled.set_pool(8).expect("pool");
    let pid = std::process::id();
    let mut group = c.benchmark_group(format!("cgroup_{}", fresh.layout().as_str()));
    for (mode, driver) in [("fresh", &fresh), ("pooled", &pooled)] {
        for (label, limits) in limit_sets() {
            let mut n = 0u64;
            group.bench_function(format!("{mode}/{label}"), |b| {
                b.iter(|| {
                    n += 1;
                    let cg = driver
                        .create(&format!("bench-{pid}-{n}"), &limits)
                        .expect("create");
                    cg.remove().expect("remove");
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, create_remove);
criterion_main!(benches);
