//! The CPU backend: easel's convolution kernels, ReLU masks as bits, max-pooling winners as
//! bytes, and a backward pass in which each step writes its result once, with the ReLU
//! below it (and the gradient of that ReLU's own output, if requested) folded in.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;
use easel_core::LayerId;

use super::{kept_at, Keep};
use crate::conv::{self, Activation, Algo, KernelCache, Winograd};
use crate::pool::{self, Pooling, Routing};
use crate::relu_mask::{relu_backward, ReluMask};
use crate::stack::{grad_at, op, with_grads_at, ConvWeights, ForwardSteps, Op};
use crate::{VggError, CONVS};

/// The CPU backend's settings and its cache of transformed Winograd kernels.
#[derive(Clone)]
pub(crate) struct CpuLayers {
    pub(crate) winograd: Winograd,
    /// Shared by the model's clones, so that a daemon keeps it across jobs.
    pub(crate) kernels: Arc<KernelCache>,
}

/// A pooling layer as its backward pass needs it.
struct PoolRecord {
    input_dims: (usize, usize, usize, usize),
    /// Which input of each window won, for max pooling.
    winners: Option<Vec<u8>>,
}

/// What a traced forward pass kept: each ReLU's mask, and each pool's input shape and
/// winners. No activation is kept, so the caller may drop the features before backward.
#[derive(Default)]
pub(crate) struct Kept {
    masks: BTreeMap<usize, ReluMask>,
    pools: BTreeMap<usize, PoolRecord>,
    /// The whole image's size when the pass ran on a window of it (see [`Steps`]).
    whole: Option<(usize, usize)>,
}

impl Kept {
    fn mask(&self, index: usize) -> Result<&ReluMask, VggError> {
        kept_at(&self.masks, index, "ReLU")
    }
}

impl CpuLayers {
    /// How the forward pass of convolution `k` runs.
    fn forward_algo(&self, k: usize) -> Algo<'_> {
        if self.winograd.forward_of(k) {
            Algo::Winograd(Some((&self.kernels, k)))
        } else {
            Algo::Direct
        }
    }

    /// How the input gradient of convolution `k` runs.
    fn gradient_algo(&self, k: usize) -> Algo<'_> {
        if self.winograd.gradients() {
            Algo::Winograd(Some((&self.kernels, k)))
        } else {
            Algo::Direct
        }
    }

    /// `algo` for convolution `k`, with a Winograd tile chosen as for the whole image when the
    /// pass runs on a window of a `whole`-sized image: the window then computes as the whole
    /// image does, and its kernels are the ones the cache holds for it.
    fn as_whole<'s>(algo: Algo<'s>, k: usize, whole: Option<(usize, usize)>) -> Algo<'s> {
        match (algo, whole) {
            (Algo::Winograd(cache), Some((height, width))) => {
                let (_, h, w) = crate::memory::index_shape(CONVS[k].0, height, width);
                Algo::WinogradAs(cache, (h, w))
            }
            (algo, _) => algo,
        }
    }

    /// The gradient w.r.t. the normalised input, from `grads` at the layers' outputs.
    pub(crate) fn backward(
        &self,
        convs: &[ConvWeights],
        kept: &Kept,
        grads: &[(LayerId, Tensor)],
    ) -> Result<Option<Tensor>, VggError> {
        let deepest = grads.iter().filter_map(|(l, _)| l.features_index()).max();
        let mut grad: Option<Tensor> = None;
        // The ReLU at this index was already folded into the backward step above it.
        let mut folded = false;
        for index in (0..deepest.map_or(0, |d| d + 1)).rev() {
            if std::mem::replace(&mut folded, false) {
                continue;
            }
            let Some(g) = with_grads_at(grad.take(), grads, index)? else { continue };
            grad = Some(match op(index) {
                Op::Conv(k) if index > 0 && op(index - 1) == Op::Relu => {
                    folded = true;
                    let add = grad_at(grads, index - 1)?;
                    let weight = &convs[k].weight;
                    conv::input_grad_masked(
                        &g,
                        weight,
                        add.as_ref(),
                        kept.mask(index - 1)?,
                        Self::as_whole(self.gradient_algo(k), k, kept.whole),
                    )?
                }
                Op::Conv(k) => conv::input_grad(
                    &g,
                    &convs[k].weight,
                    Self::as_whole(self.gradient_algo(k), k, kept.whole),
                )?,
                Op::Relu => relu_backward(&g, None, kept.mask(index)?)?,
                Op::Pool => {
                    // Every pool of VGG-19 follows a ReLU.
                    folded = true;
                    let add = grad_at(grads, index - 1)?;
                    let record = kept_at(&kept.pools, index, "pool")?;
                    let routing = match &record.winners {
                        Some(winners) => Routing::Max(winners),
                        None => Routing::Avg,
                    };
                    pool::backward(&g, record.input_dims, routing, add.as_ref(), kept.mask(index - 1)?)?
                }
            });
        }
        Ok(grad)
    }
}

/// One forward pass on the CPU backend.
pub(crate) struct Steps<'a> {
    layers: &'a CpuLayers,
    convs: &'a [ConvWeights],
    pooling: Pooling,
    /// `None` when the pass keeps nothing for a backward pass.
    kept: Option<Kept>,
    /// `Some((height, width))`: the input is a window of an image of this size, whose choice
    /// of algorithm each convolution follows.
    whole: Option<(usize, usize)>,
}

impl<'a> Steps<'a> {
    pub(crate) fn new(
        layers: &'a CpuLayers,
        convs: &'a [ConvWeights],
        pooling: Pooling,
        keep: Keep,
        whole: Option<(usize, usize)>,
    ) -> Self {
        let kept = (keep == Keep::ForBackward).then(|| Kept { whole, ..Kept::default() });
        Self { layers, convs, pooling, kept, whole }
    }

    /// What the pass kept (nothing, unless it was made to keep).
    pub(crate) fn into_kept(self) -> Kept {
        self.kept.unwrap_or_default()
    }
}

impl ForwardSteps for Steps<'_> {
    fn conv(&mut self, k: usize, x: &Tensor, activation: Activation) -> Result<Tensor, VggError> {
        let ConvWeights { weight, bias } = &self.convs[k];
        let algo = CpuLayers::as_whole(self.layers.forward_algo(k), k, self.whole);
        conv::forward(x, weight, bias, activation, algo)
    }

    fn relu_output(&mut self, index: usize, out: &Tensor) -> Result<(), VggError> {
        if let Some(kept) = &mut self.kept {
            kept.masks.insert(index, ReluMask::of(out)?);
        }
        Ok(())
    }

    fn pool(&mut self, index: usize, x: &Tensor) -> Result<Tensor, VggError> {
        let input_dims = x.dims4()?;
        let (pooled, winners) = match self.pooling {
            Pooling::Max => {
                let (pooled, winners) = pool::max_pool(x)?;
                (pooled, Some(winners))
            }
            Pooling::Avg => (x.avg_pool2d(2)?, None),
        };
        if let Some(kept) = &mut self.kept {
            kept.pools.insert(index, PoolRecord { input_dims, winners });
        }
        Ok(pooled)
    }
}
