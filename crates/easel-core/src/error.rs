//! The error type plugins and the engine share at the plugin boundary.

use crate::LayerId;

/// What can go wrong inside a loss or optimiser.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A loss asked for a layer the extractor did not provide.
    #[error("feature map `{0}` was not computed; the loss must list it in `layers()`")]
    MissingLayer(LayerId),
    /// A loss needs a reference image that the job does not have.
    #[error("{0}")]
    MissingReference(String),
    /// The objective produced NaN or infinity.
    #[error(
        "the loss became {value} at evaluation {evaluation}; lower the learning rate or the loss weights"
    )]
    NonFinite { value: f64, evaluation: usize },
    /// The objective could not be computed (feature extraction failed); the engine's own error,
    /// kept whole so that its source chain survives the trip through the optimiser.
    #[error(transparent)]
    Objective(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The engine asked a loss for something its [`crate::Tiling`] does not offer.
    #[error("the loss does not implement `{0}` (its `tiling()` says what it offers)")]
    Unsupported(&'static str),
    /// Saved optimiser state does not fit this optimiser or image.
    #[error("optimiser state does not match: {0}")]
    BadState(String),
}
