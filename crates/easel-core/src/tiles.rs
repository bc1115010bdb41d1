//! What a loss sees when the engine evaluates an image tile by tile.
//!
//! An image too large for one evaluation in the memory budget is cut into tiles whose
//! windows carry a halo wide enough that every feature at a tile's *own* positions is the
//! feature of the whole image. A loss then sees one tile at a time: its own features (a crop
//! of each layer it reads) and where they lie in the whole feature map. How it turns tiles
//! into the whole image's value and gradient depends on its [`Tiling`]:
//!
//! - [`Tiling::Local`]: the loss is a sum over positions (content: `1/2 sum (F - P)^2`). Each
//!   tile gives its share of the value and the gradient of its own positions
//!   ([`crate::Loss::tile_value_and_grad`]); the engine adds them up.
//! - [`Tiling::Global`]: the value needs sums over the whole image first (Gram matrices,
//!   means, covariances). The engine makes two passes: in the first it adds up each tile's
//!   share of those sums ([`crate::Loss::tile_statistics`]) over all tiles; in the second it
//!   asks for the value from the totals ([`crate::Loss::value_from_statistics`], once) and
//!   for each tile's gradient given the totals ([`crate::Loss::tile_grad`]).
//!
//! Targets: a local loss is prepared as usual ([`crate::Loss::prepare`]) from the whole
//! content image's features of its layers, assembled from tiles; a global loss from each
//! style image's summed statistics ([`crate::Loss::prepare_from_statistics`]), so a large
//! style image is never held whole either. Losses that read only [`crate::LayerId::Pixels`]
//! are not cut: the image is in memory anyway, so they are evaluated whole as usual.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::{CoreError, FeatureMaps, LayerId};

/// How a loss can be evaluated on an image cut into tiles (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiling {
    /// It cannot: a job with this loss must fit in memory whole.
    Unsupported,
    /// A sum over positions: each tile's own positions give their share.
    Local,
    /// Needs sums over the whole image (its statistics) before its value is known.
    Global,
}

/// Where a tile's own positions lie in the whole image's feature map of one layer: rows
/// `top..top + height` and columns `left..left + width` of a `whole_height x whole_width` map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
    pub whole_height: usize,
    pub whole_width: usize,
}

impl Placement {
    /// Positions in the whole map (`M` of a Gram matrix `F F^T / M`).
    pub fn whole_positions(&self) -> usize {
        self.whole_height * self.whole_width
    }

    /// This placement's part of `whole` (`[1, C, whole_height, whole_width]`), e.g. of a
    /// target: a view, not a copy.
    pub fn crop(&self, whole: &Tensor) -> Result<Tensor, CoreError> {
        Ok(whole.narrow(2, self.top, self.height)?.narrow(3, self.left, self.width)?)
    }
}

/// One tile: the features of its own positions (`[1, C, height, width]` per layer) and where
/// they lie in the whole image.
#[derive(Debug, Clone, Copy)]
pub struct Tile<'a> {
    pub features: &'a FeatureMaps,
    pub placements: &'a BTreeMap<LayerId, Placement>,
}

impl Tile<'_> {
    /// Where the features of `layer` lie, or an error naming the layer.
    pub fn placement(&self, layer: LayerId) -> Result<Placement, CoreError> {
        self.placements.get(&layer).copied().ok_or(CoreError::MissingLayer(layer))
    }
}

/// One style image's summed statistics (what [`crate::Loss::tile_statistics`] returned, added
/// up over its tiles) and its share in the blend.
#[derive(Debug, Clone)]
pub struct StyleStatistics {
    pub statistics: Vec<Tensor>,
    /// Blend weight; the weights of all style images sum to 1.
    pub weight: f64,
}
