//! Tests of the linear_attention family.
