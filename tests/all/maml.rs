//! Tests of the maml family.
