//! Capture benchmark.
fn main() {}
