//! Benchmarks of the linear_attention family (not yet implemented).
fn main() {}
