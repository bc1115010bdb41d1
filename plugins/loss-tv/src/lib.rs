//! Total-variation loss: squared differences of neighbouring pixels, for smoother results.

use easel_core::candle_core::{DType, Tensor};
use easel_core::{
    CoreError, FeatureMaps, LayerGrads, LayerId, Loss, LossFactory, OptionSpec, Options, References,
};

/// Builds [`TvLoss`] from `type = "tv"`.
pub struct TvFactory;

impl LossFactory for TvFactory {
    fn name(&self) -> &'static str {
        "tv"
    }

    fn summary(&self) -> &'static str {
        "L = sum (p[y+1,x]-p[y,x])^2 + (p[y,x+1]-p[y,x])^2 on the pixel image: suppresses noise"
    }

    fn options(&self) -> &'static [OptionSpec] {
        &[]
    }

    fn build(&self, _options: &mut Options<'_>) -> Box<dyn Loss> {
        Box::new(TvLoss)
    }
}

/// Sum of squared vertical and horizontal neighbour differences over all channels.
pub struct TvLoss;

impl Loss for TvLoss {
    fn layers(&self) -> Vec<LayerId> {
        vec![LayerId::Pixels]
    }

    fn prepare(&mut self, _references: &References<'_>) -> Result<(), CoreError> {
        Ok(())
    }

    fn evaluate(&self, features: &FeatureMaps) -> Result<Tensor, CoreError> {
        let p = features.get(LayerId::Pixels)?;
        let (_, _, h, w) = p.dims4()?;
        let mut total = Tensor::zeros((), DType::F64, p.device())?;
        if h > 1 {
            let dy = (p.narrow(2, 1, h - 1)? - p.narrow(2, 0, h - 1)?)?;
            total = (total + dy.to_dtype(DType::F64)?.sqr()?.sum_all()?)?;
        }
        if w > 1 {
            let dx = (p.narrow(3, 1, w - 1)? - p.narrow(3, 0, w - 1)?)?;
            total = (total + dx.to_dtype(DType::F64)?.sqr()?.sum_all()?)?;
        }
        Ok(total)
    }

    /// Each difference `d = p[i+1] - p[i]` adds `2d` to the gradient at `i+1` and `-2d` at
    /// `i`. A plain loop over the pixels: candle would walk strided views element by element.
    fn value_and_grad(&self, features: &FeatureMaps) -> Option<Result<(f64, LayerGrads), CoreError>> {
        let run = || {
            let p = features.get(LayerId::Pixels)?;
            let (_, _, h, w) = p.dims4()?;
            let values = p.flatten_all()?.to_vec1::<f32>()?;
            let mut grad = vec![0f32; values.len()];
            let mut value = 0.0;
            let mut term = |grad: &mut [f32], i: usize, j: usize| {
                let d = values[j] - values[i];
                value += f64::from(d) * f64::from(d);
                grad[j] += 2.0 * d;
                grad[i] -= 2.0 * d;
            };
            for plane in (0..values.len()).step_by((h * w).max(1)) {
                for y in 0..h {
                    for x in 0..w {
                        let i = plane + y * w + x;
                        if y + 1 < h {
                            term(&mut grad, i, i + w);
                        }
                        if x + 1 < w {
                            term(&mut grad, i, i + 1);
                        }
                    }
                }
            }
            let grad = Tensor::from_vec(grad, p.shape(), p.device())?;
            Ok((value, vec![(LayerId::Pixels, grad)]))
        };
        Some(run())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_core::candle_core::{Device, Var};
    use easel_testkit::{assert_gradient_matches, Tolerance};

    fn image(x: &[f32]) -> Result<FeatureMaps, CoreError> {
        let mut f = FeatureMaps::new();
        f.insert(LayerId::Pixels, Tensor::from_slice(x, (1, 2, 3, 4), &Device::Cpu)?);
        Ok(f)
    }

    #[test]
    fn value_matches_definition_and_gradient_matches_finite_differences() -> Result<(), CoreError> {
        let x: Vec<f32> = (0..24).map(|i| ((i * 5) % 7) as f32 * 0.1).collect();
        let at =
            |x: &[f32]| -> Result<f64, CoreError> { Ok(TvLoss.evaluate(&image(x)?)?.to_scalar::<f64>()?) };
        let px = |c: usize, y: usize, x_: usize| x[c * 12 + y * 4 + x_] as f64;
        let mut expected = 0.0;
        for c in 0..2 {
            for y in 0..3 {
                for x_ in 0..4 {
                    if y + 1 < 3 {
                        expected += (px(c, y + 1, x_) - px(c, y, x_)).powi(2);
                    }
                    if x_ + 1 < 4 {
                        expected += (px(c, y, x_ + 1) - px(c, y, x_)).powi(2);
                    }
                }
            }
        }
        assert!((at(&x)? - expected).abs() < 1e-5 * expected.max(1.0));

        let var = Var::from_tensor(&Tensor::from_slice(&x, (1, 2, 3, 4), &Device::Cpu)?)?;
        let mut f = FeatureMaps::new();
        f.insert(LayerId::Pixels, var.as_tensor().clone());
        let grads = TvLoss.evaluate(&f)?.backward()?;
        let grad: Vec<f32> = grads.get(var.as_tensor()).expect("gradient").flatten_all()?.to_vec1()?;
        // The closed form gives the same value and gradient.
        let (value, closed) = TvLoss.value_and_grad(&f).expect("tv has a closed form")?;
        assert!((value - expected).abs() < 1e-5 * expected.max(1.0));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].0, LayerId::Pixels);
        let closed: Vec<f32> = closed[0].1.flatten_all()?.to_vec1()?;
        for (a, b) in closed.iter().zip(&grad) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "closed form {a} vs autograd {b}");
        }
        let tolerance = Tolerance { relative: 1e-3, floor: 1.0 };
        assert_gradient_matches("pixels", at, &x, &grad, 0..24, 1e-2, tolerance)
    }
}
