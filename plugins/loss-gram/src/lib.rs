//! Style loss (Gatys et al. 2015): distance between Gram matrices of features, over several layers.

use easel_core::candle_core::Tensor;
use easel_core::sums::{sum_dtype, sum_of_squares};
use easel_core::{
    CoreError, FeatureMaps, LayerGrads, LayerId, Loss, LossFactory, OptionDefault, OptionSpec, Options,
    References, StyleStatistics, Tile, Tiling,
};
use rayon::prelude::*;

/// Builds [`GramLoss`] from `type = "gram"`.
pub struct GramFactory;

/// This plugin, as the builtin registry (easel-plugins) adds it.
pub const PLUGIN: easel_core::Plugin = easel_core::Plugin::Loss(&GramFactory);

const DEFAULT_LAYERS: &[LayerId] =
    &[LayerId::Relu1_1, LayerId::Relu2_1, LayerId::Relu3_1, LayerId::Relu4_1, LayerId::Relu5_1];

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        key: "layers",
        kind: "list of layer names",
        default: OptionDefault::Layers(DEFAULT_LAYERS),
        doc: "layers whose Gram matrices are matched",
    },
    OptionSpec {
        key: "layer_weights",
        kind: "list of numbers >= 0, one per layer",
        default: OptionDefault::Derived("1/n each"),
        doc: "w_l in L = sum_l w_l E_l",
    },
];

impl LossFactory for GramFactory {
    fn name(&self) -> &'static str {
        "gram"
    }

    fn summary(&self) -> &'static str {
        "E_l = sum (G - A)^2 / (4 N^2), G = F F^T / M; several style images blend their A"
    }

    fn options(&self) -> &'static [OptionSpec] {
        OPTIONS
    }

    fn build(&self, options: &mut Options<'_>) -> Box<dyn Loss> {
        let layers = options.layers("layers", DEFAULT_LAYERS);
        let n = layers.len().max(1);
        let layer_weights =
            match options.numbers("layer_weights", |w| (w < 0.0).then(|| "must be >= 0".into())) {
                Some(w) if w.len() != layers.len() => {
                    let msg = format!("has {} entries but `layers` has {}", w.len(), layers.len());
                    options.error("layer_weights", msg);
                    vec![1.0 / n as f64; layers.len()]
                }
                Some(w) => w,
                None => vec![1.0 / n as f64; layers.len()],
            };
        Box::new(GramLoss { layers, layer_weights, targets: Vec::new() })
    }
}

/// The Gram matrix `F F^T / M` of features `[1, N, H, W]`, with `M = H * W`.
pub fn gram_matrix(features: &Tensor) -> Result<Tensor, CoreError> {
    let (_, n, h, w) = features.dims4()?;
    let f = features.reshape((n, h * w))?;
    Ok((f.matmul(&f.t()?)? / (h * w) as f64)?)
}

/// Most columns of `F` one f32 product in [`gram_matrix_wide`] sums over.
const GRAM_PART: usize = 16384;

/// `F F^T / M` in the device's sum type (f64, or f32 on Metal: see
/// [`easel_core::sums`]): f32 products over parts of at most [`GRAM_PART`] of the `M`
/// columns, one part per task on the rayon pool, summed in that type.
///
/// The loss compares `G` with a target `A` it approaches during the optimisation, so the
/// rounding of `G` must stay well below `G - A`. The features follow a ReLU, so each entry
/// is a sum of non-negative products with no cancellation, and `gemm` sums in f32 registers
/// over blocks of the columns: on VGG-sized random features the result is within 1e-6 of an
/// f64 product, relative to the largest entry (and the tests' sums within 1.4e-6 of exact,
/// on x86-64 and aarch64), at about half the cost of an f64 product throughout. Splitting
/// the columns across the cores is what makes it fast: with `N` as small
/// as 64, `gemm` alone splits only the `N x N` result and barely uses the second core.
pub fn gram_matrix_wide(features: &Tensor) -> Result<Tensor, CoreError> {
    let (_, n, h, w) = features.dims4()?;
    let m = h * w;
    let f = features.reshape((n, m))?;
    let sum = sum_dtype(features.device());
    let threads = rayon::current_num_threads().max(1);
    let parts = m.div_ceil(GRAM_PART).div_ceil(threads).max(1) * threads;
    let len = m.div_ceil(parts).max(1);
    let starts: Vec<usize> = (0..m).step_by(len).collect();
    let partials = starts
        .into_par_iter()
        .map(|start| {
            let part = f.narrow(1, start, len.min(m - start))?;
            part.matmul(&part.t()?)?.to_dtype(sum)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut g = Tensor::zeros((n, n), sum, features.device())?;
    for p in &partials {
        g = (g + p)?;
    }
    Ok((g / m as f64)?)
}

/// What preparing without a style image is.
fn no_style_image() -> CoreError {
    CoreError::MissingReference("the gram loss needs at least one style image".into())
}

/// `A = sum_s w_s G_s / sum_s w_s`: the style images' Gram matrices blended by their weights,
/// added in the order given. `grams` holds one matrix and weight per style image, at least one.
fn blend(grams: Vec<(Tensor, f64)>) -> Result<Tensor, CoreError> {
    let total_weight: f64 = grams.iter().map(|(_, w)| w).sum();
    let mut blend: Option<Tensor> = None;
    for (g, w) in grams {
        let g = (g * (w / total_weight))?;
        blend = Some(match blend {
            Some(b) => (b + g)?,
            None => g,
        });
    }
    let blend = blend.ok_or_else(no_style_image)?;
    Ok(blend.detach())
}

/// `F F^T / m` over the columns of `features` (`[1, N, h, w]`), in the sum type: a tile's
/// share of the whole map's Gram matrix when `m` is the whole map's positions.
fn gram_share(features: &Tensor, m: usize) -> Result<Tensor, CoreError> {
    let (_, n, h, w) = features.dims4()?;
    if h * w == 0 {
        // A last tile narrower than this layer's cell owns none of its positions.
        return Ok(Tensor::zeros((n, n), sum_dtype(features.device()), features.device())?);
    }
    // `gram_matrix_wide` divides by the tile's own positions; rescale to the whole map's.
    Ok((gram_matrix_wide(&features.contiguous()?)? * ((h * w) as f64 / m as f64))?)
}

/// `sum_l w_l E_l` with `E_l = sum (G_l - A_l)^2 / (4 N_l^2)`; `A_l` blends the style images.
pub struct GramLoss {
    layers: Vec<LayerId>,
    layer_weights: Vec<f64>,
    targets: Vec<Tensor>,
}

impl GramLoss {
    /// A Gram loss on `layers` with `layer_weights` (same length).
    pub fn new(layers: Vec<LayerId>, layer_weights: Vec<f64>) -> Self {
        Self { layers, layer_weights, targets: Vec::new() }
    }

    /// The unweighted `E_l` of each layer (scalars in the sum type), for reports.
    pub fn per_layer(&self, features: &FeatureMaps) -> Result<Vec<(LayerId, Tensor)>, CoreError> {
        self.check_prepared()?;
        self.layers
            .iter()
            .zip(&self.targets)
            .map(|(&layer, target)| {
                let g = gram_matrix_wide(features.get(layer)?)?;
                let n = g.dim(0)? as f64;
                Ok((layer, ((g - target)?.sqr()?.sum_all()? / (4.0 * n * n))?))
            })
            .collect()
    }

    fn check_prepared(&self) -> Result<(), CoreError> {
        if self.targets.len() == self.layers.len() {
            Ok(())
        } else {
            Err(CoreError::MissingReference("gram loss evaluated before prepare()".into()))
        }
    }
}

impl Loss for GramLoss {
    fn layers(&self) -> Vec<LayerId> {
        self.layers.clone()
    }

    fn prepare(&mut self, references: &References<'_>) -> Result<(), CoreError> {
        if references.styles.is_empty() {
            return Err(no_style_image());
        }
        let mut targets = Vec::with_capacity(self.layers.len());
        for &layer in &self.layers {
            let grams = references
                .styles
                .iter()
                .map(|style| Ok((gram_matrix_wide(style.features.get(layer)?)?, style.weight)))
                .collect::<Result<Vec<_>, CoreError>>()?;
            targets.push(blend(grams)?);
        }
        self.targets = targets;
        Ok(())
    }

    fn evaluate(&self, features: &FeatureMaps) -> Result<Tensor, CoreError> {
        self.check_prepared()?;
        let sum = sum_dtype(self.targets[0].device());
        let mut total = Tensor::zeros((), sum, self.targets[0].device())?;
        for ((&layer, target), &w) in self.layers.iter().zip(&self.targets).zip(&self.layer_weights) {
            let g = gram_matrix(features.get(layer)?)?.to_dtype(sum)?;
            let n = g.dim(0)? as f64;
            total = (total + ((g - target)?.sqr()?.sum_all()? * (w / (4.0 * n * n)))?)?;
        }
        Ok(total)
    }

    /// One `N x N` target per layer, in the sum type (f64 at most).
    fn target_bytes(&self, shape: &dyn Fn(LayerId) -> (u64, u64)) -> u64 {
        self.layers.iter().map(|&l| 8 * shape(l).0 * shape(l).0).sum()
    }

    /// `dE_l/dF = (G - A) F / (N^2 M)`, with `G - A` formed in the sum type.
    fn value_and_grad(&self, features: &FeatureMaps) -> Option<Result<(f64, LayerGrads), CoreError>> {
        let run = || {
            self.check_prepared()?;
            let mut value = 0.0;
            let mut grads = Vec::with_capacity(self.layers.len());
            for ((&layer, target), &w) in self.layers.iter().zip(&self.targets).zip(&self.layer_weights) {
                let f = features.get(layer)?;
                let (_, n, h, wd) = f.dims4()?;
                let diff = (gram_matrix_wide(f)? - target)?;
                let n2 = (n * n) as f64;
                value += w * sum_of_squares(&diff)? / (4.0 * n2);
                let scale = w / (n2 * (h * wd) as f64);
                // The scale goes into the small N x N factor, not over the N x M product.
                let grad = (diff * scale)?.to_dtype(f.dtype())?.matmul(&f.reshape((n, h * wd))?)?;
                grads.push((layer, grad.reshape(f.shape())?));
            }
            Ok((value, grads))
        };
        Some(run())
    }

    /// `G` is a sum over the whole image's positions: its statistics are the Gram matrices.
    fn tiling(&self) -> Tiling {
        Tiling::Global
    }

    /// `F F^T / M` over the tile's own positions, one matrix per layer (`M`: the whole map's).
    fn tile_statistics(&self, tile: &Tile<'_>) -> Result<Vec<Tensor>, CoreError> {
        self.layers
            .iter()
            .map(|&layer| gram_share(tile.features.get(layer)?, tile.placement(layer)?.whole_positions()))
            .collect()
    }

    /// `A_l`: the style images' Gram matrices, blended, as [`Loss::prepare`] makes them.
    fn prepare_from_statistics(&mut self, styles: &[StyleStatistics]) -> Result<(), CoreError> {
        if styles.is_empty() {
            return Err(no_style_image());
        }
        let mut targets = Vec::with_capacity(self.layers.len());
        for index in 0..self.layers.len() {
            let grams = styles
                .iter()
                .map(|style| match style.statistics.get(index) {
                    Some(g) => Ok((g.clone(), style.weight)),
                    None => Err(CoreError::MissingReference(format!(
                        "style statistics have no entry for layer {index}"
                    ))),
                })
                .collect::<Result<Vec<_>, CoreError>>()?;
            targets.push(blend(grams)?);
        }
        self.targets = targets;
        Ok(())
    }

    fn value_from_statistics(&self, totals: &[Tensor]) -> Result<f64, CoreError> {
        self.check_prepared()?;
        let mut value = 0.0;
        for ((g, target), &w) in totals.iter().zip(&self.targets).zip(&self.layer_weights) {
            let n = g.dim(0)? as f64;
            value += w * sum_of_squares(&(g - target)?)? / (4.0 * n * n);
        }
        Ok(value)
    }

    /// `dE_l/dF = (G - A) F / (N^2 M)` on the tile's own features, `G` the whole image's.
    fn tile_grad(&self, tile: &Tile<'_>, totals: &[Tensor]) -> Result<LayerGrads, CoreError> {
        self.check_prepared()?;
        let mut grads = Vec::with_capacity(self.layers.len());
        for (((&layer, g), target), &w) in
            self.layers.iter().zip(totals).zip(&self.targets).zip(&self.layer_weights)
        {
            let f = tile.features.get(layer)?;
            let (_, n, h, wd) = f.dims4()?;
            let scale = w / ((n * n) as f64 * tile.placement(layer)?.whole_positions() as f64);
            let grad = ((g - target)? * scale)?
                .to_dtype(f.dtype())?
                .matmul(&f.contiguous()?.reshape((n, h * wd))?)?;
            grads.push((layer, grad.reshape((1, n, h, wd))?));
        }
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_core::candle_core::{Device, Var};
    use easel_core::StyleReference;
    use easel_testkit::{assert_gradient_matches, Tolerance};

    fn maps(
        layer: LayerId,
        values: &[f32],
        shape: (usize, usize, usize, usize),
    ) -> Result<FeatureMaps, CoreError> {
        let mut f = FeatureMaps::new();
        f.insert(layer, Tensor::from_slice(values, shape, &Device::Cpu)?);
        Ok(f)
    }

    fn pattern(n: usize, k: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * k) % 13) as f32 - 6.0) * 0.07).collect()
    }

    #[test]
    fn blends_styles_and_matches_definition() -> Result<(), CoreError> {
        let layer = LayerId::Relu1_1;
        // Two styles of different sizes: Gram matrices are normalised by their own M.
        let s1 = pattern(2 * 3 * 3, 5);
        let s2 = pattern(2 * 2 * 2, 3);
        let styles = vec![
            StyleReference { features: maps(layer, &s1, (1, 2, 3, 3))?, weight: 0.75 },
            StyleReference { features: maps(layer, &s2, (1, 2, 2, 2))?, weight: 0.25 },
        ];
        let empty = FeatureMaps::new();
        let mut loss = GramLoss::new(vec![layer], vec![1.0]);
        loss.prepare(&References { content: &empty, styles: &styles })?;

        let gram = |f: &[f32], m: usize| -> [[f64; 2]; 2] {
            let mut g = [[0.0; 2]; 2];
            for (a, row) in g.iter_mut().enumerate() {
                for (b, cell) in row.iter_mut().enumerate() {
                    *cell = (0..m).map(|i| f[a * m + i] as f64 * f[b * m + i] as f64).sum::<f64>() / m as f64;
                }
            }
            g
        };
        let x = pattern(2 * 4 * 4, 7);
        let (g1, g2, gx) = (gram(&s1, 9), gram(&s2, 4), gram(&x, 16));
        let mut expected = 0.0;
        for a in 0..2 {
            for b in 0..2 {
                let target = 0.75 * g1[a][b] + 0.25 * g2[a][b];
                expected += (gx[a][b] - target).powi(2);
            }
        }
        expected /= 4.0 * 4.0;
        let got = loss.evaluate(&maps(layer, &x, (1, 2, 4, 4))?)?.to_scalar::<f64>()?;
        assert!((got - expected).abs() < 1e-5 * expected, "{got} vs {expected}");
        Ok(())
    }

    #[test]
    fn gram_over_several_parts_matches_an_f64_sum() -> Result<(), CoreError> {
        // M = 39001 columns: several parts of GRAM_PART, the last one ragged.
        let (n, h, w) = (3, 47, 829);
        let m = h * w;
        let values: Vec<f32> = pattern(n * m, 7).iter().map(|v| v.abs()).collect();
        let g = gram_matrix_wide(&Tensor::from_slice(&values, (1, n, h, w), &Device::Cpu)?)?;
        let g: Vec<Vec<f64>> = g.to_vec2()?;
        for a in 0..n {
            for b in 0..n {
                let exact = (0..m).map(|i| values[a * m + i] as f64 * values[b * m + i] as f64).sum::<f64>()
                    / m as f64;
                // The f32 parts come within about 1e-6 of exact (4e-7 on x86-64, 1.4e-6 on
                // aarch64, whose gemm kernels block the sums differently); a part lost or
                // counted twice would be off by a quarter.
                assert!((g[a][b] - exact).abs() <= 1e-5 * exact, "G[{a}][{b}] = {} vs {exact}", g[a][b]);
            }
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<(), CoreError> {
        let layers = [LayerId::Relu1_1, LayerId::Relu2_1];
        let mut style = FeatureMaps::new();
        style.insert(layers[0], Tensor::from_slice(&pattern(3 * 4 * 4, 5), (1, 3, 4, 4), &Device::Cpu)?);
        style.insert(layers[1], Tensor::from_slice(&pattern(4 * 2 * 2, 3), (1, 4, 2, 2), &Device::Cpu)?);
        let styles = vec![StyleReference { features: style, weight: 1.0 }];
        let empty = FeatureMaps::new();
        let mut loss = GramLoss::new(layers.to_vec(), vec![0.3, 0.7]);
        loss.prepare(&References { content: &empty, styles: &styles })?;

        let x1 = pattern(3 * 4 * 4, 7);
        let x2 = pattern(4 * 2 * 2, 11);
        let at = |x1: &[f32], x2: &[f32]| -> Result<f64, CoreError> {
            let mut f = maps(layers[0], x1, (1, 3, 4, 4))?;
            f.insert(layers[1], Tensor::from_slice(x2, (1, 4, 2, 2), &Device::Cpu)?);
            Ok(loss.evaluate(&f)?.to_scalar::<f64>()?)
        };
        let v1 = Var::from_tensor(&Tensor::from_slice(&x1, (1, 3, 4, 4), &Device::Cpu)?)?;
        let v2 = Var::from_tensor(&Tensor::from_slice(&x2, (1, 4, 2, 2), &Device::Cpu)?)?;
        let mut f = FeatureMaps::new();
        f.insert(layers[0], v1.as_tensor().clone());
        f.insert(layers[1], v2.as_tensor().clone());
        let grads = loss.evaluate(&f)?.backward()?;
        let g1: Vec<f32> = grads.get(v1.as_tensor()).expect("gradient").flatten_all()?.to_vec1()?;
        let g2: Vec<f32> = grads.get(v2.as_tensor()).expect("gradient").flatten_all()?.to_vec1()?;
        // The closed form agrees with autograd, in value and gradient.
        let (value, closed) = loss.value_and_grad(&f).expect("gram has a closed form")?;
        // `evaluate` forms G in f32 for autograd, the closed form in f64.
        assert!((value - at(&x1, &x2)?).abs() < 1e-5 * value.abs());
        for ((layer, g), autograd) in closed.iter().zip([&g1, &g2]) {
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            for (a, b) in g.iter().zip(autograd.iter()) {
                assert!((a - b).abs() <= 1e-5 * (1e-3 + b.abs()), "{layer}: closed form {a} vs autograd {b}");
            }
        }
        let tolerance = Tolerance { relative: 2e-3, floor: 1e-3 };
        let along_x1 = |x1: &[f32]| at(x1, &x2);
        assert_gradient_matches("relu1_1", along_x1, &x1, &g1, [0, 9, 30, 47], 1e-2, tolerance)?;
        let along_x2 = |x2: &[f32]| at(&x1, x2);
        assert_gradient_matches("relu2_1", along_x2, &x2, &g2, [0, 6, 15], 1e-2, tolerance)
    }

    #[test]
    fn layer_weights_must_match_layers() {
        let t: easel_core::toml::Table =
            "layers = [\"relu1_1\"]\nlayer_weights = [0.5, 0.5]".parse().expect("toml");
        let mut o = Options::new(&t, "loss[1]");
        let _ = GramFactory.build(&mut o);
        let errors = o.finish();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].to_string(), "loss[1].layer_weights: has 2 entries but `layers` has 1");
    }
}
