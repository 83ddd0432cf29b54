//! Tests of the cgroup layer: the files written for each limit against fake hierarchies in temp
//! dirs, usage parsing and check errors; then, when privileged, the real hierarchy of this host.

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::fs::Backing;
use super::hybrid::{HybridDriver, V1Controller, v1_mounts};
use super::v2::V2Driver;
use super::*;
use crate::job::{CpuList, DevNum, IoLimit, Limits};

fn write(path: impl AsRef<Path>, text: &str) {
    let path = path.as_ref();
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The files in a directory, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn sda() -> DevNum {
    DevNum { major: 8, minor: 0 }
}

/// A fake `/sys/dev/block` with a disk 8:0 and its partition 8:1.
fn fake_sys_dev_block(tmp: &Path) -> PathBuf {
    let sys = tmp.join("sys");
    write(sys.join("block/sda/dev"), "8:0\n");
    write(sys.join("block/sda/sda1/dev"), "8:1\n");
    write(sys.join("block/sda/sda1/partition"), "1\n");
    let dev_block = sys.join("dev/block");
    fs::create_dir_all(&dev_block).unwrap();
    std::os::unix::fs::symlink("../../block/sda", dev_block.join("8:0")).unwrap();
    std::os::unix::fs::symlink("../../block/sda/sda1", dev_block.join("8:1")).unwrap();
    dev_block
}

fn every_limit() -> Limits {
    Limits {
        memory_bytes: Some(100 << 20),
        cpu_percent: Some(150),
        cores: Some(CpuList::new(vec![1])),
        pids: Some(64),
        io: vec![IoLimit {
            device: sda(),
            read_bps: Some(1 << 20),
            write_bps: None,
        }],
        timeout: None,
    }
}

/// A fake v2 hierarchy whose root delegates `controllers` to joblet's parent.
fn fake_v2(tmp: &Path, controllers: &str) -> (PathBuf, V2Driver) {
    let root = tmp.join("cgroup");
    let parent = root.join(PARENT_NAME);
    write(parent.join("cgroup.controllers"), controllers);
    write(parent.join("cgroup.subtree_control"), "");
    write(parent.join("cpuset.cpus.effective"), "0-1\n");
    write(parent.join("memory.swap.max"), "max\n");
    write(parent.join("memory.peak"), "0\n");
    let sys = fake_sys_dev_block(tmp);
    let driver = V2Driver::with_backing(&root, &sys, Backing::Plain).unwrap();
    (parent, driver)
}

#[test]
fn v2_parent_enables_only_delegated_controllers() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, _driver) = fake_v2(tmp.path(), "cpu memory pids hugetlb\n");
    assert_eq!(
        read(parent.join("cgroup.subtree_control")),
        "+cpu +memory +pids\n"
    );
}

#[test]
fn v2_parent_already_enabled_is_not_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("cgroup").join(PARENT_NAME);
    write(parent.join("cgroup.controllers"), "cpu memory\n");
    write(parent.join("cgroup.subtree_control"), "cpu memory\n");
    V2Driver::with_backing(&tmp.path().join("cgroup"), tmp.path(), Backing::Plain).unwrap();
    assert_eq!(read(parent.join("cgroup.subtree_control")), "cpu memory\n");
}

#[test]
fn v2_create_writes_every_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, driver) = fake_v2(tmp.path(), "cpu cpuset io memory pids\n");
    let limits = every_limit();
    driver.check(&limits).unwrap();
    let cg = driver.create("job1", &limits).unwrap();
    let dir = parent.join("job1");
    assert_eq!(cg.path(), dir);
    assert_eq!(cg.id(), fs::metadata(&dir).unwrap().ino());
    assert!(cg.join_procs().is_empty());
    assert_eq!(
        files(&dir),
        [
            "cpu.max",
            "cpuset.cpus",
            "io.max",
            "memory.max",
            "memory.swap.max",
            "pids.max"
        ]
    );
    assert_eq!(read(dir.join("memory.max")), "104857600\n");
    assert_eq!(read(dir.join("memory.swap.max")), "0\n");
    assert_eq!(read(dir.join("cpu.max")), "150000 100000\n");
    assert_eq!(read(dir.join("cpuset.cpus")), "1\n");
    assert_eq!(read(dir.join("pids.max")), "64\n");
    assert_eq!(read(dir.join("io.max")), "8:0 rbps=1048576 wbps=max\n");
    cg.remove().unwrap();
    assert!(!dir.exists());
    assert!(parent.exists());
}

#[test]
fn v2_create_without_limits_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, driver) = fake_v2(tmp.path(), "cpu cpuset io memory pids\n");
    let cg = driver.create("job2", &Limits::default()).unwrap();
    assert!(files(&parent.join("job2")).is_empty());
    cg.remove().unwrap();
}

#[test]
fn v2_io_limits_on_one_device_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, driver) = fake_v2(tmp.path(), "io\n");
    let limits = Limits {
        io: vec![
            IoLimit {
                device: sda(),
                read_bps: Some(10),
                write_bps: None,
            },
            IoLimit {
                device: sda(),
                read_bps: None,
                write_bps: Some(20),
            },
        ],
        ..Limits::default()
    };
    let cg = driver.create("job3", &limits).unwrap();
    assert_eq!(read(parent.join("job3/io.max")), "8:0 rbps=10 wbps=20\n");
    cg.remove().unwrap();
}

#[test]
fn v2_usage_reads_cpu_peak_and_oom_kills() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, driver) = fake_v2(tmp.path(), "memory\n");
    let cg = driver.create("job4", &Limits::default()).unwrap();
    let dir = parent.join("job4");
    write(
        dir.join("cpu.stat"),
        "usage_usec 3500\nuser_usec 2000\nsystem_usec 1500\nnr_periods 0\n",
    );
    write(dir.join("memory.peak"), "8192\n");
    write(
        dir.join("memory.events"),
        "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n",
    );
    assert_eq!(
        cg.usage().unwrap(),
        Usage {
            cpu_user_ns: 2_000_000,
            cpu_system_ns: 1_500_000,
            memory_peak_bytes: Some(8192),
            oom_kills: 2,
        }
    );
    cg.remove().unwrap();
}

#[test]
fn v2_usage_without_memory_controller_reports_cpu_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, driver) = fake_v2(tmp.path(), "cpu\n");
    let cg = driver.create("job5", &Limits::default()).unwrap();
    write(
        parent.join("job5/cpu.stat"),
        "usage_usec 3\nuser_usec 1\nsystem_usec 2\n",
    );
    let usage = cg.usage().unwrap();
    assert_eq!((usage.cpu_user_ns, usage.cpu_system_ns), (1000, 2000));
    assert_eq!(usage.memory_peak_bytes, None);
    assert_eq!(usage.oom_kills, 0);
    cg.remove().unwrap();
}

#[test]
fn usage_with_a_garbled_file_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, driver) = fake_v2(tmp.path(), "cpu\n");
    let cg = driver.create("job6", &Limits::default()).unwrap();
    write(parent.join("job6/cpu.stat"), "usage_usec 3\n");
    let err = cg.usage().unwrap_err();
    assert!(
        matches!(&err, CgroupError::Read { path, .. } if path.ends_with("job6/cpu.stat")),
        "{err:?}"
    );
    cg.remove().unwrap();
}

#[test]
fn v2_check_names_the_missing_controller_and_how_to_enable_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, driver) = fake_v2(tmp.path(), "cpu memory\n");
    let err = driver
        .check(&Limits {
            pids: Some(10),
            ..Limits::default()
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--pids") && err.contains("pids controller"),
        "{err}"
    );
    assert!(err.contains("echo +pids >"), "{err}");
    assert!(driver.check(&Limits::default()).is_ok());
}

#[test]
fn check_rejects_cpus_outside_the_parent_set() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, driver) = fake_v2(tmp.path(), "cpuset\n");
    let err = driver
        .check(&Limits {
            cores: Some(CpuList::new(vec![1, 99])),
            ..Limits::default()
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("CPU 99 ") && err.contains("available CPUs are 0-1"),
        "{err}"
    );
    driver
        .check(&Limits {
            cores: Some(CpuList::new(vec![0, 1])),
            ..Limits::default()
        })
        .unwrap();
}

#[test]
fn check_rejects_tiny_memory_and_zero_pids() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, driver) = fake_v2(tmp.path(), "memory pids\n");
    let tiny = Limits {
        memory_bytes: Some(4096),
        ..Limits::default()
    };
    assert!(
        driver
            .check(&tiny)
            .unwrap_err()
            .to_string()
            .contains("1 MiB")
    );
    let zero = Limits {
        pids: Some(0),
        ..Limits::default()
    };
    assert!(driver.check(&zero).is_err());
    let fine = Limits {
        memory_bytes: Some(MIN_MEMORY_BYTES),
        pids: Some(1),
        ..Limits::default()
    };
    driver.check(&fine).unwrap();
}

#[test]
fn check_rejects_missing_devices_and_partitions() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, driver) = fake_v2(tmp.path(), "io\n");
    let io = |major, minor| Limits {
        io: vec![IoLimit {
            device: DevNum { major, minor },
            read_bps: Some(1),
            write_bps: None,
        }],
        ..Limits::default()
    };
    let err = driver.check(&io(9, 9)).unwrap_err().to_string();
    assert!(err.contains("9:9 does not exist"), "{err}");
    let err = driver.check(&io(8, 1)).unwrap_err().to_string();
    assert!(
        err.contains("8:1 is a partition") && err.contains("disk 8:0"),
        "{err}"
    );
    driver.check(&io(8, 0)).unwrap();
}

#[test]
fn create_rejects_names_that_are_not_one_component() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, driver) = fake_v2(tmp.path(), "cpu\n");
    for name in ["", ".", "..", "../escape", "a/b"] {
        assert!(
            matches!(
                driver.create(name, &Limits::default()),
                Err(CgroupError::Create { .. })
            ),
            "{name:?}"
        );
    }
    assert!(!tmp.path().join("escape").exists());
}

#[test]
fn create_of_an_existing_job_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, driver) = fake_v2(tmp.path(), "cpu\n");
    let cg = driver.create("dup", &Limits::default()).unwrap();
    assert!(matches!(
        driver.create("dup", &Limits::default()),
        Err(CgroupError::Create { .. })
    ));
    cg.remove().unwrap();
}

struct FakeHybrid {
    unified: PathBuf,
    v1: Vec<(V1Controller, PathBuf)>,
    sys: PathBuf,
}

impl FakeHybrid {
    fn new(tmp: &Path, memsw: bool) -> FakeHybrid {
        let root = tmp.join("cgroup");
        fs::create_dir_all(root.join("unified")).unwrap();
        let mut v1 = Vec::new();
        for c in V1Controller::ALL {
            let mount = root.join(c.name());
            fs::create_dir_all(mount.join(PARENT_NAME)).unwrap();
            v1.push((c, mount));
        }
        let memory = root.join("memory").join(PARENT_NAME);
        write(memory.join("memory.max_usage_in_bytes"), "0\n");
        write(memory.join("memory.swappiness"), "60\n");
        if memsw {
            write(memory.join("memory.memsw.limit_in_bytes"), "-1\n");
        }
        write(root.join("cpuset/cpuset.cpus"), "0-1\n");
        write(root.join("cpuset/cpuset.mems"), "0\n");
        write(root.join("cpuset/joblet/cpuset.cpus"), "");
        write(root.join("cpuset/joblet/cpuset.mems"), "");
        FakeHybrid {
            unified: root.join("unified"),
            v1,
            sys: fake_sys_dev_block(tmp),
        }
    }

    fn driver(&self) -> HybridDriver {
        HybridDriver::with_backing(&self.unified, &self.v1, &self.sys, Backing::Plain).unwrap()
    }

    fn job(&self, c: &str, name: &str) -> PathBuf {
        self.unified
            .parent()
            .unwrap()
            .join(c)
            .join(PARENT_NAME)
            .join(name)
    }
}

#[test]
fn hybrid_cpuset_parent_gets_the_root_cpus_and_mems() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeHybrid::new(tmp.path(), true);
    fake.driver();
    let parent = fake.unified.parent().unwrap().join("cpuset/joblet");
    assert_eq!(read(parent.join("cpuset.cpus")), "0-1\n");
    assert_eq!(read(parent.join("cpuset.mems")), "0\n");
    assert_eq!(read(parent.join("cgroup.clone_children")), "1\n");
}

#[test]
fn hybrid_create_writes_every_limit_in_v1() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeHybrid::new(tmp.path(), true);
    let driver = fake.driver();
    let limits = every_limit();
    driver.check(&limits).unwrap();
    let cg = driver.create("h1", &limits).unwrap();
    let v2 = fake.unified.join("joblet/h1");
    assert_eq!(cg.path(), v2);
    assert_eq!(cg.id(), fs::metadata(&v2).unwrap().ino());
    assert!(
        files(&v2).is_empty(),
        "nothing is limited in v2 on a hybrid host"
    );
    // One join fd per v1 cgroup: memory, cpuset, cpu, pids, blkio.
    assert_eq!(cg.join_procs().len(), 5);

    let mem = fake.job("memory", "h1");
    assert_eq!(
        files(&mem),
        [
            "memory.limit_in_bytes",
            "memory.memsw.limit_in_bytes",
            "tasks"
        ]
    );
    assert_eq!(read(mem.join("memory.limit_in_bytes")), "104857600\n");
    assert_eq!(read(mem.join("memory.memsw.limit_in_bytes")), "104857600\n");
    let cpu = fake.job("cpu", "h1");
    assert_eq!(files(&cpu), ["cpu.cfs_quota_us", "tasks"]);
    assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "150000\n");
    // mems come from the parent through cgroup.clone_children.
    let cpuset = fake.job("cpuset", "h1");
    assert_eq!(files(&cpuset), ["cpuset.cpus", "tasks"]);
    assert_eq!(read(cpuset.join("cpuset.cpus")), "1\n");
    assert_eq!(read(fake.job("pids", "h1").join("pids.max")), "64\n");
    let blkio = fake.job("blkio", "h1");
    assert_eq!(files(&blkio), ["blkio.throttle.read_bps_device", "tasks"]);
    assert_eq!(
        read(blkio.join("blkio.throttle.read_bps_device")),
        "8:0 1048576\n"
    );

    cg.remove().unwrap();
    for c in V1Controller::ALL {
        assert!(!fake.job(c.name(), "h1").exists(), "{}", c.name());
    }
    assert!(!v2.exists());
}

#[test]
fn hybrid_without_limits_makes_only_v2_and_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeHybrid::new(tmp.path(), true);
    let cg = fake.driver().create("h2", &Limits::default()).unwrap();
    assert_eq!(cg.join_procs().len(), 1);
    assert!(fake.unified.join("joblet/h2").is_dir());
    // Only the tasks file the join fd opened: no limit written.
    assert_eq!(files(&fake.job("memory", "h2")), ["tasks"]);
    for c in ["cpu", "cpuset", "pids", "blkio"] {
        assert!(!fake.job(c, "h2").exists(), "{c}");
    }
    cg.remove().unwrap();
}

#[test]
fn hybrid_without_memsw_turns_swappiness_off() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeHybrid::new(tmp.path(), false);
    let limits = Limits {
        memory_bytes: Some(32 << 20),
        ..Limits::default()
    };
    let cg = fake.driver().create("h3", &limits).unwrap();
    let mem = fake.job("memory", "h3");
    assert_eq!(
        files(&mem),
        ["memory.limit_in_bytes", "memory.swappiness", "tasks"]
    );
    assert_eq!(read(mem.join("memory.swappiness")), "0\n");
    cg.remove().unwrap();
}

#[test]
fn hybrid_cpuset_without_clone_children_writes_mems() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeHybrid::new(tmp.path(), true);
    // A directory where the file should be makes the clone_children write fail.
    fs::create_dir_all(
        fake.unified
            .parent()
            .unwrap()
            .join("cpuset/joblet/cgroup.clone_children"),
    )
    .unwrap();
    let limits = Limits {
        cores: Some(CpuList::new(vec![0])),
        ..Limits::default()
    };
    let cg = fake.driver().create("h4", &limits).unwrap();
    let cpuset = fake.job("cpuset", "h4");
    assert_eq!(read(cpuset.join("cpuset.mems")), "0\n");
    assert_eq!(read(cpuset.join("cpuset.cpus")), "0\n");
    cg.remove().unwrap();
}

#[test]
fn hybrid_usage_reads_v2_cpu_and_v1_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeHybrid::new(tmp.path(), true);
    let cg = fake.driver().create("h5", &Limits::default()).unwrap();
    write(
        fake.unified.join("joblet/h5/cpu.stat"),
        "usage_usec 30\nuser_usec 10\nsystem_usec 20\n",
    );
    let mem = fake.job("memory", "h5");
    write(mem.join("memory.max_usage_in_bytes"), "1048576\n");
    write(
        mem.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    );
    assert_eq!(
        cg.usage().unwrap(),
        Usage {
            cpu_user_ns: 10_000,
            cpu_system_ns: 20_000,
            memory_peak_bytes: Some(1 << 20),
            oom_kills: 3,
        }
    );
    cg.remove().unwrap();
}

#[test]
fn hybrid_failed_create_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeHybrid::new(tmp.path(), true);
    // Another "h6" already in blkio: the last mkdir fails after four succeeded.
    fs::create_dir_all(fake.job("blkio", "h6")).unwrap();
    let err = fake.driver().create("h6", &every_limit()).unwrap_err();
    assert!(matches!(&err, CgroupError::Create { path, .. } if path.ends_with("blkio/joblet/h6")));
    assert!(!fake.unified.join("joblet/h6").exists());
    for c in ["memory", "cpu", "cpuset", "pids"] {
        assert!(!fake.job(c, "h6").exists(), "{c}");
    }
    assert!(fake.job("blkio", "h6").exists(), "not ours, left alone");
}

#[test]
fn hybrid_check_names_unmounted_controllers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut fake = FakeHybrid::new(tmp.path(), true);
    fake.v1.retain(|(c, _)| *c != V1Controller::Pids);
    let driver = fake.driver();
    let limits = Limits {
        pids: Some(5),
        ..Limits::default()
    };
    let err = driver.check(&limits).unwrap_err().to_string();
    assert!(err.contains("v1 pids controller"), "{err}");
    assert!(driver.create("h7", &limits).is_err());
    assert!(!fake.unified.join("joblet/h7").exists());
    let err = driver
        .check(&Limits {
            cores: Some(CpuList::new(vec![5])),
            ..Limits::default()
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("CPU 5 ") && err.contains("0-1"), "{err}");
}

#[test]
fn mountinfo_finds_v1_controllers_under_the_root() {
    let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:32 /sub /elsewhere/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:33 / /sys/fs/cgroup/my\\040pids rw - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /mnt/blkio rw,relatime - cgroup cgroup rw,blkio
";
    let found = v1_mounts(text, Path::new("/sys/fs/cgroup"));
    let p = |s: &str| PathBuf::from(s);
    assert_eq!(
        found,
        vec![
            (V1Controller::Cpu, p("/sys/fs/cgroup/cpu,cpuacct")),
            (V1Controller::Cpuset, p("/sys/fs/cgroup/cpuset")),
            (V1Controller::Memory, p("/sys/fs/cgroup/memory")),
            (V1Controller::Pids, p("/sys/fs/cgroup/my pids")),
        ]
    );
}

#[test]
fn cpu_stat_and_oom_parsing() {
    assert_eq!(
        parse_cpu_stat("usage_usec 5\nuser_usec 2\nsystem_usec 3\n"),
        Some((2000, 3000))
    );
    assert_eq!(parse_cpu_stat("usage_usec 5\n"), None);
    assert_eq!(parse_oom_kill("oom 1\noom_kill 4\n"), Some(4));
    assert_eq!(parse_oom_kill("oom 1\n"), None);
}

#[test]
fn detect_refuses_a_directory_that_is_no_cgroup() {
    let tmp = tempfile::tempdir().unwrap();
    let err = detect(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, CgroupError::Detect { reason, .. } if reason.contains("not a cgroup mount")),
        "{err}"
    );
}

#[test]
fn remove_is_idempotent_for_vanished_dirs() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, driver) = fake_v2(tmp.path(), "cpu\n");
    let cg = driver.create("gone", &Limits::default()).unwrap();
    fs::remove_dir(parent.join("gone")).unwrap();
    cg.remove().unwrap();
}

/// Makes a fake v2 job dir look like an emptied cgroup with `charged` bytes still charged.
fn fake_emptied(dir: &Path, charged: u64) {
    write(dir.join("cgroup.events"), "populated 0\nfrozen 0\n");
    write(dir.join("memory.current"), &format!("{charged}\n"));
    if !dir.join("memory.peak").exists() {
        write(dir.join("memory.peak"), &format!("{charged}\n"));
    }
}

fn fake_counters(dir: &Path, user_usec: u64, oom_kills: u64) {
    write(
        dir.join("cpu.stat"),
        &format!("usage_usec {user_usec}\nuser_usec {user_usec}\nsystem_usec 0\n"),
    );
    write(
        dir.join("memory.events"),
        &format!("oom {oom_kills}\noom_kill {oom_kills}\n"),
    );
}

#[test]
fn v2_pool_reuses_an_emptied_set_with_every_limit_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut driver) = fake_v2(tmp.path(), "cpu cpuset io memory pids\n");
    driver.set_pool(4).unwrap();
    let first = driver.create("job-a", &every_limit()).unwrap();
    assert!(first.reusable());
    let dir = first.path().to_owned();
    assert!(
        dir.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("pool-")
    );
    let id = first.id();
    fake_counters(&dir, 700, 2);
    write(dir.join("memory.peak"), "9000000\n");
    fake_emptied(&dir, 4096);
    first.remove().unwrap();
    assert!(dir.exists(), "an emptied set goes back to the pool");

    let limits = Limits {
        memory_bytes: Some(50 << 20),
        ..Limits::default()
    };
    let second = driver.create("job-b", &limits).unwrap();
    assert_eq!((second.path(), second.id()), (dir.as_path(), id));
    // Each file holds the history of writes: the first job's limits, then the resets.
    assert_eq!(read(dir.join("memory.max")), "104857600\n52428800\n");
    assert_eq!(
        read(dir.join("memory.swap.max")),
        "0\n",
        "still limited: no rewrite"
    );
    assert_eq!(read(dir.join("cpu.max")), "150000 100000\nmax 100000\n");
    assert_eq!(read(dir.join("cpuset.cpus")), "1\n\n");
    assert_eq!(read(dir.join("pids.max")), "64\nmax\n");
    assert_eq!(
        read(dir.join("io.max")),
        "8:0 rbps=1048576 wbps=max\n8:0 rbps=max wbps=max\n"
    );

    // Usage is what the second job did: deltas, and the peak above what was charged.
    fake_counters(&dir, 1000, 3);
    write(dir.join("memory.peak"), "1004096\n");
    assert_eq!(
        second.usage().unwrap(),
        Usage {
            cpu_user_ns: 300_000,
            cpu_system_ns: 0,
            memory_peak_bytes: Some(1_000_000),
            oom_kills: 1,
        }
    );
    second.remove().unwrap();
    driver.set_pool(0).unwrap();
    assert!(!dir.exists(), "dropping the pool removes what it holds");
}

#[test]
fn v2_pool_with_the_same_limits_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut driver) = fake_v2(tmp.path(), "cpu memory pids\n");
    driver.set_pool(1).unwrap();
    let limits = Limits {
        memory_bytes: Some(8 << 20),
        pids: Some(5),
        ..Limits::default()
    };
    let cg = driver.create("x", &limits).unwrap();
    let dir = cg.path().to_owned();
    fake_counters(&dir, 1, 0);
    fake_emptied(&dir, 0);
    cg.remove().unwrap();
    let cg = driver.create("y", &limits).unwrap();
    assert_eq!(cg.path(), dir);
    assert_eq!(read(dir.join("memory.max")), "8388608\n");
    assert_eq!(read(dir.join("pids.max")), "5\n");
    cg.remove().unwrap();
}

#[test]
fn v2_pool_removes_sets_still_populated_or_holding_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut driver) = fake_v2(tmp.path(), "memory\n");
    driver.set_pool(4).unwrap();

    let busy = driver.create("busy", &Limits::default()).unwrap();
    let busy_dir = busy.path().to_owned();
    fake_emptied(&busy_dir, 0);
    write(busy_dir.join("cgroup.events"), "populated 1\nfrozen 0\n");
    busy.remove().unwrap();
    assert!(!busy_dir.exists());

    // Charged beyond the leftover allowance, and the fake's reclaim frees nothing.
    let full = driver.create("full", &Limits::default()).unwrap();
    let full_dir = full.path().to_owned();
    let charged = pool::MAX_LEFTOVER_BYTES + 1;
    fake_emptied(&full_dir, charged);
    full.remove().unwrap();
    assert!(!full_dir.exists());
}

#[test]
fn pool_capacity_is_respected() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent, mut driver) = fake_v2(tmp.path(), "cpu\n");
    driver.set_pool(1).unwrap();
    let a = driver.create("a", &Limits::default()).unwrap();
    let b = driver.create("b", &Limits::default()).unwrap();
    assert_ne!(a.path(), b.path());
    for cg in [&a, &b] {
        fake_emptied(cg.path(), 0);
        write(cg.path().join("cpu.stat"), "user_usec 0\nsystem_usec 0\n");
    }
    a.remove().unwrap();
    b.remove().unwrap();
    let pooled: Vec<_> = files(&parent)
        .into_iter()
        .filter(|f| f.starts_with("pool-"))
        .collect();
    assert_eq!(pooled.len(), 1, "{pooled:?}");
}

#[test]
fn hybrid_pool_matches_sets_by_v1_controllers_and_resets_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeHybrid::new(tmp.path(), true);
    let mut driver = fake.driver();
    driver.set_pool(4).unwrap();
    let with_pids = Limits {
        memory_bytes: Some(64 << 20),
        pids: Some(10),
        ..Limits::default()
    };
    let cg = driver.create("j1", &with_pids).unwrap();
    let name = cg.path().file_name().unwrap().to_str().unwrap().to_owned();
    assert_eq!(cg.join_procs().len(), 2);
    let v2 = cg.path().to_owned();
    write(v2.join("cpu.stat"), "user_usec 5\nsystem_usec 5\n");
    write(v2.join("cgroup.events"), "populated 0\n");
    let mem = fake.job("memory", &name);
    write(mem.join("memory.usage_in_bytes"), "0\n");
    write(
        mem.join("memory.oom_control"),
        "oom_kill_disable 0\noom_kill 1\n",
    );
    cg.remove().unwrap();
    assert!(v2.exists() && mem.exists());

    // No pids limit: a set without a pids cgroup is needed, so a new one is made.
    let other = driver.create("j2", &Limits::default()).unwrap();
    assert_ne!(other.path(), v2);
    assert_eq!(other.join_procs().len(), 1);

    let again = Limits {
        memory_bytes: Some(128 << 20),
        pids: Some(20),
        ..Limits::default()
    };
    let cg = driver.create("j3", &again).unwrap();
    assert_eq!(cg.path(), v2);
    assert_eq!(cg.join_procs().len(), 2);
    assert_eq!(
        read(mem.join("memory.limit_in_bytes")),
        "67108864\n134217728\n"
    );
    assert_eq!(
        read(mem.join("memory.memsw.limit_in_bytes")),
        "67108864\n134217728\n"
    );
    assert_eq!(read(fake.job("pids", &name).join("pids.max")), "10\n20\n");
    assert_eq!(
        read(mem.join("memory.max_usage_in_bytes")),
        "0\n",
        "the peak is reset at hand-out"
    );
    assert_eq!(
        cg.usage().unwrap().oom_kills,
        0,
        "the first job's OOM kill is not ours"
    );
    cg.remove().unwrap();
    other.remove().unwrap();
    driver.set_pool(0).unwrap();
    assert!(!v2.exists() && !mem.exists());
}

/// Tests against this host's real hierarchy at `/sys/fs/cgroup` (root only).
mod real {
    use std::io::Write as _;
    use std::os::fd::OwnedFd;
    use std::process::{Command, Stdio};

    use super::*;
    use crate::testsupport::privileged;

    const ROOT: &str = "/sys/fs/cgroup";

    fn driver() -> Option<Box<dyn CgroupDriver>> {
        let mut driver = None;
        let ok = privileged("a cgroup v2 or hybrid hierarchy at /sys/fs/cgroup", || {
            driver = Some(detect(Path::new(ROOT)).map_err(|e| e.to_string())?);
            Ok(())
        });
        if ok { driver } else { None }
    }

    /// A name no other test (or concurrent run) uses.
    fn unique(tag: &str) -> String {
        format!("test-{}-{tag}", std::process::id())
    }

    /// Where the v1 hierarchies are, for reading files back.
    fn v1_dir(c: V1Controller, name: &str) -> PathBuf {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let (_, mount) = v1_mounts(&mountinfo, Path::new(ROOT))
            .into_iter()
            .find(|(f, _)| *f == c)
            .unwrap_or_else(|| panic!("{} is not mounted", c.name()));
        mount.join(PARENT_NAME).join(name)
    }

    /// The whole disk holding `/`.
    fn root_disk() -> DevNum {
        let dev = fs::metadata("/").unwrap().dev();
        let mut sys = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            rustix::fs::major(dev),
            rustix::fs::minor(dev)
        ));
        if sys.join("partition").exists() {
            sys = fs::canonicalize(sys.join("..")).unwrap();
        }
        crate::parse::dev_num(read(sys.join("dev")).trim()).unwrap()
    }

    /// Removes the cgroups if the test fails half way.
    struct Cleanup(Option<JobCgroup>);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(cg) = self.0.take() {
                let _ = cg.remove();
            }
        }
    }

    /// Kills our child if the test fails half way.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn write_pid(fd: &OwnedFd, pid: u32) {
        let text = pid.to_string();
        let n = rustix::io::write(fd, text.as_bytes()).expect("moving the child");
        assert_eq!(n, text.len());
    }

    /// Moves `pid` into every cgroup of the set, as the spawn code does for the child.
    fn move_into(cg: &JobCgroup, pid: u32) {
        write_pid(&cg.open_v2_procs().unwrap(), pid);
        for fd in cg.join_procs() {
            write_pid(fd, pid);
        }
    }

    /// A shell that waits for a line on stdin, then runs `script`.
    fn gated_shell(script: &str) -> Child {
        Child(
            Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("read _ && {script}"))
                .stdin(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    fn release(child: &mut Child) {
        child.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }

    fn assert_gone(name: &str, layout: Layout) {
        let v2_root = match layout {
            Layout::V2 => PathBuf::from(ROOT),
            Layout::Hybrid => Path::new(ROOT).join("unified"),
        };
        assert!(!v2_root.join(PARENT_NAME).join(name).exists());
        if layout == Layout::Hybrid {
            for c in V1Controller::ALL {
                let dir = v1_dir(c, name);
                assert!(!dir.exists(), "{} left behind", dir.display());
            }
        }
    }

    #[test]
    fn every_limit_is_applied_and_a_process_joins_every_cgroup() {
        let Some(driver) = driver() else { return };
        let name = unique("limits");
        let disk = root_disk();
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_percent: Some(50),
            cores: Some(CpuList::new(vec![0])),
            pids: Some(32),
            io: vec![IoLimit {
                device: disk,
                read_bps: Some(1 << 20),
                write_bps: Some(2 << 20),
            }],
            timeout: None,
        };
        driver.check(&limits).unwrap();
        let mut cleanup = Cleanup(Some(driver.create(&name, &limits).unwrap()));
        let cg = cleanup.0.as_ref().unwrap();
        assert_eq!(cg.id(), fs::metadata(cg.path()).unwrap().ino());

        match driver.layout() {
            Layout::Hybrid => {
                assert_eq!(
                    cg.path(),
                    Path::new(ROOT).join("unified/joblet").join(&name)
                );
                let mem = v1_dir(V1Controller::Memory, &name);
                assert_eq!(read(mem.join("memory.limit_in_bytes")).trim(), "67108864");
                if mem.join("memory.memsw.limit_in_bytes").exists() {
                    assert_eq!(
                        read(mem.join("memory.memsw.limit_in_bytes")).trim(),
                        "67108864"
                    );
                }
                let cpu = v1_dir(V1Controller::Cpu, &name);
                assert_eq!(read(cpu.join("cpu.cfs_quota_us")).trim(), "50000");
                assert_eq!(read(cpu.join("cpu.cfs_period_us")).trim(), "100000");
                let cpuset = v1_dir(V1Controller::Cpuset, &name);
                assert_eq!(read(cpuset.join("cpuset.cpus")).trim(), "0");
                assert!(!read(cpuset.join("cpuset.mems")).trim().is_empty());
                let pids = v1_dir(V1Controller::Pids, &name);
                assert_eq!(read(pids.join("pids.max")).trim(), "32");
                let blkio = v1_dir(V1Controller::Blkio, &name);
                assert_eq!(
                    read(blkio.join("blkio.throttle.read_bps_device")).trim(),
                    format!("{disk} 1048576")
                );
                assert_eq!(
                    read(blkio.join("blkio.throttle.write_bps_device")).trim(),
                    format!("{disk} 2097152")
                );
            }
            Layout::V2 => {
                let dir = cg.path();
                assert_eq!(read(dir.join("memory.max")).trim(), "67108864");
                assert_eq!(read(dir.join("cpu.max")).trim(), "50000 100000");
                assert_eq!(read(dir.join("cpuset.cpus")).trim(), "0");
                assert_eq!(read(dir.join("pids.max")).trim(), "32");
                assert!(
                    read(dir.join("io.max")).contains(&format!("{disk} rbps=1048576 wbps=2097152"))
                );
            }
        }

        let mut child = Child(Command::new("sleep").arg("1000").spawn().unwrap());
        let pid = child.0.id();
        move_into(cg, pid);
        let membership = read(format!("/proc/{pid}/cgroup"));
        let suffix = format!("/{PARENT_NAME}/{name}");
        assert!(
            membership.lines().any(|l| l == format!("0::{suffix}")),
            "{membership}"
        );
        if driver.layout() == Layout::Hybrid {
            for c in V1Controller::ALL {
                assert!(
                    membership.lines().any(|l| {
                        let mut f = l.splitn(3, ':');
                        let (_, ctrls, path) = (f.next(), f.next().unwrap(), f.next().unwrap());
                        ctrls.split(',').any(|x| x == c.name()) && path == suffix
                    }),
                    "not in the {} cgroup: {membership}",
                    c.name()
                );
            }
        }
        assert_eq!(read(cg.path().join("cgroup.procs")).trim(), pid.to_string());

        child.0.kill().unwrap();
        child.0.wait().unwrap();
        cleanup.0.take().unwrap().remove().unwrap();
        assert_gone(&name, driver.layout());
    }

    #[test]
    fn usage_counts_cpu_and_peak_memory() {
        let Some(driver) = driver() else { return };
        let name = unique("usage");
        let mut cleanup = Cleanup(Some(driver.create(&name, &Limits::default()).unwrap()));
        let cg = cleanup.0.as_ref().unwrap();
        let mut child = gated_shell("i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done");
        move_into(cg, child.0.id());
        release(&mut child);
        assert!(child.0.wait().unwrap().success());
        let usage = cg.usage().unwrap();
        assert!(
            usage.cpu_user_ns + usage.cpu_system_ns > 10_000_000,
            "a 300k-iteration shell loop took more than 10 ms of CPU: {usage:?}"
        );
        assert!(
            usage.memory_peak_bytes.is_some_and(|p| p > 100 << 10),
            "{usage:?}"
        );
        assert_eq!(usage.oom_kills, 0);
        cleanup.0.take().unwrap().remove().unwrap();
        assert_gone(&name, driver.layout());
    }

    #[test]
    fn exceeding_the_memory_limit_is_an_oom_kill_counted_in_usage() {
        let Some(driver) = driver() else { return };
        let name = unique("oom");
        let limits = Limits {
            memory_bytes: Some(16 << 20),
            ..Limits::default()
        };
        let mut cleanup = Cleanup(Some(driver.create(&name, &limits).unwrap()));
        let cg = cleanup.0.as_ref().unwrap();
        // dd fills a 64 MiB buffer: four times the limit.
        let mut child = gated_shell("exec dd if=/dev/zero of=/dev/null bs=64M count=1");
        move_into(cg, child.0.id());
        release(&mut child);
        let status = child.0.wait().unwrap();
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        let usage = cg.usage().unwrap();
        assert!(usage.oom_kills >= 1, "{usage:?}");
        assert!(
            usage
                .memory_peak_bytes
                .is_some_and(|p| p <= 16 << 20 && p > 8 << 20),
            "{usage:?}"
        );
        cleanup.0.take().unwrap().remove().unwrap();
        assert_gone(&name, driver.layout());
    }

    #[test]
    fn a_pooled_set_is_reused_without_the_previous_jobs_limits_or_usage() {
        let Some(mut driver) = driver() else { return };
        if let Err(e) = driver.set_pool(4) {
            // Pure v2 before 6.12 cannot reset memory.peak, so pooling is refused there.
            assert_eq!(driver.layout(), Layout::V2, "{e}");
            assert!(e.to_string().contains("6.12"), "{e}");
            eprintln!("pooling refused on this kernel, as it must be: {e}");
            return;
        }
        let first_limits = Limits {
            memory_bytes: Some(16 << 20),
            pids: Some(32),
            ..Limits::default()
        };
        let mut first = Cleanup(Some(driver.create("unused", &first_limits).unwrap()));
        let cg = first.0.as_ref().unwrap();
        assert!(cg.reusable());
        let (path, id) = (cg.path().to_owned(), cg.id());
        // The first job is OOM-killed and uses some CPU.
        let mut child = gated_shell(
            "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; \
             exec dd if=/dev/zero of=/dev/null bs=64M count=1",
        );
        move_into(cg, child.0.id());
        release(&mut child);
        child.0.wait().unwrap();
        drop(child);
        let used = cg.usage().unwrap();
        assert!(used.oom_kills >= 1 && used.cpu_user_ns > 0, "{used:?}");
        first.0.take().unwrap().remove().unwrap();
        assert!(path.exists(), "the emptied set is pooled");

        let second_limits = Limits {
            pids: Some(8),
            ..Limits::default()
        };
        let mut second = Cleanup(Some(driver.create("unused", &second_limits).unwrap()));
        let cg = second.0.as_ref().unwrap();
        assert_eq!((cg.path(), cg.id()), (path.as_path(), id), "reused");
        let name = path.file_name().unwrap().to_str().unwrap();
        if driver.layout() == Layout::Hybrid {
            let mem = v1_dir(V1Controller::Memory, name);
            let unlimited = read(mem.join("memory.limit_in_bytes"));
            assert!(
                unlimited.trim().parse::<u64>().unwrap() > 1 << 60,
                "{unlimited}"
            );
            assert_eq!(
                read(v1_dir(V1Controller::Pids, name).join("pids.max")).trim(),
                "8"
            );
        } else {
            assert_eq!(read(path.join("memory.max")).trim(), "max");
            assert_eq!(read(path.join("pids.max")).trim(), "8");
        }
        let fresh = cg.usage().unwrap();
        assert_eq!(
            (fresh.cpu_user_ns, fresh.cpu_system_ns, fresh.oom_kills),
            (0, 0, 0)
        );
        assert!(
            fresh
                .memory_peak_bytes
                .is_some_and(|p| p <= pool::MAX_LEFTOVER_BYTES),
            "{fresh:?}"
        );

        // The second job's own usage is counted.
        let mut child = gated_shell("i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done");
        move_into(cg, child.0.id());
        release(&mut child);
        assert!(child.0.wait().unwrap().success());
        let used = cg.usage().unwrap();
        assert!(
            used.cpu_user_ns + used.cpu_system_ns > 0 && used.oom_kills == 0,
            "{used:?}"
        );
        second.0.take().unwrap().remove().unwrap();
        driver.set_pool(0).unwrap();
        assert_gone(name, driver.layout());
    }

    #[test]
    fn detect_matches_the_mount_table() {
        let Some(driver) = driver() else { return };
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let cgroup2_at = |dir: &str| {
            mountinfo
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(dir) && l.contains(" - cgroup2 "))
        };
        let expected = if cgroup2_at(ROOT) {
            Layout::V2
        } else {
            assert!(cgroup2_at("/sys/fs/cgroup/unified"), "{mountinfo}");
            Layout::Hybrid
        };
        assert_eq!(driver.layout(), expected);
    }

    #[test]
    fn check_refuses_cpus_the_host_does_not_have() {
        let Some(driver) = driver() else { return };
        let err = driver
            .check(&Limits {
                cores: Some(CpuList::new(vec![4095])),
                ..Limits::default()
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CPU 4095 ") && err.contains("available CPUs are"),
            "{err}"
        );
    }
}

#[test]
fn cgroup_sets_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<JobCgroup>();
    send_sync::<V2Driver>();
    send_sync::<HybridDriver>();
}
