//! Pure cgroup v2 driver.
