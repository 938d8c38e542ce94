//! Benchmarks of the moe family (not yet implemented).
fn main() {}
