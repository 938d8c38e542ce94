//! moe (not yet implemented).
