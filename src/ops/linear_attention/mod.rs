//! linear_attention (not yet implemented).
