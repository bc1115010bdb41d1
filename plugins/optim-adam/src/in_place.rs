//! Adam's update on the CPU without image-sized temporaries.
//!
//! The tensor form of a step allocates a new tensor for every operation, and several are alive
//! at once: about nine image-sized tensors at the peak, which at 4096 px is 1.8 GB beside the
//! rest of the job. Here the moments are updated in place, element by element, and the new
//! image is the only allocation. The arithmetic is the tensor form's, operation by operation in
//! f32 (candle's `affine(mul, add)` is `v * mul + add`; Rust never fuses a multiply and an add
//! on its own), so the results are the same bits.

use easel_core::candle_core::{self, CpuStorage, CustomOp3, InplaceOp2, Layout, Shape, Tensor};

/// The step's constants, as the tensor form converts them to f32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coefficients {
    /// `1 - beta1`, the weight of `lerp(m, g, weight)`.
    pub weight: f64,
    pub beta2: f64,
    /// `1 / sqrt(1 - beta2^t)`.
    pub denominator_scale: f64,
    pub eps: f64,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f64,
}

/// The contiguous f32 values of a tensor's storage.
fn values<'s>(storage: &'s CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<&'s [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("Adam's in-place step needs contiguous f32 {what}"),
    }
}

fn values_mut<'s>(
    storage: &'s mut CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'s mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("Adam's in-place step needs contiguous f32 {what}"),
    }
}

/// `m = lerp(m, g, weight)`, in place, with PyTorch's switch of formula at weight 0.5.
struct FirstMoment(f64);

impl InplaceOp2 for FirstMoment {
    fn name(&self) -> &'static str {
        "adam-first-moment"
    }

    fn cpu_fwd(
        &self,
        m: &mut CpuStorage,
        ml: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (m, g) = (values_mut(m, ml, "moment")?, values(g, gl, "gradient")?);
        let weight = self.0;
        if weight < 0.5 {
            let w = weight as f32;
            for (m, &g) in m.iter_mut().zip(g) {
                *m += (g - *m) * w + 0.0;
            }
        } else {
            let w = (1.0 - weight) as f32;
            for (m, &g) in m.iter_mut().zip(g) {
                *m = g - ((g - *m) * w + 0.0);
            }
        }
        Ok(())
    }
}

/// `v = beta2 v + (1 - beta2) g^2`, in place.
struct SecondMoment(f64);

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "adam-second-moment"
    }

    fn cpu_fwd(
        &self,
        v: &mut CpuStorage,
        vl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (v, g) = (values_mut(v, vl, "moment")?, values(g, gl, "gradient")?);
        let (beta2, rest) = (self.0 as f32, (1.0 - self.0) as f32);
        for (v, &g) in v.iter_mut().zip(g) {
            *v = (*v * beta2 + 0.0) + ((g * g) * rest + 0.0);
        }
        Ok(())
    }
}

/// `x - step_size * m / (sqrt(v) * denominator_scale + eps)`, a new image.
struct Update(Coefficients);

impl CustomOp3 for Update {
    fn name(&self) -> &'static str {
        "adam-update"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, m, v) = (values(x, xl, "image")?, values(m, ml, "moment")?, values(v, vl, "moment")?);
        let c = self.0;
        let (scale, eps, step) = (c.denominator_scale as f32, c.eps as f32, c.step_size as f32);
        let next: Vec<f32> = x
            .iter()
            .zip(m)
            .zip(v)
            .map(|((&x, &m), &v)| x - ((m / (v.sqrt() * scale + eps)) * step + 0.0))
            .collect();
        Ok((CpuStorage::F32(next), xl.shape().clone()))
    }
}

/// Whether the in-place step applies: every tensor contiguous f32 on the CPU.
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
}

/// Updates `m` and `v` in place from `grad` and returns the next image. The moments must not
/// share storage with any other tensor (the caller copies them after handing them out).
pub(crate) fn step(
    x: &Tensor,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    c: Coefficients,
) -> candle_core::Result<Tensor> {
    m.inplace_op2(grad, &FirstMoment(c.weight))?;
    v.inplace_op2(grad, &SecondMoment(c.beta2))?;
    x.apply_op3_no_bwd(m, v, &Update(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_core::candle_core::Device;
    use easel_testkit::Rng;

    fn tensor(values: Vec<f32>) -> Tensor {
        let n = values.len();
        Tensor::from_vec(values, (1, 1, n), &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn the_in_place_step_gives_the_tensor_form_s_bits() {
        let mut rng = Rng::new(5);
        let mut values =
            |scale: f32| -> Vec<f32> { rng.uniform_vec(4099).iter().map(|u| (u - 0.5) * scale).collect() };
        for weight in [0.1, 0.75] {
            let (x, g, m0) = (tensor(values(2.0)), tensor(values(300.0)), tensor(values(30.0)));
            let v0 = tensor(values(900.0).iter().map(|v| v.abs()).collect());
            let c = Coefficients {
                weight,
                beta2: 0.999,
                denominator_scale: 1.0 / 0.3f64.sqrt(),
                eps: 1e-8,
                step_size: 0.05,
            };
            // The tensor form, as Adam's step writes it.
            let m = if weight < 0.5 {
                (&m0 + (&g - &m0).unwrap().affine(weight, 0.0).unwrap()).unwrap()
            } else {
                (&g - (&g - &m0).unwrap().affine(1.0 - weight, 0.0).unwrap()).unwrap()
            };
            let v = (v0.affine(c.beta2, 0.0).unwrap() + g.sqr().unwrap().affine(1.0 - c.beta2, 0.0).unwrap())
                .unwrap();
            let denominator = v.sqrt().unwrap().affine(c.denominator_scale, c.eps).unwrap();
            let expected = (&x - (&m / &denominator).unwrap().affine(c.step_size, 0.0).unwrap()).unwrap();

            let (m_in, v_in) = (m0.copy().unwrap(), v0.copy().unwrap());
            let next = step(&x, &m_in, &v_in, &g, c).unwrap();
            assert_eq!(bits(&m_in), bits(&m), "first moment, weight {weight}");
            assert_eq!(bits(&v_in), bits(&v), "second moment, weight {weight}");
            assert_eq!(bits(&next), bits(&expected), "image, weight {weight}");
        }
    }
}
