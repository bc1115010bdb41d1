//! Adam (Kingma & Ba, 2015) as PyTorch's `torch.optim.Adam` computes it, without weight decay or AMSGrad.

mod in_place;

use std::cell::Cell;

use easel_core::candle_core::Tensor;
use easel_core::{
    CoreError, Objective, Optimizer, OptimizerFactory, OptimizerState, OptionDefault, OptionSpec, Options,
    Step,
};

/// Builds [`Adam`] from `type = "adam"`.
pub struct AdamFactory;

/// This plugin, as the builtin registry (easel-plugins) adds it.
pub const PLUGIN: easel_core::Plugin = easel_core::Plugin::Optimizer(&AdamFactory);

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        key: "lr",
        kind: "number > 0",
        default: OptionDefault::Number(AdamConfig::DEFAULT.lr),
        doc: "step size; with Adam each pixel moves by about this much per iteration early on",
    },
    OptionSpec {
        key: "beta1",
        kind: "number in [0, 1)",
        default: OptionDefault::Number(AdamConfig::DEFAULT.beta1),
        doc: "decay rate of the running mean of the gradient",
    },
    OptionSpec {
        key: "beta2",
        kind: "number in [0, 1)",
        default: OptionDefault::Number(AdamConfig::DEFAULT.beta2),
        doc: "decay rate of the running mean of the squared gradient",
    },
    OptionSpec {
        key: "eps",
        kind: "number > 0",
        default: OptionDefault::Number(AdamConfig::DEFAULT.eps),
        doc: "added to the denominator so that flat pixels do not divide by zero",
    },
];

impl OptimizerFactory for AdamFactory {
    fn name(&self) -> &'static str {
        "adam"
    }

    fn summary(&self) -> &'static str {
        "Adam: per-pixel steps scaled by running gradient moments; one evaluation per iteration"
    }

    fn options(&self) -> &'static [OptionSpec] {
        OPTIONS
    }

    fn build(&self, options: &mut Options<'_>) -> Box<dyn Optimizer> {
        let defaults = AdamConfig::DEFAULT;
        let config = AdamConfig {
            lr: options.positive("lr", defaults.lr),
            beta1: options.number_in("beta1", defaults.beta1, 0.0, 1.0, true),
            beta2: options.number_in("beta2", defaults.beta2, 0.0, 1.0, true),
            eps: options.positive("eps", defaults.eps),
        };
        Box::new(Adam::new(config))
    }
}

/// Adam's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Step size, > 0.
    pub lr: f64,
    /// Decay rate of the first moment, in [0, 1).
    pub beta1: f64,
    /// Decay rate of the second moment, in [0, 1).
    pub beta2: f64,
    /// Denominator offset, > 0.
    pub eps: f64,
}

impl AdamConfig {
    /// The values a config that leaves them out gets, and `easel plugins` shows.
    pub const DEFAULT: AdamConfig = AdamConfig { lr: 0.02, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The running first and second moments of the gradient, shaped like the image.
struct Moments {
    m: Tensor,
    v: Tensor,
}

/// The Adam optimiser; one objective evaluation per [`Optimizer::step`].
///
/// Each step computes, as PyTorch does,
/// `m = lerp(m, g, 1 - beta1)`, `v = beta2 v + (1 - beta2) g^2`,
/// `x -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`.
///
/// [`Optimizer::state`] holds the scalar `t` (steps taken) and, once a step has been taken,
/// the tensors `m` and `v`.
pub struct Adam {
    config: AdamConfig,
    /// `None` until the first step, and after [`Optimizer::reset`].
    moments: Option<Moments>,
    /// Number of steps taken since the last reset.
    t: u64,
    /// The moments' storage may be shared with tensors handed out by [`Optimizer::state`] or
    /// taken in by [`Optimizer::restore`]: copied before the next in-place update.
    shared: Cell<bool>,
}

impl Adam {
    /// An optimiser with no history. `config` is used as given: [`AdamFactory`] validates it.
    pub fn new(config: AdamConfig) -> Self {
        Self { config, moments: None, t: 0, shared: Cell::new(false) }
    }

    /// The hyper-parameters in use.
    pub fn config(&self) -> AdamConfig {
        self.config
    }

    /// Moments of a previous step, or zeros on the first; errors when they do not fit `x`.
    fn current_moments(&self, x: &Tensor) -> Result<Moments, CoreError> {
        let Some(moments) = &self.moments else {
            // Two tensors, not one shared: the CPU step updates them in place.
            return Ok(Moments { m: x.zeros_like()?, v: x.zeros_like()? });
        };
        if moments.m.shape() != x.shape() {
            return Err(CoreError::BadState(format!(
                "Adam moments have shape {:?} but the image has shape {:?}",
                moments.m.dims(),
                x.dims()
            )));
        }
        // A restored checkpoint is loaded on the CPU; moving is a no-op once on x's device.
        let (m, v) = (moments.m.to_device(x.device())?, moments.v.to_device(x.device())?);
        if self.shared.get() {
            return Ok(Moments { m: m.copy()?, v: v.copy()? });
        }
        Ok(Moments { m, v })
    }
}

impl Optimizer for Adam {
    fn step(&mut self, x: &mut Tensor, objective: &mut dyn Objective) -> Result<Step, CoreError> {
        let Moments { m, v } = self.current_moments(x)?;
        let t = self.t + 1;
        let (loss, grad) = objective.evaluate(x)?;
        if !loss.is_finite() {
            return Err(CoreError::NonFinite { value: loss, evaluation: t as usize });
        }
        // The objective may hand back a gradient still attached to its autograd graph.
        let grad = grad.detach();
        let AdamConfig { lr, beta1, beta2, eps } = self.config;

        let bias_correction1 = 1.0 - beta1.powf(t as f64);
        let bias_correction2 = 1.0 - beta2.powf(t as f64);
        let step_size = lr / bias_correction1;
        let grad = if grad.is_contiguous() { grad } else { grad.contiguous()? };
        if in_place::applies(&[x, &m, &v, &grad]) {
            let c = in_place::Coefficients {
                weight: 1.0 - beta1,
                beta2,
                denominator_scale: 1.0 / bias_correction2.sqrt(),
                eps,
                step_size,
            };
            let next = in_place::step(x, &m, &v, &grad, c)?;
            drop(grad);
            *x = next;
            self.moments = Some(Moments { m, v });
            self.shared.set(false);
            self.t = t;
            return Ok(Step { loss, evaluations: 1, converged: false });
        }

        // PyTorch updates m with `lerp`, which switches formula at weight 0.5 for accuracy.
        let weight = 1.0 - beta1;
        let m = if weight < 0.5 {
            (&m + (&grad - &m)?.affine(weight, 0.0)?)?
        } else {
            (&grad - (&grad - &m)?.affine(1.0 - weight, 0.0)?)?
        };
        let v = (v.affine(beta2, 0.0)? + grad.sqr()?.affine(1.0 - beta2, 0.0)?)?;

        let denominator = v.sqrt()?.affine(1.0 / bias_correction2.sqrt(), eps)?;
        let update = (&m / &denominator)?.affine(step_size, 0.0)?;
        *x = (x.detach() - update)?;

        self.moments = Some(Moments { m, v });
        self.t = t;
        Ok(Step { loss, evaluations: 1, converged: false })
    }

    fn reset(&mut self) {
        self.moments = None;
        self.t = 0;
    }

    fn state(&self) -> OptimizerState {
        let mut state = OptimizerState::default();
        if let Some(Moments { m, v }) = &self.moments {
            state.tensors.push(("m".to_string(), m.clone()));
            state.tensors.push(("v".to_string(), v.clone()));
            self.shared.set(true);
        }
        state.scalars.push(("t".to_string(), self.t as f64));
        state
    }

    fn restore(&mut self, state: &OptimizerState) -> Result<(), CoreError> {
        let t = state.scalar("t")?;
        // 2^53: beyond it f64 no longer holds every integer, so the count cannot be trusted.
        if !(t >= 0.0 && t.fract() == 0.0 && t <= 9_007_199_254_740_992.0) {
            return Err(CoreError::BadState(format!(
                "Adam step count `t` must be a non-negative integer, got {t}"
            )));
        }
        if t == 0.0 {
            self.reset();
            return Ok(());
        }
        let m = state.tensor("m")?;
        let v = state.tensor("v")?;
        if m.shape() != v.shape() {
            return Err(CoreError::BadState(format!(
                "Adam moments `m` {:?} and `v` {:?} differ in shape",
                m.dims(),
                v.dims()
            )));
        }
        // The image's shape is checked at the next step, when the image is known.
        self.moments = Some(Moments { m: m.clone(), v: v.clone() });
        self.shared.set(true);
        self.t = t as u64;
        Ok(())
    }

    /// The moments `m` and `v`.
    fn state_bytes(&self, elements: u64) -> u64 {
        2 * 4 * elements
    }

    /// The new image beside the old: on the CPU the moments are updated in place (elsewhere the
    /// tensor form's temporaries are on the GPU, whose memory is not the planner's).
    fn step_bytes(&self, elements: u64) -> u64 {
        4 * elements
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_core::candle_core::{Device, Tensor};
    use easel_core::toml::Table;
    use easel_testkit::Quadratic;

    const X0: [f32; 4] = [1.0, -2.0, 0.5, 3.0];
    const C: [f32; 4] = [0.0, 1.0, 0.5, -1.0];

    fn setup() -> (Tensor, Quadratic) {
        let x = Tensor::new(&X0, &Device::Cpu).unwrap();
        (x, Quadratic::new(&C))
    }

    fn adam(lr: f64) -> Adam {
        Adam::new(AdamConfig { lr, ..AdamConfig::default() })
    }

    /// Textbook Adam on the quadratic, element by element in f64.
    fn reference(steps: usize, lr: f64) -> (Vec<f64>, Vec<f64>) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let mut x: Vec<f64> = X0.iter().map(|&v| v as f64).collect();
        let c: Vec<f64> = C.iter().map(|&v| v as f64).collect();
        let (mut m, mut v) = (vec![0.0; 4], vec![0.0; 4]);
        let mut losses = Vec::new();
        for t in 1..=steps {
            losses.push(x.iter().zip(&c).map(|(x, c)| (x - c).powi(2)).sum());
            for i in 0..4 {
                let g = 2.0 * (x[i] - c[i]);
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let mhat = m[i] / (1.0 - b1.powi(t as i32));
                let vhat = v[i] / (1.0 - b2.powi(t as i32));
                x[i] -= lr * mhat / (vhat.sqrt() + eps);
            }
        }
        (x, losses)
    }

    fn values(x: &Tensor) -> Vec<f32> {
        x.to_vec1::<f32>().unwrap()
    }

    #[test]
    fn a_state_handed_out_is_not_changed_by_later_steps() {
        let (mut x, mut q) = setup();
        let mut opt = adam(0.1);
        opt.step(&mut x, &mut q).unwrap();
        let saved = opt.state();
        let before: Vec<Vec<f32>> =
            saved.tensors.iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap()).collect();
        opt.step(&mut x, &mut q).unwrap();
        opt.step(&mut x, &mut q).unwrap();
        let after: Vec<Vec<f32>> =
            saved.tensors.iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap()).collect();
        assert_eq!(before, after, "the moments are updated in place, but only once they are Adam's alone");
        // And restoring it gives the run from there again.
        let mut again = adam(0.1);
        again.restore(&saved).unwrap();
        assert_eq!(again.state().tensors.len(), 2);
    }

    #[test]
    fn first_step_moves_each_coordinate_by_lr_against_the_gradient() {
        let (mut x, mut f) = setup();
        let mut opt = adam(0.01);
        let step = opt.step(&mut x, &mut f).unwrap();
        // Loss before the step: 1 + 9 + 0 + 16. At t = 1 bias correction makes
        // mhat / sqrt(vhat) = g / |g|, so x moves by lr * sign(g); zero gradient stays put.
        assert_eq!(step, Step { loss: 26.0, evaluations: 1, converged: false });
        let expected = [0.99f32, -1.99, 0.5, 2.99];
        for (got, want) in values(&x).iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn three_steps_match_the_textbook_formula() {
        let (mut x, mut f) = setup();
        let mut opt = adam(0.01);
        let mut losses = Vec::new();
        for _ in 0..3 {
            losses.push(opt.step(&mut x, &mut f).unwrap().loss);
        }
        let (want_x, want_losses) = reference(3, 0.01);
        // f32 arithmetic on values of order 1: agreement to 1e-5 is rounding, not a formula slip.
        for (got, want) in values(&x).iter().zip(&want_x) {
            assert!((*got as f64 - want).abs() < 1e-5, "x: {got} vs {want}");
        }
        for (got, want) in losses.iter().zip(&want_losses) {
            assert!((got - want).abs() < 1e-4, "loss: {got} vs {want}");
        }
        // Moving by about lr per step towards c, three steps in: x ~ x0 - 0.03 sign(g).
        assert!((values(&x)[0] - 0.97).abs() < 1e-4);
        assert_eq!(opt.state().scalar("t").unwrap(), 3.0);
    }

    #[test]
    fn converges_on_the_quadratic() {
        let (mut x, mut f) = setup();
        let mut opt = adam(0.05);
        let first = opt.step(&mut x, &mut f).unwrap().loss;
        let mut last = first;
        for _ in 0..500 {
            last = opt.step(&mut x, &mut f).unwrap().loss;
        }
        assert!(last < 1e-3 * first, "{first} -> {last}");
    }

    #[test]
    fn restored_state_continues_bit_identically() {
        let (mut x, mut f) = setup();
        let mut opt = adam(0.01);
        for _ in 0..3 {
            opt.step(&mut x, &mut f).unwrap();
        }
        let saved = opt.state();
        let x_saved = x.clone();
        for _ in 0..3 {
            opt.step(&mut x, &mut f).unwrap();
        }

        let mut resumed = adam(0.01);
        resumed.restore(&saved).unwrap();
        let mut y = x_saved;
        for _ in 0..3 {
            resumed.step(&mut y, &mut f).unwrap();
        }
        let (a, b) = (values(&x), values(&y));
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "{a:?} vs {b:?}");
        assert_eq!(resumed.state().scalar("t").unwrap(), 6.0);
    }

    #[test]
    fn reset_forgets_moments() {
        let (mut x, mut f) = setup();
        let mut opt = adam(0.01);
        opt.step(&mut x, &mut f).unwrap();
        opt.reset();
        let state = opt.state();
        assert!(state.tensors.is_empty());
        assert_eq!(state.scalar("t").unwrap(), 0.0);
        // After a reset the first step is again a sign step of size lr.
        let before = values(&x);
        opt.step(&mut x, &mut f).unwrap();
        assert!((before[0] - values(&x)[0] - 0.01).abs() < 1e-6);
    }

    #[test]
    fn restored_moments_of_another_shape_are_rejected_at_the_next_step() {
        let (mut x, mut f) = setup();
        let mut opt = adam(0.01);
        opt.step(&mut x, &mut f).unwrap();
        let saved = opt.state();

        let mut other = adam(0.01);
        other.restore(&saved).unwrap();
        let mut small = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let mut g = Quadratic::new(&[0.0, 0.0]);
        let err = other.step(&mut small, &mut g).unwrap_err();
        assert!(matches!(err, CoreError::BadState(_)), "{err}");

        let mut broken = saved.clone();
        broken.scalars[0].1 = 1.5;
        assert!(matches!(adam(0.01).restore(&broken), Err(CoreError::BadState(_))));
        broken.scalars[0].1 = 2.0;
        broken.tensors.retain(|(n, _)| n != "v");
        assert!(matches!(adam(0.01).restore(&broken), Err(CoreError::BadState(_))));
        assert!(adam(0.01).restore(&Adam::new(AdamConfig::default()).state()).is_ok());
    }

    #[test]
    fn non_finite_loss_is_reported() {
        struct Exploding;
        impl Objective for Exploding {
            fn evaluate(&mut self, x: &Tensor) -> Result<(f64, Tensor), CoreError> {
                Ok((f64::INFINITY, x.zeros_like()?))
            }
        }
        let (mut x, _) = setup();
        let err = adam(0.01).step(&mut x, &mut Exploding).unwrap_err();
        assert!(matches!(err, CoreError::NonFinite { evaluation: 1, .. }), "{err}");
    }

    #[test]
    fn options_are_read_and_checked() {
        let table: Table = "lr = 0.5\nbeta1 = 0\nbeta2 = 0.99\neps = 1e-6".parse().unwrap();
        let mut options = Options::new(&table, "optimizer");
        let _ = AdamFactory.build(&mut options);
        assert!(options.finish().is_empty());

        let table: Table = "lr = -1\nbeta1 = 1\nbeta2 = \"x\"\neps = 0".parse().unwrap();
        let mut options = Options::new(&table, "optimizer");
        let _ = AdamFactory.build(&mut options);
        let errors: Vec<String> = options.finish().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            [
                "optimizer.lr: must be > 0, got -1",
                "optimizer.beta1: must be in [0, 1), got 1",
                "optimizer.beta2: expected a number, got string \"x\"",
                "optimizer.eps: must be > 0, got 0",
            ]
        );
    }

    #[test]
    fn documented_defaults_are_the_defaults() {
        let d = AdamConfig::default();
        let documented: Vec<_> = OPTIONS.iter().map(|o| (o.key, o.default)).collect();
        let number = OptionDefault::Number;
        assert_eq!(
            documented,
            [
                ("lr", number(d.lr)),
                ("beta1", number(d.beta1)),
                ("beta2", number(d.beta2)),
                ("eps", number(d.eps))
            ]
        );
        assert_eq!(AdamFactory.name(), "adam");
    }
}
