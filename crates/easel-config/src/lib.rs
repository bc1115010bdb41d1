//! easel's configuration: layered TOML (defaults < daemon < job sidecar < flags) -> a validated [`Plan`].
//!
//! Validation is pure (no file or device access) and reports every problem at once, each
//! with its key path, so one `easel config check` shows all that is wrong with a file.

mod layers;
mod plan;

pub use layers::{merge, ConfigLayers, DEFAULT_TOML};
pub use plan::{
    BackendChoice, DaemonSettings, DeviceChoice, Init, Limits, ModelSettings, NamedOptimizer, OutputFormat,
    OutputSettings, Plan, RunSettings, StyleSpec, WeightedLoss,
};

use easel_core::OptionError;

/// Why a configuration could not be turned into a plan.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("{source_name}: invalid TOML: {message}")]
    Syntax { source_name: String, message: String },
    #[error("invalid configuration ({sources}):\n{}", list(.errors))]
    Invalid { sources: String, errors: Vec<OptionError> },
}

fn list(errors: &[OptionError]) -> String {
    errors.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n")
}
