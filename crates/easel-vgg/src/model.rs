//! The VGG-19 feature stack: forward to the deepest requested layer, and a hand-written input
//! gradient.
//!
//! The stack is a fixed chain (conv, ReLU, pool), so its backward pass is written out (in
//! [`crate::backend`]) instead of going through candle's generic autograd, which would also
//! compute the kernel gradient of every convolution although the weights never change.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use easel_core::{FeatureMaps, LayerId};

use crate::backend::{Backend, Keep, Kept, Layers, Pass};
use crate::conv::{KernelCache, Winograd};
use crate::pool::Pooling;
use crate::stack::ConvWeights;
use crate::{VggError, WeightsFile, CONVS, POOLS};

/// How pixels in [0, 1] are turned into network input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preprocess {
    /// RGB, `(p - mean) / std` with ImageNet statistics (torchvision weights).
    Torchvision,
    /// BGR, `255 p - mean` (weights converted from Caffe).
    Caffe,
}

/// What [`Vgg19::load`] keeps of transformed Winograd kernels: at 256 px that holds all of
/// them, and it bounds their share of peak memory at larger sizes (the README has figures).
pub const DEFAULT_KERNEL_CACHE_BYTES: usize = 128 << 20;

const TORCHVISION_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const TORCHVISION_STD: [f32; 3] = [0.229, 0.224, 0.225];
const CAFFE_MEAN_BGR: [f32; 3] = [103.939, 116.779, 123.68];

/// VGG-19 `features` up to some depth, with its pre-processing and pooling.
///
/// Cheap to clone: tensors are reference counted, so one loaded model serves many jobs.
#[derive(Clone)]
pub struct Vgg19 {
    convs: Arc<[ConvWeights]>,
    depth: LayerId,
    pooling: Pooling,
    preprocess: Preprocess,
    layers: Layers,
    mean: Tensor,
    scale: Tensor,
    device: Device,
}

/// What a traced forward pass kept for [`Vgg19::backward`]: the shapes of the layers it
/// returned, and what its backend's backward pass needs (on the CPU, each ReLU's mask as bits
/// and each max pool's winners, so the caller can drop the features once it has their
/// gradients).
pub struct Trace {
    input_dims: (usize, usize, usize, usize),
    shapes: Vec<(LayerId, Vec<usize>)>,
    kept: Kept,
}

impl Vgg19 {
    /// Loads the convolutions needed to compute `depth` (and nothing deeper) from `weights`
    /// onto `device`, to run on [`Backend::Cpu`] there and on [`Backend::Generic`] elsewhere.
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
        let layers = if device.is_cpu() {
            Layers::cpu(Winograd::default(), Arc::new(KernelCache::new(DEFAULT_KERNEL_CACHE_BYTES)))
        } else {
            Layers::generic(&convs)?
        };
        Ok(Self {
            convs: convs.into(),
            depth,
            pooling,
            preprocess,
            layers,
            mean: Tensor::from_slice(&mean, (1, 3, 1, 1), device)?,
            scale: Tensor::from_slice(&scale, (1, 3, 1, 1), device)?,
            device: device.clone(),
        })
    }

    /// The same model on `backend`: [`Backend::Generic`] runs anywhere, [`Backend::Cpu`] only
    /// on the CPU.
    pub fn with_backend(mut self, backend: Backend) -> Result<Self, VggError> {
        if backend == self.backend() {
            return Ok(self);
        }
        self.layers = match backend {
            Backend::Cpu if !self.device.is_cpu() => {
                return Err(VggError::BackendDevice {
                    backend,
                    device: format!("{:?}", self.device.location()),
                })
            }
            Backend::Cpu => {
                Layers::cpu(Winograd::default(), Arc::new(KernelCache::new(DEFAULT_KERNEL_CACHE_BYTES)))
            }
            Backend::Generic => Layers::generic(&self.convs)?,
        };
        Ok(self)
    }

    /// The backend the layers run on.
    pub fn backend(&self) -> Backend {
        self.layers.backend()
    }

    /// The same model with its convolutions run as `mode` says (default: [`Winograd::Deep`]),
    /// on the CPU backend; the generic backend has no Winograd convolutions.
    pub fn with_winograd(mut self, mode: Winograd) -> Self {
        if let Layers::Cpu(cpu) = &mut self.layers {
            cpu.winograd = mode;
        }
        self
    }

    /// The same model keeping at most `bytes` of transformed Winograd kernels across passes
    /// (default [`DEFAULT_KERNEL_CACHE_BYTES`]; 0 transforms them on every pass), in a cache
    /// of its own (shared by its clones); on the CPU backend.
    pub fn with_kernel_cache(mut self, bytes: usize) -> Self {
        if let Layers::Cpu(cpu) = &mut self.layers {
            cpu.kernels = Arc::new(KernelCache::new(bytes));
        }
        self
    }

    /// Bytes of transformed kernels kept now.
    pub fn kernel_cache_used(&self) -> usize {
        match &self.layers {
            Layers::Cpu(cpu) => cpu.kernels.used(),
            Layers::Generic(_) => 0,
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
        1 << POOLS.iter().filter(|&&p| Some(p) <= layer.features_index()).count()
    }

    fn normalise(&self, pixels: &Tensor) -> Result<Tensor, VggError> {
        Ok(match self.preprocess {
            Preprocess::Torchvision => pixels.broadcast_sub(&self.mean)?.broadcast_mul(&self.scale)?,
            Preprocess::Caffe => self.bgr(pixels)?.broadcast_mul(&self.scale)?.broadcast_sub(&self.mean)?,
        })
    }

    /// `t` with its channels in reverse order (RGB to BGR and back).
    fn bgr(&self, t: &Tensor) -> Result<Tensor, VggError> {
        Ok(t.index_select(&Tensor::new(&[2u32, 1, 0], &self.device)?, 1)?)
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

    /// Runs pixels `[1, 3, H, W]` in [0, 1] up to the deepest of `layers` and returns their
    /// outputs.
    pub fn forward(&self, pixels: &Tensor, layers: &[LayerId]) -> Result<FeatureMaps, VggError> {
        Ok(self.run(pixels, layers, Keep::Nothing, None)?.0)
    }

    /// Like [`Vgg19::forward`], also keeping what [`Vgg19::backward`] needs.
    pub fn forward_traced(
        &self,
        pixels: &Tensor,
        layers: &[LayerId],
    ) -> Result<(FeatureMaps, Trace), VggError> {
        self.run(pixels, layers, Keep::ForBackward, None)
    }

    /// [`Vgg19::forward`] of a window of a `whole = (height, width)` image, whose convolutions
    /// run as the whole image's would (the same Winograd tiles, or direct): on a window that
    /// starts on the whole image's 64-px grid, the features its halo leaves exact are then the
    /// whole image's to the bit.
    pub fn forward_window(
        &self,
        pixels: &Tensor,
        layers: &[LayerId],
        whole: (usize, usize),
    ) -> Result<FeatureMaps, VggError> {
        Ok(self.run(pixels, layers, Keep::Nothing, Some(whole))?.0)
    }

    /// [`Vgg19::forward_traced`] of a window, as [`Vgg19::forward_window`].
    pub fn forward_traced_window(
        &self,
        pixels: &Tensor,
        layers: &[LayerId],
        whole: (usize, usize),
    ) -> Result<(FeatureMaps, Trace), VggError> {
        self.run(pixels, layers, Keep::ForBackward, Some(whole))
    }

    fn run(
        &self,
        pixels: &Tensor,
        layers: &[LayerId],
        keep: Keep,
        whole: Option<(usize, usize)>,
    ) -> Result<(FeatureMaps, Trace), VggError> {
        let deepest = layers.iter().copied().max().unwrap_or(LayerId::Pixels);
        self.check(pixels, deepest)?;
        let x = self.normalise(pixels)?;
        let input_dims = x.dims4()?;
        let (mut features, kept) = match deepest.features_index() {
            Some(last) => {
                self.layers.forward(&self.convs, self.pooling, x, layers, last, Pass { keep, whole })?
            }
            None => (FeatureMaps::new(), self.layers.kept_nothing()),
        };
        if layers.contains(&LayerId::Pixels) {
            features.insert(LayerId::Pixels, pixels.clone());
        }
        let shapes = features.iter().map(|(layer, t)| (layer, t.dims().to_vec())).collect();
        Ok((features, Trace { input_dims, shapes, kept }))
    }

    /// The gradient w.r.t. the pixels of a function of the layers' outputs, given its gradient
    /// w.r.t. each output it read (`Pixels` included, if the function reads the image
    /// directly); each must be a layer `trace` returned, with its shape.
    pub fn backward(&self, trace: &Trace, grads: &[(LayerId, Tensor)]) -> Result<Tensor, VggError> {
        for (layer, g) in grads {
            let (d0, d1, d2, d3) = trace.input_dims;
            let expected = match trace.shapes.iter().find(|(l, _)| l == layer) {
                Some((_, dims)) => dims.clone(),
                // The image itself, which every pass reads.
                None if *layer == LayerId::Pixels => vec![d0, d1, d2, d3],
                None => return Err(VggError::NotTraced { layer: layer.to_string() }),
            };
            if expected.as_slice() != g.dims() {
                return Err(VggError::GradientShape {
                    layer: layer.to_string(),
                    expected,
                    found: g.dims().to_vec(),
                });
            }
        }
        let grad = self.layers.backward(&self.convs, self.pooling, &trace.kept, grads)?;
        let mut pixels_grad = match grad {
            Some(g) => match self.preprocess {
                Preprocess::Torchvision => g.broadcast_mul(&self.scale)?,
                Preprocess::Caffe => self.bgr(&g.broadcast_mul(&self.scale)?)?,
            },
            None => Tensor::zeros(trace.input_dims, DType::F32, &self.device)?,
        };
        for (_, g) in grads.iter().filter(|(l, _)| *l == LayerId::Pixels) {
            pixels_grad = (pixels_grad + g)?;
        }
        Ok(pixels_grad)
    }
}
