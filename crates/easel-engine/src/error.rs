//! Errors of a job, each naming the file or setting involved.

use std::path::PathBuf;

/// What can stop a job.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {reason}")]
    Image { path: PathBuf, reason: String },
    /// The result could not be encoded.
    #[error("{path}: cannot write result: {reason}")]
    Output { path: PathBuf, reason: String },
    /// The result could not be written (a full disk among the causes: the source says).
    #[error("{path}: cannot write result: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Vgg(#[from] easel_vgg::VggError),
    #[error(transparent)]
    Core(#[from] easel_core::CoreError),
    #[error("{0}")]
    Device(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A checkpoint file could not be read or written.
    #[error("checkpoint: {path}: cannot {action}: {source}")]
    CheckpointIo { path: PathBuf, action: &'static str, source: std::io::Error },
    /// A checkpoint file is not valid safetensors.
    #[error("checkpoint: {path}: {source}")]
    CheckpointFormat { path: PathBuf, source: safetensors::SafeTensorError },
    /// The job is predicted to need more memory than `limits.memory_mb` allows.
    #[error(
        "this job needs about {need_mb} MB at {width}x{height} but limits.memory_mb allows {budget_mb} MB; \
         try {advice}"
    )]
    OverBudget { need_mb: u64, budget_mb: u64, width: u32, height: u32, advice: String },
    /// A tensor or image of the wrong shape for where it was given.
    #[error("shape mismatch: {0}")]
    Shape(String),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Core(e.into())
    }
}
