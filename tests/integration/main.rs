//! Integration tests: one binary (see STYLE.md), run for real as root. Each test drives the real
//! `joblet` binary and tries to break one guarantee the docs make.
//!
//! Privileged tests call [`privileged`] first: without root (or the kernel features) they skip
//! with a message, unless `JOBLET_REQUIRE_PRIVILEGED=1` (CI), where they fail loudly.

mod exit_codes;
mod gc;
mod isolation;
mod lifecycle;
mod limits;
mod state;
mod vm_sanity;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// Gate for tests that spawn jobs: root, a recognised cgroup layout.
pub(crate) fn privileged() -> bool {
    joblet_runtime::testsupport::privileged("root, namespaces and cgroups", || {
        joblet_runtime::cgroup::detect(std::path::Path::new("/sys/fs/cgroup"))
            .map(drop)
            .map_err(|e| format!("no usable cgroup layout: {e}"))
    })
}

/// The state dir the tests' jobs use.
pub(crate) fn state_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("joblet-state")
}

/// A `joblet` command with the test state dir.
pub(crate) fn joblet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_joblet"));
    c.env("JOBLET_STATE_DIR", state_dir());
    c.stdin(Stdio::null());
    c
}

/// The result of one `joblet run`.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) report: Option<serde_json::Value>,
}

/// Runs `joblet run [args] -- command...` with a report.
pub(crate) fn run(args: &[&str], command: &[&str]) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("report.json");
    let out = joblet()
        .arg("run")
        .arg("--report")
        .arg(&report)
        .args(args)
        .arg("--")
        .args(command)
        .output()
        .expect("failed to start joblet");
    finish(out, &report)
}

pub(crate) fn finish(out: Output, report: &std::path::Path) -> Run {
    let report = std::fs::read(report)
        .ok()
        .map(|b| serde_json::from_slice(&b).expect("report is JSON"));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        report,
    }
}

/// Runs a shell script in a job with `args`.
pub(crate) fn sh(args: &[&str], script: &str) -> Run {
    run(args, &["/bin/sh", "-c", script])
}

impl Run {
    /// Asserts success and returns stdout.
    #[track_caller]
    pub(crate) fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "job failed: {self:#?}");
        &self.stdout
    }

    pub(crate) fn report(&self) -> &serde_json::Value {
        self.report
            .as_ref()
            .unwrap_or_else(|| panic!("no report: {self:#?}"))
    }
}

/// A random suffix for names that must not collide between parallel tests.
pub(crate) fn unique() -> String {
    joblet_runtime::job::JobId::generate().to_string()
}
