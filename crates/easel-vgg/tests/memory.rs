//! The memory module's predictions against what a model really keeps.

mod support;

use candle_core::{Device, Tensor};
use easel_core::LayerId;
use easel_vgg::memory::{kernel_cache_bytes, Pass};
use easel_vgg::{Pooling, Preprocess, Vgg19, Winograd};
use support::synth_weights;

/// The kernel cache holds exactly what `kernel_cache_bytes` predicts after reference passes
/// and an evaluation, for every Winograd mode, with room for all and with a tight budget.
#[test]
fn kernel_cache_prediction_is_exact() {
    let (_dir, weights) = synth_weights(2);
    let layers = [LayerId::Relu1_1, LayerId::Relu3_1, LayerId::Relu4_2, LayerId::Relu5_1];
    let (style_h, style_w) = (72, 100);
    for (h, w) in [(96, 128), (150, 200)] {
        for mode in [Winograd::None, Winograd::Gradients, Winograd::Deep, Winograd::All] {
            for budget in [1u64 << 30, 20 << 20] {
                let vgg = Vgg19::load(
                    &weights,
                    LayerId::Relu5_1,
                    Pooling::Max,
                    Preprocess::Torchvision,
                    &Device::Cpu,
                )
                .unwrap()
                .with_winograd(mode)
                .with_kernel_cache(budget as usize);
                let style = Tensor::rand(0f32, 1f32, (1, 3, style_h, style_w), &Device::Cpu).unwrap();
                vgg.forward(&style, &layers).unwrap();
                let x = Tensor::rand(0f32, 1f32, (1, 3, h, w), &Device::Cpu).unwrap();
                let (features, trace) = vgg.forward_traced(&x, &layers).unwrap();
                let grads: Vec<_> = features.iter().map(|(l, f)| (l, f.ones_like().unwrap())).collect();
                vgg.backward(&trace, &grads).unwrap();
                let passes = [
                    Pass::Forward { height: style_h, width: style_w },
                    Pass::Forward { height: h, width: w },
                    Pass::Backward { height: h, width: w },
                ];
                let predicted = kernel_cache_bytes(LayerId::Relu5_1, mode, budget, &passes);
                assert_eq!(predicted, vgg.kernel_cache_used() as u64, "{h}x{w} {mode:?} budget {budget}");
            }
        }
    }
}
