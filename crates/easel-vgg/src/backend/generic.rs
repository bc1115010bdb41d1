//! The generic backend: candle's tensor ops on any device. Its trace keeps every ReLU's
//! output (masks of the ReLU gradient, inputs of the pools), and its backward pass takes
//! one layer at a time.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use easel_core::LayerId;

use super::{kept_at, Keep};
use crate::conv::{self, Activation};
use crate::pool::{self, Pooling};
use crate::stack::{op, with_grads_at, ConvWeights, ForwardSteps, Op};
use crate::VggError;

/// The generic backend's kernels of the input gradients, flipped once.
#[derive(Clone)]
pub(crate) struct GenericLayers {
    /// `[C_in, C_out, 3, 3]` per convolution, in [`crate::CONVS`]'s order.
    flipped: Vec<Tensor>,
}

/// What a traced forward pass kept: the output of every ReLU.
#[derive(Default)]
pub(crate) struct Kept {
    relu_outputs: BTreeMap<usize, Tensor>,
}

impl Kept {
    fn relu_output(&self, index: usize) -> Result<&Tensor, VggError> {
        kept_at(&self.relu_outputs, index, "ReLU")
    }
}

impl GenericLayers {
    pub(crate) fn new(convs: &[ConvWeights]) -> Result<Self, VggError> {
        let flipped = convs.iter().map(|c| conv::generic::flipped(&c.weight)).collect::<Result<_, _>>()?;
        Ok(Self { flipped })
    }

    /// The gradient w.r.t. the normalised input, from `grads` at the layers' outputs.
    pub(crate) fn backward(
        &self,
        pooling: Pooling,
        kept: &Kept,
        grads: &[(LayerId, Tensor)],
    ) -> Result<Option<Tensor>, VggError> {
        let deepest = grads.iter().filter_map(|(l, _)| l.features_index()).max();
        let mut grad: Option<Tensor> = None;
        for index in (0..deepest.map_or(0, |d| d + 1)).rev() {
            let Some(g) = with_grads_at(grad.take(), grads, index)? else { continue };
            grad = Some(match op(index) {
                Op::Conv(k) => conv::generic::input_grad(&g, &self.flipped[k])?,
                Op::Relu => {
                    // Selected through the mask's bytes rather than multiplied by it as floats:
                    // one activation-sized f32 tensor fewer at the backward pass's peak.
                    let closed = Tensor::zeros((), DType::F32, g.device())?.broadcast_as(g.shape())?;
                    kept.relu_output(index)?.gt(0f32)?.where_cond(&g, &closed)?
                }
                Op::Pool => {
                    // Every pool of VGG-19 follows a ReLU, whose output is its input.
                    let input = kept.relu_output(index - 1)?;
                    match pooling {
                        Pooling::Max => pool::generic::max_pool_backward(input, &g)?,
                        Pooling::Avg => pool::generic::avg_pool_backward(input.dims4()?, &g)?,
                    }
                }
            });
        }
        Ok(grad)
    }
}

/// One forward pass on the generic backend.
pub(crate) struct Steps<'a> {
    convs: &'a [ConvWeights],
    pooling: Pooling,
    /// `None` when the pass keeps nothing for a backward pass.
    kept: Option<Kept>,
}

impl<'a> Steps<'a> {
    pub(crate) fn new(convs: &'a [ConvWeights], pooling: Pooling, keep: Keep) -> Self {
        Self { convs, pooling, kept: (keep == Keep::ForBackward).then(Kept::default) }
    }

    /// What the pass kept (nothing, unless it was made to keep).
    pub(crate) fn into_kept(self) -> Kept {
        self.kept.unwrap_or_default()
    }
}

impl ForwardSteps for Steps<'_> {
    fn conv(&mut self, k: usize, x: &Tensor, activation: Activation) -> Result<Tensor, VggError> {
        let ConvWeights { weight, bias } = &self.convs[k];
        Ok(conv::generic::forward(x, weight, bias, activation)?)
    }

    fn relu_output(&mut self, index: usize, out: &Tensor) -> Result<(), VggError> {
        if let Some(kept) = &mut self.kept {
            kept.relu_outputs.insert(index, out.clone());
        }
        Ok(())
    }

    fn pool(&mut self, _index: usize, x: &Tensor) -> Result<Tensor, VggError> {
        Ok(match self.pooling {
            Pooling::Max => x.max_pool2d(2)?,
            Pooling::Avg => x.avg_pool2d(2)?,
        })
    }
}
