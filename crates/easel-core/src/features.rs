//! Feature maps by layer, and the reference features a loss builds its targets from.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::{CoreError, LayerId};

/// Feature tensors (`[1, C, H, W]`) keyed by layer.
#[derive(Debug, Clone, Default)]
pub struct FeatureMaps {
    maps: BTreeMap<LayerId, Tensor>,
}

impl FeatureMaps {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the features of `layer`.
    pub fn insert(&mut self, layer: LayerId, features: Tensor) {
        self.maps.insert(layer, features);
    }

    /// The features of `layer`, or an error naming the missing layer.
    pub fn get(&self, layer: LayerId) -> Result<&Tensor, CoreError> {
        self.maps.get(&layer).ok_or(CoreError::MissingLayer(layer))
    }

    /// Layers and features in forward order.
    pub fn iter(&self) -> impl Iterator<Item = (LayerId, &Tensor)> {
        self.maps.iter().map(|(l, t)| (*l, t))
    }

    /// Number of layers held.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether no layer is held.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }
}

/// One style image's features and its share in the blend.
#[derive(Debug, Clone)]
pub struct StyleReference {
    pub features: FeatureMaps,
    /// Blend weight; the weights of all style images sum to 1.
    pub weight: f64,
}

/// Features of the reference images at the current scale, from which losses build targets.
#[derive(Debug, Clone, Copy)]
pub struct References<'a> {
    pub content: &'a FeatureMaps,
    pub styles: &'a [StyleReference],
}
