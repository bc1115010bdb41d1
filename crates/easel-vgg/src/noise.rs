//! Deterministic pseudo-random values for the unit tests (no RNG crate, the same on every
//! platform).

/// Uniform values in [-1, 1) from a fixed seed.
pub(crate) fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut z = seed;
    (0..n)
        .map(|_| {
            z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
