//! Exact tiled evaluation: the objective and its pixel gradient computed window by window, for
//! images whose whole evaluation does not fit the memory budget (see [`crate::tiles`] for the
//! cut and [`easel_core::Tiling`] for the losses' side).
//!
//! Every feature at a tile's own positions is the whole image's, so each loss sees exactly the
//! whole image's features, split into parts. Global losses (Gram) first add up their
//! statistics over all tiles (a forward pass per tile), then every tile is run forward again,
//! with what the backward pass needs: the losses give the gradient of its own features only,
//! and its back-propagation through the window adds into the image's gradient. Since
//! back-propagation is linear and reaches no further than the halo, the tiles' contributions
//! add up to the whole image's gradient.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use easel_config::WeightedLoss;
use easel_core::{FeatureMaps, LayerId, References, StyleReference, StyleStatistics, Tile, Tiling};
use easel_vgg::memory::{evaluation_flops, layer_shape};
use easel_vgg::{Trace, Vgg19};

use crate::memory::forward_step;
use crate::terms::{pixels_only, tiled_layers, value_and_layer_grads};
use crate::tiles::{cut, TileCut};
use crate::EngineError;

/// The convolutions' work (FLOPs) of one evaluation of `losses` on a `height x width` image,
/// whole or in tiles of `tile_step` pixels: each tile's window runs forward and back, and
/// when a global loss needs its statistics, the image runs forward once more before that, in
/// the larger windows of [`forward_step`].
pub fn evaluation_work(
    losses: &[WeightedLoss],
    height: usize,
    width: usize,
    tile_step: Option<usize>,
) -> u64 {
    let layers = crate::terms::layers_of(losses);
    let Some(step) = tile_step else { return evaluation_flops(&layers, height, width) };
    let tiled = tiled_layers(losses.iter());
    // evaluation_flops counts the forward pass and the input gradients alike.
    let work = |step: usize, share: u64| -> u64 {
        cut(height, width, step, &tiled)
            .iter()
            .map(|tile| evaluation_flops(&layers, tile.rows.len(), tile.cols.len()) / share)
            .sum()
    };
    let global = losses.iter().any(|l| !pixels_only(l) && l.loss.tiling() == Tiling::Global);
    let statistics = if global { work(forward_step(&tiled, height, width, step), 2) } else { 0 };
    work(step, 1) + statistics
}

/// The window of `tile` out of `image` (`[1, 3, H, W]`), contiguous.
fn window(image: &Tensor, tile: &TileCut) -> Result<Tensor, EngineError> {
    Ok(image
        .narrow(2, tile.rows.start, tile.rows.len())?
        .narrow(3, tile.cols.start, tile.cols.len())?
        .contiguous()?)
}

/// The tile's own part of each layer of `features` (computed on its window).
fn own(features: &FeatureMaps, tile: &TileCut) -> Result<FeatureMaps, EngineError> {
    let mut maps = FeatureMaps::new();
    for (layer, t) in features.iter().filter(|(l, _)| *l != LayerId::Pixels) {
        let (p, (y, x)) = (tile.placements[&layer], tile.offsets[&layer]);
        maps.insert(layer, t.narrow(2, y, p.height)?.narrow(3, x, p.width)?);
    }
    Ok(maps)
}

/// Adds `part` (`[1, C, h, w]`) into `whole` (`C x height x width`, row-major) at `(top, left)`.
fn add_into(
    whole: &mut [f32],
    (height, width): (usize, usize),
    part: &Tensor,
    (top, left): (usize, usize),
) -> Result<(), EngineError> {
    let (_, c, h, w) = part.dims4()?;
    let values: Vec<f32> = part.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    for ch in 0..c {
        for y in 0..h {
            let src = &values[(ch * h + y) * w..][..w];
            let dst = &mut whole[(ch * height + top + y) * width + left..][..w];
            for (d, s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        }
    }
    Ok(())
}

/// The weighted total of `terms` at `x` and its pixel gradient, tile by tile with tiles of
/// `step` pixels (see the module documentation).
pub(crate) fn total(
    vgg: &Vgg19,
    terms: &[(&WeightedLoss, f64)],
    x: &Tensor,
    step: usize,
) -> Result<(f64, Tensor), EngineError> {
    let (_, _, height, width) = x.dims4()?;
    let (pixel_terms, tiled_terms): (Vec<_>, Vec<_>) =
        terms.iter().copied().partition(|(l, _)| pixels_only(l));
    let layers = tiled_layers(tiled_terms.iter().map(|(l, _)| *l));
    let is_global: Vec<bool> = tiled_terms.iter().map(|(l, _)| l.loss.tiling() == Tiling::Global).collect();
    let tiles = cut(height, width, step, &layers);
    let mut value = 0.0;

    // First pass: the global losses' statistics, summed over the tiles (`totals[i]` for the
    // i-th tiled term; empty for local ones). With the same cut as the second pass, the last
    // tile is run as that pass needs it, and kept: the second pass starts with it.
    let global: Vec<usize> = (0..tiled_terms.len()).filter(|&i| is_global[i]).collect();
    let mut totals: Vec<Vec<Tensor>> = vec![Vec::new(); tiled_terms.len()];
    let mut kept = None;
    if !global.is_empty() {
        let losses: Vec<&WeightedLoss> = global.iter().map(|&i| tiled_terms[i].0).collect();
        let first_step = forward_step(&layers, height, width, step);
        let (sums, last) = if first_step == step {
            statistics(vgg, x, &losses, &tiles, Some(&layers))?
        } else {
            statistics(vgg, x, &losses, &cut(height, width, first_step, &layers), None)?
        };
        for (&i, sums) in global.iter().zip(sums) {
            let (loss, scale) = tiled_terms[i];
            value += scale * loss.loss.value_from_statistics(&sums)?;
            totals[i] = sums;
        }
        kept = last;
    }

    // Second pass: each tile's own gradient, back-propagated through its window.
    let mut grad = vec![0f32; 3 * height * width];
    for tile in tiles.iter().rev() {
        let (features, trace) = match kept.take() {
            Some(kept) => kept,
            None => vgg.forward_traced_window(&window(x, tile)?, &layers, (height, width))?,
        };
        let own_features = own(&features, tile)?;
        let view = Tile { features: &own_features, placements: &tile.placements };
        let mut layer_grads: BTreeMap<LayerId, Tensor> = BTreeMap::new();
        for ((&(loss, scale), sums), &global) in tiled_terms.iter().zip(&totals).zip(&is_global) {
            let grads = if global {
                loss.loss.tile_grad(&view, sums)?
            } else {
                let (v, grads) = loss.loss.tile_value_and_grad(&view)?;
                value += scale * v;
                grads
            };
            for (layer, g) in grads {
                let g = (g * scale)?;
                let summed = match layer_grads.remove(&layer) {
                    Some(previous) => (previous + g)?,
                    None => g,
                };
                layer_grads.insert(layer, summed);
            }
        }
        drop((own_features, features));
        // The gradient of the own positions, zero over the halo, in the window's maps.
        let (wh, ww) = (tile.rows.len(), tile.cols.len());
        let padded = layer_grads
            .into_iter()
            .map(|(layer, g)| {
                let (_, mh, mw) = layer_shape(layer, wh, ww);
                let ((y, x), (_, _, h, w)) = (tile.offsets[&layer], g.dims4()?);
                let g = g.pad_with_zeros(2, y, mh - y - h)?.pad_with_zeros(3, x, mw - x - w)?;
                Ok((layer, g))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let window_grad = vgg.backward(&trace, &padded)?;
        add_into(&mut grad, (height, width), &window_grad, (tile.rows.start, tile.cols.start))?;
    }

    // Losses on the pixels alone, on the whole image.
    if !pixel_terms.is_empty() {
        let mut pixels = FeatureMaps::new();
        pixels.insert(LayerId::Pixels, x.clone());
        let (v, grads) = value_and_layer_grads(vgg.device(), &pixels, &pixel_terms)?;
        value += v;
        for (_, g) in grads {
            add_into(&mut grad, (height, width), &g, (0, 0))?;
        }
    }
    let grad = Tensor::from_vec(grad, (1, 3, height, width), &Device::Cpu)?.to_device(x.device())?;
    Ok((value, grad))
}

/// Adds `shares` into `sums`, entry by entry (the first tile's shares become the sums).
fn accumulate(kind: &str, sums: &mut Vec<Tensor>, shares: Vec<Tensor>) -> Result<(), EngineError> {
    if sums.is_empty() {
        *sums = shares;
        return Ok(());
    }
    if sums.len() != shares.len() {
        return Err(EngineError::Shape(format!(
            "the {kind} loss gave {} statistics for one tile and {} for another",
            sums.len(),
            shares.len()
        )));
    }
    for (sum, share) in sums.iter_mut().zip(shares) {
        *sum = (&*sum + share)?;
    }
    Ok(())
}

/// A window's features and the trace its backward pass needs.
type Traced = (FeatureMaps, Trace);

/// Each of the global `losses`' statistics of `image`, summed over `tiles` (one forward pass
/// per tile for all of them). With `traced` (the layers a gradient pass reads), the last tile
/// is run with its trace, which is returned with its features for that pass.
fn statistics(
    vgg: &Vgg19,
    image: &Tensor,
    losses: &[&WeightedLoss],
    tiles: &[TileCut],
    traced: Option<&[LayerId]>,
) -> Result<(Vec<Vec<Tensor>>, Option<Traced>), EngineError> {
    let (_, _, height, width) = image.dims4()?;
    let layers = tiled_layers(losses.iter().copied());
    let mut sums: Vec<Vec<Tensor>> = vec![Vec::new(); losses.len()];
    let mut kept = None;
    for (i, tile) in tiles.iter().enumerate() {
        let window = window(image, tile)?;
        let (features, trace) = match traced.filter(|_| i + 1 == tiles.len()) {
            Some(traced) => {
                let (features, trace) = vgg.forward_traced_window(&window, traced, (height, width))?;
                (features, Some(trace))
            }
            None => (vgg.forward_window(&window, &layers, (height, width))?, None),
        };
        let own = own(&features, tile)?;
        let view = Tile { features: &own, placements: &tile.placements };
        for (loss, sums) in losses.iter().zip(&mut sums) {
            accumulate(loss.kind, sums, loss.loss.tile_statistics(&view)?)?;
        }
        kept = trace.map(|trace| (features, trace));
    }
    Ok((sums, kept))
}

/// Builds every loss's targets for the current scale from the reference images, tile by tile
/// with tiles of `step` pixels: local losses from the content image's features of their
/// layers (assembled whole from the tiles' own parts), global ones from each style image's
/// statistics; losses on the pixels alone from the images themselves. `styles` pairs each
/// style image (`[1, 3, h, w]`) with its blend weight.
pub(crate) fn prepare(
    vgg: &Vgg19,
    losses: &mut [WeightedLoss],
    content: &Tensor,
    styles: &[(Tensor, f64)],
    step: usize,
) -> Result<(), EngineError> {
    let local_layers =
        tiled_layers(losses.iter().filter(|l| !pixels_only(l) && l.loss.tiling() == Tiling::Local));
    let mut content_maps = assemble(vgg, content, &local_layers, step)?;
    content_maps.insert(LayerId::Pixels, content.clone());
    let pixel_styles: Vec<StyleReference> = styles
        .iter()
        .map(|(image, weight)| {
            let mut features = FeatureMaps::new();
            features.insert(LayerId::Pixels, image.clone());
            StyleReference { features, weight: *weight }
        })
        .collect();
    let references = References { content: &content_maps, styles: &pixel_styles };
    // The global losses' targets: each style image's statistics for all of them, from one
    // forward pass per tile.
    let global: Vec<usize> = (0..losses.len())
        .filter(|&i| !pixels_only(&losses[i]) && losses[i].loss.tiling() == Tiling::Global)
        .collect();
    let mut statistics_of: Vec<Vec<StyleStatistics>> = vec![Vec::with_capacity(styles.len()); global.len()];
    if !global.is_empty() {
        let globals: Vec<&WeightedLoss> = global.iter().map(|&i| &losses[i]).collect();
        let layers = tiled_layers(globals.iter().copied());
        for (image, weight) in styles {
            let (_, _, height, width) = image.dims4()?;
            let tiles = cut(height, width, forward_step(&layers, height, width, step), &layers);
            let (sums, _) = statistics(vgg, image, &globals, &tiles, None)?;
            for (of, statistics) in statistics_of.iter_mut().zip(sums) {
                of.push(StyleStatistics { statistics, weight: *weight });
            }
        }
    }
    // Each loss's statistics where it is global; the others prepare from the references.
    let mut by_loss: Vec<Option<Vec<StyleStatistics>>> = (0..losses.len()).map(|_| None).collect();
    for (&i, statistics) in global.iter().zip(statistics_of) {
        by_loss[i] = Some(statistics);
    }
    for (loss, statistics) in losses.iter_mut().zip(by_loss) {
        match statistics {
            Some(statistics) => loss.loss.prepare_from_statistics(&statistics)?,
            None => loss.loss.prepare(&references)?,
        }
    }
    Ok(())
}

/// The whole maps of `layers` on `image`, assembled from the own parts of its tiles.
fn assemble(
    vgg: &Vgg19,
    image: &Tensor,
    layers: &[LayerId],
    step: usize,
) -> Result<FeatureMaps, EngineError> {
    let mut maps = FeatureMaps::new();
    if layers.is_empty() {
        return Ok(maps);
    }
    let (_, _, height, width) = image.dims4()?;
    let step = forward_step(layers, height, width, step);
    let shapes: Vec<(usize, usize, usize)> = layers.iter().map(|&l| layer_shape(l, height, width)).collect();
    let mut wholes: Vec<Vec<f32>> = shapes.iter().map(|&(c, h, w)| vec![0f32; c * h * w]).collect();
    for tile in cut(height, width, step, layers) {
        let features = vgg.forward_window(&window(image, &tile)?, layers, (height, width))?;
        let own = own(&features, &tile)?;
        for ((&layer, whole), &(_, h, w)) in layers.iter().zip(&mut wholes).zip(&shapes) {
            let p = tile.placements[&layer];
            add_into(whole, (h, w), own.get(layer)?, (p.top, p.left))?;
        }
    }
    for ((&layer, whole), &(c, h, w)) in layers.iter().zip(wholes).zip(&shapes) {
        maps.insert(layer, Tensor::from_vec(whole, (1, c, h, w), &Device::Cpu)?.to_device(image.device())?);
    }
    Ok(maps)
}
