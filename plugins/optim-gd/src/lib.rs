//! Plain gradient descent, `x := x - lr * dL/dx`: a baseline to compare the other optimisers with.

use easel_core::candle_core::{DType, Tensor};
use easel_core::{
    CoreError, Objective, Optimizer, OptimizerFactory, OptimizerState, OptionDefault, OptionSpec, Options,
    Step,
};

/// Builds [`GradientDescent`] from `type = "gd"`.
pub struct GdFactory;

/// This plugin, as the builtin registry (easel-plugins) adds it.
pub const PLUGIN: easel_core::Plugin = easel_core::Plugin::Optimizer(&GdFactory);

/// The learning rate when the configuration gives none.
pub const DEFAULT_LR: f64 = 0.01;

const OPTIONS: &[OptionSpec] = &[OptionSpec {
    key: "lr",
    kind: "number > 0",
    default: OptionDefault::Number(DEFAULT_LR),
    doc: "step size: the image moves by lr times the gradient each iteration",
}];

impl OptimizerFactory for GdFactory {
    fn name(&self) -> &'static str {
        "gd"
    }

    fn summary(&self) -> &'static str {
        "gradient descent: x -= lr * gradient; one evaluation per iteration, no state"
    }

    fn options(&self) -> &'static [OptionSpec] {
        OPTIONS
    }

    fn build(&self, options: &mut Options<'_>) -> Box<dyn Optimizer> {
        Box::new(GradientDescent::new(options.positive("lr", DEFAULT_LR)))
    }
}

/// Gradient descent with a fixed step size; one objective evaluation per step.
pub struct GradientDescent {
    lr: f64,
    /// Evaluations since construction or reset, to number a non-finite loss in its error.
    evaluations: usize,
}

impl GradientDescent {
    /// An optimiser with step size `lr`, used as given: [`GdFactory`] validates it.
    pub fn new(lr: f64) -> Self {
        Self { lr, evaluations: 0 }
    }

    /// The step size in use.
    pub fn lr(&self) -> f64 {
        self.lr
    }
}

impl Optimizer for GradientDescent {
    fn step(&mut self, x: &mut Tensor, objective: &mut dyn Objective) -> Result<Step, CoreError> {
        self.evaluations += 1;
        let (loss, grad) = objective.evaluate(x)?;
        if !loss.is_finite() {
            return Err(CoreError::NonFinite { value: loss, evaluation: self.evaluations });
        }
        // Reported so that the engine can stop early: with a zero gradient x never moves again.
        let converged = grad.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? == 0.0;
        *x = (x.detach() - grad.detach().affine(self.lr, 0.0)?)?;
        Ok(Step { loss, evaluations: 1, converged })
    }

    fn reset(&mut self) {
        self.evaluations = 0;
    }

    fn state(&self) -> OptimizerState {
        OptimizerState::default()
    }

    fn restore(&mut self, state: &OptimizerState) -> Result<(), CoreError> {
        if let Some(name) =
            state.tensors.iter().map(|(n, _)| n).chain(state.scalars.iter().map(|(n, _)| n)).next()
        {
            return Err(CoreError::BadState(format!(
                "gradient descent keeps no state, but the saved state holds `{name}`; \
                 was it saved by another optimiser?"
            )));
        }
        Ok(())
    }

    /// No state.
    fn state_bytes(&self, _elements: u64) -> u64 {
        0
    }

    /// The update `lr * g` and the new image.
    fn step_bytes(&self, elements: u64) -> u64 {
        2 * 4 * elements
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_core::candle_core::Device;
    use easel_core::toml::Table;
    use easel_testkit::Quadratic;

    fn setup() -> (Tensor, Quadratic) {
        let x = Tensor::new(&[1f32, -2.0, 0.5, 3.0], &Device::Cpu).unwrap();
        (x, Quadratic::new(&[0.0, 1.0, 0.5, -1.0]))
    }

    #[test]
    fn one_step_follows_the_gradient() {
        let (mut x, mut f) = setup();
        let step = GradientDescent::new(0.1).step(&mut x, &mut f).unwrap();
        assert_eq!(step, Step { loss: 26.0, evaluations: 1, converged: false });
        // x - 0.1 * 2 (x - c) = c + 0.8 (x - c).
        let want = [0.8f32, -1.4, 0.5, 2.2];
        for (got, want) in x.to_vec1::<f32>().unwrap().iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn minimises_the_quadratic() {
        let (mut x, mut f) = setup();
        let mut opt = GradientDescent::new(0.1);
        let mut last = opt.step(&mut x, &mut f).unwrap();
        for _ in 0..100 {
            last = opt.step(&mut x, &mut f).unwrap();
        }
        // The error shrinks by 0.8 per step: 26 * 0.64^100 is far below f32 resolution.
        assert!(last.loss < 1e-10, "{}", last.loss);

        let at_minimum = opt.step(&mut f.minimum().clone(), &mut f).unwrap();
        assert_eq!(at_minimum, Step { loss: 0.0, evaluations: 1, converged: true });
    }

    #[test]
    fn state_is_empty_and_foreign_state_is_rejected() {
        let mut opt = GradientDescent::new(0.1);
        let state = opt.state();
        assert!(state.tensors.is_empty() && state.scalars.is_empty());
        assert!(opt.restore(&state).is_ok());
        let foreign = OptimizerState { tensors: vec![], scalars: vec![("t".to_string(), 3.0)] };
        assert!(matches!(opt.restore(&foreign), Err(CoreError::BadState(_))));
    }

    #[test]
    fn non_finite_loss_is_reported() {
        struct Nan;
        impl Objective for Nan {
            fn evaluate(&mut self, x: &Tensor) -> Result<(f64, Tensor), CoreError> {
                Ok((f64::NAN, x.zeros_like()?))
            }
        }
        let (mut x, mut f) = setup();
        let mut opt = GradientDescent::new(0.1);
        opt.step(&mut x, &mut f).unwrap();
        let err = opt.step(&mut x, &mut Nan).unwrap_err();
        assert!(matches!(err, CoreError::NonFinite { evaluation: 2, .. }), "{err}");
    }

    #[test]
    fn options_are_read_and_checked() {
        let table: Table = "lr = 0.5".parse().unwrap();
        let mut options = Options::new(&table, "optimizer");
        let _ = GdFactory.build(&mut options);
        assert!(options.finish().is_empty());

        let table: Table = "lr = 0".parse().unwrap();
        let mut options = Options::new(&table, "optimizer");
        let _ = GdFactory.build(&mut options);
        let errors: Vec<String> = options.finish().iter().map(|e| e.to_string()).collect();
        assert_eq!(errors, ["optimizer.lr: must be > 0, got 0"]);
        assert_eq!((OPTIONS[0].key, OPTIONS[0].default), ("lr", OptionDefault::Number(DEFAULT_LR)));
        assert_eq!(GdFactory.name(), "gd");
    }
}
