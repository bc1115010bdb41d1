//! What the engine's integration tests share: the test data and synthetic weights (written once
//! per test binary). Their plugins come from `easel_plugins::builtin`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use easel_vgg::WeightsFile;

/// A file of the project's test data (`tests/data`).
pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data").join(name)
}

/// Synthetic VGG-19 weights, seed 0.
pub fn weights() -> &'static WeightsFile {
    static WEIGHTS: OnceLock<(tempfile::TempDir, WeightsFile)> = OnceLock::new();
    &WEIGHTS
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("synth0.safetensors");
            easel_vgg::synth::write(0, &path).expect("synthetic weights are written");
            (dir, WeightsFile::open(&path).expect("synthetic weights open"))
        })
        .1
}
