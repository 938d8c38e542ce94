//! The flat parameter layout of an [`Mlp`], validated once per call and shared by the CPU and
//! CUDA paths: for each layer, W (fan_out × fan_in, row-major) then b (fan_out).

use super::{Activation, Loss, Mlp};
use crate::{Error, Result};

/// Parameter counts must fit in an `i32` so that kernels index with 32-bit arithmetic.
const MAX_PARAMS: usize = i32::MAX as usize;

/// A validated [`Mlp`] with its parameter offsets.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub sizes: Vec<usize>,
    pub activation: Activation,
    pub loss: Loss,
    /// Offset of W_l for each layer l (0-based); b_l follows at `w_offset[l] + fan_out·fan_in`.
    pub w_offset: Vec<usize>,
    pub num_params: usize,
}

impl Layout {
    pub fn new(mlp: &Mlp, op: &'static str) -> Result<Layout> {
        if mlp.sizes.len() < 2 {
            return Err(Error::invalid(
                op,
                "Mlp::sizes",
                format!("needs at least an input and an output width, got {:?}", mlp.sizes),
            ));
        }
        if mlp.sizes.contains(&0) {
            return Err(Error::invalid(
                op,
                "Mlp::sizes",
                format!("every width must be ≥ 1, got {:?}", mlp.sizes),
            ));
        }
        let num_params = mlp.num_params();
        if num_params > MAX_PARAMS {
            return Err(Error::invalid(
                op,
                "Mlp::sizes",
                format!("{:?} has {num_params} parameters; at most {MAX_PARAMS} are supported", mlp.sizes),
            ));
        }
        let mut w_offset = Vec::with_capacity(mlp.sizes.len() - 1);
        let mut offset = 0;
        for w in mlp.sizes.windows(2) {
            w_offset.push(offset);
            offset += w[1] * (w[0] + 1);
        }
        Ok(Layout {
            sizes: mlp.sizes.clone(),
            activation: mlp.activation,
            loss: mlp.loss,
            w_offset,
            num_params,
        })
    }

    /// The number of dense layers L.
    pub fn layers(&self) -> usize {
        self.sizes.len() - 1
    }

    pub fn fan_in(&self, l: usize) -> usize {
        self.sizes[l]
    }

    pub fn fan_out(&self, l: usize) -> usize {
        self.sizes[l + 1]
    }

    pub fn input(&self) -> usize {
        self.sizes[0]
    }

    pub fn output(&self) -> usize {
        self.sizes[self.sizes.len() - 1]
    }

    /// The widest layer output (hidden or final).
    pub fn max_width(&self) -> usize {
        self.sizes[1..].iter().copied().max().unwrap_or(1)
    }

    /// The range of W_l in the flat vector.
    pub fn weight(&self, l: usize) -> std::ops::Range<usize> {
        let start = self.w_offset[l];
        start..start + self.fan_out(l) * self.fan_in(l)
    }

    /// The range of b_l in the flat vector.
    pub fn bias(&self, l: usize) -> std::ops::Range<usize> {
        let start = self.weight(l).end;
        start..start + self.fan_out(l)
    }
}
