//! The child's side of a spawn: everything between `clone3` and `execve`.
//!
//! This code runs on a private stack while sharing the parent's memory (`CLONE_VM |
//! CLONE_VFORK`), so it must be async-signal-safe: it only reads the [`ChildPlan`] prepared by the
//! parent, makes raw syscalls, and never allocates, locks or panics. The first failure is written
//! to the error pipe as a [`Failure`] and the child exits; on success `execve` closes the pipe
//! (it is close-on-exec) and the parent reads EOF.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::io::Errno;
use rustix::process::{Resource, Rlimit};
use rustix::thread::{CapabilitySet, CapabilitySets};

use crate::rootfs::MountOp;
use crate::sys;
use crate::sys::misc::CStringArray;

/// Declares [`Step`] from one table: each step and its description, so the list, the decoding
/// and the messages cannot drift apart.
macro_rules! steps {
    ($($name:ident => $what:literal,)*) => {
        /// Which step of the child's setup failed. The numbering (declaration order) is internal
        /// to one joblet binary: parent and child are the same program.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        pub(crate) enum Step {
            $($name,)*
        }

        impl Step {
            const ALL: &'static [Step] = &[$(Step::$name,)*];

            /// Human description, read after "failed to".
            pub(crate) fn describe(self) -> &'static str {
                match self {
                    $(Step::$name => $what,)*
                }
            }
        }
    };
}

steps! {
    ResetSignals => "reset signal dispositions",
    JoinCgroup => "join the job's v1 cgroups",
    CgroupNamespace => "enter a new cgroup namespace",
    Mount => "set up the job's filesystem",
    Hostname => "set the hostname",
    Loopback => "bring up loopback in the new network namespace",
    Rlimit => "set resource limits",
    Stdio => "set up stdin/stdout/stderr",
    CloseFds => "close inherited file descriptors",
    Workdir => "enter the working directory",
    SetGroups => "drop supplementary groups",
    SetGid => "set the group id",
    SetUid => "set the user id",
    KeepCaps => "keep capabilities across the user change",
    Capabilities => "set capabilities",
    AmbientCaps => "raise ambient capabilities",
    ParentDeathSignal => "set the parent-death signal",
    NoNewPrivs => "set no_new_privs",
    Seccomp => "install the seccomp filter",
    Exec => "execute the command",
    RootTemplate => "enter the root template's mount namespace",
}

impl Step {
    pub(crate) fn from_u32(v: u32) -> Option<Step> {
        Step::ALL.get(v as usize).copied()
    }
}

/// What the child reports through the error pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) step: Step,
    /// Index of the failing mount op for [`Step::Mount`], or of the cgroup fd.
    pub(crate) index: u32,
    pub(crate) errno: i32,
}

impl Failure {
    pub(crate) const SIZE: usize = 12;

    fn encode(step: Step, index: u32, errno: Errno) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&(step as u32).to_ne_bytes());
        b[4..8].copy_from_slice(&index.to_ne_bytes());
        b[8..12].copy_from_slice(&errno.raw_os_error().to_ne_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; Self::SIZE]) -> Option<Failure> {
        let word = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        Some(Failure {
            step: Step::from_u32(u32::from_ne_bytes(word(0)))?,
            index: u32::from_ne_bytes(word(4)),
            errno: i32::from_ne_bytes(word(8)),
        })
    }
}

/// How the command is executed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Program<'a> {
    /// Try each path in order, like `execvp` (the `PATH` lookup done in the parent).
    Paths(&'a [CString]),
    /// Execute this file descriptor (joblet's own binary as the job's init).
    Fd(BorrowedFd<'a>),
}

/// Everything the child needs, prepared by the parent before `clone3`.
#[derive(Debug)]
pub(crate) struct ChildPlan<'a> {
    pub(crate) err_pipe: BorrowedFd<'a>,
    pub(crate) join_procs: Vec<BorrowedFd<'a>>,
    /// The root template's mount namespace: the child copies it instead of building the root
    /// (`mounts` then holds only the per-job mounts, with absolute paths).
    pub(crate) root_template: Option<BorrowedFd<'a>>,
    /// `PR_SET_PDEATHSIG(SIGKILL)`: the job dies with the thread that spawned it.
    pub(crate) parent_death_kill: bool,
    pub(crate) mounts: &'a [MountOp],
    pub(crate) hostname: &'a [u8],
    pub(crate) loopback: bool,
    pub(crate) stdio: [BorrowedFd<'a>; 3],
    pub(crate) workdir: &'a CString,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) caps: CapabilitySet,
    pub(crate) seccomp: Option<&'a seccompiler::BpfProgram>,
    pub(crate) program: Program<'a>,
    pub(crate) argv: &'a CStringArray,
    pub(crate) envp: &'a CStringArray,
}

/// Highest capability number this code knows (`CAP_CHECKPOINT_RESTORE`, Linux 5.9).
const CAP_LAST: u32 = 40;

/// The child's entry point. Returns only on failure, with the process exit code.
pub(crate) fn run(plan: &ChildPlan<'_>) -> i32 {
    match setup_and_exec(plan) {
        Ok(never) => match never {},
        Err((step, index, errno)) => {
            let msg = Failure::encode(step, index, errno);
            // Best effort: if the pipe is gone the parent sees a child that exited 125.
            let _ = rustix::io::write(plan.err_pipe, &msg);
            125
        }
    }
}

type StepResult<T> = Result<T, (Step, u32, Errno)>;

fn at<T>(step: Step, r: Result<T, Errno>) -> StepResult<T> {
    r.map_err(|e| (step, 0, e))
}

enum Never {}

fn setup_and_exec(plan: &ChildPlan<'_>) -> StepResult<Never> {
    at(Step::ResetSignals, sys::signal::child_reset_all())?;

    // Join the v1 cgroups (hybrid hosts) before entering the cgroup namespace, so that the
    // namespace's root is the job's own cgroup in every hierarchy.
    for (i, fd) in plan.join_procs.iter().enumerate() {
        rustix::io::write(*fd, b"0").map_err(|e| (Step::JoinCgroup, i as u32, e))?;
    }
    match plan.root_template {
        Some(ns) => {
            // The template namespace is shared by every job: the child only passes through
            // it, and makes its own copy (whose root is the template root) before mounting.
            at(
                Step::RootTemplate,
                rustix::thread::move_into_link_name_space(
                    ns,
                    Some(rustix::thread::LinkNameSpaceType::Mount),
                ),
            )?;
            at(
                Step::CgroupNamespace,
                sys::misc::unshare_mount_and_cgroup_ns(),
            )?;
        }
        None => at(Step::CgroupNamespace, sys::misc::unshare_cgroup_ns())?,
    }

    // Device nodes and mount points get exactly the modes asked for.
    rustix::process::umask(rustix::fs::Mode::empty());
    for (i, op) in plan.mounts.iter().enumerate() {
        op.run().map_err(|e| (Step::Mount, i as u32, e))?;
    }
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));

    at(Step::Hostname, rustix::system::sethostname(plan.hostname))?;
    if plan.loopback {
        at(Step::Loopback, sys::misc::loopback_up())?;
    }
    at(Step::Rlimit, set_rlimits())?;
    at(Step::Stdio, setup_stdio(&plan.stdio))?;
    at(Step::CloseFds, sys::misc::cloexec_from(3))?;
    at(
        Step::Workdir,
        rustix::process::chdir(plan.workdir.as_c_str()),
    )?;

    drop_privileges(plan)?;
    if plan.parent_death_kill {
        // After the uid change, which clears the setting. The parent thread is suspended until
        // exec (vfork), so it cannot die unnoticed before this call.
        at(
            Step::ParentDeathSignal,
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)),
        )?;
    }

    at(Step::NoNewPrivs, rustix::thread::set_no_new_privs(true))?;
    if let Some(filter) = plan.seccomp {
        at(Step::Seccomp, crate::seccomp::install(filter))?;
    }
    exec(plan)
}

fn set_rlimits() -> Result<(), Errno> {
    // No core dumps of jobs onto the host (core_pattern may pipe to a host helper).
    rustix::process::setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    let nofile = rustix::process::getrlimit(Resource::Nofile);
    let max = nofile.maximum.map_or(65536, |m| m.min(65536));
    rustix::process::setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(max.min(1024)),
            maximum: Some(max),
        },
    )
}

/// Installs the three stdio fds as 0, 1, 2 without the close-on-exec flag.
fn setup_stdio(fds: &[BorrowedFd<'_>; 3]) -> Result<(), Errno> {
    // A source fd below 3 that is not already in place could be overwritten by an earlier dup2:
    // move such sources above 2 first.
    let mut raised: [Option<rustix::fd::OwnedFd>; 3] = [None, None, None];
    for (i, fd) in fds.iter().enumerate() {
        let raw = fd.as_raw_fd();
        if raw < 3 && raw != i as i32 {
            raised[i] = Some(rustix::io::fcntl_dupfd_cloexec(fd, 3)?);
        }
    }
    for (i, fd) in fds.iter().enumerate() {
        let src = match &raised[i] {
            Some(o) => rustix::fd::AsFd::as_fd(o),
            None => *fd,
        };
        if src.as_raw_fd() == i as i32 {
            rustix::io::fcntl_setfd(src, rustix::io::FdFlags::empty())?;
        } else {
            match i {
                0 => rustix::stdio::dup2_stdin(src)?,
                1 => rustix::stdio::dup2_stdout(src)?,
                _ => rustix::stdio::dup2_stderr(src)?,
            }
        }
    }
    Ok(())
}

fn drop_privileges(plan: &ChildPlan<'_>) -> StepResult<()> {
    use rustix::thread as t;
    // The bounding set loses everything not kept: no later exec can regain it.
    for cap in 0..=CAP_LAST {
        let bit = CapabilitySet::from_bits_retain(1u64 << cap);
        if plan.caps.contains(bit) {
            continue;
        }
        match t::remove_capability_from_bounding_set(bit) {
            Ok(()) | Err(Errno::INVAL) => {} // EINVAL: this kernel has no such capability
            Err(e) => return Err((Step::Capabilities, cap, e)),
        }
    }
    at(Step::AmbientCaps, t::clear_ambient_capability_set())?;
    let keep = !plan.caps.is_empty() && plan.uid != 0;
    if keep {
        at(Step::KeepCaps, t::set_keep_capabilities(true))?;
    }
    at(Step::SetGroups, t::set_thread_groups(&[]))?;
    let gid = rustix::process::Gid::from_raw(plan.gid);
    at(Step::SetGid, t::set_thread_res_gid(gid, gid, gid))?;
    let uid = rustix::process::Uid::from_raw(plan.uid);
    at(Step::SetUid, t::set_thread_res_uid(uid, uid, uid))?;
    at(
        Step::Capabilities,
        t::set_capabilities(
            None,
            CapabilitySets {
                effective: plan.caps,
                permitted: plan.caps,
                inheritable: plan.caps,
            },
        ),
    )?;
    if keep {
        for cap in 0..=CAP_LAST {
            let bit = CapabilitySet::from_bits_retain(1u64 << cap);
            if plan.caps.contains(bit) {
                t::configure_capability_in_ambient_set(bit, true)
                    .map_err(|e| (Step::AmbientCaps, cap, e))?;
            }
        }
        at(Step::KeepCaps, t::set_keep_capabilities(false))?;
    }
    Ok(())
}

fn exec(plan: &ChildPlan<'_>) -> StepResult<Never> {
    match &plan.program {
        Program::Fd(fd) => {
            let e = sys::misc::exec_fd(*fd, plan.argv, plan.envp);
            Err((Step::Exec, 0, e))
        }
        Program::Paths(paths) => {
            // execvp semantics: ENOENT/ENOTDIR move on to the next PATH entry; EACCES is
            // remembered (a later entry may still work); anything else stops the search.
            let mut saw_eacces = false;
            let mut last = Errno::NOENT;
            for p in *paths {
                let e = sys::misc::exec_path(p, plan.argv, plan.envp);
                match e {
                    Errno::NOENT | Errno::NOTDIR => last = Errno::NOENT,
                    Errno::ACCESS => saw_eacces = true,
                    other => return Err((Step::Exec, 0, other)),
                }
            }
            Err((Step::Exec, 0, if saw_eacces { Errno::ACCESS } else { last }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_round_trips_through_the_pipe_encoding() {
        for &step in Step::ALL {
            let bytes = Failure::encode(step, 7, Errno::NOENT);
            let want = Failure {
                step,
                index: 7,
                errno: libc::ENOENT,
            };
            assert_eq!(Failure::decode(&bytes), Some(want), "{step:?}");
        }
        assert_eq!(Failure::decode(&[0xff; Failure::SIZE]), None);
    }
}
