//! Content loss (Gatys et al. 2015): half the squared distance to the content image's features.

use easel_core::candle_core::Tensor;
use easel_core::sums::{sum_dtype, sum_of_squares};
use easel_core::{
    CoreError, FeatureMaps, LayerGrads, LayerId, Loss, LossFactory, OptionDefault, OptionSpec, Options,
    References, Tile, Tiling,
};

/// Builds [`ContentLoss`] from `type = "content"`.
pub struct ContentFactory;

/// This plugin, as the builtin registry (easel-plugins) adds it.
pub const PLUGIN: easel_core::Plugin = easel_core::Plugin::Loss(&ContentFactory);

const DEFAULT_LAYERS: &[LayerId] = &[LayerId::Relu4_2];

const OPTIONS: &[OptionSpec] = &[OptionSpec {
    key: "layers",
    kind: "list of layer names",
    default: OptionDefault::Layers(DEFAULT_LAYERS),
    doc: "layers whose features are matched; the per-layer losses are summed",
}];

impl LossFactory for ContentFactory {
    fn name(&self) -> &'static str {
        "content"
    }

    fn summary(&self) -> &'static str {
        "L = 1/2 sum (F - P)^2: keeps the content image's deep features"
    }

    fn options(&self) -> &'static [OptionSpec] {
        OPTIONS
    }

    fn build(&self, options: &mut Options<'_>) -> Box<dyn Loss> {
        let layers = options.layers("layers", DEFAULT_LAYERS);
        Box::new(ContentLoss { layers, targets: Vec::new() })
    }
}

/// `1/2 sum (F - P)^2` summed over the configured layers, P from the content image.
pub struct ContentLoss {
    layers: Vec<LayerId>,
    targets: Vec<Tensor>,
}

impl ContentLoss {
    /// A content loss on `layers`.
    pub fn new(layers: Vec<LayerId>) -> Self {
        Self { layers, targets: Vec::new() }
    }

    fn check_prepared(&self) -> Result<(), CoreError> {
        if self.targets.len() == self.layers.len() {
            Ok(())
        } else {
            Err(CoreError::MissingReference("content loss evaluated before prepare()".into()))
        }
    }
}

impl Loss for ContentLoss {
    fn layers(&self) -> Vec<LayerId> {
        self.layers.clone()
    }

    fn prepare(&mut self, references: &References<'_>) -> Result<(), CoreError> {
        self.targets = self
            .layers
            .iter()
            .map(|&layer| Ok(references.content.get(layer)?.detach()))
            .collect::<Result<_, CoreError>>()?;
        Ok(())
    }

    fn evaluate(&self, features: &FeatureMaps) -> Result<Tensor, CoreError> {
        self.check_prepared()?;
        let mut total: Option<Tensor> = None;
        for (&layer, target) in self.layers.iter().zip(&self.targets) {
            let diff = (features.get(layer)? - target)?;
            let term = (diff.to_dtype(sum_dtype(diff.device()))?.sqr()?.sum_all()? * 0.5)?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        total.ok_or_else(|| CoreError::MissingReference("content loss has no layers".into()))
    }

    /// The content image's features at each layer, f32.
    fn target_bytes(&self, shape: &dyn Fn(LayerId) -> (u64, u64)) -> u64 {
        self.layers.iter().map(|&l| 4 * shape(l).0 * shape(l).1).sum()
    }

    /// `dL/dF = F - P`: one subtraction instead of a graph for autograd to walk back.
    fn value_and_grad(&self, features: &FeatureMaps) -> Option<Result<(f64, LayerGrads), CoreError>> {
        let run = || {
            self.check_prepared()?;
            let mut value = 0.0;
            let mut grads = Vec::with_capacity(self.layers.len());
            for (&layer, target) in self.layers.iter().zip(&self.targets) {
                let diff = (features.get(layer)? - target)?;
                value += 0.5 * sum_of_squares(&diff)?;
                grads.push((layer, diff));
            }
            Ok((value, grads))
        };
        Some(run())
    }

    /// A sum over positions: each tile's share is that of its own positions.
    fn tiling(&self) -> Tiling {
        Tiling::Local
    }

    /// [`Loss::value_and_grad`] on the tile's own features against the same part of the target.
    fn tile_value_and_grad(&self, tile: &Tile<'_>) -> Result<(f64, LayerGrads), CoreError> {
        self.check_prepared()?;
        let mut value = 0.0;
        let mut grads = Vec::with_capacity(self.layers.len());
        for (&layer, target) in self.layers.iter().zip(&self.targets) {
            let diff = (tile.features.get(layer)? - tile.placement(layer)?.crop(target)?)?;
            value += 0.5 * sum_of_squares(&diff)?;
            grads.push((layer, diff));
        }
        Ok((value, grads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_core::candle_core::{Device, Var};
    use easel_testkit::{assert_gradient_matches, Tolerance};

    #[test]
    fn value_matches_definition_and_gradient_matches_finite_differences() -> Result<(), CoreError> {
        let dev = Device::Cpu;
        let target = Tensor::arange(0f32, 24.0, &dev)?.reshape((1, 2, 3, 4))?;
        let mut content = FeatureMaps::new();
        content.insert(LayerId::Relu4_2, (target.clone() * 0.1)?);
        let mut loss = ContentLoss::new(vec![LayerId::Relu4_2]);
        loss.prepare(&References { content: &content, styles: &[] })?;

        let x: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 * 0.13 - 0.4).collect();
        let at = |x: &[f32]| -> Result<f64, CoreError> {
            let mut f = FeatureMaps::new();
            f.insert(LayerId::Relu4_2, Tensor::from_slice(x, (1, 2, 3, 4), &dev)?);
            Ok(loss.evaluate(&f)?.to_scalar::<f64>()?)
        };
        let expected: f64 =
            x.iter().enumerate().map(|(i, v)| 0.5 * (*v as f64 - 0.1 * i as f64).powi(2)).sum();
        assert!((at(&x)? - expected).abs() < 1e-4 * expected);

        let var = Var::from_tensor(&Tensor::from_slice(&x, (1, 2, 3, 4), &dev)?)?;
        let mut f = FeatureMaps::new();
        f.insert(LayerId::Relu4_2, var.as_tensor().clone());
        let grads = loss.evaluate(&f)?.backward()?;
        let grad: Vec<f32> = grads.get(var.as_tensor()).expect("gradient").flatten_all()?.to_vec1()?;
        // The closed form gives the same value and gradient.
        let (value, closed) = loss.value_and_grad(&f).expect("content has a closed form")?;
        assert!((value - expected).abs() < 1e-4 * expected);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].0, LayerId::Relu4_2);
        let closed: Vec<f32> = closed[0].1.flatten_all()?.to_vec1()?;
        for (a, b) in closed.iter().zip(&grad) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "closed form {a} vs autograd {b}");
        }
        let tolerance = Tolerance { relative: 1e-3, floor: 1.0 };
        assert_gradient_matches("relu4_2", at, &x, &grad, [0, 5, 17, 23], 1e-2, tolerance)
    }
}
