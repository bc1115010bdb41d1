//! Winograd F(4x4, 3x3) for the 3x3 same-padding convolutions: 36 multiplications per 16
//! output pixels and input channel instead of 144; and F(2x2, 3x3) (16 per 4 instead of 36)
//! for images with few 4x4 tiles.
//!
//! Each 4x4 tile of output pixels comes from the 6x6 input patch around it: the patch is
//! transformed (`B^T d B`), multiplied elementwise by the transformed kernel (`G g G^T`),
//! summed over input channels and transformed back (`A^T m A`). The sums over input channels
//! are 36 independent products `[c_out, c_in] x [c_in, tiles]`, which `gemm` runs; the
//! transforms run on 16 tiles at a time, lane by lane, so that the compiler vectorises them.
//!
//! Work is cut into blocks of whole tile rows: a block owns four pixel rows of every output
//! plane per tile row, so blocks write their parts of the output in parallel. Blocks are as
//! small as keeps their transformed input and products in a core's L2 cache, unless that
//! would make them re-read the transformed kernel more often than is worth (see
//! [`row_blocks`]).
//!
//! Rounding here depends on a pixel's place in its tile, so equal input patches can give
//! outputs a few ulps apart where [`super::direct`] gives bit-equal ones; against exact
//! arithmetic the error is about 10x the direct path's with F(4x4) and 1.5x with F(2x2)
//! (see the tests). [`super::Winograd`] says where this is used.
//!
//! The transforms are in [`transforms`]; transformed kernels are kept across calls in [`cache`].

mod cache;
mod transforms;

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

pub(crate) use cache::KernelCache;
use cache::Key;
pub(crate) use transforms::Tile;
use transforms::{plane_len, transform_kernel, InputTransform, OutputTransform};

use super::cpu_caches;
use super::direct::{Conv3x3, Filter};
use super::epilogue::Epilogue;
use super::gemm::{matmul, Strided};
use super::schedule::{split_planes, split_work};
use crate::simd;

/// What a block's transformed input plus products should fit in: a core's L2 cache (1 MB on
/// the Zen 4 it was tuned on; [`cpu_caches::scaled`] fits it to this machine).
const BLOCK_CACHE_BYTES: usize = 1 << 20;

/// Upper bound on one task's transformed input plus products (one tile row may exceed it), at
/// 1 MB of L2 (scaled likewise).
const BLOCK_BUDGET_BYTES: usize = 8 << 20;

/// Input channels per product, summed by `gemm` into the result: short f32 accumulation
/// chains, as in the direct path.
const CHANNEL_BLOCK: usize = 64;

thread_local! {
    /// Per-thread scratch reused across calls: the transformed input, then the products.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Whether Winograd pays off for this shape: with few channels the transforms cost more
/// than the products save (conv1_1 and its gradient), and on images of a few tiles the
/// kernel transform outweighs them.
pub(crate) fn suits(tile: Tile, s: &Conv3x3) -> bool {
    let tiles = s.height.div_ceil(tile.m()) * s.width.div_ceil(tile.m());
    s.c_in >= 16 && s.c_out >= 16 && tiles >= 64
}

/// The tiles for this shape: the larger where the image has enough of them, else the
/// smaller; `None` where neither pays off.
pub(crate) fn choose(s: &Conv3x3) -> Option<Tile> {
    [Tile::F4, Tile::F2].into_iter().find(|&t| suits(t, s))
}

/// `conv3x3(input, kernel)` with padding 1, then `epilogue`; the same
/// contract as [`Conv3x3::run`]. With `cache`, the transformed kernel is kept there (if it
/// fits) under the given number of the convolution, and taken from there on later calls.
pub(crate) fn run(
    tile: Tile,
    s: &Conv3x3,
    input: &[f32],
    kernel: Filter<'_>,
    epilogue: Epilogue<'_>,
    cache: Option<(&KernelCache, usize)>,
) -> Vec<f32> {
    s.check(input, kernel, epilogue);
    let plane = s.height * s.width;
    let mut out = vec![0f32; s.c_out * plane];
    if plane == 0 || s.c_out == 0 {
        return out;
    }
    if let Some((cache, conv)) = cache {
        let flipped = matches!(kernel, Filter::FlippedOf(_));
        let forward_dims = if flipped { (s.c_out, s.c_in) } else { (s.c_in, s.c_out) };
        let forward = Key { conv, forward_dims, flipped: false, tile };
        // An F(2x2) input gradient reads its forward pass's kernel if that is kept.
        let kept = match (flipped && tile == Tile::F2).then(|| cache.kept(forward)).flatten() {
            Some(u) => Some((u, true)),
            None => cache.get(Key { flipped, ..forward }, s, kernel).map(|u| (u, false)),
        };
        if let Some((u, transposed)) = kept {
            let u = if transposed { Transformed::ForwardF2(&u) } else { Transformed::Own(&u) };
            run_blocks(tile, s, input, u, epilogue, &mut out);
            return out;
        }
    }
    // A kernel that is not kept is transformed into a buffer freed right after: kept for
    // the next call instead (by the calling thread), it would stay allocated through the
    // backward pass's peak. (The binary's allocator settings reuse the freed pages.)
    let mut u = Vec::new();
    transform_kernel(tile, s, kernel, &mut u);
    run_blocks(tile, s, input, Transformed::Own(&u), epilogue, &mut out);
    out
}

/// The work of [`run`] once the kernel is transformed (`u`): every block of tile rows, in
/// parallel, into `out`.
fn run_blocks(
    tile: Tile,
    s: &Conv3x3,
    input: &[f32],
    u: Transformed<'_>,
    epilogue: Epilogue<'_>,
    out: &mut [f32],
) {
    let (h, w, m, nn) = (s.height, s.width, tile.m(), tile.n() * tile.n());
    let plane = h * w;
    let tiles_x = w.div_ceil(m);
    let blocks = row_blocks(tile, s, rayon::current_num_threads());
    let pixels: Vec<Range<usize>> = blocks.iter().map(|b| m * b.start * w..(m * b.end).min(h) * w).collect();
    let parts = split_planes(out, plane, &pixels);
    parts.into_par_iter().zip(blocks).zip(pixels).for_each(|((mut rows, block), pixels)| {
        SCRATCH.with(|scratch| {
            let (v, prod) = &mut *scratch.borrow_mut();
            let tiles = block.len() * tiles_x;
            let (v_plane, p_plane) = (plane_len(s.c_in, tiles), plane_len(s.c_out, tiles));
            v.resize(nn * v_plane, 0.0);
            prod.resize(nn * p_plane, 0.0);
            simd::widest(InputTransform { tile, s, input, rows: block.clone(), v });
            for xi in 0..nn {
                for first in (0..s.c_in).step_by(CHANNEL_BLOCK) {
                    let k = CHANNEL_BLOCK.min(s.c_in - first);
                    let lhs = u.matrix(s, nn, xi, first);
                    let rhs = &v[xi * v_plane + first * tiles..];
                    let dst = &mut prod[xi * p_plane..][..s.c_out * tiles];
                    matmul(s.c_out, tiles, k, lhs, rhs, dst, first > 0);
                }
            }
            simd::widest(OutputTransform { tile, s, p: prod, rows: block, out: &mut rows });
            epilogue.apply(&mut rows, pixels.start, plane);
        })
    });
}

/// A transformed kernel as [`run_blocks`] reads it.
#[derive(Clone, Copy)]
enum Transformed<'a> {
    /// `u[co, xi, ci]`, as [`transform_kernel`] lays it out.
    Own(&'a [f32]),
    /// The F(2x2) kernel of the forward convolution whose input gradient this is: its
    /// `u[ci, xi', co]` (`[c_out, xi, c_in]` in its own terms), read transposed and with the
    /// taps permuted by [`FLIP_F2`].
    ForwardF2(&'a [f32]),
}

/// Which tap of F(2x2)'s transformed kernel each tap of the transformed flipped kernel is:
/// flipping `g` swaps the points 0 and infinity of `G g G^T` and keeps 1 and -1, exactly (the
/// f64 sums are the same, `x0 + x2 = x2 + x0`), so `U_flipped[r][c] = U[p(r)][p(c)]`.
const FLIP_F2: [usize; 16] = {
    let p = [3, 1, 2, 0];
    let mut map = [0; 16];
    let mut xi = 0;
    while xi < 16 {
        map[xi] = p[xi / 4] * 4 + p[xi % 4];
        xi += 1;
    }
    map
};

impl<'a> Transformed<'a> {
    /// Tap `xi` of the kernel as `[c_out, c_in]`, from input channel `first` on.
    fn matrix(self, s: &Conv3x3, nn: usize, xi: usize, first: usize) -> Strided<'a, f32> {
        match self {
            // u[co, xi, ci] is at (co * nn + xi) * c_in + ci.
            Transformed::Own(u) => {
                Strided { data: &u[xi * s.c_in + first..], row_stride: nn * s.c_in, col_stride: 1 }
            }
            // u[ci, xi', co] is at (ci * nn + xi') * c_out + co.
            Transformed::ForwardF2(u) => Strided {
                data: &u[(first * nn + FLIP_F2[xi]) * s.c_out..],
                row_stride: 1,
                col_stride: nn * s.c_out,
            },
        }
    }
}

/// Splits the tile rows into blocks, a multiple of the thread count of them. A block's
/// transformed input and products should stay in cache ([`BLOCK_CACHE_BYTES`]) between the
/// transform that writes them and the products or transform that read them; but every block
/// reads the whole transformed kernel, so a block has at least as many tiles as make its own
/// data as large as the kernel (`c_in c_out / (c_in + c_out)` tiles), within
/// [`BLOCK_BUDGET_BYTES`]. This matters most for the wide, shallow layers of blocks 1-2
/// (`cargo bench -p easel-vgg --bench conv` measures it).
fn row_blocks(tile: Tile, s: &Conv3x3, threads: usize) -> Vec<Range<usize>> {
    let (tiles_y, tiles_x) = (s.height.div_ceil(tile.m()), s.width.div_ceil(tile.m()));
    let tile_bytes = tile.n() * tile.n() * (s.c_in + s.c_out) * std::mem::size_of::<f32>();
    let kernel_tiles = s.c_in * s.c_out / (s.c_in + s.c_out).max(1);
    let (cache, budget) = (cpu_caches::scaled(BLOCK_CACHE_BYTES), cpu_caches::scaled(BLOCK_BUDGET_BYTES));
    let tiles = (cache / tile_bytes).max(kernel_tiles);
    let rows = tiles.div_ceil(tiles_x).min(budget / (tile_bytes * tiles_x)).max(1);
    // split_work's sizes counted in tile rows: at most `rows` per block.
    split_work(tiles_y, tiles_y, rows, threads, tiles_y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::direct::tests::direct;
    use crate::relu_mask::ReluMask;
    use easel_testkit::Rng;

    /// Relative L2 error of `got` against `want`, and the same for the direct path.
    fn errors(tile: Tile, s: &Conv3x3, seed: u64) -> (f64, f64) {
        let input = Rng::new(seed).uniform_vec(s.c_in * s.height * s.width);
        let scale = (2.0 / (9.0 * s.c_in as f32)).sqrt();
        let kernel: Vec<f32> =
            Rng::new(seed + 1).uniform_vec(s.c_out * s.c_in * 9).iter().map(|k| k * scale).collect();
        let bias = Rng::new(seed + 2).uniform_vec(s.c_out);
        let want = direct(s, &input, &kernel, &bias);
        let l2 = |got: &[f32]| {
            let (mut d, mut n) = (0f64, 0f64);
            for (&g, &e) in got.iter().zip(&want) {
                d += (f64::from(g) - e).powi(2);
                n += e * e;
            }
            (d / n).sqrt()
        };
        let ours = run(tile, s, &input, Filter::Plain(&kernel), Epilogue::Bias(&bias), None);
        let direct = s.run(&input, Filter::Plain(&kernel), Epilogue::Bias(&bias));
        for (i, (&g, &e)) in ours.iter().zip(&want).enumerate() {
            assert!((f64::from(g) - e).abs() <= 1e-4 * (1.0 + e.abs()), "{s:?} at {i}: {g} vs {e}");
        }
        (l2(&ours), l2(&direct))
    }

    #[test]
    fn matches_exact_convolution_on_ragged_tiles() {
        // Sides that are not multiples of the tile, a single tile, channel counts that are
        // not multiples of the lane or channel block; rows of several groups of 16 tiles, the
        // last one partly used.
        for tile in [Tile::F2, Tile::F4] {
            for (i, &(c_in, c_out, height, width)) in [
                (16, 16, 4, 4),
                (17, 19, 5, 7),
                (16, 24, 9, 34),
                (70, 33, 13, 6),
                (130, 20, 6, 21),
                (16, 20, 9, 150),
            ]
            .iter()
            .enumerate()
            {
                let s = Conv3x3 { c_in, c_out, height, width };
                let (ours, direct) = errors(tile, &s, 10 * i as u64);
                let bound = if tile == Tile::F2 { 3.0 } else { 20.0 };
                assert!(ours < bound * direct, "{tile:?} {s:?}: winograd {ours:.2e} vs direct {direct:.2e}");
            }
        }
    }

    /// The error of each tile size against exact arithmetic on VGG's shapes, relative to the
    /// direct path's: about 1.5x with F(2x2), about 10x with F(4x4) (the module docs' figures).
    #[test]
    fn accuracy_on_vgg_shapes() {
        for &(c_in, c_out, height, width) in &[(64, 64, 24, 32), (256, 256, 12, 16), (512, 512, 8, 8)] {
            let s = Conv3x3 { c_in, c_out, height, width };
            for (tile, bound) in [(Tile::F2, 2.0), (Tile::F4, 16.0)] {
                let (ours, direct) = errors(tile, &s, 7);
                assert!(ours < bound * direct, "{tile:?} {s:?}: winograd {ours:.2e} vs direct {direct:.2e}");
            }
        }
    }

    #[test]
    fn epilogues_match_the_direct_path() {
        let s = Conv3x3 { c_in: 32, c_out: 24, height: 11, width: 10 };
        let p = s.height * s.width;
        let input = Rng::new(1).uniform_vec(s.c_in * p);
        let kernel = Rng::new(2).uniform_vec(s.c_out * s.c_in * 9);
        let bias = Rng::new(3).uniform_vec(s.c_out);
        let add = Rng::new(4).uniform_vec(s.c_out * p);
        let mask_values = candle_core::Tensor::from_vec(
            Rng::new(5).uniform_vec(s.c_out * p),
            s.c_out * p,
            &candle_core::Device::Cpu,
        )
        .expect("shape matches");
        let mask = ReluMask::of(&mask_values).expect("a CPU tensor");
        let mask = mask.covering(s.c_out * p, "the output").expect("as large");
        for tile in [Tile::F2, Tile::F4] {
            for epilogue in [
                Epilogue::None,
                Epilogue::Bias(&bias),
                Epilogue::BiasRelu(&bias),
                Epilogue::ReluBackward { add: Some(&add), mask },
                Epilogue::ReluBackward { add: None, mask },
            ] {
                let ours = run(tile, &s, &input, Filter::Plain(&kernel), epilogue, None);
                let direct = s.run(&input, Filter::Plain(&kernel), epilogue);
                for (i, (a, b)) in ours.iter().zip(&direct).enumerate() {
                    let ok = (a - b).abs() <= 1e-4 * (1.0 + b.abs());
                    assert!(ok, "{tile:?} {epilogue:?} at {i}: {a} vs {b}");
                }
            }
        }
    }

    /// An F(2x2) input gradient reads its forward pass's kept kernel, transposed and permuted,
    /// for the same bits as its own.
    #[test]
    fn f2_gradient_reads_the_forward_kernel() {
        let forward = Conv3x3 { c_in: 20, c_out: 24, height: 13, width: 40 };
        let gradient = Conv3x3 { c_in: 24, c_out: 20, ..forward };
        let x = Rng::new(8).uniform_vec(forward.c_in * forward.height * forward.width);
        let g = Rng::new(9).uniform_vec(gradient.c_in * gradient.height * gradient.width);
        let weight = Rng::new(10).uniform_vec(forward.c_out * forward.c_in * 9);
        let cache = KernelCache::new(1 << 20);
        let grad = |cache| run(Tile::F2, &gradient, &g, Filter::FlippedOf(&weight), Epilogue::None, cache);
        let own = grad(None);
        run(Tile::F2, &forward, &x, Filter::Plain(&weight), Epilogue::None, Some((&cache, 7)));
        let kept = cache.used();
        assert!(kept > 0);
        assert!(own == grad(Some((&cache, 7))), "the bits differ");
        assert_eq!(cache.used(), kept, "no kernel of its own kept");
        // Another convolution's kernel is not taken.
        assert!(own == grad(Some((&cache, 8))));
        assert!(cache.used() > kept);
    }

    #[test]
    fn blocks_cover_every_tile_row_once() {
        for &(c_in, h, w) in &[(64, 384, 512), (512, 24, 32), (512, 4, 4), (16, 1000, 3000), (16, 5, 3)] {
            let s = Conv3x3 { c_in, c_out: c_in, height: h, width: w };
            for tile in [Tile::F2, Tile::F4] {
                let tiles_y = h.div_ceil(tile.m());
                for threads in 1..4 {
                    let blocks = row_blocks(tile, &s, threads);
                    assert_eq!(blocks.first().map(|r| r.start), Some(0));
                    assert_eq!(blocks.last().map(|r| r.end), Some(tiles_y));
                    assert!(blocks.windows(2).all(|p| p[0].end == p[1].start && !p[0].is_empty()));
                }
            }
        }
    }
}
