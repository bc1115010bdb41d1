//! How losses take sums over many elements: in f64 where the device has it, else in f32.
//!
//! Features are f32. Loss values and the Gram matrices (`G - A` shrinks as the style is
//! matched) are summed in f64 on the CPU and on CUDA, which keeps them close to a float64
//! reference at little cost; Metal has no f64, so there they are summed in f32.

use candle_core::{DType, Device, Tensor};

use crate::CoreError;

/// The float type that sums over many elements are taken in on `device`.
pub fn sum_dtype(device: &Device) -> DType {
    if device.is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

/// The value of a scalar (rank 0, or one element) tensor of any float type on any device.
pub fn scalar_f64(t: &Tensor) -> Result<f64, CoreError> {
    let t = t.flatten_all()?.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    Ok(t.to_vec1::<f64>()?.first().copied().unwrap_or(0.0))
}

/// `sum(t^2)`, taken in [`sum_dtype`] on `t`'s device; on the CPU (f32 or f64) by a plain
/// loop in f64 over the elements in order, without a converted copy: an order fixed here,
/// whatever the vector unit (candle's f32 sums add SIMD partial sums in an order that
/// depends on the architecture; its f64 sum is this same sequential loop).
pub fn sum_of_squares(t: &Tensor) -> Result<f64, CoreError> {
    if t.device().is_cpu() {
        match t.dtype() {
            DType::F32 => {
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                return Ok(values.iter().map(|&v| f64::from(v) * f64::from(v)).sum());
            }
            DType::F64 => {
                let values = t.flatten_all()?.to_vec1::<f64>()?;
                return Ok(values.iter().map(|&v| v * v).sum());
            }
            _ => {}
        }
    }
    scalar_f64(&t.to_dtype(sum_dtype(t.device()))?.sqr()?.sum_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_in_f64_on_the_cpu() -> Result<(), CoreError> {
        assert_eq!(sum_dtype(&Device::Cpu), DType::F64);
        // 1 + 1e-8 is 1 in f32; 2^24 + 1 is not an f32 either.
        let values = [1.0f32, 1e-4, 4096.0, 1.0];
        let t = Tensor::from_slice(&values, 4, &Device::Cpu)?;
        let exact: f64 = values.iter().map(|&v| f64::from(v).powi(2)).sum();
        assert_eq!(sum_of_squares(&t)?, exact);
        // The f64 loop, and the tensor-op path (other devices, and other float types), agree.
        assert_eq!(sum_of_squares(&t.to_dtype(DType::F64)?)?, exact);
        // Many values whose sum rounds: added left to right, in f64.
        let many: Vec<f64> = (0..5000).map(|i| ((i * 7919 % 1000) as f64 - 500.0) / 7.0).collect();
        let left_to_right = many.iter().fold(0.0, |total, v| total + v * v);
        let t = Tensor::from_slice(&many, (50, 100), &Device::Cpu)?;
        assert_eq!(sum_of_squares(&t)?.to_bits(), left_to_right.to_bits());
        assert_eq!(sum_of_squares(&t.t()?)?.to_bits(), sum_of_squares(&t.t()?.contiguous()?)?.to_bits());
        assert_eq!(scalar_f64(&Tensor::new(2.5f32, &Device::Cpu)?)?, 2.5);
        Ok(())
    }
}
