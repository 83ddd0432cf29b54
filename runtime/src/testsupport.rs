//! Helpers shared by joblet's tests (unit, integration, xtask lanes). Not part of the API.

/// The privileged-test gate.
///
/// Returns `true` when the test can run: the process is root and `feature` (a short description
/// such as `"cgroup v2"`) is available according to `available`. Otherwise: when
/// `JOBLET_REQUIRE_PRIVILEGED=1` (set in CI) the test fails loudly with `reason`; elsewhere it
/// prints why it skipped and returns `false`.
pub fn privileged(feature: &str, available: impl FnOnce() -> Result<(), String>) -> bool {
    let reason = if !rustix::process::geteuid().is_root() {
        Err("not running as root".to_owned())
    } else {
        available()
    };
    match reason {
        Ok(()) => true,
        Err(why) => {
            if std::env::var_os("JOBLET_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1") {
                panic!("privileged test needs {feature} but {why} (JOBLET_REQUIRE_PRIVILEGED=1)");
            }
            eprintln!("skipping privileged test: needs {feature} but {why}");
            false
        }
    }
}

/// Shorthand for tests that only need root.
pub fn root() -> bool {
    privileged("root", || Ok(()))
}

/// The spawn benchmark's baseline: runs `path` (no arguments, empty environment) with
/// `clone3(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)` + `execve` and no isolation at all, and waits
/// for it through its pidfd. Returns the exit code.
pub fn bare_spawn_wait(path: &std::ffi::CStr) -> std::io::Result<i32> {
    baseline_spawn_wait(path, 0, None)
}

/// The spawn benchmark's "namespaces + cgroup" floor: like [`bare_spawn_wait`], with the job's
/// namespace set (`CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS`) and born in the
/// cgroup v2 directory `cgroup` (`CLONE_INTO_CGROUP`), and nothing else: no root, no
/// privilege drop, no seccomp, no accounting. The cheapest spawn with the same kernel objects
/// per job as a joblet job.
pub fn ns_cgroup_spawn_wait(
    path: &std::ffi::CStr,
    cgroup: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<i32> {
    use crate::sys::clone3::{CLONE_NEWIPC, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUTS};
    baseline_spawn_wait(
        path,
        CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS,
        Some(cgroup),
    )
}

fn baseline_spawn_wait(
    path: &std::ffi::CStr,
    flags: u64,
    cgroup: Option<std::os::fd::BorrowedFd<'_>>,
) -> std::io::Result<i32> {
    use crate::sys::misc::CStringArray;
    thread_local! {
        static STACK: std::cell::RefCell<Option<crate::sys::clone3::Stack>> =
            const { std::cell::RefCell::new(None) };
    }
    let argv = CStringArray::new(vec![path.to_owned()]);
    let envp = CStringArray::new(Vec::new());
    let pidfd = STACK.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(crate::sys::clone3::Stack::new(64 * 1024)?);
        }
        let stack = slot.as_mut().expect("stack just created");
        crate::sys::clone3::clone3_baseline_exec(stack, flags, cgroup, path, &argv, &envp)
    })?;
    let st = rustix::process::waitid(
        rustix::process::WaitId::PidFd(std::os::fd::AsFd::as_fd(&pidfd)),
        rustix::process::WaitIdOptions::EXITED,
    )?
    .ok_or_else(|| std::io::Error::other("waitid returned no status"))?;
    Ok(st
        .exit_status()
        .unwrap_or(128 + st.terminating_signal().unwrap_or(0)))
}

/// How many times slower than native this machine runs processes, from `JOBLET_TEST_SLOW`
/// (`cargo xtask vm-test` sets 50: the guest is emulated); 1 when unset or invalid.
pub fn slow_factor() -> u32 {
    parse_slow_factor(std::env::var("JOBLET_TEST_SLOW").ok().as_deref())
}

fn parse_slow_factor(value: Option<&str>) -> u32 {
    value
        .and_then(|v| v.trim().parse().ok())
        .filter(|&f| f > 0)
        .unwrap_or(1)
}

/// `base` scaled by [`slow_factor`]: use it for every deadline a test waits on, so the same test
/// passes natively and under emulation.
pub fn timeout(base: std::time::Duration) -> std::time::Duration {
    base.saturating_mul(slow_factor())
}

/// Whether the tests run in the VM lane (`JOBLET_TEST_LANE=vm`, set by `cargo xtask vm-test`),
/// whose guest is known to be pure cgroup v2 with every controller delegated.
pub fn in_vm_lane() -> bool {
    std::env::var_os("JOBLET_TEST_LANE").is_some_and(|v| v == "vm")
}

/// Busy time of every CPU so far, in clock ticks (`USER_HZ`): /proc/stat's `cpu` line without
/// idle and iowait (user, nice, system, irq, softirq, steal). For benchmarks' CPU per job,
/// kernel threads included.
pub fn host_busy_ticks() -> std::io::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let invalid =
        || std::io::Error::new(std::io::ErrorKind::InvalidData, "/proc/stat: bad cpu line");
    let cpu = stat.lines().next().ok_or_else(invalid)?;
    cpu.split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|&(i, _)| i != 3 && i != 4)
        .map(|(_, f)| f.parse::<u64>().map_err(|_| invalid()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_busy_ticks_counts_up_while_this_test_spins() {
        let before = host_busy_ticks().expect("read /proc/stat");
        let spin_until = std::time::Instant::now() + std::time::Duration::from_millis(50);
        while std::time::Instant::now() < spin_until {
            std::hint::spin_loop();
        }
        // 50 ms of busy CPU is 5 ticks at USER_HZ 100; allow for tick granularity.
        let after = host_busy_ticks().expect("read /proc/stat");
        assert!(after >= before + 3, "{before} -> {after}");
    }

    #[test]
    fn slow_factor_defaults_to_one() {
        assert_eq!(parse_slow_factor(None), 1);
        assert_eq!(parse_slow_factor(Some("50")), 50);
        assert_eq!(parse_slow_factor(Some("0")), 1);
        assert_eq!(parse_slow_factor(Some("fast")), 1);
    }
}
