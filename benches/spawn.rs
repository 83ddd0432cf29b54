//! Spawn benchmark.
fn main() {}
