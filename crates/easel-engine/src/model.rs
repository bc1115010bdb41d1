//! Loading the VGG-19 a plan needs, for `easel run` and the daemon alike.

use easel_config::{BackendChoice, DeviceChoice, Plan};
use easel_core::LayerId;
use easel_vgg::{Backend, Pooling, Preprocess, Vgg19, WeightsFile, Winograd};

use crate::memory::Backends;
use crate::EngineError;

/// What a loaded model depends on besides its weights file: the deepest layer a loss reads and
/// `[model]`'s settings. Two plans with equal specs can share one model (clones share tensors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    pub deepest: LayerId,
    pub pooling: Pooling,
    pub preprocess: Preprocess,
    pub winograd: Winograd,
    /// MiB of transformed Winograd kernels kept across iterations.
    pub kernel_cache_mb: u32,
    pub device: DeviceChoice,
    pub backend: BackendChoice,
}

impl ModelSpec {
    /// The model `plan` runs on: no deeper than its losses read.
    pub fn of(plan: &Plan) -> Self {
        let m = &plan.model;
        ModelSpec {
            deepest: plan.losses.iter().flat_map(|l| l.loss.layers()).max().unwrap_or(LayerId::Pixels),
            pooling: m.pooling,
            preprocess: m.preprocess,
            winograd: m.winograd,
            kernel_cache_mb: m.kernel_cache_mb,
            device: m.device,
            backend: m.backend,
        }
    }

    /// The backends a job of this spec may run on, whose working sets the memory planner
    /// counts. Under `device = "auto"` a build with a GPU backend may run on either, as the
    /// device is found only when the model loads; the planner counts the larger.
    pub fn backends(&self) -> Backends {
        let gpu_build = cfg!(any(feature = "cuda", feature = "metal"));
        match (self.backend, self.device) {
            (BackendChoice::Candle, _) | (_, DeviceChoice::Cuda(_) | DeviceChoice::Metal(_)) => {
                Backends::GENERIC
            }
            (BackendChoice::Auto, DeviceChoice::Cpu) => Backends::CPU,
            (BackendChoice::Auto, DeviceChoice::Auto) => Backends { cpu: true, generic: gpu_build },
        }
    }

    /// Builds the model from `weights` on the spec's device.
    pub fn load(&self, weights: &WeightsFile) -> Result<Vgg19, EngineError> {
        let device = crate::device(self.device)?;
        let vgg = Vgg19::load(weights, self.deepest, self.pooling, self.preprocess, &device)?;
        let vgg = match self.backend {
            BackendChoice::Auto => vgg,
            BackendChoice::Candle => vgg.with_backend(Backend::Generic)?,
        };
        Ok(vgg.with_winograd(self.winograd).with_kernel_cache((self.kernel_cache_mb as usize) << 20))
    }
}
