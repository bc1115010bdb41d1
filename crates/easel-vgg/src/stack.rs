//! The chain of VGG-19's `features`: what each index does, the weights of its convolutions,
//! and the forward walk that every backend shares.

use candle_core::Tensor;
use easel_core::{FeatureMaps, LayerId};

use crate::conv::Activation;
use crate::cpu_tensor::contiguous_f32;
use crate::{VggError, CONVS, POOLS};

/// What one index of `features` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// The convolution of this ordinal in [`CONVS`].
    Conv(usize),
    Relu,
    Pool,
}

/// What index `index` of `features` does.
pub(crate) fn op(index: usize) -> Op {
    match CONVS.iter().position(|&(i, _, _)| i == index) {
        Some(ordinal) => Op::Conv(ordinal),
        None if POOLS.contains(&index) => Op::Pool,
        None => Op::Relu,
    }
}

/// One convolution's weights.
#[derive(Clone)]
pub(crate) struct ConvWeights {
    /// `[C_out, C_in, 3, 3]`.
    pub(crate) weight: Tensor,
    /// `[1, C_out, 1, 1]`.
    pub(crate) bias: Tensor,
}

/// What a backend does at each step of the forward pass, recording what its backward pass
/// will need; [`forward`] walks the chain and calls it.
pub(crate) trait ForwardSteps {
    /// Convolution `k` (its ordinal in [`CONVS`]) of `x`, then `activation`.
    fn conv(&mut self, k: usize, x: &Tensor, activation: Activation) -> Result<Tensor, VggError>;

    /// Takes note of the output `out` of the ReLU at `index`.
    fn relu_output(&mut self, index: usize, out: &Tensor) -> Result<(), VggError>;

    /// The pooling at `index` of `x`.
    fn pool(&mut self, index: usize, x: &Tensor) -> Result<Tensor, VggError>;
}

/// Runs the normalised input `x` through the chain up to index `last` with `steps`, and
/// returns the outputs of `wanted` (those with a features index).
///
/// A ReLU runs within the convolution before it unless that convolution's output (the
/// pre-activation) is wanted itself.
pub(crate) fn forward(
    steps: &mut dyn ForwardSteps,
    mut x: Tensor,
    wanted: &[LayerId],
    last: usize,
) -> Result<FeatureMaps, VggError> {
    let mut features = FeatureMaps::new();
    let is_wanted = |index: usize| LayerId::from_features_index(index).filter(|l| wanted.contains(l));
    // Whether x already went through the ReLU at this index, within the convolution before.
    let mut rectified = false;
    for index in 0..=last {
        let fused = std::mem::replace(&mut rectified, false);
        x = match op(index) {
            Op::Conv(k) => {
                rectified = index < last && op(index + 1) == Op::Relu && is_wanted(index).is_none();
                steps.conv(k, &x, if rectified { Activation::Relu } else { Activation::Identity })?
            }
            Op::Relu if fused => x,
            Op::Relu => x.relu()?,
            Op::Pool => steps.pool(index, &x)?,
        };
        if op(index) == Op::Relu {
            steps.relu_output(index, &x)?;
        }
        if let Some(layer) = is_wanted(index) {
            features.insert(layer, x.clone());
        }
    }
    Ok(features)
}

/// The sum of the gradients `grads` gives the output of index `index`, in f32, if any.
pub(crate) fn grad_at(grads: &[(LayerId, Tensor)], index: usize) -> Result<Option<Tensor>, VggError> {
    let mut sum: Option<Tensor> = None;
    for (_, g) in grads.iter().filter(|(l, _)| l.features_index() == Some(index)) {
        sum = add(sum, contiguous_f32(g)?)?;
    }
    Ok(sum)
}

/// `grad` (the gradient flowing back into index `index`'s output) plus what `grads` gives
/// that output directly: what a backward pass carries on from there, if anything.
pub(crate) fn with_grads_at(
    grad: Option<Tensor>,
    grads: &[(LayerId, Tensor)],
    index: usize,
) -> Result<Option<Tensor>, VggError> {
    match grad_at(grads, index)? {
        Some(g) => add(grad, g),
        None => Ok(grad),
    }
}

fn add(sum: Option<Tensor>, g: Tensor) -> Result<Option<Tensor>, VggError> {
    Ok(Some(match sum {
        Some(acc) => (acc + g)?,
        None => g,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_follow_torchvision_features() {
        for (k, &(index, _, _)) in CONVS.iter().enumerate() {
            assert_eq!(op(index), Op::Conv(k));
            assert_eq!(op(index + 1), Op::Relu, "a ReLU follows every convolution");
        }
        for &index in &POOLS {
            assert_eq!(op(index), Op::Pool);
            assert_eq!(op(index - 1), Op::Relu, "every pool follows a ReLU");
            assert_eq!(LayerId::from_features_index(index).map(|l| l.name().starts_with("pool")), Some(true));
        }
    }
}
