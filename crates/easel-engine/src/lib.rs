//! One style-transfer job end to end: decode images, build targets, optimise, write the result.

pub mod checkpoint;
mod device;
mod error;
pub mod image_io;
pub mod memory;
mod model;
mod objective;
mod run;
mod terms;
mod tiled;
pub mod tiles;

pub use checkpoint::Checkpoint;
pub use device::{device, device_name};
pub use error::EngineError;
pub use image_io::{image_dimensions, load_image, save_image, RgbImage};
pub use model::ModelSpec;
pub use objective::{l2_norm, LossReport, StyleObjective};
pub use run::{Progress, StyleRun};
pub use terms::layers_of;
pub use tiled::evaluation_work;
