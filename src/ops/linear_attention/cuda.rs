//! Launches of `kernels/linear_attention.cu` (stub).
use super::{BackwardArgs, BackwardResult, ForwardArgs, ForwardResult, Problem};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug)]
pub(crate) enum Path {
    Auto,
}

pub(super) fn forward(_p: &Problem, _a: &ForwardArgs<'_>, _path: Path) -> Result<ForwardResult> {
    Err(Error::KernelsNotBuilt { module: "linear_attention" })
}

pub(super) fn backward(
    _p: &Problem,
    _a: &ForwardArgs<'_>,
    _b: &BackwardArgs<'_>,
    _path: Path,
) -> Result<BackwardResult> {
    Err(Error::KernelsNotBuilt { module: "linear_attention" })
}
