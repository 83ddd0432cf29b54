//! Spawning and supervising one job.
//!
//! [`Runtime`] holds what is probed once per process (cgroup driver, host layout, seccomp
//! filter). [`Runtime::spawn`] creates the job's cgroups, prepares the child's whole plan (mount
//! ops, argv, envp, fds) and makes **one** `clone3` call with
//! `CLONE_VM | CLONE_VFORK | CLONE_PIDFD | CLONE_INTO_CGROUP | CLONE_NEWPID | CLONE_NEWNS |
//! CLONE_NEWIPC | CLONE_NEWUTS` (+ `CLONE_NEWNET` for `--network none`). The child (see
//! `child`) finishes the setup and execs; the parent learns of any failure through a
//! close-on-exec pipe. From then on the job is known only by its pidfd ([`Job`]): signals go
//! through `pidfd_send_signal`, the exit through `waitid(P_PIDFD)`, never through a pid that
//! could be reused.
//!
//! The step-by-step sequence, its fallbacks and why are in `docs/design/spawn.md`.

pub(crate) mod child;
mod template;

use std::cell::RefCell;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};

use crate::cgroup::{CgroupDriver, CgroupError, JobCgroup};
use crate::job::{JobRecord, JobSpec, JobState, NetworkMode, RuntimeInfo};
use crate::rootfs::{self, HostLayout, MountOp, RootfsError};
use crate::sys;
use crate::sys::clone3::{CloneArgs, Stack};
use crate::sys::misc::CStringArray;
use child::{ChildPlan, Failure, Program, Step};

/// The `PATH` a job gets unless `--env PATH=...` says otherwise.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `argv[0]` under which joblet's own binary runs as a job's init (`--init`).
pub const INIT_ARGV0: &str = "joblet-init";

/// Stack size of the vfork-style child. Its code is a flat sequence of syscalls.
const CHILD_STACK: usize = 64 * 1024;

/// Errors of spawning and supervising a job.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The job's specification is invalid (bad option values, missing paths).
    #[error("{0}")]
    Invalid(String),
    /// The root filesystem could not be planned.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// A cgroup operation failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The seccomp filter could not be built.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// A syscall in the parent failed.
    #[error("failed to {op}")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The command could not be executed (`errno` ENOENT: not found; EACCES and others: not
    /// executable).
    #[error("failed to execute {program:?}")]
    Exec {
        /// The command.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The shared root template could not be built.
    #[error("failed to {what} in the root template")]
    Template {
        /// The failed step, described.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A setup step in the child failed.
    #[error("failed to {what} for job {job}")]
    Setup {
        /// The job.
        job: String,
        /// The failed step, described.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl SpawnError {
    /// The exit code `joblet run` reports, following docker: 127 command not found, 126 command
    /// not executable, 125 joblet itself failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::Exec { source, .. } => match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => 127,
                _ => 126,
            },
            _ => 125,
        }
    }
}

fn sys_err(op: &'static str) -> impl FnOnce(Errno) -> SpawnError {
    move |e| SpawnError::Sys {
        op,
        source: e.into(),
    }
}

/// Runtime settings.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// The cgroup filesystem root (normally `/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// joblet's state directory (default `/var/lib/joblet`); the job root is staged below it.
    pub state_dir: PathBuf,
    /// How many emptied cgroup sets to keep for reuse (0: a fresh set per job). Worth it for
    /// long-lived processes that spawn many jobs (the daemon, benchmarks); see `cgroup::pool`.
    pub cgroup_pool: usize,
    /// Build the static part of the minimal root once per runtime and copy it into each job
    /// (see `docs/design/spawn.md`, "Root template"). Worth it for processes that spawn more
    /// than one job; a one-shot `joblet run` builds the root in the job itself.
    pub root_template: bool,
    /// Kill a job (SIGKILL to its PID 1, so its whole PID namespace) if the thread that spawned
    /// it dies: for a foreground `joblet run`, whose jobs must not outlive it. A daemon that
    /// hands jobs over across restarts leaves it off.
    pub kill_on_supervisor_exit: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            state_dir: default_state_dir(),
            cgroup_pool: 0,
            root_template: true,
            kill_on_supervisor_exit: false,
        }
    }
}

/// `JOBLET_STATE_DIR` or `/var/lib/joblet`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("JOBLET_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/joblet"))
}

/// What is probed once per process and shared by every spawn.
#[derive(Debug)]
pub struct Runtime {
    cgroups: Box<dyn CgroupDriver>,
    host: HostLayout,
    stage: PathBuf,
    online_cpus: u32,
    init_exe: std::sync::OnceLock<Result<OwnedFd, Errno>>,
    template: std::sync::Mutex<TemplateState>,
    telemetry: Option<std::sync::Arc<crate::telemetry::Telemetry>>,
    kill_on_supervisor_exit: bool,
}

thread_local! {
    /// One child stack per spawning thread: the thread is suspended until its child execs, so
    /// the stack is free again when `clone3` returns.
    static STACK: RefCell<Option<Stack>> = const { RefCell::new(None) };
}

impl Runtime {
    /// Probes the host: cgroup layout (creating joblet's parent cgroups), the host directories
    /// of the minimal root, the staging directory under the state dir.
    pub fn new(config: &RuntimeConfig) -> Result<Runtime, SpawnError> {
        let mut cgroups = crate::cgroup::detect(&config.cgroup_root)?;
        if config.cgroup_pool > 0 {
            cgroups.set_pool(config.cgroup_pool)?;
        }
        let stage = config.state_dir.join("root");
        std::fs::create_dir_all(&stage).map_err(|e| SpawnError::Sys {
            op: "create the staging directory",
            source: e,
        })?;
        Ok(Runtime {
            cgroups,
            host: HostLayout::probe(),
            stage,
            online_cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            init_exe: std::sync::OnceLock::new(),
            template: std::sync::Mutex::new(if config.root_template {
                TemplateState::Unbuilt
            } else {
                TemplateState::Off
            }),
            telemetry: None,
            kill_on_supervisor_exit: config.kill_on_supervisor_exit,
        })
    }

    /// Measures every job spawned from now on with the eBPF probes (loaded once, by the caller:
    /// loading stays out of the spawn path). Each job's record then carries a `latency` object.
    pub fn set_telemetry(&mut self, telemetry: std::sync::Arc<crate::telemetry::Telemetry>) {
        self.telemetry = Some(telemetry);
    }

    /// Stops measuring jobs spawned from now on (jobs already spawned keep their telemetry).
    pub fn clear_telemetry(&mut self) {
        self.telemetry = None;
    }

    /// The cgroup driver in use.
    pub fn cgroups(&self) -> &dyn CgroupDriver {
        &*self.cgroups
    }

    /// Checks a spec without creating anything: the errors a user can fix (bad cores, missing
    /// rootfs or bind sources, unsupported limits).
    pub fn validate(&self, spec: &JobSpec) -> Result<(), SpawnError> {
        if spec.command.is_empty() {
            return Err(SpawnError::Invalid("no command given".into()));
        }
        if let Some(c) = &spec.limits.cores
            && let Some(bad) = c.cpus().iter().find(|&&c| c >= self.online_cpus)
        {
            return Err(SpawnError::Invalid(format!(
                "--cores {c}: CPU {bad} does not exist (this host has CPUs 0-{})",
                self.online_cpus - 1
            )));
        }
        self.cgroups.check(&spec.limits)?;
        rootfs::plan(
            &self.stage,
            &self.host,
            &spec.sandbox,
            spec.sandbox.uid,
            spec.sandbox.gid,
        )?;
        Ok(())
    }

    /// Starts a job. On success the command is running (or exec'd and already exited) inside its
    /// sandbox and cgroup; on error nothing is left behind.
    pub fn spawn(&self, spec: &JobSpec, stdio: Stdio) -> Result<Job, SpawnError> {
        if spec.command.is_empty() {
            return Err(SpawnError::Invalid("no command given".into()));
        }
        let sb = &spec.sandbox;
        let template = if rootfs::templatable(sb) {
            self.template()?
        } else {
            None
        };
        let mounts = self.mount_plan(spec, template.is_some())?;
        let exec = self.prepare_exec(spec)?;
        let seccomp = if sb.seccomp {
            Some(crate::seccomp::default_filter()?)
        } else {
            None
        };
        let stdin = match stdio.stdin {
            Some(fd) => fd,
            None => rustix::fs::open(
                c"/dev/null",
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(sys_err("open /dev/null"))?,
        };
        let hostname = sb.hostname.clone().unwrap_or_else(|| spec.id.to_string());
        let workdir = match &sb.workdir {
            Some(w) => CString::new(w.as_os_str().as_bytes())
                .map_err(|_| SpawnError::Invalid("--workdir contains a NUL byte".into()))?,
            None if sb.rootfs.as_ref().is_none_or(|r| r.join("work").is_dir()) => {
                CString::from(c"/work")
            }
            None => CString::from(c"/"),
        };

        let cgroup = self.cgroups.create(spec.id.as_str(), &spec.limits)?;
        // No syscall: the probes start measuring the job when clone3 puts its first task in the
        // cgroup (and forget any previous job of a pooled cgroup then).
        if let Some(t) = &self.telemetry {
            t.mark_spawn(cgroup.id(), crate::telemetry::monotonic_ns());
        }
        let started = Instant::now();
        let started_at_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let result = self.clone_child(
            spec,
            template.as_deref(),
            &cgroup,
            &mounts,
            &exec,
            seccomp,
            [stdin.as_fd(), stdio.stdout.as_fd(), stdio.stderr.as_fd()],
            hostname.as_bytes(),
            &workdir,
        );
        match result {
            Ok((pid, pidfd, path)) => Ok(Job {
                record: {
                    let mut r =
                        base_record(spec, self.cgroups.layout().as_str(), path, cgroup.id());
                    r.runtime.cgroup_path = Some(cgroup.path().to_owned());
                    r.started_at_ns = started_at_ns;
                    r
                },
                telemetry: self.telemetry.clone(),
                id: spec.id.clone(),
                pid,
                pidfd,
                cgroup: Some(cgroup),
                started,
                started_at_ns,
            }),
            Err(e) => {
                if let Some(t) = &self.telemetry {
                    let _ = t.finish(cgroup.id());
                }
                let _ = cgroup.remove();
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn clone_child(
        &self,
        spec: &JobSpec,
        template: Option<&template::Template>,
        cgroup: &JobCgroup,
        mounts: &[MountOp],
        exec: &PreparedExec,
        seccomp: Option<&seccompiler::BpfProgram>,
        stdio: [BorrowedFd<'_>; 3],
        hostname: &[u8],
        workdir: &CString,
    ) -> Result<(Pid, OwnedFd, &'static str), SpawnError> {
        // Non-blocking: see `check_child`. A 12-byte write to an empty pipe never blocks anyway.
        let (err_read, err_write) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )
        .map_err(sys_err("create the error pipe"))?;
        let init_fd;
        let program = match &exec.init {
            true => {
                init_fd = self.init_exe()?;
                Program::Fd(init_fd)
            }
            false => Program::Paths(&exec.paths),
        };
        let mut flags = sys::clone3::CLONE_VM
            | sys::clone3::CLONE_VFORK
            | sys::clone3::CLONE_PIDFD
            | sys::clone3::CLONE_NEWPID
            | sys::clone3::CLONE_NEWIPC
            | sys::clone3::CLONE_NEWUTS;
        // With a template the child enters a copy of the template's mount namespace instead:
        // copying the host's first would only be thrown away.
        if template.is_none() {
            flags |= sys::clone3::CLONE_NEWNS;
        }
        if spec.sandbox.network == NetworkMode::None {
            flags |= sys::clone3::CLONE_NEWNET;
        }
        let attempt = |into_cgroup: bool, join: Vec<BorrowedFd<'_>>| {
            let plan = ChildPlan {
                err_pipe: err_write.as_fd(),
                join_procs: join,
                root_template: template.map(|t| t.ns()),
                parent_death_kill: self.kill_on_supervisor_exit,
                mounts,
                hostname,
                loopback: spec.sandbox.network == NetworkMode::None,
                stdio,
                workdir,
                uid: spec.sandbox.uid,
                gid: spec.sandbox.gid,
                caps: spec.sandbox.caps,
                seccomp,
                program,
                argv: &exec.argv,
                envp: &exec.envp,
            };
            let mut args = CloneArgs {
                flags: flags
                    | if into_cgroup {
                        sys::clone3::CLONE_INTO_CGROUP
                    } else {
                        0
                    },
                exit_signal: libc::SIGCHLD as u64,
                cgroup: if into_cgroup {
                    rustix::fd::AsRawFd::as_raw_fd(&cgroup.clone_into_fd()) as u64
                } else {
                    0
                },
                ..CloneArgs::default()
            };
            STACK.with(|cell| -> io::Result<(i32, Option<OwnedFd>)> {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Some(Stack::new(CHILD_STACK)?);
                }
                let stack = slot.as_mut().expect("stack just created");
                sys::clone3::clone3_job(&mut args, stack, &plan)
            })
        };
        let join: Vec<BorrowedFd<'_>> = cgroup.join_procs().iter().map(|f| f.as_fd()).collect();
        let (res, path) = match attempt(true, join.clone()) {
            // E2BIG: a kernel before 5.7 does not know clone_args.cgroup. Join the v2 cgroup
            // from the child instead, like the v1 ones.
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                let v2_procs = cgroup.open_v2_procs()?;
                let mut join = join;
                join.insert(0, v2_procs.as_fd());
                (attempt(false, join), "clone3-vfork-join-cgroup")
            }
            r => (r, "clone3-vfork-into-cgroup"),
        };
        match res {
            Ok((pid, Some(pidfd))) => {
                let pid = Pid::from_raw(pid).ok_or_else(|| SpawnError::Sys {
                    op: "clone3",
                    source: io::Error::other("kernel returned pid 0"),
                })?;
                drop(err_write);
                let path = match (template.is_some(), path) {
                    (true, "clone3-vfork-into-cgroup") => "clone3-vfork-into-cgroup+root-template",
                    (true, _) => "clone3-vfork-join-cgroup+root-template",
                    (false, p) => p,
                };
                self.check_child(spec, template.is_some(), err_read, pid, pidfd, path)
            }
            Ok((_, None)) => Err(SpawnError::Sys {
                op: "clone3",
                source: io::Error::other("no pidfd returned"),
            }),
            Err(e) => Err(SpawnError::Sys {
                op: "clone3 the job",
                source: e,
            }),
        }
    }

    /// Reads the error pipe (the child has exec'd or exited by now): EOF means exec succeeded.
    ///
    /// The read does not wait for EOF. The kernel resumes a vfork parent when the child
    /// releases the shared memory: at exit, or in `execve` past its point of no return but
    /// *before* the close-on-exec fds (the pipe's write end among them) are closed. A child that
    /// failed wrote its report before exiting, so it is in the pipe already; an empty pipe
    /// (`EAGAIN`) therefore means the exec succeeded. Waiting for EOF instead blocked the parent
    /// once more per job, for a context switch to the exec'ing child and back.
    fn check_child(
        &self,
        spec: &JobSpec,
        templated: bool,
        err_read: OwnedFd,
        pid: Pid,
        pidfd: OwnedFd,
        path: &'static str,
    ) -> Result<(Pid, OwnedFd, &'static str), SpawnError> {
        let mut buf = [0u8; Failure::SIZE];
        let n = loop {
            match rustix::io::read(&err_read, &mut buf) {
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => break 0,
                r => break r.map_err(sys_err("read the error pipe"))?,
            }
        };
        if n == 0 {
            return Ok((pid, pidfd, path));
        }
        // The child failed and exited: reap it so no zombie is left.
        let _ = rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED);
        let failure = (n == Failure::SIZE)
            .then(|| Failure::decode(&buf))
            .flatten();
        let Some(f) = failure else {
            return Err(SpawnError::Setup {
                job: spec.id.to_string(),
                what: "start the job".into(),
                source: io::Error::other("garbled report from the child"),
            });
        };
        let source = io::Error::from_raw_os_error(f.errno);
        Err(match f.step {
            Step::Exec => SpawnError::Exec {
                program: spec.command[0].to_string_lossy().into_owned(),
                source,
            },
            Step::Mount => {
                let mounts = self.mount_plan(spec, templated).ok();
                let what = mounts
                    .as_ref()
                    .and_then(|m| m.get(f.index as usize))
                    .map_or_else(
                        || "set up the job's filesystem".into(),
                        |op| op.describe(&self.stage),
                    );
                SpawnError::Setup {
                    job: spec.id.to_string(),
                    what,
                    source,
                }
            }
            step => SpawnError::Setup {
                job: spec.id.to_string(),
                what: step.describe().into(),
                source,
            },
        })
    }

    /// The job's mount plan: the per-job mounts on top of the template copy, or the whole root.
    fn mount_plan(&self, spec: &JobSpec, templated: bool) -> Result<Vec<MountOp>, RootfsError> {
        let sb = &spec.sandbox;
        if templated {
            rootfs::job_plan(&self.host, sb, sb.uid, sb.gid)
        } else {
            rootfs::plan(&self.stage, &self.host, sb, sb.uid, sb.gid)
        }
    }

    /// The current root template, built (or rebuilt, when `/etc` changed) on demand; `None`
    /// when the runtime does not use one or this host cannot build it.
    fn template(&self) -> Result<Option<std::sync::Arc<template::Template>>, SpawnError> {
        let mut state = self.template.lock().unwrap_or_else(|p| p.into_inner());
        match &*state {
            TemplateState::Off | TemplateState::Unsupported(_) => return Ok(None),
            TemplateState::Ready(t) if t.is_current(template::etc_stamp()) => {
                return Ok(Some(t.clone()));
            }
            TemplateState::Ready(_) | TemplateState::Unbuilt => {}
        }
        match template::build(&self.stage, &self.host) {
            Ok(t) => {
                let t = std::sync::Arc::new(t);
                *state = TemplateState::Ready(t.clone());
                Ok(Some(t))
            }
            Err(template::BuildError::Unsupported(e)) => {
                *state = TemplateState::Unsupported(e);
                Ok(None)
            }
            Err(template::BuildError::Step(what, e)) => Err(SpawnError::Template {
                what,
                source: e.into(),
            }),
        }
    }

    fn init_exe(&self) -> Result<BorrowedFd<'_>, SpawnError> {
        let r = self.init_exe.get_or_init(|| {
            rustix::fs::open(
                c"/proc/self/exe",
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
        });
        match r {
            Ok(fd) => Ok(fd.as_fd()),
            Err(e) => Err(SpawnError::Sys {
                op: "open joblet's own executable for --init",
                source: (*e).into(),
            }),
        }
    }

    fn prepare_exec(&self, spec: &JobSpec) -> Result<PreparedExec, SpawnError> {
        let nul = |what: &str| SpawnError::Invalid(format!("{what} contains a NUL byte"));
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            ("HOME".into(), "/work".into()),
            (
                "HOSTNAME".into(),
                spec.sandbox
                    .hostname
                    .clone()
                    .unwrap_or_else(|| spec.id.to_string()),
            ),
        ];
        if let Ok(term) = std::env::var("TERM") {
            env.push(("TERM".into(), term));
        }
        for (k, v) in &spec.env {
            match env.iter_mut().find(|(ek, _)| ek == k) {
                Some(slot) => slot.1 = v.clone(),
                None => env.push((k.clone(), v.clone())),
            }
        }
        let envp = env
            .iter()
            .map(|(k, v)| CString::new(format!("{k}={v}")).map_err(|_| nul("--env")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut argv = Vec::with_capacity(spec.command.len() + 2);
        if spec.sandbox.init {
            argv.push(CString::from(c"joblet-init"));
            argv.push(CString::from(c"--"));
        }
        for a in &spec.command {
            argv.push(CString::new(a.as_bytes()).map_err(|_| nul("the command"))?);
        }
        let cmd = spec.command[0].as_bytes();
        let paths = if cmd.contains(&b'/') {
            vec![CString::new(cmd).map_err(|_| nul("the command"))?]
        } else {
            let path = env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
            path.split(':')
                .map(|d| if d.is_empty() { "." } else { d })
                .map(|d| {
                    let mut p = d.as_bytes().to_vec();
                    p.push(b'/');
                    p.extend_from_slice(cmd);
                    CString::new(p).map_err(|_| nul("the command"))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(PreparedExec {
            paths,
            argv: CStringArray::new(argv),
            envp: CStringArray::new(envp),
            init: spec.sandbox.init,
        })
    }
}

/// Whether and how the runtime copies a prebuilt root into each job.
#[derive(Debug)]
enum TemplateState {
    /// Not wanted (`RuntimeConfig::root_template` false).
    Off,
    /// Wanted, built on the first spawn that can use it.
    Unbuilt,
    /// Built; rebuilt when `/etc` changes.
    Ready(std::sync::Arc<template::Template>),
    /// This host cannot build one (see `template::build`; the errno is kept for debugging):
    /// every job builds its own root.
    Unsupported(#[expect(dead_code, reason = "read through Debug only")] Errno),
}

/// argv, envp and where to find the program, all as C strings.
#[derive(Debug)]
struct PreparedExec {
    paths: Vec<CString>,
    argv: CStringArray,
    envp: CStringArray,
    init: bool,
}

/// The job's standard streams. `stdin: None` gives the job `/dev/null`.
#[derive(Debug)]
pub struct Stdio {
    /// Standard input (`None`: `/dev/null`).
    pub stdin: Option<OwnedFd>,
    /// Standard output.
    pub stdout: OwnedFd,
    /// Standard error.
    pub stderr: OwnedFd,
}

/// How a job's main process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The shell-style code: the exit code, or 128 + signal.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Why joblet ended a job, if it did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StopReason {
    /// The timeout passed.
    pub timed_out: bool,
    /// A stop was requested (signal to `joblet run`, `joblet stop`).
    pub stopped: bool,
}

/// A running job, known by its pidfd.
#[derive(Debug)]
pub struct Job {
    id: crate::job::JobId,
    pid: Pid,
    pidfd: OwnedFd,
    cgroup: Option<JobCgroup>,
    started: Instant,
    started_at_ns: u64,
    record: JobRecord,
    telemetry: Option<std::sync::Arc<crate::telemetry::Telemetry>>,
}

impl Job {
    /// The job's id.
    pub fn id(&self) -> &crate::job::JobId {
        &self.id
    }

    /// The host pid of the job's main process (for display only: use the pidfd to act on it).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The pidfd: readable once the job's main process has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The job's cgroup v2 id (what the eBPF probes key on).
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup.as_ref().map_or(0, |c| c.id())
    }

    /// When the job was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The record as known at spawn time (state `running`).
    pub fn record(&self) -> &JobRecord {
        &self.record
    }

    /// Sends `signal` to the job's main process (its PID 1). `ESRCH` (already exited) is not an
    /// error.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        match rustix::process::pidfd_send_signal(&self.pidfd, signal) {
            Ok(()) | Err(Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Kills the whole job: SIGKILL to its PID 1 takes down its PID namespace, so every process
    /// it started (double-forked and setsid ones included) dies with it.
    pub fn kill(&self) -> io::Result<()> {
        self.signal(Signal::KILL)
    }

    /// Whether the job's PID 1 catches or blocks `signal`. The kernel drops every other signal
    /// sent to a namespace's init (except SIGKILL/SIGSTOP), so a stop that relies on an unhandled
    /// SIGTERM would only wait out the grace period. The pid is safe to use here: the process is
    /// not reaped until [`Job::wait`]/[`Job::try_wait`], so its pid cannot be reused before.
    pub fn handles(&self, signal: Signal) -> bool {
        let Ok(status) =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid.as_raw_nonzero()))
        else {
            return false;
        };
        let bit = 1u64 << (signal.as_raw() - 1);
        status.lines().any(|l| {
            let mask = l
                .strip_prefix("SigCgt:\t")
                .or_else(|| l.strip_prefix("SigBlk:\t"));
            mask.and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .is_some_and(|m| m & bit != 0)
        })
    }

    /// Starts stopping the job with `signal`: sends it if PID 1 handles it and returns the time
    /// at which to SIGKILL (after `grace`); kills at once otherwise.
    fn begin_stop(&self, signal: Signal, grace: Duration) -> io::Result<Option<Instant>> {
        if self.handles(signal) {
            self.signal(signal)?;
            Ok(Some(Instant::now() + grace))
        } else {
            self.kill()?;
            Ok(None)
        }
    }

    /// Reaps the main process if it has exited.
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        self.wait_inner(WaitIdOptions::EXITED | WaitIdOptions::NOHANG)
    }

    /// Blocks until the main process exits and reaps it. When PID 1 of the namespace exits the
    /// kernel kills and reaps every other process of the namespace before the exit is reported,
    /// so after this returns the job has no process left.
    pub fn wait(&self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.wait_inner(WaitIdOptions::EXITED)? {
                return Ok(s);
            }
        }
    }

    fn wait_inner(&self, opts: WaitIdOptions) -> io::Result<Option<ExitStatus>> {
        loop {
            match rustix::process::waitid(WaitId::PidFd(self.pidfd.as_fd()), opts) {
                Ok(Some(st)) => {
                    if let Some(sig) = st.terminating_signal() {
                        return Ok(Some(ExitStatus::Signal(sig)));
                    }
                    return Ok(Some(ExitStatus::Code(st.exit_status().unwrap_or(0))));
                }
                Ok(None) => return Ok(None),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Completes the record from the exit status and the cgroup's accounting, then removes the
    /// job's cgroups. Call after [`Job::wait`] (or a successful [`Job::try_wait`]).
    pub fn finish(mut self, status: ExitStatus, reason: StopReason) -> JobRecord {
        self.complete(status, reason)
    }

    /// [`Job::finish`], also returning the latency report when the runtime has telemetry (it
    /// is in the record as JSON too).
    pub fn finish_traced(
        mut self,
        status: ExitStatus,
        reason: StopReason,
    ) -> (JobRecord, Option<crate::telemetry::LatencyReport>) {
        let record = self.complete(status, reason);
        let latency = record.latency.clone();
        (record, latency)
    }

    /// [`Job::finish`]'s work; leaves the handle without a cgroup, so `Drop` does nothing more.
    fn complete(&mut self, status: ExitStatus, reason: StopReason) -> JobRecord {
        let wall = self.started.elapsed();
        let mut r = self.record.clone();
        r.wall_ns = wall.as_nanos() as u64;
        match status {
            ExitStatus::Code(c) => r.exit_code = Some(c),
            ExitStatus::Signal(s) => r.signal = Some(s),
        }
        r.timed_out = reason.timed_out;
        r.stopped = reason.stopped;
        r.state = if reason.timed_out || reason.stopped {
            JobState::Stopped
        } else {
            JobState::Exited
        };
        r.started_at_ns = self.started_at_ns;
        if let Some(cg) = self.cgroup.take() {
            if let Some(t) = &self.telemetry {
                match t.finish(cg.id()) {
                    // Typed, not a JSON value: it is serialised once, with the record.
                    Ok(lat) => r.latency = Some(lat),
                    Err(e) => r.error = Some(anyhow_like(&e)),
                }
            }
            match cg.usage() {
                Ok(u) => {
                    r.cpu_user_ns = u.cpu_user_ns;
                    r.cpu_system_ns = u.cpu_system_ns;
                    r.memory_peak_bytes = u.memory_peak_bytes;
                    r.oom_killed = u.oom_kills > 0;
                }
                Err(e) => r.error = Some(anyhow_like(&e)),
            }
            if let Err(e) = cg.remove() {
                r.error.get_or_insert_with(|| anyhow_like(&e));
            }
        }
        r
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // A job dropped without `finish` (an error path in the caller) must not outlive its
        // handle: kill it, reap it and remove its cgroups.
        if let Some(cg) = self.cgroup.take() {
            let _ = self.kill();
            let _ = self.wait();
            if let Some(t) = &self.telemetry {
                let _ = t.finish(cg.id());
            }
            let _ = cg.remove();
        }
    }
}

/// An error with its chain of causes, `a: b: c`.
pub(crate) fn anyhow_like(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn base_record(spec: &JobSpec, layout: &str, path: &str, cgroup_id: u64) -> JobRecord {
    JobRecord {
        id: spec.id.clone(),
        name: spec.name.clone(),
        labels: spec.labels.clone(),
        command: spec
            .command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        state: JobState::Running,
        exit_code: None,
        signal: None,
        oom_killed: false,
        timed_out: false,
        stopped: false,
        started_at_ns: 0,
        wall_ns: 0,
        cpu_user_ns: 0,
        cpu_system_ns: 0,
        memory_peak_bytes: None,
        limits: spec.limits.clone(),
        runtime: RuntimeInfo {
            cgroup_layout: layout.to_owned(),
            cgroup_id,
            cgroup_path: None,
            supervisor: crate::job::Supervisor::current(),
            spawn_path: path.to_owned(),
            network: Some(spec.sandbox.network),
            uid: spec.sandbox.uid,
            gid: spec.sandbox.gid,
        },
        error: None,
        output: None,
        latency: None,
    }
}

/// The record of a job that could not be started: state `failed`, with the error.
pub fn failed_record(spec: &JobSpec, layout: &str, error: &SpawnError) -> JobRecord {
    let mut r = base_record(spec, layout, "", 0);
    r.state = JobState::Failed;
    r.started_at_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    r.error = Some(anyhow_like(error));
    r
}

/// Options of [`supervise`].
#[derive(Clone, Copy, Debug)]
pub struct SuperviseOptions {
    /// Stop the job after this long.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when stopping.
    pub grace: Duration,
}

/// Waits for a job while handling its timeout and, when `signals` is given, forwarding SIGINT,
/// SIGTERM, SIGHUP and SIGQUIT to it: the first SIGINT/SIGTERM is forwarded and starts the grace
/// period, a second SIGINT kills the job at once. Returns the exit status and why joblet ended
/// it, if it did.
pub fn supervise(
    job: &Job,
    opts: SuperviseOptions,
    signals: Option<&SignalForwarder>,
) -> io::Result<(ExitStatus, StopReason)> {
    use rustix::event::{PollFd, PollFlags};
    let mut reason = StopReason::default();
    let deadline = opts.timeout.map(|t| job.started + t);
    let mut kill_at: Option<Instant> = None;
    let mut interrupts = 0;
    loop {
        let now = Instant::now();
        if let Some(d) = deadline
            && now >= d
            && kill_at.is_none()
            && !reason.timed_out
        {
            reason.timed_out = true;
            kill_at = job.begin_stop(Signal::TERM, opts.grace)?;
        }
        if let Some(k) = kill_at
            && now >= k
        {
            job.kill()?;
            kill_at = None;
        }
        let next = [deadline.filter(|_| !reason.timed_out), kill_at]
            .into_iter()
            .flatten()
            .min();
        let timeout = next.map(|n| {
            let d = n.saturating_duration_since(Instant::now());
            rustix::time::Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as i64,
            }
        });
        let mut fds = vec![PollFd::new(&job.pidfd, PollFlags::IN)];
        if let Some(s) = signals {
            fds.push(PollFd::new(&s.fd, PollFlags::IN));
        }
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let pid_ready = !fds[0].revents().is_empty();
        let sig_ready = fds.get(1).is_some_and(|f| !f.revents().is_empty());
        drop(fds);
        if sig_ready && let Some(s) = signals {
            while let Some(sig) = s.fd.read()? {
                let is_stop = sig == libc::SIGINT || sig == libc::SIGTERM;
                if is_stop {
                    interrupts += 1;
                    reason.stopped = true;
                }
                if sig == libc::SIGINT && interrupts >= 2 {
                    job.kill()?;
                    continue;
                }
                let sig = Signal::from_named_raw(sig).unwrap_or(Signal::TERM);
                if is_stop && kill_at.is_none() {
                    kill_at = job.begin_stop(sig, opts.grace)?;
                } else {
                    job.signal(sig)?;
                }
            }
        }
        if pid_ready && let Some(st) = job.try_wait()? {
            return Ok((st, reason));
        }
    }
}

/// Receives SIGINT, SIGTERM, SIGHUP and SIGQUIT for [`supervise`] instead of letting them kill
/// joblet (they are blocked on the calling thread while this lives).
#[derive(Debug)]
pub struct SignalForwarder {
    fd: sys::signal::SignalFd,
}

impl SignalForwarder {
    /// Starts receiving the forwarded signals on the calling thread.
    pub fn new() -> io::Result<SignalForwarder> {
        Ok(SignalForwarder {
            fd: sys::signal::SignalFd::new(&[
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGHUP,
                libc::SIGQUIT,
            ])?,
        })
    }
}
