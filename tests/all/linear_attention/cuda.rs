//! CUDA tests (see below).
