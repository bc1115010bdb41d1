//! Tests of the L-BFGS optimiser on small objectives with known minima.

use super::*;
use easel_core::candle_core::{Device, Tensor};
use easel_core::toml::Table;
use easel_testkit::Quadratic;

/// A quadratic in ten coordinates with curvatures from 0.5 to 10, in no particular order.
fn quadratic() -> Quadratic {
    let a = [0.5f32, 3.0, 1.0, 7.0, 2.0, 10.0, 0.8, 4.0, 1.5, 6.0];
    let c: Vec<f32> = (0..10).map(|i| 1.0 + 0.3 * (i as f32 - 4.5)).collect();
    Quadratic::with_curvatures(&a, &c)
}

/// f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 on a tensor of shape [2]; minimum 0 at (1, 1).
struct Rosenbrock;

impl Objective for Rosenbrock {
    fn evaluate(&mut self, p: &Tensor) -> Result<(f64, Tensor), CoreError> {
        let x = p.narrow(0, 0, 1)?;
        let y = p.narrow(0, 1, 1)?;
        let one_minus_x = x.affine(-1.0, 1.0)?;
        let valley = (&y - x.sqr()?)?;
        let loss = (one_minus_x.sqr()? + valley.sqr()?.affine(100.0, 0.0)?)?;
        let dx = (one_minus_x.affine(-2.0, 0.0)? - (&x * &valley)?.affine(400.0, 0.0)?)?;
        let dy = valley.affine(200.0, 0.0)?;
        let loss = loss.sum_all()?.to_scalar::<f32>()? as f64;
        Ok((loss, Tensor::cat(&[dx, dy], 0)?))
    }
}

fn lbfgs(config: LbfgsConfig) -> Lbfgs {
    Lbfgs::new(config)
}

fn bits(x: &Tensor) -> Vec<u32> {
    x.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn minimises_a_quadratic_in_twenty_iterations() {
    let mut f = quadratic();
    let mut x = f.origin();
    let mut opt = lbfgs(LbfgsConfig::default());
    let initial = opt.step(&mut x, &mut f).unwrap().loss;
    for _ in 1..20 {
        opt.step(&mut x, &mut f).unwrap();
    }
    let (loss, _) = f.evaluate(&x).unwrap();
    assert!(loss < 1e-8, "loss {initial} -> {loss}");
}

#[test]
fn step_reports_its_evaluations_and_the_starting_loss() {
    let mut f = quadratic();
    let mut x = f.origin();
    let mut opt = lbfgs(LbfgsConfig::default());
    let mut reported = 0;
    for _ in 0..5 {
        let (before, _) = quadratic().evaluate(&x).unwrap();
        let step = opt.step(&mut x, &mut f).unwrap();
        assert_eq!(step.loss, before);
        reported += step.evaluations;
    }
    assert_eq!(reported, f.evaluations);
}

#[test]
fn solves_rosenbrock_from_the_classic_start() {
    let mut x = Tensor::new(&[-1.2f32, 1.0], &Device::Cpu).unwrap();
    let mut opt = lbfgs(LbfgsConfig::default());
    let mut iterations = 0;
    while iterations < 100 {
        iterations += 1;
        if opt.step(&mut x, &mut Rosenbrock).unwrap().converged {
            break;
        }
    }
    let p = x.to_vec1::<f32>().unwrap();
    assert!((p[0] - 1.0).abs() < 1e-4 && (p[1] - 1.0).abs() < 1e-4, "{p:?} after {iterations} iterations");
}

#[test]
fn fixed_steps_still_decrease_the_quadratic() {
    let mut f = quadratic();
    let mut x = f.origin();
    let config = LbfgsConfig { line_search: LineSearch::Fixed, lr: 0.5, ..LbfgsConfig::default() };
    let mut opt = lbfgs(config);
    let initial = opt.step(&mut x, &mut f).unwrap();
    assert_eq!(initial.evaluations, 2);
    for _ in 0..30 {
        // One evaluation per step, none once converged (the direction no longer descends).
        assert!(opt.step(&mut x, &mut f).unwrap().evaluations <= 1);
    }
    let (loss, _) = f.evaluate(&x).unwrap();
    assert!(loss < 1e-2 * initial.loss, "{} -> {loss}", initial.loss);
}

#[test]
fn restored_state_continues_bit_identically() {
    let mut f = quadratic();
    let mut x = f.origin();
    let config = LbfgsConfig { history: 2, ..LbfgsConfig::default() };
    let mut opt = lbfgs(config);
    for _ in 0..3 {
        opt.step(&mut x, &mut f).unwrap();
    }
    let saved = opt.state();
    assert_eq!(saved.scalar("history_len").unwrap(), 2.0, "history is capped");
    let x_saved = x.copy().unwrap();
    let mut steps = Vec::new();
    for _ in 0..3 {
        steps.push(opt.step(&mut x, &mut f).unwrap());
    }

    let mut resumed = lbfgs(config);
    resumed.restore(&saved).unwrap();
    let mut y = x_saved;
    let mut g = quadratic();
    let mut resumed_steps = Vec::new();
    for _ in 0..3 {
        resumed_steps.push(resumed.step(&mut y, &mut g).unwrap());
    }
    assert_eq!(bits(&x), bits(&y));
    assert_eq!(steps, resumed_steps);
    assert_eq!(opt.state().scalar("func_evals").unwrap(), resumed.state().scalar("func_evals").unwrap());
}

#[test]
fn reset_and_a_replaced_image_invalidate_the_cached_gradient() {
    let mut f = quadratic();
    let mut x = f.origin();
    let mut opt = lbfgs(LbfgsConfig::default());
    opt.step(&mut x, &mut f).unwrap();

    let before = f.evaluations;
    let step = opt.step(&mut x, &mut f).unwrap();
    assert_eq!(step.evaluations, f.evaluations - before);

    // A new tensor, even with equal values, is evaluated again before stepping.
    let mut replaced = x.copy().unwrap();
    let before = f.evaluations;
    let step = opt.step(&mut replaced, &mut f).unwrap();
    assert_eq!(step.evaluations, f.evaluations - before);
    assert!(opt.state().scalar("n_iter").unwrap() == 3.0);

    opt.reset();
    let state = opt.state();
    assert!(state.tensors.is_empty(), "reset clears history and cache");
    assert_eq!(state.scalar("n_iter").unwrap(), 0.0);
    let before = f.evaluations;
    let step = opt.step(&mut replaced, &mut f).unwrap();
    assert_eq!(step.evaluations, f.evaluations - before);
    assert!(step.evaluations >= 2, "evaluates the start, then the line search");
}

#[test]
fn reports_convergence_at_the_minimum_without_moving() {
    let mut f = quadratic();
    let mut x = f.minimum().clone();
    let step = lbfgs(LbfgsConfig::default()).step(&mut x, &mut f).unwrap();
    assert_eq!(step, Step { loss: 0.0, evaluations: 1, converged: true });
    assert_eq!(bits(&x), bits(f.minimum()));
}

#[test]
fn state_of_another_shape_or_incomplete_is_rejected() {
    let mut f = quadratic();
    let mut x = f.origin();
    let mut opt = lbfgs(LbfgsConfig::default());
    opt.step(&mut x, &mut f).unwrap();
    opt.step(&mut x, &mut f).unwrap();
    let saved = opt.state();

    let mut other = lbfgs(LbfgsConfig::default());
    other.restore(&saved).unwrap();
    let mut small = Tensor::new(&[0f32, 0.0], &Device::Cpu).unwrap();
    let err = other.step(&mut small, &mut Rosenbrock).unwrap_err();
    assert!(matches!(err, CoreError::BadState(_)), "{err}");

    let mut missing = saved.clone();
    missing.tensors.retain(|(name, _)| name != "y0");
    let err = lbfgs(LbfgsConfig::default()).restore(&missing).unwrap_err();
    assert!(err.to_string().contains("y0"), "{err}");

    let mut fractional = saved.clone();
    for (name, value) in &mut fractional.scalars {
        if name == "n_iter" {
            *value = 2.5;
        }
    }
    assert!(matches!(lbfgs(LbfgsConfig::default()).restore(&fractional), Err(CoreError::BadState(_))));
    assert!(lbfgs(LbfgsConfig::default()).restore(&Lbfgs::new(LbfgsConfig::default()).state()).is_ok());
}

#[test]
fn non_finite_loss_is_reported_with_its_evaluation() {
    struct Overflowing(usize);
    impl Objective for Overflowing {
        fn evaluate(&mut self, x: &Tensor) -> Result<(f64, Tensor), CoreError> {
            self.0 += 1;
            let loss = if self.0 == 2 { f64::INFINITY } else { 1.0 };
            Ok((loss, x.ones_like()?))
        }
    }
    let mut x = Tensor::new(&[0f32, 0.0], &Device::Cpu).unwrap();
    let err = lbfgs(LbfgsConfig::default()).step(&mut x, &mut Overflowing(0)).unwrap_err();
    assert!(matches!(err, CoreError::NonFinite { evaluation: 2, .. }), "{err}");
}

#[test]
fn options_are_read_and_every_problem_reported_with_its_path() {
    let table: Table = "history = 5\nlr = 0.5\nline_search = \"none\"\ntolerance_grad = 0\n\
                        tolerance_change = 1e-6\nmax_evals_per_step = 3"
        .parse()
        .unwrap();
    let mut options = Options::new(&table, "optimizer");
    let _ = LbfgsFactory.build(&mut options);
    assert!(options.finish().is_empty());

    let table: Table = "history = 0\nlr = 0\nline_search = \"backtracking\"\ntolerance_grad = -1\n\
                        tolerance_change = \"small\"\nmax_evals_per_step = 1001"
        .parse()
        .unwrap();
    let mut options = Options::new(&table, "optimizer");
    let _ = LbfgsFactory.build(&mut options);
    let errors: Vec<String> = options.finish().iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errors,
        [
            "optimizer.history: must be in [1, 1000], got 0",
            "optimizer.lr: must be > 0, got 0",
            "optimizer.line_search: unknown value \"backtracking\"; expected one of: strong_wolfe, none",
            "optimizer.tolerance_grad: must be >= 0, got -1",
            "optimizer.tolerance_change: expected a number, got string \"small\"",
            "optimizer.max_evals_per_step: must be in [1, 1000], got 1001",
        ]
    );
}

#[test]
fn documented_defaults_are_the_defaults() {
    let d = LbfgsConfig::default();
    let documented: Vec<_> = OPTIONS.iter().map(|o| (o.key, o.default)).collect();
    assert_eq!(
        documented,
        [
            ("history", OptionDefault::Integer(d.history as u64)),
            ("lr", OptionDefault::Number(d.lr)),
            ("line_search", OptionDefault::Name("strong_wolfe")),
            ("tolerance_grad", OptionDefault::Number(d.tolerance_grad)),
            ("tolerance_change", OptionDefault::Number(d.tolerance_change)),
            ("max_evals_per_step", OptionDefault::Integer(d.max_evals_per_step as u64)),
        ]
    );
    assert_eq!(d.line_search, LineSearch::StrongWolfe);
    // Every rule is chosen by its own name.
    for rule in LineSearch::ALL {
        let table: Table = format!("line_search = \"{}\"", rule.name()).parse().unwrap();
        let mut options = Options::new(&table, "optimizer");
        let _ = LbfgsFactory.build(&mut options);
        assert!(options.finish().is_empty(), "{rule:?}");
    }
    assert_eq!(LbfgsFactory.name(), "lbfgs");
}
