//! The hand-written input gradient of VGG-19 against candle's autograd through a plain
//! reference forward pass, at odd sizes where pooling drops a row or column.
//!
//! On the device of `EASEL_TEST_DEVICE` (`cpu` by default, see easel-testkit): on a GPU, the
//! generic backend's cases only (easel's own kernels are the CPU's), reference and all on the GPU.

mod support;

use candle_core::{DType, Device, Tensor, Var};
use easel_core::LayerId;
use easel_vgg::{Backend, Pooling, Preprocess, Vgg19, WeightsFile, Winograd, CONVS, POOLS};
use support::synth_weights;

/// 2x2 pooling from reshapes and reductions, whose autograd is exact. (candle 0.11's own
/// pooling backward differs from PyTorch: max pooling scales the gradient by 1/4, and average
/// pooling spreads gradient into the row and column that odd sizes drop.)
fn pool(x: &Tensor, pooling: Pooling) -> Tensor {
    let (b, c, h, w) = x.dims4().unwrap();
    let (h2, w2) = (h / 2, w / 2);
    let windows =
        x.narrow(2, 0, 2 * h2).unwrap().narrow(3, 0, 2 * w2).unwrap().reshape((b, c, h2, 2, w2, 2)).unwrap();
    match pooling {
        Pooling::Max => windows.max(5).unwrap().max(3).unwrap(),
        Pooling::Avg => windows.mean(5).unwrap().mean(3).unwrap(),
    }
}

/// VGG-19 up to `last` (a features index) in plain candle ops, so autograd can differentiate it.
fn reference_forward(
    weights: &WeightsFile,
    x: &Tensor,
    last: usize,
    pooling: Pooling,
    preprocess: Preprocess,
    taps: &[usize],
) -> Vec<Tensor> {
    let dev = x.device().clone();
    let mut h = match preprocess {
        Preprocess::Torchvision => {
            let mean = Tensor::new(&[0.485f32, 0.456, 0.406], &dev).unwrap().reshape((1, 3, 1, 1)).unwrap();
            let std = Tensor::new(&[0.229f32, 0.224, 0.225], &dev).unwrap().reshape((1, 3, 1, 1)).unwrap();
            x.broadcast_sub(&mean).unwrap().broadcast_div(&std).unwrap()
        }
        Preprocess::Caffe => {
            let bgr = x.index_select(&Tensor::new(&[2u32, 1, 0], &dev).unwrap(), 1).unwrap();
            let mean =
                Tensor::new(&[103.939f32, 116.779, 123.68], &dev).unwrap().reshape((1, 3, 1, 1)).unwrap();
            (bgr * 255.0).unwrap().broadcast_sub(&mean).unwrap()
        }
    };
    let mut out = Vec::new();
    for index in 0..=last {
        h = if let Some(&(i, cin, cout)) = CONVS.iter().find(|c| c.0 == index) {
            let w = Tensor::from_vec(
                weights.read_f32(&format!("features.{i}.weight")).unwrap(),
                (cout, cin, 3, 3),
                &dev,
            )
            .unwrap();
            let b = Tensor::from_vec(
                weights.read_f32(&format!("features.{i}.bias")).unwrap(),
                (1, cout, 1, 1),
                &dev,
            )
            .unwrap();
            h.conv2d(&w, 1, 1, 1, 1).unwrap().broadcast_add(&b).unwrap()
        } else if POOLS.contains(&index) {
            pool(&h, pooling)
        } else {
            h.relu().unwrap()
        };
        if taps.contains(&index) {
            out.push(h.clone());
        }
    }
    out
}

/// Uniform values in [low, high) from a fixed seed, so the test sees the same inputs each run
/// (random inputs could now and then put a near-tie into a max-pool window), on `device`.
fn pseudo_random(seed: u64, low: f32, high: f32, dims: &[usize], device: &Device) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            low + (high - low) * ((state >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect();
    Tensor::from_vec(values, dims, device).unwrap()
}

#[test]
fn input_gradient_matches_autograd_on_every_backend_and_mode() {
    let (_dir, weights) = synth_weights(1);
    let dev = easel_testkit::test_device();
    // 45 x 37: odd at several pooling stages (45 -> 22 -> 11 -> 5, 37 -> 18 -> 9 -> 4).
    let odd = pseudo_random(0, 0.0, 1.0, &[1, 3, 37, 45], &dev);
    // 76 x 72: enough tiles in block 3 (19 x 18 pixels, 81 F(2x2) tiles) for `Deep` to run
    // Winograd's forward there.
    let larger = pseudo_random(5, 0.0, 1.0, &[1, 3, 72, 76], &dev);
    let taps = [LayerId::Relu1_1, LayerId::Pool1, LayerId::Conv3_1, LayerId::Relu4_2, LayerId::Relu5_1];
    let indices: Vec<usize> = taps.iter().map(|t| t.features_index().unwrap()).collect();
    // Winograd in the gradients only keeps the direct path's accuracy; in the forward pass too,
    // its coarser rounding can flip a ReLU whose input is within ~1e-6 of zero (or a max-pool
    // near-tie), which moves whole entries of the gradient: a looser bound.
    let cases = [
        (&odd, Pooling::Max, Preprocess::Torchvision, Backend::Cpu, Winograd::Gradients, 1e-5),
        (&odd, Pooling::Avg, Preprocess::Caffe, Backend::Cpu, Winograd::Gradients, 1e-5),
        (&odd, Pooling::Max, Preprocess::Torchvision, Backend::Cpu, Winograd::None, 1e-5),
        (&odd, Pooling::Avg, Preprocess::Caffe, Backend::Cpu, Winograd::All, 1e-3),
        (&odd, Pooling::Max, Preprocess::Torchvision, Backend::Cpu, Winograd::All, 1e-3),
        // Average pooling only: with max pooling this image has a near-tie that candle's f32
        // autograd resolves the other way from easel's direct path too (2e-3 with `None`).
        (&larger, Pooling::Avg, Preprocess::Caffe, Backend::Cpu, Winograd::Deep, 1e-3),
        // The generic backend (the path of CUDA and Metal) runs candle's ops, as the reference
        // does, but backward by hand: its own pooling and ReLU steps, and flipped kernels.
        (&odd, Pooling::Max, Preprocess::Torchvision, Backend::Generic, Winograd::None, 1e-5),
        (&odd, Pooling::Avg, Preprocess::Caffe, Backend::Generic, Winograd::None, 1e-5),
        (&larger, Pooling::Max, Preprocess::Caffe, Backend::Generic, Winograd::None, 1e-5),
    ];
    let mut checked = 0;
    for (x, pooling, preprocess, backend, mode, tolerance) in cases {
        if backend == Backend::Cpu && !dev.is_cpu() {
            continue;
        }
        let vgg = Vgg19::load(&weights, LayerId::Relu5_1, pooling, preprocess, &dev)
            .unwrap()
            .with_backend(backend)
            .unwrap()
            .with_winograd(mode);
        assert_eq!(vgg.backend(), backend);
        let (features, trace) = vgg.forward_traced(x, &taps).unwrap();
        // d/dF of sum(F * R) is R: random upstream gradients at every tap, plus the pixels.
        let upstream: Vec<(LayerId, Tensor)> = features
            .iter()
            .enumerate()
            .map(|(i, (layer, f))| (layer, pseudo_random(i as u64 + 1, -1.0, 1.0, f.dims(), &dev)))
            .chain([(LayerId::Pixels, pseudo_random(99, -1.0, 1.0, x.dims(), &dev))])
            .collect();
        let ours = vgg.backward(&trace, &upstream).unwrap();

        let var = Var::from_tensor(x).unwrap();
        let reference = reference_forward(&weights, var.as_tensor(), 30, pooling, preprocess, &indices);
        let mut objective = (var.as_tensor() * &upstream.last().unwrap().1).unwrap().sum_all().unwrap();
        for (f, (layer, r)) in reference.iter().zip(&upstream) {
            assert_eq!(f.dims(), features.get(*layer).unwrap().dims(), "{layer} shape");
            objective = (objective + (f * r).unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = objective.backward().unwrap();
        let expected = grads.get(var.as_tensor()).unwrap();

        let diff =
            (&ours - expected).unwrap().to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap();
        let norm = expected.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap();
        let rel = (diff.to_scalar::<f64>().unwrap() / norm.to_scalar::<f64>().unwrap()).sqrt();
        let case = format!("{backend:?} {pooling:?}/{preprocess:?}/{mode:?}");
        eprintln!("{case}: relative L2 error {rel:.2e}");
        assert!(rel < tolerance, "{case}: relative L2 error {rel:.2e}");
        checked += 1;
    }
    assert_eq!(checked, if dev.is_cpu() { 9 } else { 3 }, "cases checked on {dev:?}");
}

/// Gradients that do not fit the trace are errors naming the layer, not panics, and a trace
/// only serves the backend that made it.
#[test]
fn gradients_that_do_not_fit_the_trace_are_errors() {
    let (_dir, weights) = synth_weights(1);
    let cpu =
        Vgg19::load(&weights, LayerId::Relu2_1, Pooling::Max, Preprocess::Torchvision, &Device::Cpu).unwrap();
    let x = pseudo_random(3, 0.0, 1.0, &[1, 3, 20, 24], &Device::Cpu);
    let (features, trace) = cpu.forward_traced(&x, &[LayerId::Relu1_1]).unwrap();
    let relu1_1 = features.get(LayerId::Relu1_1).unwrap();

    let wrong = pseudo_random(4, -1.0, 1.0, &[1, 64, 20, 23], &Device::Cpu);
    let err = cpu.backward(&trace, &[(LayerId::Relu1_1, wrong)]).unwrap_err().to_string();
    assert!(
        err.contains("relu1_1") && err.contains("[1, 64, 20, 23]") && err.contains("[1, 64, 20, 24]"),
        "{err}"
    );

    let err = cpu.backward(&trace, &[(LayerId::Relu2_1, relu1_1.clone())]).unwrap_err().to_string();
    assert!(err.contains("relu2_1") && err.contains("did not return it"), "{err}");

    let generic = cpu.clone().with_backend(Backend::Generic).unwrap();
    let err = generic.backward(&trace, &[(LayerId::Relu1_1, relu1_1.clone())]).unwrap_err().to_string();
    assert!(err.contains("another backend"), "{err}");
    assert!(cpu.backward(&trace, &[(LayerId::Relu1_1, relu1_1.clone())]).is_ok());
}
