//! VGG-19 on candle: memory-mapped safetensors weights, feature taps, and the input gradient.
//!
//! This is the only crate with `unsafe`: the memory map (in [`weights`]), the calls of `gemm`
//! and the run-time choice of SIMD code (in the convolutions), and the allocator settings
//! (in [`alloc`]).

pub mod alloc;
mod conv;
mod error;
mod model;
pub mod synth;
pub mod weights;

pub use conv::Winograd;
pub use error::VggError;
pub use model::{Pooling, Preprocess, Trace, Vgg19, DEFAULT_KERNEL_CACHE_BYTES};
pub use weights::{Inspection, TensorSummary, WeightsFile};

/// The 16 convolutions of VGG-19 as `(features index, in channels, out channels)`.
pub const CONVS: [(usize, usize, usize); 16] = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (16, 256, 256),
    (19, 256, 512),
    (21, 512, 512),
    (23, 512, 512),
    (25, 512, 512),
    (28, 512, 512),
    (30, 512, 512),
    (32, 512, 512),
    (34, 512, 512),
];
