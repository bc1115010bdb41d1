//! One style-transfer job end to end: decode images, build targets, optimise, write the result.

pub mod checkpoint;
mod error;
pub mod image_io;
pub mod memory;
mod model;
mod objective;
mod run;

pub use checkpoint::Checkpoint;
pub use error::EngineError;
pub use image_io::{load_image, save_image, RgbImage};
pub use model::ModelSpec;
pub use objective::{l2_norm, layers_of, LossReport, StyleObjective};
pub use run::{Progress, StyleRun};

use candle_core::Device;
use easel_config::DeviceChoice;

/// The candle device for a configured choice, or an error saying how to get it.
pub fn device(choice: DeviceChoice) -> Result<Device, EngineError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(n) => Ok(Device::new_cuda(n)?),
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => Err(EngineError::Device(
            "model.device = \"cuda\" but this easel was built without CUDA; rebuild with `--features cuda`".into(),
        )),
        #[cfg(feature = "metal")]
        DeviceChoice::Metal(n) => Ok(Device::new_metal(n)?),
        #[cfg(not(feature = "metal"))]
        DeviceChoice::Metal(_) => Err(EngineError::Device(
            "model.device = \"metal\" but this easel was built without Metal; rebuild with `--features metal`".into(),
        )),
    }
}
