//! Checking a gradient against central finite differences of the function it belongs to.

use std::fmt::Debug;

/// How far a gradient entry `g` may be from the finite difference `fd`:
/// `|fd - g| < relative * (floor + |fd|)`.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub relative: f64,
    /// Keeps entries near zero from needing an exact match.
    pub floor: f64,
}

/// `(f(x + h e_i) - f(x - h e_i)) / 2h`: the derivative of `f` along coordinate `i` at `x`.
pub fn central_difference<E>(
    f: impl Fn(&[f32]) -> Result<f64, E>,
    x: &[f32],
    i: usize,
    h: f32,
) -> Result<f64, E> {
    let (mut up, mut down) = (x.to_vec(), x.to_vec());
    up[i] += h;
    down[i] -= h;
    Ok((f(&up)? - f(&down)?) / (2.0 * h as f64))
}

/// Asserts that `grad[i]`, the gradient of `f` at `x`, matches the central difference with
/// step `h` within `tolerance` at each of `indices`; `name` labels a failure.
///
/// # Panics
/// On the first entry that does not match.
pub fn assert_gradient_matches<E: Debug>(
    name: &str,
    f: impl Fn(&[f32]) -> Result<f64, E>,
    x: &[f32],
    grad: &[f32],
    indices: impl IntoIterator<Item = usize>,
    h: f32,
    tolerance: Tolerance,
) -> Result<(), E> {
    for i in indices {
        let fd = central_difference(&f, x, i, h)?;
        let g = grad[i] as f64;
        assert!(
            (fd - g).abs() < tolerance.relative * (tolerance.floor + fd.abs()),
            "{name}[{i}]: finite difference {fd} vs gradient {g}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cube(x: &[f32]) -> Result<f64, ()> {
        Ok(x.iter().map(|&v| (v as f64).powi(3)).sum())
    }

    #[test]
    fn the_central_difference_of_a_cube_is_its_derivative_plus_h_squared() {
        // d/dx x^3 = 3 x^2; the central difference adds exactly h^2 (in exact arithmetic).
        let fd = central_difference(cube, &[0.0, 2.0], 1, 0.5).unwrap();
        assert!((fd - (12.0 + 0.25)).abs() < 1e-9, "{fd}");
    }

    #[test]
    fn a_right_gradient_passes() {
        let x = [0.5f32, -1.0, 2.0];
        let grad: Vec<f32> = x.iter().map(|v| 3.0 * v * v).collect();
        let tolerance = Tolerance { relative: 1e-3, floor: 1.0 };
        assert_gradient_matches("cube", cube, &x, &grad, 0..3, 1e-2, tolerance).unwrap();
    }

    #[test]
    #[should_panic(expected = "cube[2]: finite difference")]
    fn a_wrong_gradient_entry_is_named() {
        let x = [0.5f32, -1.0, 2.0];
        let grad = [0.75f32, 3.0, 11.0];
        let tolerance = Tolerance { relative: 1e-3, floor: 1.0 };
        assert_gradient_matches("cube", cube, &x, &grad, 0..3, 1e-2, tolerance).unwrap();
    }
}
