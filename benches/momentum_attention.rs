//! Benchmarks of the momentum_attention family (not yet implemented).
fn main() {}
