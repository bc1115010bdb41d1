//! CPU loops for the ReLU and 2x2 pooling around the convolutions, their backward passes fused.
//!
//! What backward needs is kept small: every ReLU output becomes a bit mask, and max pooling
//! remembers which of its four inputs won (one byte per output), so the trace holds no
//! full-size activations, not even the taps'. Each backward step writes its result
//! once, with the ReLU below it (and that ReLU's tap gradient) folded in.

use candle_core::{DType, Device, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::conv::Gate;

/// What the backward pass of one ReLU needs: which of its outputs were positive.
/// One bit per element, even for a tap's ReLU: the caller may then drop the taps before the
/// backward pass (at 512 px they are ~100 MB).
pub(crate) struct ReluGate(Vec<u64>);

impl ReluGate {
    /// The gate of ReLU output `out`.
    pub(crate) fn record(out: &Tensor) -> Result<Self> {
        let out = contiguous_f32(out)?;
        let (storage, layout) = out.storage_and_layout();
        Ok(Self(crate::conv::positive_bits(slice(&storage, layout)?)))
    }

    /// The mask, checked to cover the `n` elements of `what` it is to gate.
    pub(crate) fn covering(&self, n: usize, what: &str) -> Result<Gate<'_>> {
        let gate = Gate(&self.0);
        if gate.len() < n {
            return Err(candle_core::Error::Msg(format!("ReLU gate smaller than {what}")));
        }
        Ok(gate)
    }
}

/// `t` as a contiguous f32 tensor (a cheap clone when it already is one).
pub(crate) fn contiguous_f32(t: &Tensor) -> Result<Tensor> {
    let t = if t.dtype() == DType::F32 { t.clone() } else { t.to_dtype(DType::F32)? };
    t.contiguous()
}

/// The elements of a contiguous f32 tensor in CPU memory.
pub(crate) fn slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(candle_core::Error::Msg(
            "the CPU ReLU/pooling path got a tensor on another device".into(),
        ));
    };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("the CPU ReLU/pooling path needs contiguous tensors".into())
    })?;
    Ok(&cpu.as_slice::<f32>()?[start..end])
}

/// `(grad + add) * gate`, elementwise: a ReLU's backward pass.
pub(crate) fn relu_backward(grad: &Tensor, add: Option<&Tensor>, gate: &ReluGate) -> Result<Tensor> {
    let grad = contiguous_f32(grad)?;
    let add = add.map(contiguous_f32).transpose()?;
    let (g_storage, g_layout) = grad.storage_and_layout();
    let g = slice(&g_storage, g_layout)?;
    let add_guard = add.as_ref().map(|a| a.storage_and_layout());
    let add = add_guard.as_ref().map(|(s, l)| slice(s, l)).transpose()?;
    if add.is_some_and(|a| a.len() != g.len()) {
        return Err(candle_core::Error::Msg("tap gradient and ReLU gradient differ in size".into()));
    }
    let gate = gate.covering(g.len(), "its gradient")?;
    let mut out = g.to_vec();
    const BLOCK: usize = 1 << 14;
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, dst)| {
        gate.pass(dst, add, b * BLOCK);
    });
    Tensor::from_vec(out, grad.shape(), &Device::Cpu)
}

/// 2x2, stride-2 max pooling of `x` `[b, c, h, w]` (odd last rows/columns dropped), and
/// for each output the winner: 0..4 in row-major order within the window, the first of
/// equal values winning, as in PyTorch.
pub(crate) fn max_pool(x: &Tensor) -> Result<(Tensor, Vec<u8>)> {
    let x = contiguous_f32(x)?;
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    let (storage, layout) = x.storage_and_layout();
    let input = slice(&storage, layout)?;
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
/// output, then the ReLU below: `(routed + add) * gate`. Rows and columns that odd sizes
/// dropped get only `add * gate`.
pub(crate) fn pool_backward(
    grad: &Tensor,
    input_dims: (usize, usize, usize, usize),
    routing: Routing<'_>,
    add: Option<&Tensor>,
    gate: &ReluGate,
) -> Result<Tensor> {
    let (b, c, h, w) = input_dims;
    let (h2, w2) = (h / 2, w / 2);
    let grad = contiguous_f32(grad)?;
    if grad.dims4()? != (b, c, h2, w2) {
        return Err(candle_core::Error::Msg("pooling gradient does not match the pooled shape".into()));
    }
    let add = add.map(contiguous_f32).transpose()?;
    let (g_storage, g_layout) = grad.storage_and_layout();
    let g = slice(&g_storage, g_layout)?;
    let add_guard = add.as_ref().map(|a| a.storage_and_layout());
    let add = add_guard.as_ref().map(|(s, l)| slice(s, l)).transpose()?;
    let n = b * c * h * w;
    if add.is_some_and(|a| a.len() != n) || matches!(routing, Routing::Max(codes) if codes.len() != g.len()) {
        return Err(candle_core::Error::Msg("pooling backward operands differ in size".into()));
    }
    let mut out = vec![0f32; n];
    if n == 0 {
        return Tensor::from_vec(out, input_dims, &Device::Cpu);
    }
    let gate = gate.covering(n, "the pooling input")?;
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
            gate.pass(row, add, plane * h * w + y * w);
        }
    });
    Tensor::from_vec(out, input_dims, &Device::Cpu)
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
        // but the 0.0), plus the tap gradient `add` everywhere the mask is open.
        let gate = ReluGate::record(&x).unwrap();
        let grad = tensor(&[10.0, 20.0], (1, 1, 1, 2));
        let add = tensor(&[1.0; 15], (1, 1, 3, 5));
        let back = pool_backward(&grad, (1, 1, 3, 5), Routing::Max(&winners), Some(&add), &gate).unwrap();
        #[rustfmt::skip]
        let expected = [
            11.0, 1.0,   0.0, 21.0,   1.0,
            1.0, 1.0,    1.0, 1.0,    1.0,
            1.0, 1.0,    1.0, 1.0,    1.0,
        ];
        assert_eq!(values(&back), expected);
    }

    #[test]
    fn avg_pool_backward_spreads_a_quarter() {
        let x = tensor(&[1.0, -1.0, 2.0, 3.0, 4.0, 5.0], (1, 1, 3, 2));
        let gate = ReluGate::record(&x).unwrap();
        let back =
            pool_backward(&tensor(&[8.0], (1, 1, 1, 1)), (1, 1, 3, 2), Routing::Avg, None, &gate).unwrap();
        assert_eq!(values(&back), [2.0, 0.0, 2.0, 2.0, 0.0, 0.0]);
    }

    #[test]
    fn relu_backward_matches_the_mask_of_the_output() {
        let out: Vec<f32> = (0..200).map(|i| if i % 3 == 0 { 0.0 } else { i as f32 }).collect();
        let out = tensor(&out, (1, 2, 10, 10));
        let grad = tensor(&(0..200).map(|i| i as f32 - 50.0).collect::<Vec<_>>(), (1, 2, 10, 10));
        let expected = values(&(&grad * out.gt(0f32).unwrap().to_dtype(DType::F32).unwrap()).unwrap());
        let gate = ReluGate::record(&out).unwrap();
        assert_eq!(values(&relu_backward(&grad, None, &gate).unwrap()), expected);
    }
}
