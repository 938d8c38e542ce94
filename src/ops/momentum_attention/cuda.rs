//! Launches of `kernels/momentum_attention.cu` (being written).
use super::{MomentumAttentionGrads, Problem, SoftmaxParams};
use crate::{Error, Result, Tensor};

pub(super) fn forward(_: &Problem, _: &SoftmaxParams, _: &Tensor, _: &Tensor, _: &Tensor, _: &[usize]) -> Result<Tensor> {
    Err(Error::KernelsNotBuilt { module: "momentum_attention" })
}
pub(super) fn backward(_: &Problem, _: &SoftmaxParams, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: &[usize]) -> Result<MomentumAttentionGrads> {
    Err(Error::KernelsNotBuilt { module: "momentum_attention" })
}
