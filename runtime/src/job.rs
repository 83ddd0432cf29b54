//! The job model shared by every part of joblet: what to run ([`JobSpec`]), with which limits
//! ([`Limits`]) and sandbox ([`Sandbox`]), and what happened ([`JobRecord`]).
//!
//! The record is the one format joblet writes for a job: `joblet run --report`, the state dir
//! and the daemon's API all carry the same JSON object.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A job's identifier: 16 lowercase hex digits, unique per host in practice.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// A new random id (64 bits from the kernel's random pool).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 8];
        // getrandom never blocks for 8 bytes once the pool is initialised; fall back to time+pid.
        if rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).is_err() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            bytes = (now ^ u64::from(std::process::id()).rotate_left(40)).to_le_bytes();
        }
        let mut s = String::with_capacity(16);
        for b in bytes {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
        }
        JobId(s)
    }

    /// Parses an id given by a user; ids are 1-64 characters of `[0-9a-zA-Z_-]`.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| JobId(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything needed to start one job.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// The job's id (also its default hostname and cgroup name).
    pub id: JobId,
    /// A free-form name kept in the record.
    pub name: Option<String>,
    /// Free-form labels kept in the record.
    pub labels: BTreeMap<String, String>,
    /// The command and its arguments; `command[0]` is looked up in the job's `PATH` when it has
    /// no `/`.
    pub command: Vec<OsString>,
    /// Extra environment variables (`--env`), added after the clean defaults.
    pub env: Vec<(String, String)>,
    /// Resource limits.
    pub limits: Limits,
    /// Isolation settings.
    pub sandbox: Sandbox,
}

/// Resource limits of a job. `None` means unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory limit in bytes (swap is always disabled for a job).
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in percent of one core (100 = one full core, 200 = two).
    pub cpu_percent: Option<u32>,
    /// CPUs the job may run on.
    pub cores: Option<CpuList>,
    /// Maximum number of processes and threads.
    pub pids: Option<u64>,
    /// Per-device IO bandwidth limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub io: Vec<IoLimit>,
    /// Wall-clock limit, after which the job is stopped.
    #[serde(with = "duration_ns_opt", rename = "timeout_ns")]
    pub timeout: Option<Duration>,
}

/// An IO bandwidth limit on one block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimit {
    /// The block device, as `major:minor`.
    pub device: DevNum,
    /// Read bytes per second.
    pub read_bps: Option<u64>,
    /// Written bytes per second.
    pub write_bps: Option<u64>,
}

/// A block device number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevNum {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl fmt::Display for DevNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl Serialize for DevNum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DevNum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::parse::dev_num(&s).map_err(serde::de::Error::custom)
    }
}

/// A set of CPUs, kept sorted and without duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(Vec<u32>);

impl CpuList {
    /// Builds a list from CPU numbers (sorted and deduplicated here).
    pub fn new(mut cpus: Vec<u32>) -> Self {
        cpus.sort_unstable();
        cpus.dedup();
        CpuList(cpus)
    }

    /// The CPUs, ascending.
    pub fn cpus(&self) -> &[u32] {
        &self.0
    }
}

impl fmt::Display for CpuList {
    /// Kernel list format: `0-2,5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

impl Serialize for CpuList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::parse::cpu_list(&s).map_err(serde::de::Error::custom)
    }
}

/// The job's network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// The host's network namespace, shared on purpose (ADR-003).
    #[default]
    Host,
    /// A new network namespace with only loopback up.
    None,
}

/// A bind mount from the host into the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// Host path.
    pub source: PathBuf,
    /// Absolute path inside the job.
    pub target: PathBuf,
    /// Writable; binds are read-only unless asked.
    pub writable: bool,
}

/// Isolation settings of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    /// Network namespace mode.
    pub network: NetworkMode,
    /// A whole root filesystem to use instead of the minimal host-derived root.
    pub rootfs: Option<PathBuf>,
    /// Extra bind mounts.
    pub binds: Vec<Bind>,
    /// The job's working directory inside its root (default `/work`, a private tmpfs).
    pub workdir: Option<PathBuf>,
    /// Size of the private `/tmp` and `/work` tmpfs mounts, in bytes.
    pub tmp_size: u64,
    /// Hostname inside the job (default: the job id).
    pub hostname: Option<String>,
    /// User id the command runs as.
    pub uid: u32,
    /// Group id the command runs as.
    pub gid: u32,
    /// Capabilities kept (every other one is dropped from all sets).
    pub caps: rustix::thread::CapabilitySet,
    /// Install the default seccomp filter.
    pub seccomp: bool,
    /// Run a minimal init as PID 1 that forwards signals and reaps zombies.
    pub init: bool,
}

/// The default size of `/tmp` and `/work`.
pub const DEFAULT_TMP_SIZE: u64 = 64 << 20;
/// `nobody`.
pub const DEFAULT_UID: u32 = 65534;
/// `nogroup`.
pub const DEFAULT_GID: u32 = 65534;

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            network: NetworkMode::Host,
            rootfs: None,
            binds: Vec::new(),
            workdir: None,
            tmp_size: DEFAULT_TMP_SIZE,
            hostname: None,
            uid: DEFAULT_UID,
            gid: DEFAULT_GID,
            caps: rustix::thread::CapabilitySet::empty(),
            seccomp: true,
            init: false,
        }
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Started and not yet reaped.
    Running,
    /// Ended by itself (any exit code or signal not sent by joblet).
    Exited,
    /// joblet could not start it, or lost it.
    Failed,
    /// Ended because joblet stopped it (stop request, timeout, interrupt).
    Stopped,
}

/// What joblet keeps about a job: written as `--report`, stored in the state dir and served by the
/// daemon. Times are nanoseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id.
    pub id: JobId,
    /// `--name`.
    pub name: Option<String>,
    /// `--label`s.
    pub labels: BTreeMap<String, String>,
    /// The command as given (lossy UTF-8).
    pub command: Vec<String>,
    /// Life-cycle state.
    pub state: JobState,
    /// Exit code, `None` when the job was killed by a signal or has not ended.
    pub exit_code: Option<i32>,
    /// The signal that killed the job's main process.
    pub signal: Option<i32>,
    /// The kernel's OOM killer killed a process of the job.
    pub oom_killed: bool,
    /// The job was stopped because its `--timeout` passed.
    pub timed_out: bool,
    /// The job was stopped on request (signal to `joblet run`, `joblet stop`).
    pub stopped: bool,
    /// Start time, nanoseconds since the Unix epoch.
    pub started_at_ns: u64,
    /// Wall time from spawn to reap.
    pub wall_ns: u64,
    /// User CPU time of all the job's processes (cgroup accounting).
    pub cpu_user_ns: u64,
    /// System CPU time of all the job's processes (cgroup accounting).
    pub cpu_system_ns: u64,
    /// Peak memory use of the job's cgroup, when the kernel reports it.
    pub memory_peak_bytes: Option<u64>,
    /// The limits as applied.
    pub limits: Limits,
    /// How the job was isolated and spawned.
    pub runtime: RuntimeInfo,
    /// Why joblet failed to start or supervise the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What was captured of the job's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputInfo>,
    /// Kernel-level latency measured by the eBPF probes (`--trace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<crate::telemetry::LatencyReport>,
}

/// A supervising process, identified by pid and start time (a pid alone can be reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Supervisor {
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
}

impl Supervisor {
    /// The calling process.
    pub fn current() -> Option<Supervisor> {
        let pid = std::process::id();
        Some(Supervisor {
            pid,
            start_ticks: start_ticks(pid)?,
        })
    }

    /// Whether this process still exists (same pid and same start time).
    pub fn is_alive(&self) -> bool {
        start_ticks(self.pid) == Some(self.start_ticks)
    }
}

fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields follow the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    // A zombie has exited: it only waits to be reaped.
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

impl JobRecord {
    /// The state to show: a record still `running` whose supervisor is gone is `failed` (the
    /// supervisor crashed; its job died with it or is orphaned).
    pub fn effective_state(&self) -> JobState {
        match (self.state, &self.runtime.supervisor) {
            (JobState::Running, Some(s)) if !s.is_alive() => JobState::Failed,
            (state, _) => state,
        }
    }
}

/// The job's captured output, for the record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputInfo {
    /// Bytes of stdout stored.
    pub stdout_bytes: u64,
    /// Bytes of stderr stored.
    pub stderr_bytes: u64,
    /// Bytes dropped by a size cap or a full disk (each loss has a marker in the log).
    pub lost_bytes: u64,
    /// Sequence number of the log's end chunk.
    pub last_seq: u64,
    /// Why capture failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a job was run, for the record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// `v2` or `hybrid`.
    pub cgroup_layout: String,
    /// The id of the job's cgroup v2 directory (what `bpf_get_current_cgroup_id()` returns).
    pub cgroup_id: u64,
    /// The job's cgroup v2 directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<std::path::PathBuf>,
    /// Which spawn path ran (e.g. `clone3-vfork-into-cgroup`).
    pub spawn_path: String,
    /// The process supervising the job while it runs (`joblet run` or the daemon), so readers
    /// can tell a running job from one whose supervisor died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<Supervisor>,
    /// The job's network mode.
    pub network: Option<NetworkMode>,
    /// The job's uid.
    pub uid: u32,
    /// The job's gid.
    pub gid: u32,
}

mod duration_ns_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_16_hex_digits_and_distinct() {
        let a = JobId::generate();
        let b = JobId::generate();
        assert_eq!(a.as_str().len(), 16);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn job_id_parse_rejects_path_tricks() {
        assert!(JobId::parse("abc-1_2").is_some());
        assert!(JobId::parse("").is_none());
        assert!(JobId::parse("../etc").is_none());
        assert!(JobId::parse("a/b").is_none());
    }

    #[test]
    fn supervisor_liveness_uses_pid_and_start_time() {
        let me = Supervisor::current().expect("own stat");
        assert!(me.is_alive());
        assert!(
            !Supervisor {
                start_ticks: me.start_ticks + 1,
                ..me
            }
            .is_alive()
        );
        assert!(
            !Supervisor {
                pid: u32::MAX - 1,
                ..me
            }
            .is_alive()
        );
    }

    #[test]
    fn cpu_list_formats_ranges() {
        assert_eq!(CpuList::new(vec![3, 0, 1, 2, 5, 5]).to_string(), "0-3,5");
        assert_eq!(CpuList::new(vec![1]).to_string(), "1");
    }
}
