//! The list of plugin factories a binary was built with.

use crate::{LossFactory, OptimizerFactory};

/// One plugin, as its crate exports it (`pub const PLUGIN`) for the builtin registry.
#[derive(Clone, Copy)]
pub enum Plugin {
    Loss(&'static dyn LossFactory),
    Optimizer(&'static dyn OptimizerFactory),
}

/// Loss and optimiser factories, looked up by their TOML `type` name.
#[derive(Default)]
pub struct Registry {
    losses: Vec<&'static dyn LossFactory>,
    optimizers: Vec<&'static dyn OptimizerFactory>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a plugin of either kind.
    pub fn with(self, plugin: Plugin) -> Self {
        match plugin {
            Plugin::Loss(factory) => self.with_loss(factory),
            Plugin::Optimizer(factory) => self.with_optimizer(factory),
        }
    }

    /// Adds a loss plugin.
    pub fn with_loss(mut self, factory: &'static dyn LossFactory) -> Self {
        self.losses.push(factory);
        self
    }

    /// Adds an optimiser plugin.
    pub fn with_optimizer(mut self, factory: &'static dyn OptimizerFactory) -> Self {
        self.optimizers.push(factory);
        self
    }

    /// The loss plugin named `name`.
    pub fn loss(&self, name: &str) -> Option<&'static dyn LossFactory> {
        self.losses.iter().copied().find(|f| f.name() == name)
    }

    /// The optimiser plugin named `name`.
    pub fn optimizer(&self, name: &str) -> Option<&'static dyn OptimizerFactory> {
        self.optimizers.iter().copied().find(|f| f.name() == name)
    }

    /// All loss plugins, in registration order.
    pub fn losses(&self) -> &[&'static dyn LossFactory] {
        &self.losses
    }

    /// All optimiser plugins, in registration order.
    pub fn optimizers(&self) -> &[&'static dyn OptimizerFactory] {
        &self.optimizers
    }

    /// Loss plugin names, for "unknown type" errors.
    pub fn loss_names(&self) -> String {
        self.losses.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
    }

    /// Optimiser plugin names, for "unknown type" errors.
    pub fn optimizer_names(&self) -> String {
        self.optimizers.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
    }
}
