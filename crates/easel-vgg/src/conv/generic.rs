//! The convolutions on candle's tensor ops, for any device (the generic backend).
//!
//! candle's CUDA `conv2d` lowers a convolution to one im2col matrix (9 * C_in floats per output
//! pixel) and one GEMM over the whole image: conv1_2 of a 2048x1536 image would take 7 GB of
//! scratch, and past 2^32 im2col elements (conv1_2 at about 2800 px) its kernel's launch size
//! overflows. So an image is convolved in bands of rows whose scratch stays under
//! [`BAND_SCRATCH_BYTES`], each band's output going through the bias and ReLU and straight
//! into its place in the result. An image small enough is one band: the same single `conv2d`
//! as before.

use candle_core::{Result, Tensor};

use super::Activation;

/// The most one band of a convolution allocates beside the result: the im2col matrix, the
/// GEMM's output and its copy into channel-first order, and the epilogue's tensor.
pub const BAND_SCRATCH_BYTES: u64 = 256 << 20;

/// `conv3x3(x, w) + b` with padding 1, stride 1, then `activation`; `bias` is `[1, C_out, 1, 1]`.
pub(crate) fn forward(x: &Tensor, weight: &Tensor, bias: &Tensor, activation: Activation) -> Result<Tensor> {
    banded(x, weight, band_rows(x.dims4()?, weight.dim(0)?), |band| {
        let y = band.broadcast_add(bias)?;
        match activation {
            Activation::Identity => Ok(y),
            Activation::Relu => y.relu(),
        }
    })
}

/// Gradient w.r.t. the input of [`forward`] (before its activation), given the gradient of its
/// output and the kernel [`flipped`] once (at load) from the forward one.
pub(crate) fn input_grad(grad_out: &Tensor, flipped: &Tensor) -> Result<Tensor> {
    banded(grad_out, flipped, band_rows(grad_out.dims4()?, flipped.dim(0)?), |band| band.contiguous())
}

/// `flipped[i][o][ky][kx] = weight[o][i][2 - ky][2 - kx]`: the kernel of the input gradient
/// as `conv2d` needs it.
pub(crate) fn flipped(weight: &Tensor) -> Result<Tensor> {
    let (c_out, c_in, kh, kw) = weight.dims4()?;
    let reversed: Vec<u32> = (0..(kh * kw) as u32).rev().collect();
    let reversed = Tensor::from_vec(reversed, kh * kw, weight.device())?;
    weight
        .reshape((c_out, c_in, kh * kw))?
        .index_select(&reversed, 2)?
        .reshape((c_out, c_in, kh, kw))?
        .transpose(0, 1)?
        .contiguous()
}

/// Scratch bytes a band takes per output pixel of a convolution from `c_in` to `c_out`
/// channels: 9 * C_in floats of im2col and three C_out-channel tensors (the GEMM's output, its
/// reordered copy, the epilogue's).
pub(crate) fn band_bytes_per_pixel(c_in: usize, c_out: usize) -> usize {
    4 * (9 * c_in + 3 * c_out)
}

/// Rows of output per band of an input of `(batch, C_in, height, width)` convolved into `c_out`
/// channels, so that a band's scratch stays under [`BAND_SCRATCH_BYTES`].
fn band_rows((b, c_in, h, w): (usize, usize, usize, usize), c_out: usize) -> usize {
    let row = b * w * band_bytes_per_pixel(c_in, c_out);
    (BAND_SCRATCH_BYTES as usize / row.max(1)).clamp(1, h.max(1))
}

/// `conv3x3(x, kernel)` (padding 1) in bands of `rows` output rows, each through `epilogue`
/// (which must return a contiguous tensor) into its rows of the result.
fn banded(
    x: &Tensor,
    kernel: &Tensor,
    rows: usize,
    epilogue: impl Fn(Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    if rows >= h {
        return epilogue(x.conv2d(kernel, 1, 1, 1, 1)?);
    }
    let mut out: Option<Tensor> = None;
    for top in (0..h).step_by(rows) {
        let bottom = (top + rows).min(h);
        // The band's rows and the image's row on either side, where there is one: the
        // convolution's own zero padding then stands only where the image ends, and the
        // outputs of the rows it adds are dropped.
        let (from, to) = (top.saturating_sub(1), (bottom + 1).min(h));
        let band =
            x.narrow(2, from, to - from)?.conv2d(kernel, 1, 1, 1, 1)?.narrow(2, top - from, bottom - top)?;
        let band = epilogue(band)?;
        let out = match &mut out {
            Some(out) => out,
            // Allocated once the first band says the epilogue's channels and type.
            None => out.insert(Tensor::zeros((b, band.dim(1)?, h, w), band.dtype(), band.device())?),
        };
        out.slice_set(&band, 2, top)?;
    }
    out.ok_or_else(|| candle_core::Error::Msg("a convolution of an image without rows".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn random(dims: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = dims.0 * dims.1 * dims.2 * dims.3;
        let mut state = seed;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
    }

    #[test]
    fn bands_of_any_height_give_the_whole_images_convolution() {
        // 13 rows: bands of 1, 2, 4 (a last band of 1), 6 and 12 rows, and the whole.
        let x = random((1, 5, 13, 11), 1);
        let weight = random((7, 5, 3, 3), 2);
        let bias = random((1, 7, 1, 1), 3);
        let relu = |t: Tensor| t.broadcast_add(&bias)?.relu();
        let whole = relu(x.conv2d(&weight, 1, 1, 1, 1).unwrap()).unwrap();
        for rows in [1, 2, 4, 6, 12, 13, 40] {
            let banded = banded(&x, &weight, rows, relu).unwrap();
            let diff =
                (&banded - &whole).unwrap().abs().unwrap().flatten_all().unwrap().max(D::Minus1).unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "bands of {rows} rows");
        }
    }

    #[test]
    fn a_band_takes_at_most_the_scratch_it_is_allowed() {
        // conv1_2 of a 2048x1536 image: 64 -> 64 channels, 4 * 2048 * (576 + 192) bytes a row.
        let row = 4 * 2048 * (9 * 64 + 3 * 64);
        let rows = band_rows((1, 64, 1536, 2048), 64);
        assert_eq!(rows, (256 << 20) / row);
        assert!(rows * row <= BAND_SCRATCH_BYTES as usize && (rows + 1) * row > BAND_SCRATCH_BYTES as usize);
        // A small image is one band; a row wider than the scratch is a band of its own.
        assert_eq!(band_rows((1, 64, 96, 128), 64), 96);
        assert_eq!(band_rows((1, 512, 10, 1 << 20), 512), 1);
    }
}
