//! The style-transfer objective: weighted losses on VGG-19 features, and its pixel gradient.

use candle_core::Tensor;
use easel_config::WeightedLoss;
use easel_core::sums::sum_of_squares;
use easel_core::{CoreError, LayerId, Objective};
use easel_vgg::Vgg19;

use crate::terms::{layers_of, value_and_layer_grads};
use crate::EngineError;

/// Sum of `weight * loss` over the configured losses, as a function of the pixel image.
pub struct StyleObjective<'a> {
    vgg: &'a Vgg19,
    losses: &'a [WeightedLoss],
    layers: Vec<LayerId>,
    evaluations: usize,
    /// `Some(step)`: evaluated in tiles of `step` pixels (see [`crate::tiled`]).
    tile_step: Option<usize>,
}

/// One loss's unweighted value and gradient norm at an image (`easel eval`).
#[derive(Debug, Clone, PartialEq)]
pub struct LossReport {
    pub kind: &'static str,
    pub weight: f64,
    pub value: f64,
    pub grad_l2: f64,
}

/// The L2 norm of a tensor, accumulated in the device's sum type (f64 but on Metal).
pub fn l2_norm(t: &Tensor) -> Result<f64, CoreError> {
    Ok(sum_of_squares(t)?.sqrt())
}

impl<'a> StyleObjective<'a> {
    /// The objective of `losses` (already prepared for the current scale) on `vgg`.
    pub fn new(vgg: &'a Vgg19, losses: &'a [WeightedLoss]) -> Self {
        Self { vgg, losses, layers: layers_of(losses), evaluations: 0, tile_step: None }
    }

    /// The same objective evaluated in tiles of `step` pixels (a multiple of
    /// [`crate::tiles::STEP_ALIGN`]), or whole for `None`.
    pub fn tiled(mut self, step: Option<usize>) -> Self {
        self.tile_step = step;
        self
    }

    /// Evaluations so far.
    pub fn evaluations(&self) -> usize {
        self.evaluations
    }

    /// Each loss's unweighted value and gradient norm at `x`, one forward pass for all.
    pub fn report(&mut self, x: &Tensor) -> Result<Vec<LossReport>, EngineError> {
        if let Some(step) = self.tile_step {
            return self
                .losses
                .iter()
                .map(|loss| {
                    let (value, grad) = crate::tiled::total(self.vgg, &[(loss, 1.0)], x, step)?;
                    Ok(LossReport { kind: loss.kind, weight: loss.weight, value, grad_l2: l2_norm(&grad)? })
                })
                .collect();
        }
        let (features, trace) = self.vgg.forward_traced(x, &self.layers)?;
        self.losses
            .iter()
            .map(|loss| {
                let (value, layer_grads) =
                    value_and_layer_grads(self.vgg.device(), &features, &[(loss, 1.0)])?;
                let grad = self.vgg.backward(&trace, &layer_grads)?;
                Ok(LossReport { kind: loss.kind, weight: loss.weight, value, grad_l2: l2_norm(&grad)? })
            })
            .collect()
    }

    /// The weighted total and its pixel gradient at `x`.
    pub fn total(&mut self, x: &Tensor) -> Result<(f64, Tensor), EngineError> {
        self.evaluations += 1;
        let terms: Vec<(&WeightedLoss, f64)> = self.losses.iter().map(|l| (l, l.weight)).collect();
        if let Some(step) = self.tile_step {
            return crate::tiled::total(self.vgg, &terms, x, step);
        }
        let (features, trace) = self.vgg.forward_traced(x, &self.layers)?;
        let (value, layer_grads) = value_and_layer_grads(self.vgg.device(), &features, &terms)?;
        // The backward pass needs only the trace: freeing the features first lowers the peak
        // memory on the CPU, where the trace keeps none of them.
        drop(features);
        Ok((value, self.vgg.backward(&trace, &layer_grads)?))
    }
}

impl Objective for StyleObjective<'_> {
    fn evaluate(&mut self, x: &Tensor) -> Result<(f64, Tensor), CoreError> {
        let (value, grad) = self.total(x).map_err(|e| match e {
            EngineError::Core(c) => c,
            EngineError::Vgg(easel_vgg::VggError::Tensor(t)) => CoreError::Tensor(t),
            other => CoreError::Objective(Box::new(other)),
        })?;
        if !value.is_finite() {
            return Err(CoreError::NonFinite { value, evaluation: self.evaluations });
        }
        Ok((value, grad))
    }
}
