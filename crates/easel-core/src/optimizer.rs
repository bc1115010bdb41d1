//! The optimiser plugin boundary.

use candle_core::Tensor;

use crate::{CoreError, OptionSpec, Options};

/// The function being minimised: its value and gradient at a point.
pub trait Objective {
    /// Loss and its gradient with respect to `x` (same shape as `x`).
    fn evaluate(&mut self, x: &Tensor) -> Result<(f64, Tensor), CoreError>;
}

/// What one optimiser iteration did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// The loss at the iterate the step started from.
    pub loss: f64,
    /// Objective evaluations this step spent.
    pub evaluations: usize,
    /// True when the optimiser cannot make further progress (gradient or step vanished).
    pub converged: bool,
}

/// An optimiser's resumable state: named tensors and scalars, saved in checkpoints.
#[derive(Debug, Clone, Default)]
pub struct OptimizerState {
    pub tensors: Vec<(String, Tensor)>,
    pub scalars: Vec<(String, f64)>,
}

impl OptimizerState {
    /// The tensor saved under `name`.
    pub fn tensor(&self, name: &str) -> Result<&Tensor, CoreError> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| CoreError::BadState(format!("tensor `{name}` is missing")))
    }

    /// The scalar saved under `name`.
    pub fn scalar(&self, name: &str) -> Result<f64, CoreError> {
        self.scalars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| CoreError::BadState(format!("scalar `{name}` is missing")))
    }
}

/// An option the memory planner lowered so that a job fits its budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjustment {
    /// Its key path, e.g. `optimizer.history`.
    pub key: &'static str,
    pub from: u64,
    pub to: u64,
}

impl std::fmt::Display for Adjustment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} lowered from {} to {} to fit the memory budget", self.key, self.from, self.to)
    }
}

/// Minimises an [`Objective`] over the image, one iteration per call.
pub trait Optimizer: Send {
    /// Performs one iteration, updating `x` in place.
    fn step(&mut self, x: &mut Tensor, objective: &mut dyn Objective) -> Result<Step, CoreError>;

    /// Forgets all history, as between scales (the image changes size).
    fn reset(&mut self);

    /// Everything needed to continue exactly where this optimiser stands.
    fn state(&self) -> OptimizerState;

    /// Restores a state produced by [`Optimizer::state`] of the same plugin.
    fn restore(&mut self, state: &OptimizerState) -> Result<(), CoreError>;

    /// The most bytes this optimiser holds while the objective is evaluated, for an image of
    /// `elements` values (its state, and whatever a step keeps across the evaluations it makes,
    /// as L-BFGS's line search does), for the memory planner. The image and its gradient are
    /// the planner's own.
    fn state_bytes(&self, elements: u64) -> u64;

    /// The bytes a step allocates beside [`Optimizer::state_bytes`] when no evaluation is
    /// running (the update, the new image), for the memory planner. Default: 0.
    fn step_bytes(&self, _elements: u64) -> u64 {
        0
    }

    /// Makes the optimiser hold at most `bytes` for an image of `elements` values if one of
    /// its options allows (L-BFGS keeps a shorter history), saying what it changed; `None` when
    /// it cannot (the default).
    fn fit_state(&mut self, _elements: u64, _bytes: u64) -> Option<Adjustment> {
        None
    }
}

/// Builds an [`Optimizer`] from its TOML options; one per plugin, listed in the registry.
pub trait OptimizerFactory: Sync {
    /// The `type` that selects this plugin in TOML.
    fn name(&self) -> &'static str;

    /// One line for `easel plugins`.
    fn summary(&self) -> &'static str;

    /// The options this plugin reads, with their defaults.
    fn options(&self) -> &'static [OptionSpec];

    /// Reads the options and builds the optimiser; problems are recorded in `options`.
    fn build(&self, options: &mut Options<'_>) -> Box<dyn Optimizer>;
}
