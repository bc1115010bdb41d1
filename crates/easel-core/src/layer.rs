//! VGG-19 layer names, in the order of torchvision's `features` module.

use std::fmt;
use std::str::FromStr;

macro_rules! layers {
    ($($variant:ident = $name:literal),* $(,)?) => {
        /// A point in the VGG-19 feature stack where a loss may read features.
        ///
        /// `Pixels` is the optimised image itself (for losses such as total variation);
        /// every other variant is `features.{i}` of torchvision's VGG-19, in order, so
        /// `Conv1_1` is index 0 and `Pool5` index 36. `ConvX_Y` is the pre-activation and
        /// `ReluX_Y` its rectified output (Gatys' "conv4_2" is our `Relu4_2`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum LayerId { $($variant),* }

        impl LayerId {
            /// Every layer, `Pixels` first, then in forward order.
            pub const ALL: &'static [LayerId] = &[$(LayerId::$variant),*];

            /// The name used in configuration files (`relu4_2`).
            pub fn name(self) -> &'static str {
                match self { $(LayerId::$variant => $name),* }
            }
        }
    };
}

layers! {
    Pixels = "pixels",
    Conv1_1 = "conv1_1", Relu1_1 = "relu1_1", Conv1_2 = "conv1_2", Relu1_2 = "relu1_2", Pool1 = "pool1",
    Conv2_1 = "conv2_1", Relu2_1 = "relu2_1", Conv2_2 = "conv2_2", Relu2_2 = "relu2_2", Pool2 = "pool2",
    Conv3_1 = "conv3_1", Relu3_1 = "relu3_1", Conv3_2 = "conv3_2", Relu3_2 = "relu3_2",
    Conv3_3 = "conv3_3", Relu3_3 = "relu3_3", Conv3_4 = "conv3_4", Relu3_4 = "relu3_4", Pool3 = "pool3",
    Conv4_1 = "conv4_1", Relu4_1 = "relu4_1", Conv4_2 = "conv4_2", Relu4_2 = "relu4_2",
    Conv4_3 = "conv4_3", Relu4_3 = "relu4_3", Conv4_4 = "conv4_4", Relu4_4 = "relu4_4", Pool4 = "pool4",
    Conv5_1 = "conv5_1", Relu5_1 = "relu5_1", Conv5_2 = "conv5_2", Relu5_2 = "relu5_2",
    Conv5_3 = "conv5_3", Relu5_3 = "relu5_3", Conv5_4 = "conv5_4", Relu5_4 = "relu5_4", Pool5 = "pool5",
}

impl LayerId {
    /// Index of this layer in torchvision's `vgg19().features`; `None` for `Pixels`.
    pub fn features_index(self) -> Option<usize> {
        (self as usize).checked_sub(1)
    }

    /// The layer at `features.{index}`.
    pub fn from_features_index(index: usize) -> Option<LayerId> {
        Self::ALL.get(index + 1).copied()
    }

    /// Comma-separated list of every name, for error messages.
    pub fn all_names() -> String {
        Self::ALL.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error for a name that is not a VGG-19 layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownLayer(pub String);

impl fmt::Display for UnknownLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown layer `{}`; known layers: {}", self.0, LayerId::all_names())
    }
}

impl std::error::Error for UnknownLayer {}

impl FromStr for LayerId {
    type Err = UnknownLayer;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.iter().copied().find(|l| l.name() == s).ok_or_else(|| UnknownLayer(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_torchvision_indices() {
        assert_eq!(LayerId::Conv1_1.features_index(), Some(0));
        assert_eq!(LayerId::Relu4_2.features_index(), Some(22));
        assert_eq!(LayerId::Pool5.features_index(), Some(36));
        assert_eq!(LayerId::Pixels.features_index(), None);
        assert_eq!(LayerId::from_features_index(28), Some(LayerId::Conv5_1));
        assert_eq!(LayerId::from_features_index(37), None);
    }

    #[test]
    fn parses_and_prints_names() {
        for &layer in LayerId::ALL {
            assert_eq!(layer.name().parse::<LayerId>(), Ok(layer));
        }
        let err = "conv6_1".parse::<LayerId>().unwrap_err().to_string();
        assert!(err.contains("conv6_1") && err.contains("relu4_2"), "{err}");
    }
}
