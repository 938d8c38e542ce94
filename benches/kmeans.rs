//! Benchmarks of the kmeans family (not yet implemented).
fn main() {}
