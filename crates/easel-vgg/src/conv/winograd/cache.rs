//! Transformed Winograd kernels kept across calls: the weights never change, so each
//! convolution's kernel need be transformed once per direction and tile size.

use std::sync::{Arc, Mutex};

use super::transforms::{transform_kernel, Tile};
use crate::conv::direct::{Conv3x3, Filter};

/// Transformed kernels kept from one call to the next (the weights are frozen, and at 256 px
/// transforming them is a sizeable share of an evaluation), at most `budget` bytes of them: the first
/// that fit are kept, the others are transformed on every call as without a cache.
pub(crate) struct KernelCache {
    budget: usize,
    kept: Mutex<Vec<(Key, Arc<[f32]>)>>,
}

/// What a transformed kernel is of: a convolution (numbered by the caller, with its forward
/// `(c_in, c_out)`), which way it is applied ([`Filter`]'s variant) and the tile size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Key {
    pub(super) conv: usize,
    pub(super) forward_dims: (usize, usize),
    pub(super) flipped: bool,
    pub(super) tile: Tile,
}

impl KernelCache {
    /// An empty cache that keeps at most `budget` bytes.
    pub(crate) fn new(budget: usize) -> Self {
        Self { budget, kept: Mutex::new(Vec::new()) }
    }

    /// Bytes kept now.
    pub(crate) fn used(&self) -> usize {
        used(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Key, Arc<[f32]>)>> {
        // The list is valid whatever a panicking holder did: it only ever gains whole entries.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The transformed kernel under `key`, if it is kept.
    pub(super) fn kept(&self, key: Key) -> Option<Arc<[f32]>> {
        self.lock().iter().find(|(k, _)| *k == key).map(|(_, u)| Arc::clone(u))
    }

    /// The transformed kernel under `key`, transformed now if it is not kept yet and fits;
    /// `None` if it does not fit.
    pub(super) fn get(&self, key: Key, s: &Conv3x3, kernel: Filter<'_>) -> Option<Arc<[f32]>> {
        let bytes = s.c_out * key.tile.n() * key.tile.n() * s.c_in * std::mem::size_of::<f32>();
        if let Some(u) = self.kept(key) {
            return Some(u);
        }
        if self.used() + bytes > self.budget {
            return None;
        }
        // Not under the lock: the transform runs on the rayon pool, where this thread may pick
        // up another job's convolution that asks this cache too.
        let mut u = Vec::new();
        transform_kernel(key.tile, s, kernel, &mut u);
        let u: Arc<[f32]> = u.into();
        let mut kept = self.lock();
        if let Some((_, first)) = kept.iter().find(|(k, _)| *k == key) {
            return Some(Arc::clone(first));
        }
        if used(&kept) + bytes <= self.budget {
            kept.push((key, Arc::clone(&u)));
        }
        Some(u)
    }
}

fn used(kept: &[(Key, Arc<[f32]>)]) -> usize {
    kept.iter().map(|(_, u)| std::mem::size_of_val(&**u)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::epilogue::Epilogue;
    use crate::conv::winograd::run;
    use easel_testkit::Rng;

    /// A kept kernel gives the same bits as one transformed per call, is transformed once
    /// per (convolution, direction, tile), and nothing is kept past the budget.
    #[test]
    fn kernel_cache_keeps_what_fits_and_changes_no_bits() {
        let s = Conv3x3 { c_in: 24, c_out: 20, height: 13, width: 40 };
        let input = Rng::new(6).uniform_vec(s.c_in * s.height * s.width);
        let kernel = Rng::new(7).uniform_vec(s.c_out * s.c_in * 9);
        let bytes = |tile: Tile| s.c_out * tile.n() * tile.n() * s.c_in * 4;
        let cache = KernelCache::new(bytes(Tile::F4) + bytes(Tile::F2));
        let run_with = |tile, filter, cache| run(tile, &s, &input, filter, Epilogue::None, cache);
        for tile in [Tile::F4, Tile::F2] {
            for filter in [Filter::Plain(&kernel), Filter::FlippedOf(&kernel)] {
                let plain = run_with(tile, filter, None);
                let first = run_with(tile, filter, Some((&cache, 3)));
                let again = run_with(tile, filter, Some((&cache, 3)));
                assert!(plain == first && first == again, "{tile:?} {filter:?}");
            }
        }
        // F(4x4) and F(2x2) of the plain kernel were kept; both flipped ones found it full.
        assert_eq!(cache.used(), bytes(Tile::F4) + bytes(Tile::F2));
        let key = Key { conv: 3, forward_dims: (24, 20), flipped: false, tile: Tile::F4 };
        let kept = cache.get(key, &s, Filter::Plain(&kernel)).expect("kept");
        assert!(Arc::ptr_eq(&kept, &cache.get(key, &s, Filter::Plain(&kernel)).expect("kept")));
        let flipped = Key { flipped: true, ..key };
        assert!(cache.get(flipped, &s, Filter::FlippedOf(&kernel)).is_none(), "over the budget");
        // Another convolution number is another kernel.
        assert!(cache.get(Key { conv: 4, ..key }, &s, Filter::Plain(&kernel)).is_none());
        assert_eq!(KernelCache::new(0).get(key, &s, Filter::Plain(&kernel)), None);
    }
}
