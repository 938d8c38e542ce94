//! CUDA tests (written with the kernels).
