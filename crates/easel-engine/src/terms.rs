//! The configured losses as terms of the objective: which layers they read, how they tile,
//! and their value and gradient on given features.

use candle_core::{Tensor, Var};
use easel_config::WeightedLoss;
use easel_core::sums::{scalar_f64, sum_dtype};
use easel_core::{FeatureMaps, LayerId, Tiling};

use crate::EngineError;

/// Every layer any of `losses` reads, in forward order.
pub fn layers_of(losses: &[WeightedLoss]) -> Vec<LayerId> {
    in_order(losses.iter().flat_map(|l| l.loss.layers()))
}

/// `layers` in forward order, each once.
fn in_order(layers: impl Iterator<Item = LayerId>) -> Vec<LayerId> {
    let mut layers: Vec<LayerId> = layers.collect();
    layers.sort_unstable();
    layers.dedup();
    layers
}

/// Whether `loss` reads the pixels only: such losses are evaluated on the whole image, which is
/// in memory anyway.
pub(crate) fn pixels_only(loss: &WeightedLoss) -> bool {
    loss.loss.layers().iter().all(|&l| l == LayerId::Pixels)
}

/// The layers (pixels excluded) the losses evaluated in tiles read, in forward order.
pub(crate) fn tiled_layers<'l>(losses: impl Iterator<Item = &'l WeightedLoss>) -> Vec<LayerId> {
    in_order(losses.flat_map(|l| l.loss.layers()).filter(|&l| l != LayerId::Pixels))
}

/// The losses that stop a job from being evaluated in tiles (by `kind`), if any.
pub fn untileable(losses: &[WeightedLoss]) -> Vec<&'static str> {
    losses
        .iter()
        .filter(|l| !pixels_only(l) && l.loss.tiling() == Tiling::Unsupported)
        .map(|l| l.kind)
        .collect()
}

/// Value of `sum_i scale_i * loss_i` over the given features, and its gradient w.r.t. each
/// layer it reads.
pub(crate) fn value_and_layer_grads(
    device: &candle_core::Device,
    features: &FeatureMaps,
    terms: &[(&WeightedLoss, f64)],
) -> Result<(f64, Vec<(LayerId, Tensor)>), EngineError> {
    let mut value = 0.0;
    let mut layer_grads: Vec<(LayerId, Tensor)> = Vec::new();
    let mut autograd_terms = Vec::new();
    for &(loss, scale) in terms {
        match loss.loss.value_and_grad(features) {
            Some(result) => {
                let (v, grads) = result?;
                value += scale * v;
                for (layer, g) in grads {
                    layer_grads.push((layer, (g * scale)?));
                }
            }
            None => autograd_terms.push((loss, scale)),
        }
    }
    if !autograd_terms.is_empty() {
        // The layers these losses read become leaf variables so candle differentiates the
        // losses only; the gradient then goes back through VGG-19 by the hand-written pass.
        let mut vars = Vec::new();
        let mut leaves = FeatureMaps::new();
        let wanted: Vec<LayerId> = autograd_terms.iter().flat_map(|(l, _)| l.loss.layers()).collect();
        for (layer, tensor) in features.iter().filter(|(l, _)| wanted.contains(l)) {
            let var = Var::from_tensor(tensor)?;
            leaves.insert(layer, var.as_tensor().clone());
            vars.push((layer, var));
        }
        let mut total = Tensor::zeros((), sum_dtype(device), device)?;
        for (loss, scale) in autograd_terms {
            total = (total + (loss.loss.evaluate(&leaves)? * scale)?)?;
        }
        let grads = total.backward()?;
        value += scalar_f64(&total)?;
        for (layer, var) in &vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                layer_grads.push((*layer, g.clone()));
            }
        }
    }
    Ok((value, layer_grads))
}
