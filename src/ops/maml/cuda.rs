//! CUDA launches (in progress).
