//! maml (not yet implemented).
