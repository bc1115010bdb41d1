//! L-BFGS with an optional strong-Wolfe line search, modelled on PyTorch's `torch.optim.LBFGS`.
//!
//! One [`Optimizer::step`] is one L-BFGS iteration (PyTorch's `max_iter = 1`), but the loss and
//! gradient at the new point found by the line search are kept, so an iteration costs only
//! its line-search evaluations; PyTorch's closure re-evaluates the starting point each call.
//! The first step after construction or [`Optimizer::reset`] also evaluates its start, so with
//! `line_search = "none"` it costs two evaluations and every later step one, following the
//! same trajectory as PyTorch's `LBFGS(max_iter=1, line_search_fn=None)`.
//!
//! `max_evals_per_step` caps the evaluations of one line search: its first trial plus
//! `max_evals_per_step - 1` iterations (PyTorch's `max_ls`, which allows 25 after the trial).

mod line_search;
mod reduce;

use std::collections::VecDeque;

use easel_core::candle_core::{Tensor, TensorId};
use easel_core::{
    Adjustment, CoreError, Objective, Optimizer, OptimizerFactory, OptimizerState, OptionDefault, OptionSpec,
    Options, Step,
};

use line_search::{strong_wolfe, LinePoint};
use reduce::{abs_sum, dot, max_abs};

/// Builds [`Lbfgs`] from `type = "lbfgs"`.
pub struct LbfgsFactory;

/// This plugin, as the builtin registry (easel-plugins) adds it.
pub const PLUGIN: easel_core::Plugin = easel_core::Plugin::Optimizer(&LbfgsFactory);

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        key: "history",
        kind: "integer in [1, 1000]",
        default: OptionDefault::Integer(LbfgsConfig::DEFAULT.history as u64),
        doc: "number of past (step, gradient change) pairs kept; each costs two image-sized tensors",
    },
    OptionSpec {
        key: "lr",
        kind: "number > 0",
        default: OptionDefault::Number(LbfgsConfig::DEFAULT.lr),
        doc: "initial step length of the line search (the fixed step with line_search = \"none\")",
    },
    OptionSpec {
        key: "line_search",
        kind: "\"strong_wolfe\" or \"none\"",
        default: OptionDefault::Name(LbfgsConfig::DEFAULT.line_search.name()),
        doc: "how the step length along the L-BFGS direction is chosen",
    },
    OptionSpec {
        key: "tolerance_grad",
        kind: "number >= 0",
        default: OptionDefault::Number(LbfgsConfig::DEFAULT.tolerance_grad),
        doc: "converged when no gradient element exceeds this in magnitude",
    },
    OptionSpec {
        key: "tolerance_change",
        kind: "number >= 0",
        default: OptionDefault::Number(LbfgsConfig::DEFAULT.tolerance_change),
        doc: "converged when the loss, or every pixel, changes by less than this in an iteration",
    },
    OptionSpec {
        key: "max_evals_per_step",
        kind: "integer in [1, 1000]",
        default: OptionDefault::Integer(LbfgsConfig::DEFAULT.max_evals_per_step as u64),
        doc: "most objective evaluations one line search may spend",
    },
];

impl OptimizerFactory for LbfgsFactory {
    fn name(&self) -> &'static str {
        "lbfgs"
    }

    fn summary(&self) -> &'static str {
        "L-BFGS with strong-Wolfe line search (as PyTorch's); fewest iterations, several evaluations each"
    }

    fn options(&self) -> &'static [OptionSpec] {
        OPTIONS
    }

    fn build(&self, options: &mut Options<'_>) -> Box<dyn Optimizer> {
        let d = LbfgsConfig::DEFAULT;
        let line_searches = LineSearch::ALL.map(|l| (l.name(), l));
        let config = LbfgsConfig {
            history: options.integer("history", d.history as u64, 1, 1000) as usize,
            lr: options.positive("lr", d.lr),
            line_search: options.choice("line_search", d.line_search, &line_searches),
            tolerance_grad: options.non_negative("tolerance_grad", d.tolerance_grad),
            tolerance_change: options.non_negative("tolerance_change", d.tolerance_change),
            max_evals_per_step: options.integer("max_evals_per_step", d.max_evals_per_step as u64, 1, 1000)
                as usize,
        };
        Box::new(Lbfgs::new(config))
    }
}

/// How an iteration chooses its step length along the search direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineSearch {
    /// PyTorch's `_strong_wolfe`: bracketing then cubic zoom, c1 = 1e-4, c2 = 0.9.
    StrongWolfe,
    /// A fixed step `lr` (the first iteration `min(1, 1 / |g|_1) * lr`), one evaluation.
    Fixed,
}

impl LineSearch {
    /// Every rule, in the order an unknown name's error lists them.
    pub const ALL: [LineSearch; 2] = [LineSearch::StrongWolfe, LineSearch::Fixed];

    /// The rule's name in TOML.
    pub const fn name(self) -> &'static str {
        match self {
            LineSearch::StrongWolfe => "strong_wolfe",
            LineSearch::Fixed => "none",
        }
    }
}

/// L-BFGS settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LbfgsConfig {
    /// Most (s, y) pairs kept, >= 1.
    pub history: usize,
    /// Initial (or fixed) step length, > 0.
    pub lr: f64,
    /// Step-length rule.
    pub line_search: LineSearch,
    /// Converged when the gradient's max-norm is at most this.
    pub tolerance_grad: f64,
    /// Converged when the loss or the step's max-norm changes less than this.
    pub tolerance_change: f64,
    /// Most evaluations one line search may spend, >= 1.
    pub max_evals_per_step: usize,
}

impl LbfgsConfig {
    /// The values a config that leaves them out gets, and `easel plugins` shows.
    pub const DEFAULT: LbfgsConfig = LbfgsConfig {
        history: 100,
        lr: 1.0,
        line_search: LineSearch::StrongWolfe,
        tolerance_grad: 1e-7,
        tolerance_change: 1e-9,
        max_evals_per_step: 25,
    };
}

impl Default for LbfgsConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Pairs whose curvature `y . s` is at most this are skipped: they would make the inverse
/// Hessian estimate indefinite (PyTorch's threshold).
const MIN_CURVATURE: f64 = 1e-10;

/// One remembered iteration: step `s = x_new - x`, gradient change `y`, and `ro = 1 / y . s`.
struct Pair {
    s: Tensor,
    y: Tensor,
    ro: f64,
}

/// The loss and gradient at the current iterate, so that the next step need not evaluate it.
struct Cached {
    loss: f64,
    grad: Tensor,
    /// The tensor the gradient belongs to. `None` after a restore, where the engine passes the
    /// checkpointed image back as a new tensor and the saved values are trusted.
    x: Option<TensorId>,
}

/// Image-sized tensors a step holds besides the history (see `state_bytes`).
const STEP_TEMPORARIES: u64 = 6;

/// Limited-memory BFGS; each [`Optimizer::step`] is one iteration.
///
/// State between steps mirrors PyTorch's: the (s, y) history, the initial inverse-Hessian
/// scale `h_diag = s.y / y.y` of the newest pair, and the iteration count. Unlike PyTorch the
/// pair of an iteration is stored at its end rather than the start of the next one, so no
/// previous gradient or direction needs keeping; the arithmetic is the same.
///
/// [`Optimizer::state`] holds tensors `s0`, `y0`, `s1`, `y1`, ... (oldest pair first) and
/// scalars `ro0`, `ro1`, ... (`1 / y.s`), `history_len`, `h_diag`, `n_iter` and `func_evals`;
/// after the first step also the cached loss and gradient at the current image, `loss` and
/// `grad`, so that a restored optimiser continues bit-identically without re-evaluating.
pub struct Lbfgs {
    config: LbfgsConfig,
    /// Oldest first, at most `config.history` long.
    history: VecDeque<Pair>,
    h_diag: f64,
    /// Iterations since the last reset; the first one uses a gradient-scaled step.
    n_iter: u64,
    /// Evaluations since the last reset, to number a non-finite loss in its error.
    func_evals: usize,
    cached: Option<Cached>,
}

impl Lbfgs {
    /// An optimiser with no history. `config` is used as given: [`LbfgsFactory`] validates it.
    pub fn new(config: LbfgsConfig) -> Self {
        Self { config, history: VecDeque::new(), h_diag: 1.0, n_iter: 0, func_evals: 0, cached: None }
    }

    /// The settings in use.
    pub fn config(&self) -> LbfgsConfig {
        self.config
    }

    /// Restored tensors may come from another image size or sit on the CPU: check the shape
    /// (the mistake is the caller's, so say so) and move them next to `x`.
    fn adopt(&mut self, x: &Tensor) -> Result<(), CoreError> {
        let saved = self.history.front().map(|p| &p.s).or(self.cached.as_ref().map(|c| &c.grad));
        if let Some(saved) = saved {
            if saved.shape() != x.shape() {
                return Err(CoreError::BadState(format!(
                    "L-BFGS history has shape {:?} but the image has shape {:?}; \
                     the optimiser must be reset when the image changes size",
                    saved.dims(),
                    x.dims()
                )));
            }
        }
        let device = x.device();
        for pair in &mut self.history {
            pair.s = pair.s.to_device(device)?;
            pair.y = pair.y.to_device(device)?;
        }
        if let Some(cached) = &mut self.cached {
            cached.grad = cached.grad.to_device(device)?;
        }
        Ok(())
    }

    /// The two-loop recursion: `-H g` for the inverse-Hessian estimate `H` of the history.
    fn direction(&self, grad: &Tensor) -> Result<Tensor, CoreError> {
        let mut q = grad.neg()?;
        let mut alpha = vec![0.0; self.history.len()];
        for (i, pair) in self.history.iter().enumerate().rev() {
            alpha[i] = dot(&pair.s, &q)? * pair.ro;
            q = (q - pair.y.affine(alpha[i], 0.0)?)?;
        }
        let mut r = q.affine(self.h_diag, 0.0)?;
        for (pair, alpha) in self.history.iter().zip(alpha) {
            let beta = dot(&pair.y, &r)? * pair.ro;
            r = (r + pair.s.affine(alpha - beta, 0.0)?)?;
        }
        Ok(r)
    }

    /// Adds the pair of the step just taken, unless its curvature is too small to trust.
    fn remember(&mut self, s: Tensor, y: Tensor) -> Result<(), CoreError> {
        let ys = dot(&y, &s)?;
        if ys > MIN_CURVATURE {
            if self.history.len() == self.config.history {
                self.history.pop_front();
            }
            self.h_diag = ys / dot(&y, &y)?;
            self.history.push_back(Pair { s, y, ro: 1.0 / ys });
        }
        Ok(())
    }
}

/// `x + t d`. Trial points and the accepted point are computed by this one expression, so the
/// accepted image is bit-identical to the one whose gradient the line search kept.
fn along(x: &Tensor, t: f64, d: &Tensor) -> Result<Tensor, CoreError> {
    Ok((x + d.affine(t, 0.0)?)?)
}

/// Evaluates the objective, counting the evaluation and rejecting a non-finite loss.
fn evaluate(
    objective: &mut dyn Objective,
    x: &Tensor,
    func_evals: &mut usize,
) -> Result<(f64, Tensor), CoreError> {
    *func_evals += 1;
    let (loss, grad) = objective.evaluate(x)?;
    if !loss.is_finite() {
        return Err(CoreError::NonFinite { value: loss, evaluation: *func_evals });
    }
    // The objective may hand back a gradient still attached to its autograd graph; keeping
    // that in the history would keep every graph alive.
    Ok((loss, grad.detach()))
}

impl Optimizer for Lbfgs {
    fn step(&mut self, x: &mut Tensor, objective: &mut dyn Objective) -> Result<Step, CoreError> {
        self.adopt(x)?;
        let x0 = x.detach();
        let mut evaluations = 0;
        // The cache is only valid for the tensor it was computed at: if the caller replaced
        // the image (clamped it, say), evaluate afresh as PyTorch would.
        let (loss, grad) = match &self.cached {
            Some(c) if c.x.is_none() || c.x == Some(x.id()) => (c.loss, c.grad.clone()),
            _ => {
                evaluations += 1;
                evaluate(objective, &x0, &mut self.func_evals)?
            }
        };
        let LbfgsConfig { lr, tolerance_grad, tolerance_change, .. } = self.config;
        if max_abs(&grad)? <= tolerance_grad {
            self.cached = Some(Cached { loss, grad, x: Some(x.id()) });
            return Ok(Step { loss, evaluations, converged: true });
        }

        self.n_iter += 1;
        let (d, t) = if self.n_iter == 1 {
            // No curvature known yet: a steepest-descent step of at most lr in 1-norm.
            (grad.neg()?, (1.0f64).min(1.0 / abs_sum(&grad)?) * lr)
        } else {
            (self.direction(&grad)?, lr)
        };
        let gtd = dot(&grad, &d)?;
        if gtd > -tolerance_change {
            // Not a descent direction (to working precision): no step can lower the loss.
            self.cached = Some(Cached { loss, grad, x: Some(x.id()) });
            return Ok(Step { loss, evaluations, converged: true });
        }

        let (new_loss, new_grad, t) = match self.config.line_search {
            LineSearch::StrongWolfe => {
                let func_evals = &mut self.func_evals;
                let mut at = |t: f64| evaluate(objective, &along(&x0, t, &d)?, func_evals);
                let start = LinePoint { t: 0.0, loss, grad: grad.clone(), gtd };
                // The first trial is one evaluation; each line-search iteration one more.
                let max_ls = self.config.max_evals_per_step - 1;
                let result = strong_wolfe(&mut at, &d, t, &start, tolerance_change, max_ls)?;
                evaluations += result.evaluations;
                (result.point.loss, result.point.grad, result.point.t)
            }
            LineSearch::Fixed => {
                evaluations += 1;
                let (l, g) = evaluate(objective, &along(&x0, t, &d)?, &mut self.func_evals)?;
                (l, g, t)
            }
        };

        let new_x = along(&x0, t, &d)?;
        let s = d.affine(t, 0.0)?;
        let step_norm = max_abs(&s)?;
        let converged = max_abs(&new_grad)? <= tolerance_grad
            || step_norm <= tolerance_change
            || (new_loss - loss).abs() < tolerance_change;
        let y = (&new_grad - &grad)?;
        self.remember(s, y)?;
        *x = new_x;
        self.cached = Some(Cached { loss: new_loss, grad: new_grad, x: Some(x.id()) });
        Ok(Step { loss, evaluations, converged })
    }

    fn reset(&mut self) {
        *self = Self::new(self.config);
    }

    fn state(&self) -> OptimizerState {
        let mut state = OptimizerState::default();
        for (i, pair) in self.history.iter().enumerate() {
            state.tensors.push((format!("s{i}"), pair.s.clone()));
            state.tensors.push((format!("y{i}"), pair.y.clone()));
            state.scalars.push((format!("ro{i}"), pair.ro));
        }
        state.scalars.push(("history_len".to_string(), self.history.len() as f64));
        state.scalars.push(("h_diag".to_string(), self.h_diag));
        state.scalars.push(("n_iter".to_string(), self.n_iter as f64));
        state.scalars.push(("func_evals".to_string(), self.func_evals as f64));
        if let Some(cached) = &self.cached {
            state.scalars.push(("loss".to_string(), cached.loss));
            state.tensors.push(("grad".to_string(), cached.grad.clone()));
        }
        state
    }

    fn restore(&mut self, state: &OptimizerState) -> Result<(), CoreError> {
        let history_len = count(state, "history_len")? as usize;
        let mut history = VecDeque::with_capacity(history_len);
        for i in 0..history_len {
            let s = state.tensor(&format!("s{i}"))?.clone();
            let y = state.tensor(&format!("y{i}"))?.clone();
            let ro = state.scalar(&format!("ro{i}"))?;
            if !(ro.is_finite() && ro > 0.0) {
                return Err(bad(format!("`ro{i}` must be a positive number, got {ro}")));
            }
            history.push_back(Pair { s, y, ro });
        }
        // A checkpoint taken with a longer history keeps its newest pairs.
        while history.len() > self.config.history {
            history.pop_front();
        }
        let h_diag = state.scalar("h_diag")?;
        if !(h_diag.is_finite() && h_diag > 0.0) {
            return Err(bad(format!("`h_diag` must be a positive number, got {h_diag}")));
        }
        let n_iter = count(state, "n_iter")?;
        let func_evals = count(state, "func_evals")? as usize;
        let cached = if state.tensors.iter().any(|(name, _)| name == "grad") {
            let loss = state.scalar("loss")?;
            if !loss.is_finite() {
                return Err(bad(format!("`loss` must be finite, got {loss}")));
            }
            Some(Cached { loss, grad: state.tensor("grad")?.clone(), x: None })
        } else {
            None
        };

        let saved = history.iter().flat_map(|p| [&p.s, &p.y]);
        check_same_shape(saved.chain(cached.as_ref().map(|c| &c.grad)))?;
        // The image's shape is checked at the next step, when the image is known.
        *self = Self { config: self.config, history, h_diag, n_iter, func_evals, cached };
        Ok(())
    }

    /// Two image-sized tensors per history pair (`s` and `y`), and a step's image-sized
    /// temporaries (the gradient and the previous one, the direction, the two-loop's work
    /// vector, the line search's trial point and its gradient).
    fn state_bytes(&self, elements: u64) -> u64 {
        4 * elements * (2 * self.config.history as u64 + STEP_TEMPORARIES)
    }

    /// Keeps as many history pairs as fit in `bytes`, at least one.
    fn fit_state(&mut self, elements: u64, bytes: u64) -> Option<Adjustment> {
        let fits = (bytes / 4 / elements.max(1)).saturating_sub(STEP_TEMPORARIES) / 2;
        let history = usize::try_from(fits).unwrap_or(usize::MAX).min(self.config.history);
        if history == 0 || history == self.config.history {
            return None;
        }
        let from = self.config.history as u64;
        self.config.history = history;
        while self.history.len() > history {
            self.history.pop_front();
        }
        Some(Adjustment { key: "optimizer.history", from, to: history as u64 })
    }
}

/// Errors unless all `tensors` have one shape.
fn check_same_shape<'a>(mut tensors: impl Iterator<Item = &'a Tensor>) -> Result<(), CoreError> {
    let Some(first) = tensors.next() else { return Ok(()) };
    match tensors.find(|t| t.shape() != first.shape()) {
        Some(other) => {
            Err(bad(format!("saved tensors differ in shape: {:?} and {:?}", first.dims(), other.dims())))
        }
        None => Ok(()),
    }
}

/// A [`CoreError::BadState`] naming this optimiser.
fn bad(message: String) -> CoreError {
    CoreError::BadState(format!("L-BFGS {message}"))
}

/// A saved counter: a non-negative integer that f64 holds exactly (below 2^53).
fn count(state: &OptimizerState, name: &str) -> Result<u64, CoreError> {
    let value = state.scalar(name)?;
    if value >= 0.0 && value.fract() == 0.0 && value < 9_007_199_254_740_992.0 {
        Ok(value as u64)
    } else {
        Err(bad(format!("`{name}` must be a non-negative integer, got {value}")))
    }
}

#[cfg(test)]
mod tests;
