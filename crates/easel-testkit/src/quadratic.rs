//! A quadratic objective with a known minimum, for the optimisers' tests.

use easel_core::candle_core::{Device, Tensor};
use easel_core::{CoreError, Objective};

/// `f(x) = sum a_i (x_i - c_i)^2`, gradient `2 a (x - c)`, minimum 0 at `c`; counts its
/// evaluations. The loss is summed in f32, as the image's dtype.
pub struct Quadratic {
    a: Tensor,
    c: Tensor,
    /// Calls of [`Objective::evaluate`] so far.
    pub evaluations: usize,
}

impl Quadratic {
    /// Unit curvature, `f(x) = sum (x_i - c_i)^2`, on the CPU.
    pub fn new(c: &[f32]) -> Self {
        Self::with_curvatures(&vec![1.0; c.len()], c)
    }

    /// Curvature `a_i` along coordinate `i`, on the CPU.
    ///
    /// # Panics
    /// When `a` and `c` differ in length.
    pub fn with_curvatures(a: &[f32], c: &[f32]) -> Self {
        assert_eq!(a.len(), c.len(), "one curvature per coordinate");
        let a = Tensor::new(a, &Device::Cpu).expect("a vector on the CPU");
        let c = Tensor::new(c, &Device::Cpu).expect("a vector on the CPU");
        Self { a, c, evaluations: 0 }
    }

    /// The minimiser `c`.
    pub fn minimum(&self) -> &Tensor {
        &self.c
    }

    /// The origin, a start away from the minimum.
    pub fn origin(&self) -> Tensor {
        self.c.zeros_like().expect("zeros of a CPU vector")
    }
}

impl Objective for Quadratic {
    fn evaluate(&mut self, x: &Tensor) -> Result<(f64, Tensor), CoreError> {
        self.evaluations += 1;
        let diff = (x - &self.c)?;
        let loss = (&self.a * diff.sqr()?)?.sum_all()?.to_scalar::<f32>()? as f64;
        Ok((loss, (&self.a * diff)?.affine(2.0, 0.0)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_and_gradient_follow_the_formula() {
        let mut f = Quadratic::with_curvatures(&[1.0, 3.0], &[0.5, -1.0]);
        let x = Tensor::new(&[1.5f32, 1.0], &Device::Cpu).unwrap();
        let (loss, grad) = f.evaluate(&x).unwrap();
        // 1 * 1^2 + 3 * 2^2; gradient 2 * (1 * 1, 3 * 2).
        assert_eq!(loss, 13.0);
        assert_eq!(grad.to_vec1::<f32>().unwrap(), [2.0, 12.0]);
        let (at_minimum, _) = f.evaluate(&f.minimum().clone()).unwrap();
        assert_eq!(at_minimum, 0.0);
        assert_eq!(f.evaluations, 2);
        assert_eq!(f.origin().to_vec1::<f32>().unwrap(), [0.0, 0.0]);
    }
}
