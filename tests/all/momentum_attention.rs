//! Tests of the momentum_attention family.
