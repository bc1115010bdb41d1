//! Total-variation loss: squared differences of neighbouring pixels, for smoother results.

use easel_core::candle_core::Tensor;
use easel_core::sums::{scalar_f64, sum_dtype};
use easel_core::{
    CoreError, FeatureMaps, LayerGrads, LayerId, Loss, LossFactory, OptionSpec, Options, References,
};

/// Builds [`TvLoss`] from `type = "tv"`.
pub struct TvFactory;

/// This plugin, as the builtin registry (easel-plugins) adds it.
pub const PLUGIN: easel_core::Plugin = easel_core::Plugin::Loss(&TvFactory);

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
        let sum = sum_dtype(p.device());
        let mut total = Tensor::zeros((), sum, p.device())?;
        if h > 1 {
            let dy = (p.narrow(2, 1, h - 1)? - p.narrow(2, 0, h - 1)?)?;
            total = (total + dy.to_dtype(sum)?.sqr()?.sum_all()?)?;
        }
        if w > 1 {
            let dx = (p.narrow(3, 1, w - 1)? - p.narrow(3, 0, w - 1)?)?;
            total = (total + dx.to_dtype(sum)?.sqr()?.sum_all()?)?;
        }
        Ok(total)
    }

    /// Each difference `d = p[i+1] - p[i]` adds `2d` to the gradient at `i+1` and `-2d` at
    /// `i`.
    fn value_and_grad(&self, features: &FeatureMaps) -> Option<Result<(f64, LayerGrads), CoreError>> {
        let run = || {
            let p = features.get(LayerId::Pixels)?;
            let (value, grad) = if p.device().is_cpu() { on_host(p)? } else { on_device(p)? };
            Ok((value, vec![(LayerId::Pixels, grad)]))
        };
        Some(run())
    }
}

/// [`TvLoss`]'s value and gradient by a plain loop over the pixels in CPU memory: candle would
/// walk strided views element by element.
fn on_host(p: &Tensor) -> Result<(f64, Tensor), CoreError> {
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
    Ok((value, Tensor::from_vec(grad, p.shape(), p.device())?))
}

/// [`TvLoss`]'s value and gradient with tensor ops on the image's own device (a GPU), so
/// that the image never leaves it: each difference along an axis, padded back to the image's
/// size once on each side, gives its `+2d` and `-2d`.
fn on_device(p: &Tensor) -> Result<(f64, Tensor), CoreError> {
    let (_, _, h, w) = p.dims4()?;
    let sum = sum_dtype(p.device());
    let mut value = Tensor::zeros((), sum, p.device())?;
    let mut grad = p.zeros_like()?;
    for (axis, len) in [(2, h), (3, w)] {
        if len > 1 {
            let d = (p.narrow(axis, 1, len - 1)? - p.narrow(axis, 0, len - 1)?)?;
            value = (value + d.to_dtype(sum)?.sqr()?.sum_all()?)?;
            let twice = (d * 2.0)?;
            grad = ((grad + twice.pad_with_zeros(axis, 1, 0)?)? - twice.pad_with_zeros(axis, 0, 1)?)?;
        }
    }
    Ok((scalar_f64(&value)?, grad))
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

    /// The tensor-op path of GPUs gives the CPU loop's value and gradient.
    #[test]
    fn device_path_matches_the_host_loop() -> Result<(), CoreError> {
        let x: Vec<f32> = (0..3 * 5 * 7).map(|i| ((i * 5) % 11) as f32 * 0.09 - 0.3).collect();
        let p = Tensor::from_slice(&x, (1, 3, 5, 7), &Device::Cpu)?;
        let (v_host, g_host) = on_host(&p)?;
        let (v_ops, g_ops) = on_device(&p)?;
        assert!((v_host - v_ops).abs() <= 1e-12 * v_host, "{v_host} vs {v_ops}");
        let (g_host, g_ops): (Vec<f32>, Vec<f32>) =
            (g_host.flatten_all()?.to_vec1()?, g_ops.flatten_all()?.to_vec1()?);
        for (i, (a, b)) in g_host.iter().zip(&g_ops).enumerate() {
            assert!((a - b).abs() <= 1e-6, "entry {i}: {a} vs {b}");
        }
        Ok(())
    }
}
