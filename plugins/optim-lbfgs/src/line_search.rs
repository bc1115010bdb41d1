//! The strong-Wolfe line search of PyTorch's `torch.optim.LBFGS` (`_strong_wolfe`, `_cubic_interpolate`).

use easel_core::candle_core::Tensor;
use easel_core::CoreError;

use crate::reduce::{dot, max_abs};

/// Sufficient-decrease (Armijo) constant.
const C1: f64 = 1e-4;
/// Curvature constant.
const C2: f64 = 0.9;

/// The loss and gradient at `x + t d` for a step length `t`.
pub(crate) type Evaluate<'a> = dyn FnMut(f64) -> Result<(f64, Tensor), CoreError> + 'a;

/// A point on the search line: its step length, loss, gradient and directional derivative.
#[derive(Clone)]
pub(crate) struct LinePoint {
    pub t: f64,
    pub loss: f64,
    pub grad: Tensor,
    pub gtd: f64,
}

/// The point a line search settled on and what it cost.
pub(crate) struct LineSearchResult {
    pub point: LinePoint,
    pub evaluations: usize,
}

/// The minimiser of the cubic through `(x1, f1)` and `(x2, f2)` with slopes `g1`, `g2`,
/// clamped to `bounds` (by default the interval between the points).
pub(crate) fn cubic_interpolate(
    (x1, f1, g1): (f64, f64, f64),
    (x2, f2, g2): (f64, f64, f64),
    bounds: Option<(f64, f64)>,
) -> f64 {
    let (low, high) = bounds.unwrap_or(if x1 <= x2 { (x1, x2) } else { (x2, x1) });
    let d1 = g1 + g2 - 3.0 * (f1 - f2) / (x1 - x2);
    let d2_square = d1 * d1 - g1 * g2;
    if d2_square >= 0.0 {
        let d2 = d2_square.sqrt();
        let min_pos = if x1 <= x2 {
            x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2.0 * d2))
        } else {
            x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2.0 * d2))
        };
        // Rust's max/min drop a NaN (0/0 when the points coincide) in favour of the bound,
        // where Python's would propagate it into the step length.
        min_pos.max(low).min(high)
    } else {
        (low + high) / 2.0
    }
}

/// Searches along `d` from the point `start` (at t = 0) beginning with step length `t`, and
/// returns a point satisfying the strong Wolfe conditions or the best one found.
///
/// `evaluate` is called at most `max_ls + 1` times: once at `t`, then once per iteration.
/// The returned point is one `evaluate` was called with, or `start` itself (t = 0) when no
/// trial did better.
pub(crate) fn strong_wolfe(
    evaluate: &mut Evaluate<'_>,
    d: &Tensor,
    t: f64,
    start: &LinePoint,
    tolerance_change: f64,
    max_ls: usize,
) -> Result<LineSearchResult, CoreError> {
    let d_norm = max_abs(d)?;
    let (f, gtd) = (start.loss, start.gtd);
    let trial = |evaluate: &mut Evaluate<'_>, t: f64| -> Result<LinePoint, CoreError> {
        let (loss, grad) = evaluate(t)?;
        let gtd = dot(&grad, d)?;
        Ok(LinePoint { t, loss, grad, gtd })
    };

    let mut new = trial(evaluate, t)?;
    let mut evaluations = 1;
    let mut prev = start.clone();
    let mut ls_iter = 0;
    let mut bracket = loop {
        if ls_iter == max_ls {
            // Out of iterations without a bracket: the zoom below picks the start or the trial.
            break [start.clone(), new];
        }
        if new.loss > f + C1 * new.t * gtd || (ls_iter > 1 && new.loss >= prev.loss) {
            break [prev, new];
        }
        if new.gtd.abs() <= -C2 * gtd {
            return Ok(LineSearchResult { point: new, evaluations });
        }
        if new.gtd >= 0.0 {
            break [prev, new];
        }
        // Still descending and sufficiently so: extrapolate beyond the current trial.
        let min_step = new.t + 0.01 * (new.t - prev.t);
        let max_step = new.t * 10.0;
        let next_t = cubic_interpolate(
            (prev.t, prev.loss, prev.gtd),
            (new.t, new.loss, new.gtd),
            Some((min_step, max_step)),
        );
        prev = new;
        new = trial(evaluate, next_t)?;
        evaluations += 1;
        ls_iter += 1;
    };

    // Zoom: shrink the bracket until a point satisfies the strong Wolfe conditions.
    let order = |b: &[LinePoint; 2]| if b[0].loss <= b[1].loss { (0, 1) } else { (1, 0) };
    let (mut low, mut high) = order(&bracket);
    let mut insufficient_progress = false;
    while ls_iter < max_ls {
        if (bracket[1].t - bracket[0].t).abs() * d_norm < tolerance_change {
            break;
        }
        let [a, b] = &bracket;
        let mut t = cubic_interpolate((a.t, a.loss, a.gtd), (b.t, b.loss, b.gtd), None);

        // A trial too close to an end of the bracket shrinks it too little; after two such
        // trials in a row (or one outside the bracket) step 10% of its width inside instead.
        let (bracket_min, bracket_max) = (a.t.min(b.t), a.t.max(b.t));
        let eps = 0.1 * (bracket_max - bracket_min);
        if (bracket_max - t).min(t - bracket_min) < eps {
            if insufficient_progress || t >= bracket_max || t <= bracket_min {
                t = if (t - bracket_max).abs() < (t - bracket_min).abs() {
                    bracket_max - eps
                } else {
                    bracket_min + eps
                };
                insufficient_progress = false;
            } else {
                insufficient_progress = true;
            }
        } else {
            insufficient_progress = false;
        }

        let new = trial(evaluate, t)?;
        evaluations += 1;
        ls_iter += 1;

        if new.loss > f + C1 * new.t * gtd || new.loss >= bracket[low].loss {
            // Not a sufficient decrease, or no better than the low end: it becomes the high end.
            bracket[high] = new;
            (low, high) = order(&bracket);
        } else {
            let done = new.gtd.abs() <= -C2 * gtd;
            if !done && new.gtd * (bracket[high].t - bracket[low].t) >= 0.0 {
                // The minimum lies on the other side of the new point: the old low becomes high.
                bracket[high] = bracket[low].clone();
            }
            bracket[low] = new;
            if done {
                break;
            }
        }
    }
    let [first, second] = bracket;
    let point = if low == 0 { first } else { second };
    Ok(LineSearchResult { point, evaluations })
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_core::candle_core::Device;

    #[test]
    fn cubic_interpolation_finds_the_minimum_of_a_cubic() {
        // f(x) = x^3 - 3x has its local minimum at x = 1, f' = 3x^2 - 3.
        let f = |x: f64| x * x * x - 3.0 * x;
        let g = |x: f64| 3.0 * x * x - 3.0;
        let t = cubic_interpolate((0.0, f(0.0), g(0.0)), (2.0, f(2.0), g(2.0)), None);
        assert!((t - 1.0).abs() < 1e-12, "{t}");
        let t = cubic_interpolate((2.0, f(2.0), g(2.0)), (0.0, f(0.0), g(0.0)), None);
        assert!((t - 1.0).abs() < 1e-12, "{t}");
        // Clamped to the bounds, and the midpoint when the cubic has no minimum.
        let t = cubic_interpolate((0.0, f(0.0), g(0.0)), (2.0, f(2.0), g(2.0)), Some((1.5, 3.0)));
        assert_eq!(t, 1.5);
        assert_eq!(cubic_interpolate((0.0, 0.0, 2.0), (1.0, 1.5, 2.0), None), 0.5);
    }

    /// The 1-D quadratic (x - 3)^2 searched from x = 0 along d = 1.
    fn search(t: f64, max_ls: usize) -> (LineSearchResult, usize) {
        let d = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let grad = Tensor::new(&[-6f32], &Device::Cpu).unwrap();
        let start = LinePoint { t: 0.0, loss: 9.0, grad, gtd: -6.0 };
        let mut calls = 0;
        let mut evaluate = |t: f64| -> Result<(f64, Tensor), CoreError> {
            calls += 1;
            let x = t - 3.0;
            Ok((x * x, Tensor::new(&[2.0 * x as f32], &Device::Cpu)?))
        };
        let result = strong_wolfe(&mut evaluate, &d, t, &start, 1e-9, max_ls).unwrap();
        (result, calls)
    }

    #[test]
    fn accepts_a_step_satisfying_the_wolfe_conditions_at_once() {
        let (result, calls) = search(3.0, 25);
        assert_eq!((result.point.t, result.point.loss, result.evaluations, calls), (3.0, 0.0, 1, 1));
    }

    #[test]
    fn extrapolates_a_short_step_and_zooms_into_a_long_one() {
        let (short, _) = search(0.01, 25);
        let (long, _) = search(100.0, 25);
        for result in [short, long] {
            // Strong Wolfe with c2 = 0.9: |f'(t)| <= 0.9 * 6.
            assert!(result.point.gtd.abs() <= 5.4, "t = {}", result.point.t);
            assert!(result.point.loss < 9.0);
            assert!(result.evaluations > 1);
        }
    }

    #[test]
    fn never_exceeds_its_evaluation_budget() {
        for max_ls in 0..4 {
            let (result, calls) = search(1e6, max_ls);
            assert_eq!(result.evaluations, calls);
            assert!(calls <= max_ls + 1, "{calls} calls for max_ls {max_ls}");
            // With no budget left the worse trial is rejected in favour of the start.
            assert!(result.point.loss <= 9.0);
        }
    }
}
