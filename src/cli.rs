//! Command-line definitions: every option of every subcommand, and their conversion into a
//! [`JobSpec`]. Values are parsed by `joblet_runtime::parse`, so the CLI, the daemon's API and
//! the tests accept exactly the same syntax.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use joblet_runtime::job::{
    self, Bind, CpuList, DevNum, IoLimit, JobId, JobSpec, Limits, NetworkMode, Sandbox,
};
use joblet_runtime::parse;
use rustix::thread::CapabilitySet;

/// joblet runs jobs in a selective Linux sandbox: new PID, mount, IPC, UTS and cgroup
/// namespaces, a minimal read-only root, no capabilities, seccomp, and cgroup limits. The host
/// network is shared by design (`--network none` for loopback only).
#[derive(Debug, Parser)]
#[command(name = "joblet", version, max_term_width = 100)]
pub(crate) struct Cli {
    /// State directory (also JOBLET_STATE_DIR). Default: /var/lib/joblet.
    #[arg(long, global = true, value_name = "DIR", env = "JOBLET_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a job in the foreground, without a daemon.
    ///
    /// The job's stdout and stderr go to joblet's as they come. joblet exits with the job's exit
    /// code, 128+N when the job was killed by signal N, 125 when joblet itself failed (bad
    /// option, setup error), 126 when the command cannot be executed, 127 when it is not found.
    ///
    /// The command runs as PID 1 of its namespace: the kernel ignores signals it has no handler
    /// for, and orphans are not reaped unless it reaps them. Use --init for a minimal init that
    /// forwards signals and reaps zombies.
    Run(Box<RunArgs>),

    /// List jobs: id, state, exit code, start time, duration, command.
    Ps {
        /// Show every job, not only running ones.
        #[arg(short, long)]
        all: bool,
        /// Print the records as a JSON array.
        #[arg(long)]
        json: bool,
    },

    /// Print a job's output, exactly as it wrote it (stdout to stdout, stderr to stderr).
    Logs {
        /// The job id (or a unique prefix of it).
        id: String,
        /// Follow the output until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// Start at this sequence number.
        #[arg(long, value_name = "SEQ", default_value_t = 1)]
        since: u64,
        /// Only this stream.
        #[arg(long, value_enum)]
        stream: Option<StreamArg>,
        /// Prefix each line with the time it was captured (RFC 3339).
        #[arg(short, long)]
        timestamps: bool,
    },

    /// A live table of running jobs: CPU, memory, run-queue wait p50/p99, off-CPU time, block
    /// I/O latency p50, context switches, measured in the kernel by the eBPF probes. Needs root.
    Top {
        /// Refresh interval.
        #[arg(long, value_name = "DURATION", value_parser = duration_arg, default_value = "1s")]
        interval: Duration,
        /// Print one table after one interval and exit.
        #[arg(long)]
        once: bool,
    },

    /// Clean up the state dir: recover jobs whose supervisor died, remove old jobs.
    ///
    /// A job whose `joblet run` (or daemon) was killed keeps a `running` record, an unfinished
    /// log and its cgroups. gc finds them (the supervisor's pid and start time are gone), kills
    /// whatever is left in the job's own cgroup, removes its cgroups, ends its log and records it
    /// as `failed` with the reason. A live supervisor's jobs are never touched. Every `joblet
    /// run` does the same for the jobs listed as in flight before it starts its own.
    ///
    /// With --older-than, --keep or --max-size, gc then removes ended jobs' directories (log and
    /// record), oldest first; a running job is never removed. A job ended when its final record
    /// was written. --keep protects the newest N ended jobs from every other limit.
    Gc {
        /// Remove ended jobs that ended longer ago than this (e.g. 7d, 12h, 30m).
        #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
        older_than: Option<Duration>,
        /// Keep the N most recently ended jobs; alone, remove all older ones.
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
        /// Remove the oldest ended jobs until all jobs' directories take at most SIZE on disk
        /// (e.g. 10G).
        #[arg(long, value_name = "SIZE", value_parser = size_arg)]
        max_size: Option<u64>,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
    },

    /// Show a job's stored record.
    Inspect {
        /// The job id (or a unique prefix of it).
        id: String,
        /// Print the record as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// An output stream.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum StreamArg {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Options of `joblet run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Memory limit (e.g. 256M, 1G). The job is OOM-killed past it; it gets no swap.
    #[arg(long, value_name = "SIZE", value_parser = size_arg, help_heading = "Limits")]
    pub(crate) memory: Option<u64>,

    /// CPU bandwidth in percent of one core (100 = one full core, 200 = two).
    #[arg(long, value_name = "PERCENT", value_parser = cpu_arg, allow_hyphen_values = true, help_heading = "Limits")]
    pub(crate) cpu: Option<u32>,

    /// CPUs the job may run on (e.g. 0, 0-1, 0,2).
    #[arg(long, value_name = "LIST", value_parser = cores_arg, help_heading = "Limits")]
    pub(crate) cores: Option<CpuList>,

    /// Maximum number of processes and threads (a fork bomb stops there).
    #[arg(long, value_name = "N", value_parser = pids_arg, help_heading = "Limits")]
    pub(crate) pids: Option<u64>,

    /// Read bandwidth limit on a block device, as MAJ:MIN=RATE (e.g. 8:0=10M). Repeatable.
    #[arg(long, value_name = "DEV=RATE", value_parser = io_arg, help_heading = "Limits")]
    pub(crate) io_read_bps: Vec<(DevNum, u64)>,

    /// Write bandwidth limit on a block device, as MAJ:MIN=RATE (e.g. 8:0=10M). Repeatable.
    #[arg(long, value_name = "DEV=RATE", value_parser = io_arg, help_heading = "Limits")]
    pub(crate) io_write_bps: Vec<(DevNum, u64)>,

    /// Stop the job after this long (e.g. 500ms, 10s, 5m): SIGTERM, then SIGKILL after --grace.
    #[arg(long, value_name = "DURATION", value_parser = duration_arg, help_heading = "Limits")]
    pub(crate) timeout: Option<Duration>,

    /// Time between SIGTERM and SIGKILL when the job is stopped.
    #[arg(long, value_name = "DURATION", value_parser = duration_arg, default_value = "10s", help_heading = "Limits")]
    pub(crate) grace: Duration,

    /// Network: `host` shares the host's network namespace (the default, by design); `none`
    /// gives the job a new network namespace with only loopback up.
    #[arg(long, value_enum, default_value_t = Network::Host, help_heading = "Isolation")]
    pub(crate) network: Network,

    /// Use this directory as the job's whole root filesystem (read-only) instead of the minimal
    /// root built from the host's /bin /sbin /lib /lib64 /usr and a few /etc files. It must
    /// contain /tmp, /proc and /dev.
    #[arg(long, value_name = "DIR", help_heading = "Isolation")]
    pub(crate) rootfs: Option<PathBuf>,

    /// Bind a host path into the job, read-only unless `:rw` is given. Repeatable.
    #[arg(long, value_name = "SRC:DST[:rw]", value_parser = bind_arg, help_heading = "Isolation")]
    pub(crate) bind: Vec<Bind>,

    /// Working directory inside the job. Default: /work, a private writable tmpfs.
    #[arg(long, value_name = "DIR", value_parser = job_path_arg, help_heading = "Isolation")]
    pub(crate) workdir: Option<PathBuf>,

    /// Size of the job's private /tmp and /work tmpfs mounts.
    #[arg(long, value_name = "SIZE", value_parser = size_arg, default_value = "64M", help_heading = "Isolation")]
    pub(crate) tmp_size: u64,

    /// Hostname inside the job. Default: the job id.
    #[arg(long, value_name = "NAME", value_parser = hostname_arg, help_heading = "Isolation")]
    pub(crate) hostname: Option<String>,

    /// Run as `UID[:GID]`. Default: 65534:65534 (nobody). Root (0) only when asked; it still has
    /// no capabilities.
    #[arg(long, value_name = "UID[:GID]", value_parser = user_arg, help_heading = "Isolation")]
    pub(crate) user: Option<(u32, u32)>,

    /// Keep this capability (e.g. NET_BIND_SERVICE); every other one is dropped from all sets.
    /// Repeatable.
    #[arg(long = "cap-add", value_name = "NAME", value_parser = cap_arg, help_heading = "Isolation")]
    pub(crate) cap_add: Vec<CapabilitySet>,

    /// Do not install the default seccomp filter (which blocks kexec, module loading, reboot,
    /// swap, bpf, perf_event_open, keyrings, mount and friends).
    #[arg(long, help_heading = "Isolation")]
    pub(crate) no_seccomp: bool,

    /// Run a minimal init as PID 1 that forwards signals to the command and reaps zombies.
    #[arg(long, help_heading = "Isolation")]
    pub(crate) init: bool,

    /// Forward joblet's stdin to the job (default: the job reads /dev/null).
    #[arg(short, long)]
    pub(crate) interactive: bool,

    /// Set an environment variable in the job. The job's environment is otherwise clean: PATH,
    /// HOME=/work, HOSTNAME and TERM (if set). Repeatable.
    #[arg(short, long, value_name = "KEY=VALUE", value_parser = kv_arg)]
    pub(crate) env: Vec<(String, String)>,

    /// A name for the job, kept in its record.
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,

    /// A label for the job, kept in its record. Repeatable.
    #[arg(long, value_name = "KEY=VALUE", value_parser = kv_arg)]
    pub(crate) label: Vec<(String, String)>,

    /// Measure the job's kernel-level latency with the eBPF probes (spawn to exec, run-queue
    /// wait, off-CPU time, context switches, block I/O) and print a breakdown when it ends; the
    /// report gains a `latency` object.
    #[arg(long)]
    pub(crate) trace: bool,

    /// fsync the job's log and record when it ends, so they survive a power cut (by default they
    /// are written but not synced: they survive a crash of joblet, not of the machine).
    #[arg(long)]
    pub(crate) sync: bool,

    /// Write the job's record as one JSON object to PATH when it ends.
    #[arg(long, value_name = "PATH")]
    pub(crate) report: Option<PathBuf>,

    /// The command to run and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    pub(crate) command: Vec<OsString>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Network {
    /// Share the host's network namespace.
    Host,
    /// A new network namespace with only loopback.
    None,
}

impl RunArgs {
    /// The job's specification.
    pub(crate) fn to_spec(&self) -> JobSpec {
        let mut io: BTreeMap<DevNum, IoLimit> = BTreeMap::new();
        for (dev, rate) in &self.io_read_bps {
            io.entry(*dev)
                .or_insert(IoLimit {
                    device: *dev,
                    read_bps: None,
                    write_bps: None,
                })
                .read_bps = Some(*rate);
        }
        for (dev, rate) in &self.io_write_bps {
            io.entry(*dev)
                .or_insert(IoLimit {
                    device: *dev,
                    read_bps: None,
                    write_bps: None,
                })
                .write_bps = Some(*rate);
        }
        let (uid, gid) = self.user.unwrap_or((job::DEFAULT_UID, job::DEFAULT_GID));
        JobSpec {
            id: JobId::generate(),
            name: self.name.clone(),
            labels: self.label.iter().cloned().collect(),
            command: self.command.clone(),
            env: self.env.clone(),
            limits: Limits {
                memory_bytes: self.memory,
                cpu_percent: self.cpu,
                cores: self.cores.clone(),
                pids: self.pids,
                io: io.into_values().collect(),
                timeout: self.timeout,
            },
            sandbox: Sandbox {
                network: match self.network {
                    Network::Host => NetworkMode::Host,
                    Network::None => NetworkMode::None,
                },
                rootfs: self.rootfs.clone(),
                binds: self.bind.clone(),
                workdir: self.workdir.clone(),
                tmp_size: self.tmp_size,
                hostname: self.hostname.clone(),
                uid,
                gid,
                caps: self
                    .cap_add
                    .iter()
                    .fold(CapabilitySet::empty(), |a, c| a | *c),
                seccomp: !self.no_seccomp,
                init: self.init,
            },
        }
    }
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse::size(s).map_err(|e| e.to_string())
}

fn cpu_arg(s: &str) -> Result<u32, String> {
    parse::cpu_percent(s).map_err(|e| e.to_string())
}

fn cores_arg(s: &str) -> Result<CpuList, String> {
    parse::cpu_list(s).map_err(|e| e.to_string())
}

fn pids_arg(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "invalid process count {s:?}: expected a positive integer"
        )),
    }
}

fn io_arg(s: &str) -> Result<(DevNum, u64), String> {
    parse::io_rate(s).map_err(|e| e.to_string())
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse::duration(s).map_err(|e| e.to_string())
}

fn bind_arg(s: &str) -> Result<Bind, String> {
    parse::bind(s).map_err(|e| e.to_string())
}

fn job_path_arg(s: &str) -> Result<PathBuf, String> {
    parse::job_path(s).map_err(|e| e.to_string())
}

fn hostname_arg(s: &str) -> Result<String, String> {
    parse::hostname(s).map_err(|e| e.to_string())
}

fn user_arg(s: &str) -> Result<(u32, u32), String> {
    parse::user(s).map_err(|e| e.to_string())
}

fn cap_arg(s: &str) -> Result<CapabilitySet, String> {
    parse::capability(s).map_err(|e| e.to_string())
}

fn kv_arg(s: &str) -> Result<(String, String), String> {
    parse::key_value(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_run(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut v = vec!["joblet", "run"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| match c.command {
            Command::Run(r) => *r,
            other => panic!("not run: {other:?}"),
        })
    }

    #[test]
    fn options_build_the_spec() {
        let r = parse_run(&[
            "--memory",
            "64M",
            "--cpu",
            "50",
            "--cores",
            "0",
            "--pids",
            "10",
            "--io-read-bps",
            "8:0=1M",
            "--io-write-bps",
            "8:0=2M",
            "--timeout",
            "500ms",
            "--user",
            "1000",
            "--cap-add",
            "NET_RAW",
            "--env",
            "A=1",
            "--label",
            "k=v",
            "--name",
            "n",
            "--network",
            "none",
            "--",
            "sh",
            "-c",
            "true",
        ])
        .unwrap();
        let s = r.to_spec();
        assert_eq!(s.limits.memory_bytes, Some(64 << 20));
        assert_eq!(s.limits.cpu_percent, Some(50));
        assert_eq!(s.limits.pids, Some(10));
        assert_eq!(s.limits.io.len(), 1);
        assert_eq!(s.limits.io[0].read_bps, Some(1 << 20));
        assert_eq!(s.limits.io[0].write_bps, Some(2 << 20));
        assert_eq!(s.limits.timeout, Some(Duration::from_millis(500)));
        assert_eq!((s.sandbox.uid, s.sandbox.gid), (1000, 1000));
        assert_eq!(s.sandbox.caps, CapabilitySet::NET_RAW);
        assert_eq!(s.sandbox.network, NetworkMode::None);
        assert_eq!(s.labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(
            s.command,
            vec![OsString::from("sh"), "-c".into(), "true".into()]
        );
    }

    #[test]
    fn bad_values_name_the_option() {
        for (args, needle) in [
            (&["--memory", "12Q", "true"][..], "--memory"),
            (&["--cpu", "-5", "true"][..], "--cpu"),
            (&["--cap-add", "FLY", "true"][..], "unknown capability"),
            (&["--timeout", "soon", "true"][..], "--timeout"),
        ] {
            let e = parse_run(args).unwrap_err().to_string();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn defaults_are_unprivileged() {
        let s = parse_run(&["true"]).unwrap().to_spec();
        assert_eq!((s.sandbox.uid, s.sandbox.gid), (65534, 65534));
        assert!(s.sandbox.caps.is_empty());
        assert!(s.sandbox.seccomp);
        assert_eq!(s.sandbox.network, NetworkMode::Host);
    }
}
