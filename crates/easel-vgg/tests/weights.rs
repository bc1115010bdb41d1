//! Synthetic weights bit for bit against the golden hashes, and every kind of bad weights file.

use std::path::Path;

use candle_core::Device;
use easel_core::LayerId;
use easel_vgg::{Pooling, Preprocess, Vgg19, VggError, WeightsFile};
use sha2::{Digest, Sha256};

fn synth_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("synth.safetensors");
    easel_vgg::synth::write(0, &path).expect("synthetic weights are written");
    path
}

#[test]
fn synth_seed0_matches_golden_sha256_bit_for_bit() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/synth_seed0_sha256.json"),
        )
        .expect("golden hashes readable"),
    )
    .expect("parses");
    let dir = tempfile::tempdir().expect("tmp");
    let file = WeightsFile::open(synth_file(dir.path())).expect("opens");
    let mut checked = 0;
    for (name, hash) in golden.as_object().expect("object") {
        let Some(hash) = hash.as_str() else { continue };
        let values = file.read_f32(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(format!("{:x}", Sha256::digest(&bytes)), hash, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 32, "all 16 weights and 16 biases are checked");
    let inspection = file.inspect();
    assert!(inspection.problems.is_empty(), "{:?}", inspection.problems);
    assert_eq!(inspection.tensors.len(), 32);
    assert_eq!(inspection.tensors[0].name, "features.0.bias");
}

#[test]
fn reads_f16_and_bf16_files() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = tempfile::tempdir().expect("tmp");
    let w: Vec<f32> = (0..64 * 27).map(|i| (i % 17) as f32 * 0.125 - 1.0).collect();
    let b: Vec<f32> = (0..64).map(|i| i as f32 * 0.5).collect();
    for dtype in [Dtype::F16, Dtype::BF16] {
        let enc = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| match dtype {
                    Dtype::F16 => half::f16::from_f32(*x).to_le_bytes(),
                    _ => half::bf16::from_f32(*x).to_le_bytes(),
                })
                .collect()
        };
        let (wb, bb) = (enc(&w), enc(&b));
        let tensors = vec![
            ("features.0.weight".to_string(), TensorView::new(dtype, vec![64, 3, 3, 3], &wb).expect("view")),
            ("features.0.bias".to_string(), TensorView::new(dtype, vec![64], &bb).expect("view")),
        ];
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        safetensors::tensor::serialize_to_file(tensors, &None, &path).expect("written");
        let file = WeightsFile::open(&path).expect("opens");
        // These values are exact in both half formats.
        assert_eq!(file.read_f32("features.0.weight").expect("reads"), w);
        assert_eq!(file.read_f32("features.0.bias").expect("reads"), b);
        let vgg = Vgg19::load(&file, LayerId::Relu1_1, Pooling::Max, Preprocess::Torchvision, &Device::Cpu);
        assert!(vgg.is_ok(), "a file with conv1_1 serves up to relu1_1");
        let err = Vgg19::load(&file, LayerId::Relu1_2, Pooling::Max, Preprocess::Torchvision, &Device::Cpu);
        let msg = err.err().expect("conv1_2 is missing").to_string();
        assert!(msg.contains("features.2.weight") && msg.contains("conv1_2"), "{msg}");
    }
}

#[test]
fn bad_files_are_errors_naming_file_and_tensor() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = std::fs::read(synth_file(dir.path())).expect("read");

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &good[..good.len() / 2]).expect("write");
    let msg = WeightsFile::open(&truncated).err().expect("truncated fails").to_string();
    assert!(msg.contains("truncated.safetensors") && msg.contains("truncated"), "{msg}");

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a weights file at all, just text\n").expect("write");
    let msg = WeightsFile::open(&garbage).err().expect("garbage fails").to_string();
    assert!(msg.contains("garbage.safetensors") && msg.contains("not a safetensors file"), "{msg}");

    let tiny = dir.path().join("tiny.safetensors");
    std::fs::write(&tiny, b"abc").expect("write");
    assert!(matches!(WeightsFile::open(&tiny), Err(VggError::NotSafetensors { .. })));

    let missing = dir.path().join("missing.safetensors");
    let msg = WeightsFile::open(&missing).err().expect("missing fails").to_string();
    assert!(msg.contains("missing.safetensors"), "{msg}");

    // A tensor of the wrong shape: conv1_1 with 4 input channels.
    use safetensors::tensor::{Dtype, TensorView};
    let data = vec![0u8; 64 * 4 * 9 * 4];
    let wrong = dir.path().join("wrong.safetensors");
    let view = TensorView::new(Dtype::F32, vec![64, 4, 3, 3], &data).expect("view");
    safetensors::tensor::serialize_to_file(vec![("features.0.weight".to_string(), view)], &None, &wrong)
        .expect("written");
    let file = WeightsFile::open(&wrong).expect("header is valid");
    let msg = file.read_f32("features.0.weight").expect_err("wrong shape").to_string();
    assert!(msg.contains("wrong.safetensors") && msg.contains("features.0.weight"), "{msg}");
    assert!(msg.contains("[64, 4, 3, 3]") && msg.contains("[64, 3, 3, 3]"), "{msg}");
    assert!(!file.inspect().problems.is_empty());
}
