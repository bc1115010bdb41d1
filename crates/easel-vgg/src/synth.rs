//! Deterministic synthetic VGG-19 weights (the recipe is in the README), bit-identical in any language.

use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::{VggError, CONVS};

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn uniform(seed: u64, stream: u64, i: u64) -> f64 {
    let x = splitmix64(seed.wrapping_shl(40).wrapping_add(stream << 32).wrapping_add(i));
    (x >> 40) as f64 / (1u64 << 24) as f64
}

/// The synthetic tensors for `seed`: `(name, shape, values)` for all 16 convolutions.
pub fn tensors(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::with_capacity(32);
    for (k, &(index, cin, cout)) in CONVS.iter().enumerate() {
        let k = k as u64;
        let scale = (6.0 / (cin * 9) as f64).sqrt();
        let weight = (0..(cout * cin * 9) as u64).map(|i| ((2.0 * uniform(seed, k, i) - 1.0) * scale) as f32);
        out.push((format!("features.{index}.weight"), vec![cout, cin, 3, 3], weight.collect()));
        let bias = (0..cout as u64).map(|i| ((2.0 * uniform(seed, k + 16, i) - 1.0) * 0.01) as f32);
        out.push((format!("features.{index}.bias"), vec![cout], bias.collect()));
    }
    out
}

/// Writes the synthetic weights for `seed` to `path` as f32 safetensors, atomically.
pub fn write(seed: u64, path: &Path) -> Result<(), VggError> {
    let tensors = tensors(seed);
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), data)
                .map_err(|e| VggError::NotSafetensors { path: path.to_path_buf(), reason: e.to_string() })?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>, VggError>>()?;
    let serialized = safetensors::tensor::serialize(views, &None)
        .map_err(|e| VggError::NotSafetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    easel_core::write_atomically(path, &serialized)
        .map_err(|source| VggError::Io { path: path.to_path_buf(), source })
}
