//! The ReLU's backward pass on the CPU: which outputs were positive, kept as one bit each.
//!
//! A mask takes 1/32 of the memory of the ReLU output it stands for, so the trace of a
//! forward pass holds no full-size activations, not even the requested layers' (the caller may drop those
//! before the backward pass: at 512 px they are ~100 MB).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::cpu_tensor::{contiguous_f32, host_slice, HostSlice};
use crate::simd;
use crate::VggError;

/// Which outputs of one ReLU were > 0: element `i` is bit `i % 64` of word `i / 64`.
pub(crate) struct ReluMask(Vec<u64>);

impl ReluMask {
    /// The mask of the ReLU output `out`.
    pub(crate) fn of(out: &Tensor) -> Result<Self, VggError> {
        let out = contiguous_f32(out)?;
        let values = host_slice(&out)?;
        Ok(Self(positive_bits(values.get())))
    }

    /// The bits, checked to cover the `n` elements of `what` they are to mask.
    pub(crate) fn covering(&self, n: usize, what: &'static str) -> Result<MaskBits<'_>, VggError> {
        let bits = MaskBits(&self.0);
        if bits.len() < n {
            return Err(VggError::Internal(format!("a ReLU mask is smaller than {what}")));
        }
        Ok(bits)
    }
}

/// The bits of a [`ReluMask`], as the loops that apply it read them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaskBits<'a>(&'a [u64]);

impl MaskBits<'_> {
    /// The ReLU's backward pass in place: `values` (elements `first..` of the gradient) become
    /// `values + add` where the ReLU output was > 0 and 0 elsewhere. `add`, if any, is the
    /// ReLU's own upstream gradient, whole.
    pub(crate) fn apply(&self, values: &mut [f32], add: Option<&[f32]>, first: usize) {
        let add = add.map(|a| &a[first..first + values.len()]);
        simd::widest(ApplyMask { bits: self.0, values, add, first });
    }

    /// Number of elements it covers, at least (it rounds up to 64).
    pub(crate) fn len(&self) -> usize {
        self.0.len() * 64
    }
}

/// [`MaskBits::apply`] (`add` cut to the values' span), compiled for the CPU's vector unit:
/// whole words of the mask at a time, where each bit selects a lane.
struct ApplyMask<'a> {
    bits: &'a [u64],
    values: &'a mut [f32],
    add: Option<&'a [f32]>,
    first: usize,
}

impl simd::Kernel for ApplyMask<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        apply_mask(self.bits, self.values, self.add, self.first);
    }
}

/// `values[j]` (plus `add[j]`, if any) where bit `first + j` is set, else 0: the elements up
/// to the next word boundary one by one, then 64 at a time ([`gate_word`], vector code on every
/// architecture: `.ci/neon-check.sh` checks aarch64's), with `add` read as 64-value arrays.
#[inline(always)]
fn apply_mask(bits: &[u64], values: &mut [f32], add: Option<&[f32]>, first: usize) {
    let open = |i: usize| (bits[i / 64] >> (i % 64)) & 1 == 1;
    let one = |d: f32, j: usize| gate(add.map_or(d, |a| d + a[j]), open(first + j));
    let n = values.len();
    let head = ((64 - first % 64) % 64).min(n);
    let (head_values, rest) = values.split_at_mut(head);
    for (j, d) in head_values.iter_mut().enumerate() {
        *d = one(*d, j);
    }
    let mut words = rest.chunks_exact_mut(64);
    let word0 = (first + head) / 64;
    for (w, chunk) in words.by_ref().enumerate() {
        let chunk: &mut [f32; 64] = chunk.try_into().expect("chunks_exact_mut(64) gives 64 values");
        let (word, j0) = (bits[word0 + w], head + 64 * w);
        let add = add.map(|a| -> &[f32; 64] { a[j0..][..64].try_into().expect("64 values") });
        gate_word(chunk, add, word);
    }
    let tail = words.into_remainder();
    let j0 = n - tail.len();
    for (j, d) in (j0..).zip(tail) {
        *d = one(*d, j);
    }
}

/// The 64 values of one mask word in place: `values[k]` (plus `add[k]`, if any) where bit `k`
/// of `word` is set, else +0.0. Each half word gates 32 values, a 32-bit lane per f32 lane, by a
/// bit test and an AND ([`gate`]) rather than a branch, which the compiler vectorises.
#[cfg(not(target_arch = "aarch64"))]
#[inline(always)]
fn gate_word(values: &mut [f32; 64], add: Option<&[f32; 64]>, word: u64) {
    for (half, values) in values.chunks_exact_mut(32).enumerate() {
        let half_word = (word >> (32 * half)) as u32;
        match add {
            Some(add) => {
                let add: &[f32; 32] = add[32 * half..][..32].try_into().expect("32 values");
                for (k, (d, a)) in values.iter_mut().zip(add).enumerate() {
                    *d = gate(*d + a, half_word & (1 << k) != 0);
                }
            }
            None => {
                for (k, d) in values.iter_mut().enumerate() {
                    *d = gate(*d, half_word & (1 << k) != 0);
                }
            }
        }
    }
}

/// [`gate_word`] in NEON: on aarch64 the portable loop's bit tests became a scalar select per
/// value (how the compiler treats it depends on what is inlined around it), so the lane masks
/// are made with `vtst` and applied with `vand`, 4 values at a time. The same arithmetic, so
/// the same bits.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn gate_word(values: &mut [f32; 64], add: Option<&[f32; 64]>, word: u64) {
    use std::arch::aarch64::{
        vaddq_f32, vandq_u32, vdupq_n_u32, vld1q_f32, vld1q_u32, vreinterpretq_f32_u32,
        vreinterpretq_u32_f32, vst1q_f32, vtstq_u32,
    };
    const LANE_BITS: [u32; 4] = [1, 2, 4, 8];
    // SAFETY: NEON is part of every aarch64 target's baseline, so the intrinsics may run; each
    // load and store touches the 4 values at `4 q` for `q < 16`, inside the 64-value arrays
    // `values` and `add` (and the 4-value `LANE_BITS`), and `values` is borrowed exclusively.
    unsafe {
        let lane_bits = vld1q_u32(LANE_BITS.as_ptr());
        for q in 0..16 {
            let open = vtstq_u32(vdupq_n_u32((word >> (4 * q)) as u32), lane_bits);
            let at = values.as_mut_ptr().add(4 * q);
            let mut v = vld1q_f32(at);
            if let Some(add) = add {
                v = vaddq_f32(v, vld1q_f32(add.as_ptr().add(4 * q)));
            }
            vst1q_f32(at, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), open)));
        }
    }
}

/// `value` if `open`, else +0.0, as `if open { value } else { 0.0 }` gives it, bit for bit
/// (+0.0 is all zero bits), but as an AND with a lane mask, which vectorises.
#[inline(always)]
fn gate(value: f32, open: bool) -> f32 {
    f32::from_bits(value.to_bits() & 0u32.wrapping_sub(u32::from(open)))
}

/// Packs `values > 0` (NaN is not) into mask words, on the rayon pool.
fn positive_bits(values: &[f32]) -> Vec<u64> {
    /// Words per task: 64 Ki values.
    const WORDS: usize = 1024;
    let mut bits = vec![0u64; values.len().div_ceil(64)];
    bits.par_chunks_mut(WORDS)
        .zip(values.par_chunks(WORDS * 64))
        .for_each(|(words, values)| simd::widest(PackBits { words, values }));
    bits
}

/// `words[j]` gets bit `i` set where `values[64 j + i] > 0`; compiled for the CPU's vector
/// unit, where the compares of a whole word become one mask.
struct PackBits<'a> {
    words: &'a mut [u64],
    values: &'a [f32],
}

impl simd::Kernel for PackBits<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let pack =
            |values: &[f32]| values.iter().enumerate().fold(0, |w, (i, &v)| w | (u64::from(v > 0.0) << i));
        let mut chunks = self.values.chunks_exact(64);
        for (word, chunk) in self.words.iter_mut().zip(chunks.by_ref()) {
            let chunk: &[f32; 64] = chunk.try_into().expect("chunks_exact(64) gives 64 values");
            *word = pack(chunk);
        }
        if let Some(word) = self.words.get_mut(self.values.len() / 64) {
            *word = pack(chunks.remainder());
        }
    }
}

/// `(grad + add) * mask`, elementwise: a ReLU's backward pass on its own (where no
/// convolution or pooling backward step can take it in).
pub(crate) fn relu_backward(
    grad: &Tensor,
    add: Option<&Tensor>,
    mask: &ReluMask,
) -> Result<Tensor, VggError> {
    let grad = contiguous_f32(grad)?;
    let add = add.map(contiguous_f32).transpose()?;
    let g = host_slice(&grad)?;
    let add = add.as_ref().map(host_slice).transpose()?;
    let add = add.as_ref().map(HostSlice::get);
    if add.is_some_and(|a| a.len() != g.get().len()) {
        return Err(VggError::Internal("a layer's gradient and its ReLU's gradient differ in size".into()));
    }
    let bits = mask.covering(g.get().len(), "its gradient")?;
    let mut out = g.get().to_vec();
    const BLOCK: usize = 1 << 14;
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, dst)| {
        bits.apply(dst, add, b * BLOCK);
    });
    Ok(Tensor::from_vec(out, grad.shape(), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_testkit::Rng;

    #[test]
    fn apply_matches_a_per_element_reference() {
        let n = 64 * 7 + 5;
        let mask: Vec<f32> = Rng::new(11).uniform_vec(n);
        let bits = positive_bits(&mask);
        let add = Rng::new(12).uniform_vec(n);
        // -0.0 must stay -0.0 where the mask is open and nothing is added.
        let grad: Vec<f32> = Rng::new(13)
            .uniform_vec(n)
            .into_iter()
            .enumerate()
            .map(|(i, v)| if i % 5 == 0 { -0.0 } else { v })
            .collect();
        for (first, len) in [(0, n), (3, 61), (3, 200), (64, 128), (70, n - 70), (n - 1, 1), (5, 0)] {
            for with_add in [false, true] {
                let mut got = grad[first..first + len].to_vec();
                MaskBits(&bits).apply(&mut got, with_add.then_some(&add[..]), first);
                for (j, &g) in got.iter().enumerate() {
                    let i = first + j;
                    let v = if with_add { grad[i] + add[i] } else { grad[i] };
                    let want = if mask[i] > 0.0 { v } else { 0.0 };
                    assert_eq!(g.to_bits(), want.to_bits(), "first {first} len {len} add {with_add} at {i}");
                }
            }
        }
    }

    /// Every vector unit this CPU has gives the same bits as the baseline, for both loops.
    #[test]
    fn every_vector_unit_gives_the_same_bits() {
        let n = 64 * 9 + 17;
        let (values, add) = (Rng::new(21).uniform_vec(n), Rng::new(22).uniform_vec(n));
        let bits = positive_bits(&values);
        let runs: Vec<(Vec<u64>, Vec<u32>)> = [simd::Level::Baseline, simd::Level::Avx2, simd::Level::Avx512]
            .into_iter()
            .filter_map(|level| {
                let mut words = vec![0u64; n.div_ceil(64)];
                simd::at(level, PackBits { words: &mut words, values: &values })?;
                let mut out = Rng::new(23).uniform_vec(n);
                simd::at(
                    level,
                    ApplyMask { bits: &bits, values: &mut out[3..], add: Some(&add[3..]), first: 3 },
                )?;
                Some((words, out.iter().map(|v| v.to_bits()).collect()))
            })
            .collect();
        assert!(!runs.is_empty(), "the baseline always runs");
        assert!(runs.windows(2).all(|p| p[0] == p[1]), "the variants differ");
    }

    #[test]
    fn positive_bits_mark_the_values_above_zero() {
        // Several tasks, and lengths that end mid-word.
        for n in [0, 1, 63, 64, 65, 64 * 1024 * 2 + 5] {
            let values: Vec<f32> = Rng::new(n as u64)
                .uniform_vec(n)
                .into_iter()
                .enumerate()
                .map(|(i, v)| match i % 7 {
                    0 => f32::NAN,
                    1 => -0.0,
                    2 => 0.0,
                    _ => v,
                })
                .collect();
            let bits = positive_bits(&values);
            assert_eq!(bits.len(), n.div_ceil(64));
            for (i, &v) in values.iter().enumerate() {
                assert_eq!((bits[i / 64] >> (i % 64)) & 1 == 1, v > 0.0, "n {n} at {i}: {v}");
            }
            if n % 64 != 0 {
                assert_eq!(bits[n / 64] >> (n % 64), 0, "n {n}: bits past the end");
            }
        }
    }

    #[test]
    fn relu_backward_matches_the_mask_of_the_output() {
        let out: Vec<f32> = (0..200).map(|i| if i % 3 == 0 { 0.0 } else { i as f32 }).collect();
        let out = Tensor::from_vec(out, (1, 2, 10, 10), &Device::Cpu).unwrap();
        let grad =
            Tensor::from_vec((0..200).map(|i| i as f32 - 50.0).collect(), (1, 2, 10, 10), &Device::Cpu)
                .unwrap();
        let expected = (&grad * out.gt(0f32).unwrap().to_dtype(candle_core::DType::F32).unwrap()).unwrap();
        let mask = ReluMask::of(&out).unwrap();
        let got = relu_backward(&grad, None, &mask).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&got), values(&expected));
    }
}
