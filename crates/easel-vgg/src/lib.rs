//! VGG-19 on candle: memory-mapped safetensors weights, feature extraction, and the input
//! gradient.
//!
//! This is the only crate with `unsafe`: the memory map (in [`weights`]), the calls of `gemm`
//! and the run-time choice of SIMD code (in the convolutions), and the allocator settings
//! (in [`alloc`]).
//!
//! One concept per file: [`model`](Vgg19) walks the layer chain ([`stack`](crate::CONVS)) on
//! a backend chosen at load ([`Backend`]); the CPU backend's pieces are the convolutions
//! (`conv/`: `direct`, `winograd/{transforms, cache}`, `gemm`, `schedule`, `epilogue`), the
//! ReLU masks (`relu_mask`), pooling (`pool`), the vector-unit dispatch (`simd`) and borrowed
//! tensor memory (`cpu_tensor`).

pub mod alloc;
mod backend;
mod conv;
mod cpu_tensor;
mod error;
pub mod memory;
mod model;
mod pool;
mod relu_mask;
mod simd;
mod stack;
pub mod synth;
pub mod weights;

pub use backend::Backend;
#[doc(hidden)]
pub use conv::bench as conv_bench;
pub use conv::Winograd;
pub use error::VggError;
pub use model::{Preprocess, Trace, Vgg19, DEFAULT_KERNEL_CACHE_BYTES};
pub use pool::Pooling;
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

/// The features indices of VGG-19's five 2x2 poolings (`pool1` .. `pool5`); every other
/// index that is not a convolution is a ReLU.
pub const POOLS: [usize; 5] = [4, 9, 18, 27, 36];
