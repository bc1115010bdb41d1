//! easel's builtin plugins in one registry, used by the binary and by every test that needs
//! plugins, so that the list of plugins is written once.
//!
//! Each plugin is an optional dependency whose name is also the cargo feature that compiles
//! it in; all are on by default. `CONTRIBUTING.md` lists the steps to add one.

use easel_core::Registry;

/// Writes [`builtin`] from one line per plugin: its feature, the [`Registry`] method that adds
/// it (`with_loss` or `with_optimizer`) and its factory.
macro_rules! builtin {
    ($($feature:literal => $add:ident($factory:path),)*) => {
        /// Every builtin plugin this crate was compiled with, in the order `easel plugins`
        /// lists them.
        pub fn builtin() -> Registry {
            let registry = Registry::new();
            $(
                #[cfg(feature = $feature)]
                let registry = registry.$add(&$factory);
            )*
            registry
        }
    };
}

builtin! {
    "loss-content" => with_loss(loss_content::ContentFactory),
    "loss-gram" => with_loss(loss_gram::GramFactory),
    "loss-tv" => with_loss(loss_tv::TvFactory),
    "optim-lbfgs" => with_optimizer(optim_lbfgs::LbfgsFactory),
    "optim-adam" => with_optimizer(optim_adam::AdamFactory),
    "optim-gd" => with_optimizer(optim_gd::GdFactory),
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
