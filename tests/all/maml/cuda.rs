//! CUDA tests of the maml family (filled below).
