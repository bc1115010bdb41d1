//! What a convolution does to its raw products as it stores them: bias, ReLU, or the ReLU
//! backward of the layer below (fused, so that each output is written once).

use crate::relu_mask::MaskBits;

/// What happens to `kernel * input` before it is stored.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Epilogue<'a> {
    /// Stored as is (input gradients).
    None,
    /// `+ bias[c_out]`.
    Bias(&'a [f32]),
    /// `max(x + bias[c_out], 0)`: a convolution and the ReLU after it.
    BiasRelu(&'a [f32]),
    /// `(x + add) * [mask open]`: the ReLU backward of the layer below this convolution's
    /// input, with that layer's own upstream gradient `add` (`[c_out, h, w]`) summed in first.
    ReluBackward { add: Option<&'a [f32]>, mask: MaskBits<'a> },
}

impl Epilogue<'_> {
    /// Panics unless the epilogue's operands fit a `c_out`-channel output of `plane` pixels.
    pub(crate) fn check(&self, c_out: usize, plane: usize) {
        match *self {
            Epilogue::None => {}
            Epilogue::Bias(b) | Epilogue::BiasRelu(b) => {
                assert_eq!(b.len(), c_out, "conv bias is not [c_out]")
            }
            Epilogue::ReluBackward { add, mask } => {
                if let Some(a) = add {
                    assert_eq!(a.len(), c_out * plane, "added gradient is not [c_out, h, w]");
                }
                assert!(mask.len() >= c_out * plane, "ReLU mask is not [c_out, h, w]");
            }
        }
    }

    /// Applies the epilogue in place to output slices that hold raw products, one per
    /// output channel; the slices hold output pixels `start..` of planes of `plane` pixels.
    pub(crate) fn apply(&self, rows: &mut [&mut [f32]], start: usize, plane: usize) {
        for (co, dst) in rows.iter_mut().enumerate() {
            match *self {
                Epilogue::None => {}
                Epilogue::Bias(bias) => {
                    let b = bias[co];
                    dst.iter_mut().for_each(|d| *d += b);
                }
                Epilogue::BiasRelu(bias) => {
                    let b = bias[co];
                    dst.iter_mut().for_each(|d| *d = (*d + b).max(0.0));
                }
                Epilogue::ReluBackward { add, mask } => mask.apply(dst, add, co * plane + start),
            }
        }
    }

    /// Copies each channel's row of `product` into the output slices, then applies the
    /// epilogue; the slices hold output pixels `start..` of planes of `plane` pixels.
    pub(crate) fn store(&self, rows: &mut [&mut [f32]], product: &[f32], start: usize, plane: usize) {
        let n = rows.first().map_or(0, |r| r.len());
        for (dst, src) in rows.iter_mut().zip(product.chunks_exact(n.max(1))) {
            dst.copy_from_slice(src);
        }
        self.apply(rows, start, plane);
    }
}
