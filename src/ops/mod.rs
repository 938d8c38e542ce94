//! The kernel families, one room each: `mod.rs` (public API, validation, dispatch), `cpu.rs`
//! (the CPU fallback) and `cuda.rs` (launches of `kernels/<family>.cu`).

pub(crate) mod cast;
pub mod kmeans;
pub mod linear_attention;
pub mod maml;
pub mod moe;
pub mod momentum_attention;
