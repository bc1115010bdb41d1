//! What a model and one evaluation take in memory, for the engine's planner: the weights, the
//! transformed kernels the cache will hold, and an evaluation's working set. Pure functions
//! of the shapes, so that a job can be planned before anything is loaded or allocated.

use easel_core::LayerId;

use crate::conv::{winograd_kernel_bytes, Winograd};
use crate::stack::{op, Op};
use crate::CONVS;

const F32: u64 = 4;

/// Bytes of the convolution weights (f32) a model loaded to `depth` holds.
pub fn weights_bytes(depth: LayerId) -> u64 {
    let last = depth.features_index().unwrap_or(0);
    CONVS
        .iter()
        .filter(|(i, _, _)| *i <= last)
        .map(|&(_, c_in, c_out)| F32 * (c_out * c_in * 9 + c_out) as u64)
        .sum()
}

/// The `(height, width)` of the output of each index `0..=last` of `features` for an image of
/// `height x width`, and its channels (3 for the image itself, before index 0).
fn shapes(height: usize, width: usize, last: usize) -> Vec<(usize, usize, usize)> {
    let (mut h, mut w, mut c) = (height, width, 3);
    (0..=last)
        .map(|index| {
            match op(index) {
                Op::Conv(k) => c = CONVS[k].2,
                Op::Relu => {}
                Op::Pool => (h, w) = (h / 2, w / 2),
            }
            (c, h, w)
        })
        .collect()
}

/// `(channels, height, width)` of the output of index `index` of `features` on an image of
/// `height x width`.
pub(crate) fn index_shape(index: usize, height: usize, width: usize) -> (usize, usize, usize) {
    shapes(height, width, index)[index]
}

/// `(channels, height, width)` of the output of `layer` on an image of `height x width`.
pub fn layer_shape(layer: LayerId, height: usize, width: usize) -> (usize, usize, usize) {
    match layer.features_index() {
        None => (3, height, width),
        Some(index) => shapes(height, width, index)[index],
    }
}

/// Elements of the output of `layer` on an image of `height x width`.
pub fn layer_elements(layer: LayerId, height: usize, width: usize) -> u64 {
    let (c, h, w) = layer_shape(layer, height, width);
    (c * h * w) as u64
}

/// The peak bytes of one evaluation on an image of `height x width` reading `layers`, beyond
/// the weights and the kernel cache: the requested layers' outputs and their gradients (held
/// together while the losses run), and three of the widest activations (a convolution's input
/// and output, or a gradient flowing back beside the one it comes from).
///
/// The ReLU masks (a bit per element) and pooling winners (a byte per output) are small beside
/// these, and the kernels' scratch is bounded by constants, whatever the size.
pub fn evaluation_bytes(layers: &[LayerId], height: usize, width: usize) -> u64 {
    let Some(last) = layers.iter().filter_map(|l| l.features_index()).max() else {
        return 2 * F32 * (3 * height * width) as u64;
    };
    let widest = shapes(height, width, last).iter().map(|&(c, h, w)| (c * h * w) as u64).max().unwrap_or(0);
    let requested: u64 = layers.iter().map(|&l| layer_elements(l, height, width)).sum();
    F32 * (2 * requested + 3 * widest)
}

/// The peak bytes of a forward pass alone (no trace for a backward pass) on an image of
/// `height x width` reading `layers`: the requested layers' outputs and two of the widest
/// activations (a convolution's input and output).
pub fn forward_bytes(layers: &[LayerId], height: usize, width: usize) -> u64 {
    let Some(last) = layers.iter().filter_map(|l| l.features_index()).max() else {
        return F32 * (3 * height * width) as u64;
    };
    let widest = shapes(height, width, last).iter().map(|&(c, h, w)| (c * h * w) as u64).max().unwrap_or(0);
    let requested: u64 = layers.iter().map(|&l| layer_elements(l, height, width)).sum();
    F32 * (requested + 2 * widest)
}

/// One pass of the model over an image, as the kernel cache sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// A forward pass to the deepest loaded layer (reference features, or an evaluation's).
    Forward { height: usize, width: usize },
    /// The input gradients of an evaluation, back from the deepest layer.
    Backward { height: usize, width: usize },
}

/// Bytes of transformed Winograd kernels a model loaded to `depth` keeps after `passes` (in
/// that order: the cache keeps the first that fit within `budget`), on the CPU backend.
pub fn kernel_cache_bytes(depth: LayerId, winograd: Winograd, budget: u64, passes: &[Pass]) -> u64 {
    let last = depth.features_index().unwrap_or(0);
    let convs: Vec<usize> = (0..CONVS.len()).filter(|&k| CONVS[k].0 <= last).collect();
    // (conv, flipped, bytes, tile side): what the cache has taken.
    let mut kept: Vec<(usize, bool, u64, usize)> = Vec::new();
    let mut used = 0u64;
    let mut offer =
        |k: usize, flipped: bool, h: usize, w: usize, kept: &mut Vec<(usize, bool, u64, usize)>| {
            let (_, c_in, c_out) = CONVS[k];
            let (c_in, c_out) = if flipped { (c_out, c_in) } else { (c_in, c_out) };
            let Some((bytes, side)) = winograd_kernel_bytes(c_in, c_out, h, w) else { return };
            let bytes = bytes as u64;
            // An F(2x2) input gradient reads its forward pass's kept kernel.
            let reuse = flipped && side == 2 && kept.contains(&(k, false, bytes, side));
            if reuse || kept.contains(&(k, flipped, bytes, side)) {
                return;
            }
            if used + bytes <= budget {
                used += bytes;
                kept.push((k, flipped, bytes, side));
            }
        };
    for pass in passes {
        match *pass {
            Pass::Forward { height, width } => {
                let stage = shapes(height, width, last);
                for &k in &convs {
                    let (_, h, w) = stage[CONVS[k].0];
                    if winograd.forward_of(k) {
                        offer(k, false, h, w, &mut kept);
                    }
                }
            }
            Pass::Backward { height, width } => {
                let stage = shapes(height, width, last);
                for &k in convs.iter().rev() {
                    let (_, h, w) = stage[CONVS[k].0];
                    if winograd.gradients() {
                        offer(k, true, h, w, &mut kept);
                    }
                }
            }
        }
    }
    used
}

/// How far, in pixels, a feature of `layer` reads beyond its own cell of the image on either
/// side (its receptive field is its cell plus this much around it): 70 for `relu5_1`, whose
/// field is 156 px wide. A tile whose window reaches this far past its own positions computes
/// their features exactly as the whole image does.
pub fn receptive_reach(layer: LayerId) -> usize {
    let Some(last) = layer.features_index() else { return 0 };
    // Rows read, relative to the first row of one output position's cell, walking back
    // from `layer` to the image: a 3x3 convolution (padding 1) reads one more on each side,
    // a 2x2 pooling of stride 2 the two rows under each.
    let (mut lo, mut hi, mut stride) = (0i64, 0i64, 1i64);
    for index in (0..=last).rev() {
        match op(index) {
            Op::Conv(_) => (lo, hi) = (lo - 1, hi + 1),
            Op::Relu => {}
            Op::Pool => {
                (lo, hi) = (2 * lo, 2 * hi + 1);
                stride *= 2;
            }
        }
    }
    // The cell itself is rows 0..stride.
    (-lo).max(hi - (stride - 1)) as usize
}

/// How many image pixels one position of `layer`'s map covers along each side (the product of
/// the poolings before it): 16 for `relu5_1`.
pub fn layer_stride(layer: LayerId) -> usize {
    layer.features_index().map_or(1, |last| 1 << (0..=last).filter(|&i| op(i) == Op::Pool).count())
}

/// Multiply-adds of one evaluation's convolutions (forward to the deepest of `layers`, and
/// their input gradients), as direct convolutions: the work a FLOP model of time scales by.
pub fn evaluation_flops(layers: &[LayerId], height: usize, width: usize) -> u64 {
    let Some(last) = layers.iter().filter_map(|l| l.features_index()).max() else { return 0 };
    let stage = shapes(height, width, last);
    CONVS
        .iter()
        .filter(|(i, _, _)| *i <= last)
        .map(|&(i, c_in, c_out)| {
            let (_, h, w) = stage[i];
            // Forward and input gradient, 2 FLOPs per multiply-add each.
            2 * 2 * 9 * (c_in * c_out * h * w) as u64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_to_relu5_1_are_about_52_mb() {
        let bytes = weights_bytes(LayerId::Relu5_1);
        assert_eq!(bytes, 4 * (12_940_992 + (64 * 2 + 128 * 2 + 256 * 4 + 512 * 5)));
        assert!(weights_bytes(LayerId::Relu4_2) < bytes);
        assert_eq!(weights_bytes(LayerId::Pixels), 4 * (3 * 64 * 9 + 64));
    }

    #[test]
    fn relu5_1_reads_70_px_around_its_16_px_cell() {
        // 156 px of receptive field, as Gatys-style tools quote it: 70 + 16 + 70.
        assert_eq!((receptive_reach(LayerId::Relu5_1), layer_stride(LayerId::Relu5_1)), (70, 16));
        assert_eq!(2 * receptive_reach(LayerId::Relu5_1) + 16, 156);
        assert_eq!((receptive_reach(LayerId::Relu1_1), layer_stride(LayerId::Relu1_1)), (1, 1));
        assert_eq!((receptive_reach(LayerId::Pixels), layer_stride(LayerId::Pixels)), (0, 1));
        assert_eq!(layer_stride(LayerId::Relu4_2), 8);
        assert!(receptive_reach(LayerId::Relu5_4) > receptive_reach(LayerId::Relu5_1));
    }

    #[test]
    fn layer_sizes_follow_the_pooling() {
        assert_eq!(layer_elements(LayerId::Pixels, 96, 128), 3 * 96 * 128);
        assert_eq!(layer_elements(LayerId::Relu1_1, 96, 128), 64 * 96 * 128);
        assert_eq!(layer_elements(LayerId::Relu4_2, 96, 128), 512 * 12 * 16);
        // Odd sizes are floored at each pooling, as max_pool2d does.
        assert_eq!(layer_elements(LayerId::Pool1, 37, 45), 64 * 18 * 22);
        assert_eq!(layer_elements(LayerId::Relu3_1, 37, 45), 256 * 9 * 11);
    }
}
