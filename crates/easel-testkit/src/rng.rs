//! A reproducible random sequence for tests, without a dependency.

/// Knuth's MMIX linear congruential generator, `z = 6364136223846793005 z + 1442695040888963407`,
/// read from its high bits (the low bits of an LCG repeat with short periods).
///
/// easel-vgg's tests and benches draw their random tensors with the same recurrence and the
/// same [`Rng::uniform`] mapping, so they can use this type and keep their values.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// The sequence that starts from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.state
    }

    /// A number in `[0, n)` from the top 32 bits (Lemire's multiply-shift; `n` < 2^32 is
    /// nearly uniform).
    ///
    /// # Panics
    /// When `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "an empty range");
        ((self.next_u64() >> 32) * n) >> 32
    }

    /// A number in `[-1, 1)` from the top 24 bits, exactly representable in f32.
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` numbers from [`Rng::uniform`].
    pub fn uniform_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_sequence() {
        let a: Vec<u64> = (0..5).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..5).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        assert_ne!(a, (0..5).scan(Rng::new(8), |r, _| Some(r.next_u64())).collect::<Vec<_>>());
        // The first value is the recurrence applied once to the seed.
        assert_eq!(a[0], 7u64.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
    }

    #[test]
    fn values_stay_in_their_ranges_and_cover_them() {
        let mut rng = Rng::new(1);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let k = rng.below(10);
            assert!(k < 10);
            seen[k as usize] = true;
            let u = rng.uniform();
            assert!((-1.0..1.0).contains(&u), "{u}");
        }
        assert!(seen.iter().all(|&s| s), "every value of 0..10 comes up in 1000 draws");
    }

    #[test]
    fn uniform_matches_the_mapping_easel_vgg_uses() {
        let mut z = 42u64;
        let want: Vec<f32> = (0..8)
            .map(|_| {
                z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        assert_eq!(Rng::new(42).uniform_vec(8), want);
    }
}
