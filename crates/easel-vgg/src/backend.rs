//! How the feature stack runs: on easel's own CPU kernels, or on candle's tensor ops on any
//! device. Chosen once, when the model loads; a trace is tied to the backend that made it.

mod cpu;
mod generic;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;
use easel_core::LayerId;

use crate::conv::{KernelCache, Winograd};
use crate::pool::Pooling;
use crate::stack::{self, ConvWeights};
use crate::VggError;

/// Which implementation runs the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// easel's own CPU kernels: direct and Winograd convolutions on the vector unit, ReLU
    /// masks kept as bits, backward steps fused. The default on the CPU.
    Cpu,
    /// candle's tensor ops, on any device: CUDA and Metal use it, and on the CPU it is an
    /// independent path to check the other against.
    Generic,
}

/// Whether a forward pass keeps what the backward pass needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Nothing: features only.
    Nothing,
    /// The backend's trace, for [`Layers::backward`].
    ForBackward,
}

/// How a forward pass runs: what it keeps, and whether its input is a window of a larger
/// image, whose choice of convolution algorithm it then follows (`whole`: that image's
/// `(height, width)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pass {
    pub(crate) keep: Keep,
    pub(crate) whole: Option<(usize, usize)>,
}

/// What a trace kept at `index`, or an error naming what is missing (a trace always keeps
/// what its backward pass reads: this is a broken invariant, not a user error).
fn kept_at<'a, T>(kept: &'a BTreeMap<usize, T>, index: usize, what: &str) -> Result<&'a T, VggError> {
    kept.get(&index).ok_or_else(|| VggError::Internal(format!("the trace lacks the {what} at {index}")))
}

/// A backend with what it keeps between passes.
#[derive(Clone)]
pub(crate) enum Layers {
    Cpu(cpu::CpuLayers),
    Generic(generic::GenericLayers),
}

/// What a traced forward pass kept for the backward pass, in its backend's terms.
pub(crate) enum Kept {
    Cpu(cpu::Kept),
    Generic(generic::Kept),
}

impl Layers {
    /// The CPU backend with the given Winograd mode and kernel cache.
    pub(crate) fn cpu(winograd: Winograd, kernels: Arc<KernelCache>) -> Self {
        Layers::Cpu(cpu::CpuLayers { winograd, kernels })
    }

    /// The generic backend for `convs`: their input-gradient kernels are flipped now, once.
    pub(crate) fn generic(convs: &[ConvWeights]) -> Result<Self, VggError> {
        Ok(Layers::Generic(generic::GenericLayers::new(convs)?))
    }

    /// Which backend this is.
    pub(crate) fn backend(&self) -> Backend {
        match self {
            Layers::Cpu(_) => Backend::Cpu,
            Layers::Generic(_) => Backend::Generic,
        }
    }

    /// What a pass that runs no layer keeps.
    pub(crate) fn kept_nothing(&self) -> Kept {
        match self {
            Layers::Cpu(_) => Kept::Cpu(cpu::Kept::default()),
            Layers::Generic(_) => Kept::Generic(generic::Kept::default()),
        }
    }

    /// The normalised input `x` through the layers up to index `last`: the outputs of
    /// `wanted`, and what `pass` keeps (the CPU backend also follows its `whole`).
    pub(crate) fn forward(
        &self,
        convs: &[ConvWeights],
        pooling: Pooling,
        x: Tensor,
        wanted: &[LayerId],
        last: usize,
        pass: Pass,
    ) -> Result<(easel_core::FeatureMaps, Kept), VggError> {
        let Pass { keep, whole } = pass;
        Ok(match self {
            Layers::Cpu(layers) => {
                let mut steps = cpu::Steps::new(layers, convs, pooling, keep, whole);
                let features = stack::forward(&mut steps, x, wanted, last)?;
                (features, Kept::Cpu(steps.into_kept()))
            }
            Layers::Generic(_) => {
                let mut steps = generic::Steps::new(convs, pooling, keep);
                let features = stack::forward(&mut steps, x, wanted, last)?;
                (features, Kept::Generic(steps.into_kept()))
            }
        })
    }

    /// The gradient w.r.t. the normalised input, from the gradients of the layers' outputs
    /// (`None` if no layer below the pixels has one).
    pub(crate) fn backward(
        &self,
        convs: &[ConvWeights],
        pooling: Pooling,
        kept: &Kept,
        grads: &[(LayerId, Tensor)],
    ) -> Result<Option<Tensor>, VggError> {
        match (self, kept) {
            (Layers::Cpu(layers), Kept::Cpu(kept)) => layers.backward(convs, kept, grads),
            (Layers::Generic(layers), Kept::Generic(kept)) => layers.backward(pooling, kept, grads),
            _ => Err(VggError::ForeignTrace),
        }
    }
}
