//! What a model and one evaluation take in memory, for the engine's planner: the weights, the
//! transformed kernels the cache will hold, and an evaluation's working set. Pure functions
//! of the shapes, so that a job can be planned before anything is loaded or allocated.

use easel_core::LayerId;

use crate::conv::generic::{band_bytes_per_pixel, BAND_SCRATCH_BYTES};
use crate::conv::{winograd_kernel_bytes, Winograd};
use crate::stack::{op, Op};
use crate::CONVS;

const F32: u64 = 4;

/// Bytes of the convolution weights (f32) a model loaded to `depth` holds on the CPU backend.
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

/// Widest activations the generic backend holds beside its trace at its peak, in block 1 of
/// the backward pass: the gradient flowing in, its sum with a loss's gradient, the ReLU's
/// selection, the convolution's input gradient being assembled band by band, and what candle's
/// ops keep of them. Fitted to the peak RSS `easel bench` measures with `model.backend =
/// "candle"` on the CPU, 256-1024 px (the README's memory table).
const GENERIC_TRANSIENT_WIDEST: u64 = 5;

/// [`evaluation_bytes`] on the generic backend (candle's ops, the path a GPU takes): its trace
/// keeps every ReLU's output up to the deepest layer read as f32 (the requested layers among
/// them), where the CPU backend keeps a bit per element; beside it the losses' gradients at the
/// requested layers, a backward step's transient tensors, and the largest convolution band's
/// scratch (see [`band_scratch_bytes`]).
pub fn generic_evaluation_bytes(layers: &[LayerId], height: usize, width: usize) -> u64 {
    let Some(last) = layers.iter().filter_map(|l| l.features_index()).max() else {
        return 2 * F32 * (3 * height * width) as u64;
    };
    let shapes = shapes(height, width, last);
    let elements = |index: usize| {
        let (c, h, w) = shapes[index];
        (c * h * w) as u64
    };
    let trace: u64 = (0..=last).filter(|&i| matches!(op(i), Op::Relu)).map(elements).sum();
    let widest = (0..=last).map(elements).max().unwrap_or(0);
    let requested: u64 = layers.iter().map(|&l| layer_elements(l, height, width)).sum();
    F32 * (trace + requested + GENERIC_TRANSIENT_WIDEST * widest) + band_scratch_bytes(&shapes, last)
}

/// [`weights_bytes`] on the generic backend, which keeps each kernel a second time, flipped,
/// for the input gradients (`backend::generic`).
pub fn generic_weights_bytes(depth: LayerId) -> u64 {
    2 * weights_bytes(depth)
}

/// The scratch of the largest convolution band up to index `last` of `features`, whose outputs
/// have `shapes`: a band's im2col matrix and three output tensors (`conv::generic`), at most
/// [`BAND_SCRATCH_BYTES`] and less where the whole image is one smaller band. That is what
/// candle's CUDA and Metal convolutions allocate; its CPU convolution builds the im2col matrix
/// a few rows at a time, so there the peak stays up to this much below the prediction.
fn band_scratch_bytes(shapes: &[(usize, usize, usize)], last: usize) -> u64 {
    CONVS
        .iter()
        .filter(|(index, _, _)| *index <= last)
        .map(|&(index, c_in, c_out)| {
            let (_, h, w) = shapes[index];
            (h * w * band_bytes_per_pixel(c_in, c_out)) as u64
        })
        .max()
        .unwrap_or(0)
        .min(BAND_SCRATCH_BYTES)
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
    fn the_generic_backend_holds_every_relu_output_and_a_convolution_band() {
        let px = 64 * 64;
        // relu1_2: the trace is relu1_1 and relu1_2; conv1_2's band (576 + 192 floats a pixel)
        // is the larger one, the whole image in one band.
        let expected = 4 * (2 * 64 * px + 64 * px + 5 * 64 * px) + 4 * px * (9 * 64 + 3 * 64);
        assert_eq!(generic_evaluation_bytes(&[LayerId::Relu1_2], 64, 64), expected as u64);
        // Past 256 MiB of band (conv1_2 of about 600 x 600 px), the band is cut into rows.
        let big = generic_evaluation_bytes(&[LayerId::Relu1_2], 1024, 1024);
        let activations = 4 * (3 * 64 + 5 * 64) * (1024 * 1024) as u64;
        assert_eq!(big, activations + BAND_SCRATCH_BYTES);
        // Reading relu2_1 instead: its output joins the trace and is the one requested (in
        // place of relu1_2's); conv1_2's band stays the largest.
        let to_relu2_1 = generic_evaluation_bytes(&[LayerId::Relu2_1], 64, 64);
        let (relu1_2, relu2_1) = (4 * 64 * px as u64, 4 * 128 * 32 * 32);
        assert_eq!(to_relu2_1, expected as u64 - relu1_2 + 2 * relu2_1);
        assert!(
            generic_evaluation_bytes(&[LayerId::Relu1_2], 64, 64)
                > evaluation_bytes(&[LayerId::Relu1_2], 64, 64)
        );
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
