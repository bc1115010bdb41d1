//! The contracts shared by easel's engine and its plugins: layers, features, losses, optimisers.
//!
//! Plugin crates depend on this crate only; it re-exports the candle and toml versions they
//! must use so that tensors and option tables cross the boundary without version skew.

mod error;
mod features;
pub mod files;
mod layer;
mod loss;
mod optimizer;
mod options;
mod registry;
pub mod sums;
mod tiles;

pub use candle_core;
pub use toml;

pub use error::CoreError;
pub use features::{FeatureMaps, References, StyleReference};
pub use files::{temp_path_for, write_atomically};
pub use layer::LayerId;
pub use loss::{LayerGrads, Loss, LossFactory};
pub use optimizer::{Adjustment, Objective, Optimizer, OptimizerFactory, OptimizerState, Step};
pub use options::{OptionDefault, OptionError, OptionSpec, Options};
pub use registry::{Plugin, Registry};
pub use tiles::{Placement, StyleStatistics, Tile, Tiling};
