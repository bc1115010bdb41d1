//! The convolutions on candle's tensor ops, for any device (the generic backend).

use candle_core::{Result, Tensor};

/// `conv3x3(x, w) + b` with padding 1, stride 1; `bias` is `[1, C_out, 1, 1]`.
pub(crate) fn forward(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.conv2d(weight, 1, 1, 1, 1)?.broadcast_add(bias)
}

/// Gradient w.r.t. the input of [`forward`], given the gradient of its output and the kernel
/// [`flipped`] once (at load) from the forward one.
pub(crate) fn input_grad(grad_out: &Tensor, flipped: &Tensor) -> Result<Tensor> {
    grad_out.conv2d(flipped, 1, 1, 1, 1)
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
