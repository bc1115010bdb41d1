//! Writes the body of `builtin()` for this build: one `.with(CRATE::PLUGIN)` for each plugin
//! compiled in. A plugin is an optional dependency named like its folder (`loss-NAME` or
//! `optim-NAME`), so its cargo feature is on exactly when it is a dependency of this build;
//! listing the enabled features here keeps the plugin list in one place, Cargo.toml.

use std::fmt::Write;

fn main() {
    // Features are part of the build's fingerprint: a new set reruns this anyway.
    println!("cargo:rerun-if-changed=build.rs");
    let mut crates: Vec<String> = std::env::vars()
        .filter_map(|(key, _)| key.strip_prefix("CARGO_FEATURE_").map(str::to_lowercase))
        .filter(|feature| feature.starts_with("loss_") || feature.starts_with("optim_"))
        .collect();
    // Losses first, then optimisers, each by name: the order `easel plugins` lists them in.
    crates.sort();
    let mut body = String::from("Registry::new()");
    for name in &crates {
        write!(body, "\n    .with({name}::PLUGIN)").expect("writing to a String cannot fail");
    }
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("builtin.rs");
    std::fs::write(&out, body).expect("OUT_DIR is writable");
}
