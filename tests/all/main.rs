//! Integration tests: one binary (fewer links), one module per family.

mod fuzz;
mod kmeans;
mod linear_attention;
mod maml;
mod moe;
mod momentum_attention;
mod tensor;
