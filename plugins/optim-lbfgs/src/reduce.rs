//! Tensor reductions to host scalars (dot product, sums, max-norm) that work on any candle device.
//!
//! On the CPU the elements are added by the loops below, in an order the code fixes: candle's
//! f32 `sum` adds SIMD partial sums in an order that depends on the vector unit (AVX on
//! x86-64, NEON on aarch64, none elsewhere), so the same run took a different L-BFGS path on
//! each architecture. Other devices keep the tensor ops, so that vectors stay on the GPU.

use easel_core::candle_core::{DType, Device, Tensor};
use easel_core::CoreError;

/// Independent f64 accumulators in [`fold`]: element `i` goes to accumulator `i % LANES`, and
/// the accumulators are added left to right at the end. Fixed here rather than left to the
/// compiler, it also lets the loop use whole vector registers without changing the result.
const LANES: usize = 8;

/// Length of the blocks summed first in [`device_sum`].
///
/// Off the CPU each block is summed in f32; summing 1024-element blocks and then the block
/// sums keeps the dot products of a megapixel image close to what a pairwise (BLAS, PyTorch)
/// sum gives.
const SUM_BLOCK: usize = 1024;

/// `sum_i term(i)` in f64 for `i` in `0..n`, in [`LANES`] interleaved partial sums.
#[inline(always)]
fn fold(n: usize, term: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let whole = n - n % LANES;
    for base in (0..whole).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += term(base + l);
        }
    }
    for (l, a) in acc.iter_mut().enumerate().take(n - whole) {
        *a += term(whole + l);
    }
    acc.iter().fold(0.0, |total, a| total + a)
}

/// A tensor's elements in CPU memory, in row-major order, if it lives there.
fn host(t: &Tensor) -> Result<Option<Vec<f32>>, CoreError> {
    if !matches!(t.device(), Device::Cpu) {
        return Ok(None);
    }
    Ok(Some(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
}

/// The sum of all elements off the CPU: f32 blocks, then their sums.
fn device_sum(t: &Tensor) -> Result<f64, CoreError> {
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

/// The dot product of two tensors of the same shape; on the CPU each product is exact in f64.
pub(crate) fn dot(a: &Tensor, b: &Tensor) -> Result<f64, CoreError> {
    if a.shape() != b.shape() {
        return Err(CoreError::BadState(format!(
            "L-BFGS dot product of shapes {:?} and {:?}",
            a.shape(),
            b.shape()
        )));
    }
    match (host(a)?, host(b)?) {
        (Some(x), Some(y)) => Ok(fold(x.len(), |i| f64::from(x[i]) * f64::from(y[i]))),
        _ => device_sum(&(a * b)?),
    }
}

/// The largest absolute element (the max-norm); 0 for an empty tensor.
pub(crate) fn max_abs(t: &Tensor) -> Result<f64, CoreError> {
    if t.elem_count() == 0 {
        return Ok(0.0);
    }
    // A maximum does not depend on the order, so candle's reduction serves on every device.
    scalar(&t.abs()?.max_all()?)
}

/// The sum of absolute elements (the 1-norm).
pub(crate) fn abs_sum(t: &Tensor) -> Result<f64, CoreError> {
    match host(t)? {
        Some(x) => Ok(fold(x.len(), |i| f64::from(x[i].abs()))),
        None => device_sum(&t.abs()?),
    }
}

/// A rank-0 tensor's value; read through f32, which every candle backend supports.
fn scalar(t: &Tensor) -> Result<f64, CoreError> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(dot(&small, &ta).is_err());
    }

    #[test]
    fn cpu_sums_are_added_in_the_documented_order() {
        // Values whose f64 sum rounds, so that another order would (almost surely) give other
        // bits: element i goes to partial sum i % 8, and the partial sums are added in turn.
        let n = 1003;
        let a: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 3.0).collect();
        let b: Vec<f32> = (0..n).map(|i| 1.0 + (i as f32).sin() * 1e3).collect();
        let mut partial = [0f64; 8];
        let mut abs_partial = [0f64; 8];
        for i in 0..n {
            partial[i % 8] += f64::from(a[i]) * f64::from(b[i]);
            abs_partial[i % 8] += f64::from(a[i].abs());
        }
        let (mut want_dot, mut want_abs) = (0.0, 0.0);
        for l in 0..8 {
            want_dot += partial[l];
            want_abs += abs_partial[l];
        }
        let ta = Tensor::from_vec(a, n, &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b, n, &Device::Cpu).unwrap();
        assert_eq!(dot(&ta, &tb).unwrap().to_bits(), want_dot.to_bits());
        assert_eq!(abs_sum(&ta).unwrap().to_bits(), want_abs.to_bits());
        // A strided view is read in row-major order like its contiguous copy.
        let wide =
            Tensor::from_vec((0..12).map(|i| i as f32 * 0.1).collect::<Vec<_>>(), (3, 4), &Device::Cpu)
                .unwrap();
        let t = wide.t().unwrap();
        assert_eq!(dot(&t, &t).unwrap(), dot(&t.contiguous().unwrap(), &t.contiguous().unwrap()).unwrap());
    }
}
