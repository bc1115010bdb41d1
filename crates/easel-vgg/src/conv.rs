//! The 3x3 same-padding convolution, forward and input gradient: the one place to speed up.
//!
//! On the CPU backend both run on easel's own kernels, [`direct`] (chunked im2col and
//! `gemm`'s SIMD kernels, on the rayon pool) or [`winograd`], as [`Winograd`] chooses, with
//! bias, ReLU or the ReLU backward of the layer below applied as each output is stored
//! ([`epilogue`]). The generic backend runs them on candle's `conv2d`, on any device
//! ([`generic`]). The paths agree to float rounding (see the tests).

mod cpu_caches;
mod direct;
mod epilogue;
mod gemm;
pub(crate) mod generic;
mod schedule;
mod winograd;

use candle_core::{Device, Tensor};

use crate::cpu_tensor::{contiguous_f32, host_slice, HostSlice};
use crate::relu_mask::{relu_backward, ReluMask};
use crate::VggError;
use direct::{Conv3x3, Filter};
use epilogue::Epilogue;
pub(crate) use winograd::KernelCache;

/// Which convolutions run as Winograd F(4x4, 3x3) on the CPU (F(2x2, 3x3) on images with
/// fewer than 64 of the larger tiles; direct where neither pays off, as for the 3 channels of
/// conv1_1); the others run direct.
///
/// Winograd does a quarter of the multiplications but rounds about 10x more coarsely, and
/// not the same way at every position of its 4x4 tiles. In the input gradients that only
/// perturbs the values a little. In forward passes it can flip ReLU and max-pooling decisions
/// on near-ties, and it breaks exact ties: where a photo is flat (sky, a wall, a scanned
/// margin) the direct path gives bit-equal features, so max pooling sees exact ties and
/// routes them to the first element of each window as the reference (PyTorch) does, while
/// Winograd's rounding would route them by tile position. Such ties are common in the first
/// two blocks, which see the image at full and half resolution; from conv3_1 on, a feature
/// spans at least 24 pixels and its inputs have passed two poolings. Hence the default:
/// gradients everywhere, forward passes from conv3_1 on, which is most of the forward work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Winograd {
    /// Direct everywhere: the most accurate, and exact ties stay ties.
    None,
    /// Input gradients only: the forward pass is the direct path's.
    Gradients,
    /// Input gradients, and the forward passes of blocks 3-5 (from conv3_1): features of the
    /// first two blocks, and their max-pooling decisions, are the direct path's.
    #[default]
    Deep,
    /// Every forward pass too: features within ~1e-6 (relative) of the direct path's, but
    /// max-pooling and ReLU decisions near ties may differ from an exact reference's.
    All,
}

impl Winograd {
    /// Whether the forward pass of convolution `conv` (0 for conv1_1, in [`crate::CONVS`]'s
    /// order) runs as Winograd.
    pub(crate) fn forward_of(self, conv: usize) -> bool {
        match self {
            Winograd::None | Winograd::Gradients => false,
            Winograd::Deep => conv >= FIRST_DEEP_CONV,
            Winograd::All => true,
        }
    }

    /// Whether input gradients run as Winograd.
    pub(crate) fn gradients(self) -> bool {
        self != Winograd::None
    }
}

/// conv3_1, the first convolution of block 3, in [`crate::CONVS`]'s order.
const FIRST_DEEP_CONV: usize = 4;

/// How one convolution runs on the CPU path.
#[derive(Clone, Copy)]
pub(crate) enum Algo<'a> {
    /// Direct (im2col and `gemm`).
    Direct,
    /// Winograd where the shape suits it (else direct); the transformed kernel is kept in the
    /// cache, if one is given, under the convolution's number in [`crate::CONVS`].
    Winograd(Option<(&'a KernelCache, usize)>),
    /// [`Algo::Winograd`], with the tiles (or direct) chosen as for an input of this
    /// `(height, width)`: a window of a larger image runs each convolution as the whole image
    /// does, so that (on the grid the windows start on) its features are the same bits.
    WinogradAs(Option<(&'a KernelCache, usize)>, (usize, usize)),
}

/// Bytes of the transformed kernel, and the tile side, that a convolution of `c_in` to `c_out`
/// channels on an image of `height x width` runs Winograd with; `None` where it runs direct.
pub(crate) fn winograd_kernel_bytes(
    c_in: usize,
    c_out: usize,
    height: usize,
    width: usize,
) -> Option<(usize, usize)> {
    let shape = Conv3x3 { c_in, c_out, height, width };
    winograd::choose(&shape)
        .map(|tile| (c_out * c_in * tile.n() * tile.n() * std::mem::size_of::<f32>(), tile.m()))
}

/// What a forward convolution's output goes through before it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// Nothing: the pre-activation is wanted itself.
    Identity,
    /// The ReLU that follows every convolution of VGG-19, in the same pass over the output.
    Relu,
}

/// `conv3x3(x, w) + b` with padding 1, stride 1, then `activation`, on the CPU kernels as
/// `algo` says; `bias` is `[1, C_out, 1, 1]`.
pub(crate) fn forward(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    activation: Activation,
    algo: Algo<'_>,
) -> Result<Tensor, VggError> {
    let bias = host_slice(bias)?;
    let epilogue = match activation {
        Activation::Identity => Epilogue::Bias(bias.get()),
        Activation::Relu => Epilogue::BiasRelu(bias.get()),
    };
    run(x, weight, Direction::Forward, epilogue, algo)
}

/// Gradient w.r.t. the input of [`forward`], given the gradient of its output.
///
/// For a stride-1, pad-1 3x3 convolution this is again such a convolution, with the kernel
/// `weight` (`[C_out, C_in, 3, 3]`) flipped in both spatial axes and its channel axes
/// swapped; the CPU kernels read `weight` that way in place. No kernel gradient is computed:
/// the weights are frozen.
pub(crate) fn input_grad(grad_out: &Tensor, weight: &Tensor, algo: Algo<'_>) -> Result<Tensor, VggError> {
    run(grad_out, weight, Direction::InputGradient, Epilogue::None, algo)
}

/// [`input_grad`], then the backward pass of the ReLU whose output was this convolution's
/// input: `(input_grad + add) * mask`, where `add` is that ReLU's own upstream gradient.
pub(crate) fn input_grad_masked(
    grad_out: &Tensor,
    weight: &Tensor,
    add: Option<&Tensor>,
    mask: &ReluMask,
    algo: Algo<'_>,
) -> Result<Tensor, VggError> {
    if grad_out.dims4()?.0 != 1 {
        // A mask covers the whole batch, which the kernels see one image at a time.
        return relu_backward(&input_grad(grad_out, weight, algo)?, add, mask);
    }
    let (_, _, height, width) = grad_out.dims4()?;
    // The gradient has the forward convolution's input channels.
    let n = weight.dims4()?.1 * height * width;
    let add = add.map(contiguous_f32).transpose()?;
    let add = add.as_ref().map(host_slice).transpose()?;
    let add = add.as_ref().map(HostSlice::get);
    if add.is_some_and(|a| a.len() != n) {
        return Err(VggError::Internal("a layer's gradient and its ReLU's gradient differ in size".into()));
    }
    let mask = mask.covering(n, "the input gradient")?;
    run(grad_out, weight, Direction::InputGradient, Epilogue::ReluBackward { add, mask }, algo)
}

/// Which convolution a kernel `[C_out, C_in, 3, 3]` stands for in [`run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// The convolution itself.
    Forward,
    /// Its input gradient: the kernel flipped, with its channel axes swapped.
    InputGradient,
}

/// Runs one convolution of every image of `x` on [`direct`] (or [`winograd`] if `algo` says
/// so and the shape suits it).
fn run(
    x: &Tensor,
    weight: &Tensor,
    direction: Direction,
    epilogue: Epilogue<'_>,
    algo: Algo<'_>,
) -> Result<Tensor, VggError> {
    let (batch, c_in, height, width) = x.dims4()?;
    let (c_out, k_in) = match (weight.dims4()?, direction) {
        ((o, i, 3, 3), Direction::Forward) => (o, i),
        ((o, i, 3, 3), Direction::InputGradient) => (i, o),
        (dims, _) => return Err(VggError::Internal(format!("a convolution kernel of shape {dims:?}"))),
    };
    if k_in != c_in {
        return Err(VggError::Internal(format!("a kernel for {k_in} input channels applied to {c_in}")));
    }
    let shape = Conv3x3 { c_in, c_out, height, width };
    let x = contiguous_f32(x)?;
    let x = host_slice(&x)?;
    let k = host_slice(weight)?;
    let filter = match direction {
        Direction::Forward => Filter::Plain(k.get()),
        Direction::InputGradient => Filter::FlippedOf(k.get()),
    };
    let (tile, cache) = match algo {
        Algo::Direct => (None, None),
        Algo::Winograd(cache) => (winograd::choose(&shape), cache),
        Algo::WinogradAs(cache, (height, width)) => {
            (winograd::choose(&Conv3x3 { height, width, ..shape }), cache)
        }
    };
    let one = |image: &[f32]| match tile {
        Some(tile) => winograd::run(tile, &shape, image, filter, epilogue, cache),
        None => shape.run(image, filter, epilogue),
    };
    let out = if batch == 1 {
        one(x.get())
    } else {
        let per_image = (c_in * height * width).max(1);
        x.get().chunks_exact(per_image).take(batch).flat_map(one).collect()
    };
    Ok(Tensor::from_vec(out, (batch, c_out, height, width), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_testkit::Rng;

    fn algo(winograd: bool) -> Algo<'static> {
        if winograd {
            Algo::Winograd(None)
        } else {
            Algo::Direct
        }
    }

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::from_vec(
            Rng::new(seed.wrapping_add(0x9E37_79B9_7F4A_7C15)).uniform_vec(n),
            shape,
            &Device::Cpu,
        )
        .expect("shape matches")
    }

    /// Largest |a - b| over the largest |b|: a relative error that ignores cancellations.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        diff / scale.max(f32::MIN_POSITIVE)
    }

    const SHAPES: &[(usize, usize, usize, usize)] = &[
        // (c_in, c_out, height, width): conv1_1, small and odd images, wide channel counts;
        // the first three are large enough for Winograd's F(4x4) and F(2x2) tiles.
        (64, 64, 40, 36),
        (16, 32, 37, 33),
        (64, 64, 24, 32),
        (3, 64, 33, 47),
        (64, 128, 17, 9),
        (128, 256, 7, 5),
        (256, 512, 5, 3),
        (512, 512, 3, 4),
        (5, 7, 1, 1),
        (1, 3, 2, 13),
    ];

    /// Largest relative error (max |difference| over max |value|) allowed against candle's
    /// f32 convolution: the direct path's rounding, or Winograd's (about 10x coarser).
    fn tolerance(winograd: bool) -> f32 {
        if winograd {
            1e-4
        } else {
            1e-5
        }
    }

    #[test]
    fn deep_starts_at_conv3_1() {
        let (index, c_in, c_out) = crate::CONVS[FIRST_DEEP_CONV];
        assert_eq!(Some(index), easel_core::LayerId::Conv3_1.features_index());
        assert_eq!((c_in, c_out), (128, 256));
        let deep: Vec<bool> = (0..crate::CONVS.len()).map(|k| Winograd::Deep.forward_of(k)).collect();
        assert_eq!(deep.iter().filter(|&&d| !d).count(), 4, "conv1_1 to conv2_2 stay direct");
        assert!(deep[FIRST_DEEP_CONV..].iter().all(|&d| d));
        for k in 0..crate::CONVS.len() {
            assert!(Winograd::All.forward_of(k) && !Winograd::Gradients.forward_of(k));
        }
    }

    #[test]
    fn forward_matches_candle() {
        for winograd in [false, true] {
            forward_matches_candle_in(winograd);
        }
    }

    fn forward_matches_candle_in(winograd: bool) {
        let tol = tolerance(winograd);
        for (i, &(c_in, c_out, h, w)) in SHAPES.iter().enumerate() {
            let x = random((1, c_in, h, w), i as u64);
            let k =
                (random((c_out, c_in, 3, 3), 100 + i as u64) * (1.0 / (9.0 * c_in as f64).sqrt())).unwrap();
            let b = random((1, c_out, 1, 1), 200 + i as u64);
            let fast = forward(&x, &k, &b, Activation::Identity, algo(winograd)).unwrap();
            let slow = generic::forward(&x, &k, &b, Activation::Identity).unwrap();
            assert_eq!(fast.dims(), slow.dims());
            let err = rel_err(&fast, &slow);
            assert!(err < tol, "winograd {winograd} {c_in}->{c_out} at {h}x{w}: relative error {err}");
            let fused = forward(&x, &k, &b, Activation::Relu, algo(winograd)).unwrap();
            let err = rel_err(&fused, &slow.relu().unwrap());
            assert!(
                err < tol,
                "winograd {winograd} {c_in}->{c_out} at {h}x{w} with ReLU: relative error {err}"
            );
        }
    }

    #[test]
    fn input_grad_matches_candle() {
        for winograd in [false, true] {
            input_grad_matches_candle_in(winograd);
        }
    }

    fn input_grad_matches_candle_in(winograd: bool) {
        let tol = tolerance(winograd);
        for (i, &(c_in, c_out, h, w)) in SHAPES.iter().enumerate() {
            // The gradient conv maps c_out channels back to c_in (3 for conv1_1).
            let g = random((1, c_out, h, w), 300 + i as u64);
            let weight = random((c_out, c_in, 3, 3), 400 + i as u64);
            // The reference flips the kernel by hand: flipped[i][o][t] = weight[o][i][8 - t].
            let values = weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut by_hand = vec![0f32; values.len()];
            for o in 0..c_out {
                for ci in 0..c_in {
                    for t in 0..9 {
                        by_hand[(ci * c_out + o) * 9 + 8 - t] = values[(o * c_in + ci) * 9 + t];
                    }
                }
            }
            let by_hand = Tensor::from_vec(by_hand, (c_in, c_out, 3, 3), &Device::Cpu).unwrap();
            let slow = g.conv2d(&by_hand, 1, 1, 1, 1).unwrap();
            let fast = input_grad(&g, &weight, algo(winograd)).unwrap();
            assert_eq!(fast.dims(), slow.dims());
            let err = rel_err(&fast, &slow);
            assert!(err < tol, "winograd {winograd} grad {c_out}->{c_in} at {h}x{w}: relative error {err}");
            // The generic backend flips the kernel with tensor ops.
            let err = rel_err(&generic::input_grad(&g, &generic::flipped(&weight).unwrap()).unwrap(), &slow);
            assert!(err < 1e-6, "candle's path, grad {c_out}->{c_in} at {h}x{w}: relative error {err}");
        }
    }

    #[test]
    fn batches_and_strided_inputs_work() {
        let x = random((2, 8, 6, 5), 7);
        let k = random((4, 8, 3, 3), 8);
        let b = random((1, 4, 1, 1), 9);
        let err = rel_err(
            &forward(&x, &k, &b, Activation::Identity, Algo::Direct).unwrap(),
            &generic::forward(&x, &k, &b, Activation::Identity).unwrap(),
        );
        assert!(err < 1e-5, "batch of 2: {err}");
        // A transposed (non-contiguous) input is made contiguous first.
        let xt = random((1, 8, 5, 6), 10).transpose(2, 3).unwrap();
        let err = rel_err(
            &forward(&xt, &k, &b, Activation::Identity, Algo::Direct).unwrap(),
            &generic::forward(&xt, &k, &b, Activation::Identity).unwrap(),
        );
        assert!(err < 1e-5, "transposed input: {err}");
    }
}

#[cfg(test)]
mod accuracy {
    use super::*;
    use candle_core::DType;

    /// Relative L2 distance of `t` from the f64 result `exact`.
    fn distance(t: &Tensor, exact: &Tensor) -> f64 {
        let d = (t.to_dtype(DType::F64).unwrap() - exact).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = exact.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f64>().unwrap() / n.to_scalar::<f64>().unwrap()).sqrt()
    }

    /// The max-pooling Adam golden test is sensitive to rounding (near-ties flip winners), so
    /// the fast path must be no less accurate than candle's: in fact it is about 2x closer
    /// to the f64 result (short f32 accumulation chains, see kernels::Conv3x3::chunk).
    #[test]
    fn fast_path_is_closer_to_f64_than_candle() {
        for &(c_in, c_out, h, w) in
            &[(3usize, 64usize, 24usize, 32usize), (64, 64, 24, 32), (256, 256, 12, 16), (512, 512, 6, 8)]
        {
            let x = Tensor::rand(0f32, 1f32, (1, c_in, h, w), &Device::Cpu).unwrap();
            let k = (Tensor::randn(0f32, 1f32, (c_out, c_in, 3, 3), &Device::Cpu).unwrap()
                * (2.0 / (9.0 * c_in as f64)).sqrt())
            .unwrap();
            let b = Tensor::zeros((1, c_out, 1, 1), DType::F32, &Device::Cpu).unwrap();
            let exact =
                x.to_dtype(DType::F64).unwrap().conv2d(&k.to_dtype(DType::F64).unwrap(), 1, 1, 1, 1).unwrap();
            let ours = distance(&forward(&x, &k, &b, Activation::Identity, Algo::Direct).unwrap(), &exact);
            let candle = distance(&generic::forward(&x, &k, &b, Activation::Identity).unwrap(), &exact);
            assert!(ours <= candle * 1.05, "{c_in}->{c_out}: fast {ours:.3e} vs candle {candle:.3e}");
        }
    }
}

/// The CPU convolutions on raw slices, for the `conv` bench (`cargo bench -p easel-vgg --bench
/// conv`); not a stable API.
#[doc(hidden)]
pub mod bench {
    use super::direct::{Conv3x3, Filter};
    use super::epilogue::Epilogue;
    use super::winograd;

    /// Which convolution to run: `kernel` is `[c_out, c_in, 3, 3]` plus a bias for the
    /// forward pass, and the forward pass's `[c_in, c_out, 3, 3]` for its input gradient.
    #[derive(Debug, Clone, Copy)]
    pub enum Pass<'a> {
        Forward { bias: &'a [f32] },
        InputGradient,
    }

    fn parts<'a>(pass: Pass<'a>, kernel: &'a [f32]) -> (Filter<'a>, Epilogue<'a>) {
        match pass {
            Pass::Forward { bias } => (Filter::Plain(kernel), Epilogue::Bias(bias)),
            Pass::InputGradient => (Filter::FlippedOf(kernel), Epilogue::None),
        }
    }

    /// The direct path, `input` `[c_in, height, width]` to `[c_out, height, width]`.
    pub fn direct(
        (c_in, c_out, height, width): (usize, usize, usize, usize),
        input: &[f32],
        kernel: &[f32],
        pass: Pass<'_>,
    ) -> Vec<f32> {
        let (filter, epilogue) = parts(pass, kernel);
        Conv3x3 { c_in, c_out, height, width }.run(input, filter, epilogue)
    }

    /// Winograd with the tiles easel would choose for this shape, without a kernel cache;
    /// `None` where easel would run it direct.
    pub fn winograd(
        (c_in, c_out, height, width): (usize, usize, usize, usize),
        input: &[f32],
        kernel: &[f32],
        pass: Pass<'_>,
    ) -> Option<Vec<f32>> {
        let shape = Conv3x3 { c_in, c_out, height, width };
        let (filter, epilogue) = parts(pass, kernel);
        winograd::choose(&shape).map(|tile| winograd::run(tile, &shape, input, filter, epilogue, None))
    }
}
