//! Benchmarks of the maml family (not yet implemented).
fn main() {}
