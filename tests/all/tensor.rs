//! Tensor, dtype casts and device handling.
