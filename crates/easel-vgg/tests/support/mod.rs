//! What easel-vgg's integration tests share.

use easel_vgg::WeightsFile;

/// Synthetic weights of `seed`, written to a temp folder that lives as long as the returned
/// guard.
pub fn synth_weights(seed: u64) -> (tempfile::TempDir, WeightsFile) {
    let dir = tempfile::tempdir().expect("a temp folder");
    let path = dir.path().join("w.safetensors");
    easel_vgg::synth::write(seed, &path).expect("synthetic weights are written");
    let weights = WeightsFile::open(&path).expect("synthetic weights open");
    (dir, weights)
}
