//! easel's builtin plugins in one registry, used by the binary and by every test that needs
//! plugins, so that the list of plugins is written once.
//!
//! Each plugin is an optional dependency named like its folder (`loss-NAME`, `optim-NAME`),
//! which is also the cargo feature that compiles it in; all are on by default. The build
//! script turns the enabled features into the registry, so a plugin is added by two lines of
//! Cargo.toml (`CONTRIBUTING.md` lists the steps).

use easel_core::Registry;

/// Every builtin plugin this crate was compiled with: losses, then optimisers, each by name
/// (the order `easel plugins` lists them in).
pub fn builtin() -> Registry {
    // One `.with(CRATE::PLUGIN)` per enabled plugin feature, written by build.rs.
    include!(concat!(env!("OUT_DIR"), "/builtin.rs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each folder `plugins/loss-NAME` or `plugins/optim-NAME` must be registered under `NAME`
    /// by the default features, so a plugin added to the workspace but not here is caught.
    #[test]
    fn the_default_features_register_every_plugin_folder() {
        let registry = builtin();
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins");
        let mut seen = 0;
        for entry in std::fs::read_dir(&folder).expect("the plugins folder is readable") {
            let name = entry.expect("a plugins entry").file_name().into_string().expect("UTF-8 name");
            if let Some(loss) = name.strip_prefix("loss-") {
                assert!(registry.loss(loss).is_some(), "plugins/{name} is not registered as loss `{loss}`");
            } else if let Some(optimizer) = name.strip_prefix("optim-") {
                let found = registry.optimizer(optimizer).is_some();
                assert!(found, "plugins/{name} is not registered as optimizer `{optimizer}`");
            } else {
                panic!("plugins/{name}: a plugin folder is named loss-NAME or optim-NAME");
            }
            seen += 1;
        }
        assert_eq!(seen, registry.losses().len() + registry.optimizers().len());
    }
}
