//! momentum_attention (not yet implemented).
