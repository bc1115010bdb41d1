//! Equal inputs give bit-equal features: flat image regions produce exact ties in max
//! pooling, which the reference (PyTorch) routes to the first element of each window. A
//! convolution whose rounding depends on the pixel's position would break such ties at random.
//! The direct path keeps them everywhere; the default (`Winograd::Deep`) in the first two
//! blocks, whose features feed pool1 and pool2.

mod support;

use candle_core::{Device, Tensor};
use easel_core::LayerId;
use easel_vgg::{Pooling, Preprocess, Vgg19, Winograd};
use support::synth_weights;

/// VGG-19 to relu3_1 with max pooling, on synthetic weights (seed 0).
fn model() -> Vgg19 {
    let (_dir, weights) = synth_weights(0);
    Vgg19::load(&weights, LayerId::Relu3_1, Pooling::Max, Preprocess::Torchvision, &Device::Cpu).unwrap()
}

#[test]
fn flat_images_give_position_independent_features() {
    let vgg = model();
    // A flat image: away from the zero padding every position sees the same patch.
    let x = Tensor::full(0.37f32, (1, 3, 96, 128), &Device::Cpu).unwrap();
    let taps = [LayerId::Conv1_1, LayerId::Conv1_2, LayerId::Conv2_1, LayerId::Conv2_2, LayerId::Conv3_1];
    // 96 x 128 gives conv3_1 enough tiles for Winograd, which `Deep` runs there.
    for (mode, taps) in [(Winograd::Deep, &taps[..4]), (Winograd::Gradients, &taps), (Winograd::None, &taps)]
    {
        assert_position_independent(&vgg.clone().with_winograd(mode).forward(&x, taps).unwrap(), mode);
    }
}

/// `Deep` leaves the first two blocks bit-equal to the direct path and runs conv3_1 on
/// (here as F(2x2)) with Winograd's rounding: close to the direct path's, not equal.
#[test]
fn deep_mode_runs_winograd_from_conv3_1_on() {
    let vgg = model();
    let x = Tensor::rand(0f32, 1f32, (1, 3, 96, 128), &Device::Cpu).unwrap();
    let taps = [LayerId::Conv2_2, LayerId::Conv3_1];
    let run = |mode| vgg.clone().with_winograd(mode).forward(&x, &taps).unwrap();
    let (direct, deep) = (run(Winograd::None), run(Winograd::Deep));
    let bits = |f: &easel_core::FeatureMaps, layer| {
        f.get(layer)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&direct, LayerId::Conv2_2), bits(&deep, LayerId::Conv2_2), "block 2 is direct");
    assert_ne!(bits(&direct, LayerId::Conv3_1), bits(&deep, LayerId::Conv3_1), "conv3_1 is Winograd");
    let (a, b) = (direct.get(LayerId::Conv3_1).unwrap(), deep.get(LayerId::Conv3_1).unwrap());
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-5 * scale, "conv3_1: Winograd differs by {diff} at scale {scale}");
}

fn assert_position_independent(features: &easel_core::FeatureMaps, mode: Winograd) {
    for (layer, f) in features.iter() {
        let (_, c, h, w) = f.dims4().unwrap();
        // Positions further than the receptive field's reach from every border.
        let margin = match layer {
            LayerId::Conv1_1 => 1,
            LayerId::Conv1_2 => 2,
            LayerId::Conv2_1 => 3,
            _ => 4,
        };
        let values: Vec<Vec<Vec<f32>>> = f.squeeze(0).unwrap().to_vec3().unwrap();
        for (ch, plane) in values.iter().enumerate().take(c) {
            let reference = plane[margin][margin].to_bits();
            for (y, row) in plane.iter().enumerate().take(h - margin).skip(margin) {
                for (xx, v) in row.iter().enumerate().take(w - margin).skip(margin) {
                    assert_eq!(
                        v.to_bits(),
                        reference,
                        "{mode:?}: {layer} channel {ch} at ({y}, {xx}): {v} vs {}",
                        plane[margin][margin]
                    );
                }
            }
        }
    }
}
