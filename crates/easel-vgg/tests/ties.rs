//! Equal inputs give bit-equal features: flat image regions produce exact ties in max
//! pooling, which the reference (PyTorch) routes to the first element of each window. A
//! convolution whose rounding depends on the pixel's position would break such ties at random.

use candle_core::{Device, Tensor};
use easel_core::LayerId;
use easel_vgg::{Pooling, Preprocess, Vgg19, WeightsFile};

#[test]
fn flat_images_give_position_independent_features() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    easel_vgg::synth::write(0, &path).unwrap();
    let weights = WeightsFile::open(&path).unwrap();
    let vgg =
        Vgg19::load(&weights, LayerId::Relu3_1, Pooling::Max, Preprocess::Torchvision, &Device::Cpu).unwrap();
    // A flat image: away from the zero padding every position sees the same patch.
    let x = Tensor::full(0.37f32, (1, 3, 96, 128), &Device::Cpu).unwrap();
    let taps = [LayerId::Conv1_1, LayerId::Conv1_2, LayerId::Conv2_1, LayerId::Conv3_1];
    let features = vgg.forward(&x, &taps).unwrap();
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
                        "{layer} channel {ch} at ({y}, {xx}): {v} vs {}",
                        plane[margin][margin]
                    );
                }
            }
        }
    }
}
