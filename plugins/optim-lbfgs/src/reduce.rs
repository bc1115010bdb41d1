//! Tensor reductions to host scalars (dot product, sums, max-norm) that work on any candle device.

use easel_core::candle_core::{DType, Tensor};
use easel_core::CoreError;

/// Length of the blocks summed first in [`sum`].
///
/// candle's CPU reduction adds element after element in f32, so its rounding error grows with
/// the length; summing 1024-element blocks and then the block sums keeps the dot products of
/// a megapixel image close to what a pairwise (BLAS, PyTorch) sum gives.
const SUM_BLOCK: usize = 1024;

/// The sum of all elements, as f64.
pub(crate) fn sum(t: &Tensor) -> Result<f64, CoreError> {
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let total = if n <= SUM_BLOCK {
        flat.sum_all()?
    } else {
        let whole = n - n % SUM_BLOCK;
        let blocks = flat.narrow(0, 0, whole)?.reshape((whole / SUM_BLOCK, SUM_BLOCK))?.sum(1)?.sum_all()?;
        if whole == n {
            blocks
        } else {
            (blocks + flat.narrow(0, whole, n - whole)?.sum_all()?)?
        }
    };
    scalar(&total)
}

/// The dot product of two tensors of the same shape.
pub(crate) fn dot(a: &Tensor, b: &Tensor) -> Result<f64, CoreError> {
    sum(&(a * b)?)
}

/// The largest absolute element (the max-norm); 0 for an empty tensor.
pub(crate) fn max_abs(t: &Tensor) -> Result<f64, CoreError> {
    if t.elem_count() == 0 {
        return Ok(0.0);
    }
    scalar(&t.abs()?.max_all()?)
}

/// The sum of absolute elements (the 1-norm).
pub(crate) fn abs_sum(t: &Tensor) -> Result<f64, CoreError> {
    sum(&t.abs()?)
}

/// A rank-0 tensor's value; read through f32, which every candle backend supports.
fn scalar(t: &Tensor) -> Result<f64, CoreError> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_core::candle_core::Device;

    #[test]
    fn reductions_match_host_arithmetic() {
        // 2500 elements: two whole blocks and a remainder of 452.
        let a: Vec<f32> = (0..2500).map(|i| ((i % 7) as f32 - 3.0) * 0.5).collect();
        let b: Vec<f32> = (0..2500).map(|i| ((i % 5) as f32) - 2.0).collect();
        let want_dot: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
        let want_abs: f64 = a.iter().map(|x| x.abs() as f64).sum();
        let ta = Tensor::from_vec(a, (50, 50), &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b, (50, 50), &Device::Cpu).unwrap();
        assert_eq!(dot(&ta, &tb).unwrap(), want_dot);
        assert_eq!(abs_sum(&ta).unwrap(), want_abs);
        assert_eq!(max_abs(&ta).unwrap(), 1.5);
        let small = Tensor::new(&[3f32, -4.0], &Device::Cpu).unwrap();
        assert_eq!(dot(&small, &small).unwrap(), 25.0);
        assert_eq!(max_abs(&small).unwrap(), 4.0);
    }
}
