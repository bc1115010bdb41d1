//! 2x2, stride-2 pooling between VGG-19's blocks, and its backward pass: the CPU backend's
//! loops (with the ReLU below folded in) and the generic backend's tensor ops.
//!
//! On the CPU, max pooling remembers which of its four inputs won (one byte per output)
//! instead of keeping its input for the backward pass.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::cpu_tensor::{contiguous_f32, host_slice, HostSlice};
use crate::relu_mask::ReluMask;
use crate::VggError;

/// How the stack pools between blocks (2x2, stride 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Max,
    Avg,
}

/// 2x2, stride-2 max pooling of `x` `[b, c, h, w]` (odd last rows/columns dropped), and
/// for each output the winner: 0..4 in row-major order within the window, the first of
/// equal values winning, as in PyTorch.
pub(crate) fn max_pool(x: &Tensor) -> Result<(Tensor, Vec<u8>), VggError> {
    let x = contiguous_f32(x)?;
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    let input = host_slice(&x)?;
    let input = input.get();
    let mut out = vec![0f32; b * c * h2 * w2];
    let mut codes = vec![0u8; out.len()];
    if !out.is_empty() {
        out.par_chunks_mut(h2 * w2).zip(codes.par_chunks_mut(h2 * w2)).zip(input.par_chunks(h * w)).for_each(
            |((out, codes), plane)| {
                for y in 0..h2 {
                    let (top, bottom) = (&plane[2 * y * w..][..w], &plane[(2 * y + 1) * w..][..w]);
                    for x in 0..w2 {
                        let window = [top[2 * x], top[2 * x + 1], bottom[2 * x], bottom[2 * x + 1]];
                        let (mut best, mut code) = (window[0], 0u8);
                        for (k, &v) in window.iter().enumerate().skip(1) {
                            if v > best {
                                (best, code) = (v, k as u8);
                            }
                        }
                        out[y * w2 + x] = best;
                        codes[y * w2 + x] = code;
                    }
                }
            },
        );
    }
    Ok((Tensor::from_vec(out, (b, c, h2, w2), &Device::Cpu)?, codes))
}

/// How a pooling layer's backward pass spreads a window's gradient over its four inputs.
#[derive(Clone, Copy)]
pub(crate) enum Routing<'a> {
    /// All of it to the winner recorded by [`max_pool`].
    Max(&'a [u8]),
    /// A quarter to each.
    Avg,
}

/// The gradient w.r.t. the input `[b, c, h, w]` of a 2x2 pooling, from the gradient of its
/// output, then the ReLU below: `(routed + add) * mask`. Rows and columns that odd sizes
/// dropped get only `add * mask`.
pub(crate) fn backward(
    grad: &Tensor,
    input_dims: (usize, usize, usize, usize),
    routing: Routing<'_>,
    add: Option<&Tensor>,
    mask: &ReluMask,
) -> Result<Tensor, VggError> {
    let (b, c, h, w) = input_dims;
    let (h2, w2) = (h / 2, w / 2);
    let grad = contiguous_f32(grad)?;
    if grad.dims4()? != (b, c, h2, w2) {
        return Err(VggError::Internal("a pooling gradient does not match the pooled shape".into()));
    }
    let add = add.map(contiguous_f32).transpose()?;
    let g = host_slice(&grad)?;
    let g = g.get();
    let add = add.as_ref().map(host_slice).transpose()?;
    let add = add.as_ref().map(HostSlice::get);
    let n = b * c * h * w;
    if add.is_some_and(|a| a.len() != n) || matches!(routing, Routing::Max(codes) if codes.len() != g.len()) {
        return Err(VggError::Internal("the operands of a pooling backward differ in size".into()));
    }
    let mut out = vec![0f32; n];
    if n == 0 {
        return Ok(Tensor::from_vec(out, input_dims, &Device::Cpu)?);
    }
    let mask = mask.covering(n, "the pooling input")?;
    out.par_chunks_mut(h * w).enumerate().for_each(|(plane, dst)| {
        let g = &g[plane * h2 * w2..][..h2 * w2];
        for (y, row) in dst.chunks_exact_mut(w).enumerate() {
            // Row by row, each window's gradient written to its two inputs in this row:
            // no division or routing test per element.
            if y / 2 < h2 {
                let grads = &g[(y / 2) * w2..][..w2];
                let pairs = row.chunks_exact_mut(2).zip(grads);
                match routing {
                    Routing::Max(codes) => {
                        let codes = &codes[plane * h2 * w2 + (y / 2) * w2..][..w2];
                        let left = (y % 2) as u8 * 2;
                        for ((pair, &v), &code) in pairs.zip(codes) {
                            pair[0] = if code == left { v } else { 0.0 };
                            pair[1] = if code == left + 1 { v } else { 0.0 };
                        }
                    }
                    Routing::Avg => {
                        for (pair, &v) in pairs {
                            pair.fill(v * 0.25);
                        }
                    }
                }
            }
            mask.apply(row, add, plane * h * w + y * w);
        }
    });
    Ok(Tensor::from_vec(out, input_dims, &Device::Cpu)?)
}

/// The generic backend's backward passes, on candle's tensor ops: each takes what that
/// backend keeps (the pool's input, or its shape) and the gradient of the pool's output.
pub(crate) mod generic {
    use super::*;

    /// Spreads each window's gradient evenly over its four inputs; inputs cut off by an odd
    /// size get none.
    pub(crate) fn avg_pool_backward(
        input_dims: (usize, usize, usize, usize),
        grad: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = input_dims;
        let (_, _, h2, w2) = grad.dims4()?;
        (grad.upsample_nearest2d(2 * h2, 2 * w2)? * 0.25)?.pad_with_zeros(2, 0, h - 2 * h2)?.pad_with_zeros(
            3,
            0,
            w - 2 * w2,
        )
    }

    /// Routes each window's gradient to its maximum; on ties, to the first in row-major order,
    /// as PyTorch does.
    ///
    /// Built to hold few input-sized tensors at once (a GPU holds the trace beside them) from
    /// elementwise ops and pooling, which a GPU runs fast: the input's equality with its
    /// window's maximum (bytes), seen as `[b, c, h/2, 2, w/2, 2]` windows and ranked by
    /// position, so that pooling the ranks picks each window's first maximum; then the
    /// gradient spread to it.
    pub(crate) fn max_pool_backward(input: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = input.dims4()?;
        let (h2, w2) = (h / 2, w / 2);
        let windowed = (b, c, h2, 2, w2, 2);
        let per_window = (b, c, h2, 1, w2, 1);
        let cropped = input.narrow(2, 0, 2 * h2)?.narrow(3, 0, 2 * w2)?.contiguous()?;
        let max = cropped.max_pool2d(2)?.reshape(per_window)?;
        let is_max = cropped.reshape(windowed)?.broadcast_eq(&max)?;
        drop(cropped);
        // 4 for the window's top left, 3, 2, 1 for the bottom right: the first maximum ranks
        // highest, and a position that is no maximum ranks 0.
        let rank = Tensor::from_slice(&[4f32, 3.0, 2.0, 1.0], (1, 1, 1, 2, 1, 2), input.device())?;
        let ranked = is_max.to_dtype(DType::F32)?.broadcast_mul(&rank)?;
        drop(is_max);
        let best = ranked.reshape((b, c, 2 * h2, 2 * w2))?.max_pool2d(2)?.reshape(per_window)?;
        let first = ranked.broadcast_eq(&best)?;
        drop(ranked);
        first
            .to_dtype(DType::F32)?
            .broadcast_mul(&grad.reshape((b, c, h2, 1, w2, 1))?)?
            .reshape((b, c, 2 * h2, 2 * w2))?
            .pad_with_zeros(2, 0, h - 2 * h2)?
            .pad_with_zeros(3, 0, w - 2 * w2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(values: &[f32], dims: (usize, usize, usize, usize)) -> Tensor {
        Tensor::from_slice(values, dims, &Device::Cpu).expect("shape matches")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().and_then(|t| t.to_vec1()).expect("f32 tensor")
    }

    #[test]
    fn max_pool_takes_the_first_of_equal_values_and_drops_odd_edges() {
        // 3x5: the last row and column are dropped.
        #[rustfmt::skip]
        let x = tensor(&[
            1.0, 1.0,   0.0, 2.0,   9.0,
            1.0, 0.5,   2.0, 2.0,   9.0,
            9.0, 9.0,   9.0, 9.0,   9.0,
        ], (1, 1, 3, 5));
        let (pooled, winners) = max_pool(&x).unwrap();
        assert_eq!(pooled.dims4().unwrap(), (1, 1, 1, 2));
        assert_eq!(values(&pooled), [1.0, 2.0]);
        assert_eq!(winners, [0, 1]);
        // The gradient goes to the winners only, and through the ReLU mask of x (all > 0
        // but the 0.0), plus the layer's own gradient `add` everywhere the mask is open.
        let mask = ReluMask::of(&x).unwrap();
        let grad = tensor(&[10.0, 20.0], (1, 1, 1, 2));
        let add = tensor(&[1.0; 15], (1, 1, 3, 5));
        let back = backward(&grad, (1, 1, 3, 5), Routing::Max(&winners), Some(&add), &mask).unwrap();
        #[rustfmt::skip]
        let expected = [
            11.0, 1.0,   0.0, 21.0,   1.0,
            1.0, 1.0,    1.0, 1.0,    1.0,
            1.0, 1.0,    1.0, 1.0,    1.0,
        ];
        assert_eq!(values(&back), expected);
    }

    #[test]
    fn the_generic_max_pool_backward_routes_to_the_first_maximum_and_drops_odd_edges() {
        // 3x5 with ties: all four equal, the last three equal, two equal on the right.
        #[rustfmt::skip]
        let x = tensor(&[
            1.0, 1.0,   0.0, 2.0,   9.0,
            1.0, 1.0,   2.0, 2.0,   9.0,
            9.0, 9.0,   9.0, 9.0,   9.0,
        ], (1, 1, 3, 5));
        let grad = tensor(&[10.0, 20.0], (1, 1, 1, 2));
        #[rustfmt::skip]
        let expected = [
            10.0, 0.0,   0.0, 20.0,   0.0,
            0.0, 0.0,    0.0, 0.0,    0.0,
            0.0, 0.0,    0.0, 0.0,    0.0,
        ];
        assert_eq!(values(&generic::max_pool_backward(&x, &grad).unwrap()), expected);
        // Each position of a window as the only maximum, over two channels.
        let x = tensor(&[5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0], (1, 2, 2, 2));
        let grad = tensor(&[3.0, 7.0], (1, 2, 1, 1));
        assert_eq!(
            values(&generic::max_pool_backward(&x, &grad).unwrap()),
            [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0]
        );
        let x = tensor(&[1.0, 5.0, 1.0, 1.0, 1.0, 1.0, 5.0, 1.0], (1, 2, 2, 2));
        assert_eq!(
            values(&generic::max_pool_backward(&x, &grad).unwrap()),
            [0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 7.0, 0.0]
        );
    }

    #[test]
    fn avg_pool_backward_spreads_a_quarter() {
        let x = tensor(&[1.0, -1.0, 2.0, 3.0, 4.0, 5.0], (1, 1, 3, 2));
        let mask = ReluMask::of(&x).unwrap();
        let back = backward(&tensor(&[8.0], (1, 1, 1, 1)), (1, 1, 3, 2), Routing::Avg, None, &mask).unwrap();
        assert_eq!(values(&back), [2.0, 0.0, 2.0, 2.0, 0.0, 0.0]);
    }
}
