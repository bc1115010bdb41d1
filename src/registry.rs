//! The plugins this binary was built with: one plain list, each entry behind its cargo feature.

use easel_core::Registry;

/// Every loss and optimiser compiled in.
pub fn registry() -> Registry {
    let registry = Registry::new();
    #[cfg(feature = "loss-content")]
    let registry = registry.with_loss(&easel_loss_content::ContentFactory);
    #[cfg(feature = "loss-gram")]
    let registry = registry.with_loss(&easel_loss_gram::GramFactory);
    #[cfg(feature = "loss-tv")]
    let registry = registry.with_loss(&easel_loss_tv::TvFactory);
    #[cfg(feature = "optim-lbfgs")]
    let registry = registry.with_optimizer(&easel_optim_lbfgs::LbfgsFactory);
    #[cfg(feature = "optim-adam")]
    let registry = registry.with_optimizer(&easel_optim_adam::AdamFactory);
    #[cfg(feature = "optim-gd")]
    let registry = registry.with_optimizer(&easel_optim_gd::GdFactory);
    registry
}
