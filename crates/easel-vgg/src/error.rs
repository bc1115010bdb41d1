//! Errors of weight loading and feature extraction, each naming the file and tensor involved.

use std::path::PathBuf;

/// What can go wrong reading weights or running VGG-19.
#[derive(Debug, thiserror::Error)]
pub enum VggError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a safetensors file ({reason})")]
    NotSafetensors { path: PathBuf, reason: String },
    #[error("{path}: truncated safetensors file: the header describes {expected} bytes of tensor data but the file holds {found}")]
    Truncated { path: PathBuf, expected: usize, found: usize },
    #[error("{path}: tensor `{name}` ({layer}) is missing; is this a VGG-19 with torchvision names (features.N.weight)?")]
    MissingTensor { path: PathBuf, name: String, layer: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    WrongShape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: tensor `{name}` has dtype {dtype}; easel reads F32, F16 and BF16")]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },
    #[error(
        "image of {height}x{width} pixels is too small for layer {layer}: it needs at least {min}x{min}"
    )]
    ImageTooSmall { height: usize, width: usize, layer: String, min: usize },
    #[error("layer {layer} is deeper than the loaded model (up to {loaded})")]
    NotLoaded { layer: String, loaded: String },
    #[error("no gradient can flow back from {layer}: the traced forward pass did not return it")]
    NotTraced { layer: String },
    #[error("the gradient given for {layer} has shape {found:?}; the layer's output has {expected:?}")]
    GradientShape { layer: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("the {backend:?} backend cannot run on {device}")]
    BackendDevice { backend: crate::Backend, device: String },
    #[error("this trace was made by a model on another backend")]
    ForeignTrace,
    /// A broken invariant of this crate: a bug, reported instead of a panic so that a daemon
    /// fails one job and carries on.
    #[error("internal error in the VGG-19 layers: {0}")]
    Internal(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}
