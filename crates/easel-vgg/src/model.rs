//! The VGG-19 feature stack: forward to the deepest tap, and a hand-written input gradient.
//!
//! The stack is a fixed chain (conv, ReLU, pool), so its backward pass is written out here
//! instead of going through candle's generic autograd, which would also compute the kernel
//! gradient of every convolution although the weights never change.
//!
//! On the CPU each ReLU is fused into the convolution before it (unless that convolution's
//! pre-activation is a tap), and backward runs on [`relu_pool`]'s loops with the ReLU masks
//! kept as bits; elsewhere both run on candle's tensor ops.

pub(crate) mod relu_pool;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use easel_core::{FeatureMaps, LayerId};

use crate::conv::{self, Algo, KernelCache};
use crate::{VggError, WeightsFile, Winograd, CONVS};
use relu_pool::{ReluGate, Routing};

/// How the stack pools between blocks (2x2, stride 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Max,
    Avg,
}

/// How pixels in [0, 1] are turned into network input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preprocess {
    /// RGB, `(p - mean) / std` with ImageNet statistics (torchvision weights).
    Torchvision,
    /// BGR, `255 p - mean` (weights converted from Caffe).
    Caffe,
}

/// What [`Vgg19::load`] keeps of transformed Winograd kernels: 128 MiB, which at 256 px holds
/// all of them (123 MiB; at 512 px, a third of the 351 MiB they take), and keeps peak memory
/// at 512 px under 600 MB.
pub const DEFAULT_KERNEL_CACHE_BYTES: usize = 128 << 20;

const TORCHVISION_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const TORCHVISION_STD: [f32; 3] = [0.229, 0.224, 0.225];
const CAFFE_MEAN_BGR: [f32; 3] = [103.939, 116.779, 123.68];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Conv(usize),
    Relu,
    Pool,
}

fn op(index: usize) -> Op {
    match CONVS.iter().position(|&(i, _, _)| i == index) {
        Some(ordinal) => Op::Conv(ordinal),
        None if matches!(index, 4 | 9 | 18 | 27 | 36) => Op::Pool,
        None => Op::Relu,
    }
}

#[derive(Clone)]
struct ConvWeights {
    /// `[C_out, C_in, 3, 3]`; the input gradient reads it flipped (see [`conv::input_grad`]).
    weight: Tensor,
    bias: Tensor,
}

/// VGG-19 `features` up to some depth, with its pre-processing and pooling.
///
/// Cheap to clone: tensors are reference counted, so one loaded model serves many jobs.
#[derive(Clone)]
pub struct Vgg19 {
    convs: Vec<ConvWeights>,
    depth: LayerId,
    pooling: Pooling,
    preprocess: Preprocess,
    winograd: Winograd,
    /// Transformed Winograd kernels kept across passes, shared by the model's clones.
    kernels: Arc<KernelCache>,
    mean: Tensor,
    scale: Tensor,
    device: Device,
}

/// What the forward pass kept for [`Vgg19::backward`]: the ReLU outputs (masks for the ReLU
/// gradient and inputs of the pools), and the pre-processed input's shape.
///
/// On the CPU, instead: each ReLU's mask (one bit per element, so the caller can drop the taps
/// once it has their gradients) and each pool's input shape and, for max pooling, the winner
/// of every window.
pub struct Trace {
    relu_outputs: BTreeMap<usize, Tensor>,
    gates: BTreeMap<usize, ReluGate>,
    pools: BTreeMap<usize, PoolRecord>,
    cpu: bool,
    input_dims: (usize, usize, usize, usize),
}

/// A pooling layer as its backward pass needs it (CPU path).
struct PoolRecord {
    input_dims: (usize, usize, usize, usize),
    /// Which input of each window won, for max pooling.
    winners: Option<Vec<u8>>,
}

impl Vgg19 {
    /// Loads the convolutions needed to compute `depth` (and nothing deeper) from `weights`.
    pub fn load(
        weights: &WeightsFile,
        depth: LayerId,
        pooling: Pooling,
        preprocess: Preprocess,
        device: &Device,
    ) -> Result<Self, VggError> {
        let last = depth.features_index().unwrap_or(0);
        let mut convs = Vec::new();
        for &(index, cin, cout) in CONVS.iter().take_while(|(i, _, _)| *i <= last) {
            let w = weights.read_f32(&format!("features.{index}.weight"))?;
            let b = weights.read_f32(&format!("features.{index}.bias"))?;
            convs.push(ConvWeights {
                weight: Tensor::from_vec(w, (cout, cin, 3, 3), device)?,
                bias: Tensor::from_vec(b, (1, cout, 1, 1), device)?,
            });
        }
        weights.release_pages();
        let (mean, scale) = match preprocess {
            Preprocess::Torchvision => (TORCHVISION_MEAN, TORCHVISION_STD.map(|s| 1.0 / s)),
            Preprocess::Caffe => (CAFFE_MEAN_BGR, [255.0; 3]),
        };
        Ok(Self {
            convs,
            depth,
            pooling,
            preprocess,
            winograd: Winograd::default(),
            kernels: Arc::new(KernelCache::new(DEFAULT_KERNEL_CACHE_BYTES)),
            mean: Tensor::from_slice(&mean, (1, 3, 1, 1), device)?,
            scale: Tensor::from_slice(&scale, (1, 3, 1, 1), device)?,
            device: device.clone(),
        })
    }

    /// The same model with its convolutions run as `mode` says (default: [`Winograd::Deep`]).
    pub fn with_winograd(mut self, mode: Winograd) -> Self {
        self.winograd = mode;
        self
    }

    /// The same model keeping at most `bytes` of transformed Winograd kernels across passes
    /// (default [`DEFAULT_KERNEL_CACHE_BYTES`]; 0 transforms them on every pass), in a cache
    /// of its own (shared by its clones).
    pub fn with_kernel_cache(mut self, bytes: usize) -> Self {
        self.kernels = Arc::new(KernelCache::new(bytes));
        self
    }

    /// Bytes of transformed kernels kept now.
    pub fn kernel_cache_used(&self) -> usize {
        self.kernels.used()
    }

    /// How the forward pass of convolution `k` runs on the CPU.
    fn forward_algo(&self, k: usize) -> Algo<'_> {
        if self.winograd.forward_of(k) {
            Algo::Winograd(Some((&self.kernels, k)))
        } else {
            Algo::Direct
        }
    }

    /// How the input gradient of convolution `k` runs on the CPU.
    fn gradient_algo(&self, k: usize) -> Algo<'_> {
        if self.winograd.gradients() {
            Algo::Winograd(Some((&self.kernels, k)))
        } else {
            Algo::Direct
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The deepest layer this model can compute.
    pub fn depth(&self) -> LayerId {
        self.depth
    }

    /// The smallest image side that keeps every layer up to `layer` at least 1 pixel.
    pub fn min_side(layer: LayerId) -> usize {
        let pools = [4, 9, 18, 27, 36].iter().filter(|&&p| Some(p) <= layer.features_index()).count();
        1 << pools
    }

    fn normalise(&self, pixels: &Tensor) -> Result<Tensor, VggError> {
        let x = match self.preprocess {
            Preprocess::Torchvision => pixels.clone(),
            Preprocess::Caffe => pixels.index_select(&Tensor::new(&[2u32, 1, 0], &self.device)?, 1)?,
        };
        Ok(match self.preprocess {
            Preprocess::Torchvision => x.broadcast_sub(&self.mean)?.broadcast_mul(&self.scale)?,
            Preprocess::Caffe => x.broadcast_mul(&self.scale)?.broadcast_sub(&self.mean)?,
        })
    }

    fn check(&self, pixels: &Tensor, deepest: LayerId) -> Result<(), VggError> {
        if deepest > self.depth {
            return Err(VggError::NotLoaded { layer: deepest.to_string(), loaded: self.depth.to_string() });
        }
        let (_, _, h, w) = pixels.dims4()?;
        let min = Self::min_side(deepest);
        if h < min || w < min {
            return Err(VggError::ImageTooSmall { height: h, width: w, layer: deepest.to_string(), min });
        }
        Ok(())
    }

    /// Runs pixels `[1, 3, H, W]` in [0, 1] up to the deepest of `taps` and returns the taps.
    pub fn forward(&self, pixels: &Tensor, taps: &[LayerId]) -> Result<FeatureMaps, VggError> {
        Ok(self.run(pixels, taps, false)?.0)
    }

    /// Like [`Vgg19::forward`], also keeping what [`Vgg19::backward`] needs.
    pub fn forward_traced(
        &self,
        pixels: &Tensor,
        taps: &[LayerId],
    ) -> Result<(FeatureMaps, Trace), VggError> {
        self.run(pixels, taps, true)
    }

    fn run(&self, pixels: &Tensor, taps: &[LayerId], keep: bool) -> Result<(FeatureMaps, Trace), VggError> {
        let deepest = taps.iter().copied().max().unwrap_or(LayerId::Pixels);
        self.check(pixels, deepest)?;
        let mut features = FeatureMaps::new();
        if taps.contains(&LayerId::Pixels) {
            features.insert(LayerId::Pixels, pixels.clone());
        }
        let mut x = self.normalise(pixels)?;
        let input_dims = x.dims4()?;
        let cpu = matches!(self.device, Device::Cpu);
        let mut relu_outputs = BTreeMap::new();
        let mut gates = BTreeMap::new();
        let mut pools = BTreeMap::new();
        let last = deepest.features_index();
        let tap = |index: usize| LayerId::from_features_index(index).filter(|l| taps.contains(l));
        // Whether x already went through the ReLU at this index, fused into the conv before.
        let mut rectified = false;
        for index in (0..).take_while(|&i| Some(i) <= last) {
            let fused = std::mem::replace(&mut rectified, false);
            x = match op(index) {
                Op::Conv(k) => {
                    let ConvWeights { weight, bias, .. } = &self.convs[k];
                    rectified = Some(index + 1) <= last && op(index + 1) == Op::Relu && tap(index).is_none();
                    if rectified {
                        conv::forward_relu(&x, weight, bias, self.forward_algo(k))?
                    } else {
                        conv::forward(&x, weight, bias, self.forward_algo(k))?
                    }
                }
                Op::Relu if fused => x,
                Op::Relu => x.relu()?,
                Op::Pool if cpu && self.pooling == Pooling::Max => {
                    let (pooled, winners) = relu_pool::max_pool(&x)?;
                    if keep {
                        pools.insert(index, PoolRecord { input_dims: x.dims4()?, winners: Some(winners) });
                    }
                    pooled
                }
                Op::Pool => {
                    if keep && cpu {
                        pools.insert(index, PoolRecord { input_dims: x.dims4()?, winners: None });
                    }
                    match self.pooling {
                        Pooling::Max => x.max_pool2d(2)?,
                        Pooling::Avg => x.avg_pool2d(2)?,
                    }
                }
            };
            if keep && op(index) == Op::Relu {
                if cpu {
                    gates.insert(index, ReluGate::record(&x)?);
                } else {
                    relu_outputs.insert(index, x.clone());
                }
            }
            if let Some(layer) = tap(index) {
                features.insert(layer, x.clone());
            }
        }
        Ok((features, Trace { relu_outputs, gates, pools, cpu, input_dims }))
    }

    /// The gradient w.r.t. the pixels of a function of the taps, given its gradient w.r.t.
    /// each tap (`Pixels` included, if the function reads the image directly).
    pub fn backward(&self, trace: &Trace, tap_grads: &[(LayerId, Tensor)]) -> Result<Tensor, VggError> {
        if trace.cpu {
            let grad = self.backward_cpu(trace, tap_grads)?;
            return self.pixels_grad(trace, grad, tap_grads);
        }
        let grad_at = |index: usize| {
            tap_grads.iter().filter(move |(l, _)| l.features_index() == Some(index)).map(|(_, g)| g)
        };
        let deepest = tap_grads.iter().filter_map(|(l, _)| l.features_index()).max();
        let mut grad: Option<Tensor> = None;
        for index in (0..deepest.map_or(0, |d| d + 1)).rev() {
            for g in grad_at(index) {
                grad = Some(match grad {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                });
            }
            let Some(g) = grad.take() else { continue };
            grad = Some(match op(index) {
                Op::Conv(k) => conv::input_grad(&g, &self.convs[k].weight, self.gradient_algo(k))?,
                Op::Relu => {
                    let out = &trace.relu_outputs[&index];
                    (g * out.gt(0f32)?.to_dtype(DType::F32)?)?
                }
                Op::Pool => {
                    let input = &trace.relu_outputs[&(index - 1)];
                    match self.pooling {
                        Pooling::Max => max_pool_backward(input, &g)?,
                        Pooling::Avg => avg_pool_backward(input.dims4()?, &g)?,
                    }
                }
            });
        }
        self.pixels_grad(trace, grad, tap_grads)
    }

    /// Backward through the convolutions, ReLUs and pools on the CPU (see [`relu_pool`]):
    /// the gradient w.r.t. the normalised input, if any tap below the pixels has one.
    fn backward_cpu(
        &self,
        trace: &Trace,
        tap_grads: &[(LayerId, Tensor)],
    ) -> Result<Option<Tensor>, VggError> {
        // The sum of the tap gradients at `index`, in f32.
        let taps_at = |index: usize| -> candle_core::Result<Option<Tensor>> {
            let mut sum: Option<Tensor> = None;
            for (_, g) in tap_grads.iter().filter(|(l, _)| l.features_index() == Some(index)) {
                let g = relu_pool::contiguous_f32(g)?;
                sum = Some(match sum {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
            Ok(sum)
        };
        let gate = |index: usize| {
            trace
                .gates
                .get(&index)
                .ok_or_else(|| candle_core::Error::Msg(format!("trace lacks ReLU {index}")))
        };
        let deepest = tap_grads.iter().filter_map(|(l, _)| l.features_index()).max();
        let mut grad: Option<Tensor> = None;
        // The ReLU at this index was already folded into the backward step above it.
        let mut folded = false;
        for index in (0..deepest.map_or(0, |d| d + 1)).rev() {
            if std::mem::replace(&mut folded, false) {
                continue;
            }
            if let Some(t) = taps_at(index)? {
                grad = Some(match grad {
                    Some(acc) => (acc + t)?,
                    None => t,
                });
            }
            let Some(g) = grad.take() else { continue };
            grad = Some(match op(index) {
                Op::Conv(k) if index > 0 && op(index - 1) == Op::Relu => {
                    folded = true;
                    let add = taps_at(index - 1)?;
                    conv::input_grad_gated(
                        &g,
                        &self.convs[k].weight,
                        add.as_ref(),
                        gate(index - 1)?,
                        self.gradient_algo(k),
                    )?
                }
                Op::Conv(k) => conv::input_grad(&g, &self.convs[k].weight, self.gradient_algo(k))?,
                Op::Relu => relu_pool::relu_backward(&g, None, gate(index)?)?,
                Op::Pool => {
                    // Every pool of VGG-19 follows a ReLU.
                    folded = true;
                    let add = taps_at(index - 1)?;
                    let record = trace
                        .pools
                        .get(&index)
                        .ok_or_else(|| candle_core::Error::Msg(format!("trace lacks pool {index}")))?;
                    let routing = match &record.winners {
                        Some(winners) => Routing::Max(winners),
                        None => Routing::Avg,
                    };
                    relu_pool::pool_backward(&g, record.input_dims, routing, add.as_ref(), gate(index - 1)?)?
                }
            });
        }
        Ok(grad)
    }

    /// The pixel gradient from the gradient w.r.t. the normalised input (if any) and the
    /// gradient the losses send to the pixels directly.
    fn pixels_grad(
        &self,
        trace: &Trace,
        grad: Option<Tensor>,
        tap_grads: &[(LayerId, Tensor)],
    ) -> Result<Tensor, VggError> {
        let mut pixels_grad = match grad {
            Some(g) => match self.preprocess {
                Preprocess::Torchvision => g.broadcast_mul(&self.scale)?,
                Preprocess::Caffe => g
                    .broadcast_mul(&self.scale)?
                    .index_select(&Tensor::new(&[2u32, 1, 0], &self.device)?, 1)?,
            },
            None => Tensor::zeros(trace.input_dims, DType::F32, &self.device)?,
        };
        for (_, g) in tap_grads.iter().filter(|(l, _)| *l == LayerId::Pixels) {
            pixels_grad = (pixels_grad + g)?;
        }
        Ok(pixels_grad)
    }
}

/// Spreads each window's gradient evenly over its four inputs; inputs cut off by an odd
/// size get none.
fn avg_pool_backward(input_dims: (usize, usize, usize, usize), grad: &Tensor) -> candle_core::Result<Tensor> {
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
fn max_pool_backward(input: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = input.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    let x = input.narrow(2, 0, 2 * h2)?.narrow(3, 0, 2 * w2)?.contiguous()?.reshape((b, c, h2, 2, w2, 2))?;
    let corner = |dy: usize, dx: usize| x.narrow(3, dy, 1)?.narrow(5, dx, 1)?.reshape((b, c, h2, w2));
    let (a, bb, cc, d) = (corner(0, 0)?, corner(0, 1)?, corner(1, 0)?, corner(1, 1)?);
    let max = a.maximum(&bb)?.maximum(&cc.maximum(&d)?)?;
    let is_max = |t: &Tensor| t.eq(&max)?.to_dtype(DType::F32);
    let ma = is_max(&a)?;
    let mb = (is_max(&bb)? * (1.0 - &ma)?)?;
    let mc = (is_max(&cc)? * ((1.0 - &ma)? - &mb)?)?;
    let md = (((1.0 - &ma)? - &mb)? - &mc)?;
    let top = Tensor::stack(&[(grad * ma)?, (grad * mb)?], 4)?;
    let bottom = Tensor::stack(&[(grad * mc)?, (grad * md)?], 4)?;
    Tensor::stack(&[top, bottom], 3)?
        .reshape((b, c, 2 * h2, 2 * w2))?
        .pad_with_zeros(2, 0, h - 2 * h2)?
        .pad_with_zeros(3, 0, w - 2 * w2)
}
