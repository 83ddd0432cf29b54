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
