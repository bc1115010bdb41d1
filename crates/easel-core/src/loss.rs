//! The loss plugin boundary.

use candle_core::Tensor;

use crate::{CoreError, FeatureMaps, LayerId, OptionSpec, Options, References};

/// A differentiable term of the objective, computed from feature maps.
///
/// The engine extracts the layers a loss names, calls [`Loss::prepare`] once per scale
/// with the reference images' features, then [`Loss::evaluate`] once per evaluation. The
/// returned scalar must be built from the given feature tensors with candle operations so
/// that the engine can differentiate it; the engine applies the configured weight.
pub trait Loss: Send {
    /// The layers this loss reads, `LayerId::Pixels` for the image itself.
    fn layers(&self) -> Vec<LayerId>;

    /// Builds the targets for the current scale from the reference features.
    fn prepare(&mut self, references: &References<'_>) -> Result<(), CoreError>;

    /// The unweighted loss of `features` as a scalar (rank 0) f32 tensor.
    fn evaluate(&self, features: &FeatureMaps) -> Result<Tensor, CoreError>;
}

/// Builds a [`Loss`] from its TOML options; one per plugin, listed in the registry.
pub trait LossFactory: Sync {
    /// The `type` that selects this plugin in TOML.
    fn name(&self) -> &'static str;

    /// One line for `easel plugins`.
    fn summary(&self) -> &'static str;

    /// The options this plugin reads, with their defaults.
    fn options(&self) -> &'static [OptionSpec];

    /// Reads the options and builds the loss. Problems are recorded in `options` (and the
    /// result is then discarded by the caller); building touches no file or device.
    fn build(&self, options: &mut Options<'_>) -> Box<dyn Loss>;
}
