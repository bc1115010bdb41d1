//! The loss plugin boundary.

use candle_core::Tensor;

use crate::{
    CoreError, FeatureMaps, LayerId, OptionSpec, Options, References, StyleStatistics, Tile, Tiling,
};

/// A loss's gradient with respect to each layer it reads.
pub type LayerGrads = Vec<(LayerId, Tensor)>;

/// A differentiable term of the objective, computed from feature maps.
///
/// The engine extracts the layers a loss names, calls [`Loss::prepare`] once per scale
/// with the reference images' features, then [`Loss::evaluate`] once per evaluation. The
/// returned scalar must be built from the given feature tensors with candle operations so
/// that the engine can differentiate it; the engine applies the configured weight.
///
/// Features are f32; the returned scalar is in [`crate::sums::sum_dtype`] of the device (f64
/// on the CPU and CUDA, f32 on Metal, which has no f64), and sums over many elements should
/// be taken in that type (convert the differences before squaring): loss values and the Adam
/// trajectory then match a float64 reference closely at little cost.
pub trait Loss: Send {
    /// The layers this loss reads, `LayerId::Pixels` for the image itself.
    fn layers(&self) -> Vec<LayerId>;

    /// Builds the targets for the current scale from the reference features.
    fn prepare(&mut self, references: &References<'_>) -> Result<(), CoreError>;

    /// The unweighted loss of `features` as a scalar (rank 0) tensor in the sum type.
    fn evaluate(&self, features: &FeatureMaps) -> Result<Tensor, CoreError>;

    /// Bytes of the targets [`Loss::prepare`] keeps, for the memory planner, given the shape
    /// `(channels, positions)` of each layer it reads at the current scale. The default, 0, suits
    /// losses whose targets are small beside the image (a few statistics per channel).
    fn target_bytes(&self, _shape: &dyn Fn(LayerId) -> (u64, u64)) -> u64 {
        0
    }

    /// The unweighted loss and its gradient w.r.t. each layer it reads, for losses that have
    /// them in closed form: cheaper and more precise than differentiating [`Loss::evaluate`].
    /// `None` (the default) makes the engine use autograd.
    fn value_and_grad(&self, _features: &FeatureMaps) -> Option<Result<(f64, LayerGrads), CoreError>> {
        None
    }

    /// How this loss is evaluated on an image cut into tiles, when a whole evaluation does not
    /// fit the memory budget (see [`crate::Tiling`] and the `tiles` module's documentation).
    /// The default, [`Tiling::Unsupported`], keeps jobs with this loss to what fits whole; a
    /// loss that reads only [`LayerId::Pixels`] needs nothing here (it is never cut).
    fn tiling(&self) -> Tiling {
        Tiling::Unsupported
    }

    /// [`Tiling::Local`]: the unweighted value of the tile's own positions and its gradient
    /// w.r.t. each layer's own features (shaped as `tile.features`). Targets are cropped with
    /// [`crate::Placement::crop`]. The tiles' values add up to [`Loss::evaluate`]'s.
    fn tile_value_and_grad(&self, _tile: &Tile<'_>) -> Result<(f64, LayerGrads), CoreError> {
        Err(CoreError::Unsupported("tile_value_and_grad"))
    }

    /// [`Tiling::Global`]: this tile's share of the sums over the image that the loss needs,
    /// in the sum type (e.g. `F F^T / M` over the tile's own positions, `M` the whole map's).
    /// The engine adds the tensors up, entry by entry, over all tiles.
    fn tile_statistics(&self, _tile: &Tile<'_>) -> Result<Vec<Tensor>, CoreError> {
        Err(CoreError::Unsupported("tile_statistics"))
    }

    /// [`Tiling::Global`]: builds the targets for the current scale from each style image's
    /// statistics (summed over its tiles): what [`Loss::prepare`] does from whole features.
    fn prepare_from_statistics(&mut self, _styles: &[StyleStatistics]) -> Result<(), CoreError> {
        Err(CoreError::Unsupported("prepare_from_statistics"))
    }

    /// [`Tiling::Global`]: the unweighted value, from the image's statistics (summed over its
    /// tiles).
    fn value_from_statistics(&self, _totals: &[Tensor]) -> Result<f64, CoreError> {
        Err(CoreError::Unsupported("value_from_statistics"))
    }

    /// [`Tiling::Global`]: the gradient w.r.t. the tile's own features, given the image's
    /// statistics.
    fn tile_grad(&self, _tile: &Tile<'_>, _totals: &[Tensor]) -> Result<LayerGrads, CoreError> {
        Err(CoreError::Unsupported("tile_grad"))
    }
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
