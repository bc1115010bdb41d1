//! What the engine's integration tests share: the test data and synthetic weights (written once
//! per test binary). Their plugins come from `easel_plugins::builtin`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use easel_vgg::WeightsFile;

/// A file of the project's test data: `tests/data` of the checkout the test was built in, or of
/// the folder `EASEL_TEST_DATA` names, for a test binary carried to another machine (a GPU's).
pub fn data(name: &str) -> PathBuf {
    match std::env::var_os("EASEL_TEST_DATA") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data").join(name),
    }
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
