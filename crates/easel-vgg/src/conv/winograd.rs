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
//! outputs a few ulps apart where [`super::kernels`] gives bit-equal ones; against exact
//! arithmetic the error is about 10x the direct path's with F(4x4) and 1.5x with F(2x2)
//! (see the tests). [`super::Winograd`] says where this is used.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::kernels::{finish, matmul, split_planes, split_work, Conv3x3, Epilogue, Strided, Taps};
use super::simd::{self, Kernel};

/// Tiles transformed together: one AVX-512 register of f32 per value, or a few narrower ones.
const LANES: usize = 16;

/// What a block's transformed input plus products should fit in: about a core's L2 cache.
const BLOCK_CACHE_BYTES: usize = 1 << 20;

/// Upper bound on one task's transformed input plus products (one tile row may exceed it).
const BLOCK_BUDGET_BYTES: usize = 8 << 20;

/// Input channels per product, summed by `gemm` into the result: short f32 accumulation
/// chains, as in the direct path.
const CHANNEL_BLOCK: usize = 64;

/// `G` of F(2x2, 3x3), the kernel transform (interpolation points 0, 1, -1 and infinity).
/// Kernel transforms run in f64 so that each transformed tap is rounded once.
const G2: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// `G` of F(4x4, 3x3) (interpolation points 0, 1, -1, 2, -2 and infinity).
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// Up to six values per lane: one row or column of a patch (F(2x2) uses the first four).
type Six = [[f32; LANES]; 6];

/// Which Winograd algorithm: the output tile side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// F(2x2, 3x3): 16 multiplications per 4 outputs (2.25x fewer than direct); rounding
    /// error within about 1.5x of the direct path's.
    F2,
    /// F(4x4, 3x3): 36 multiplications per 16 outputs (4x fewer); rounding error about 10x
    /// the direct path's (the products of the transformed values are summed in f32).
    F4,
}

impl Tile {
    /// Output tile side.
    const fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// Input patch side.
    const fn n(self) -> usize {
        self.m() + 2
    }
}

/// `B^T d` along one axis of a patch, for `n` values per lane.
#[inline(always)]
fn input_1d(tile: Tile, d: &Six) -> Six {
    let mut o = [[0f32; LANES]; 6];
    match tile {
        Tile::F2 => {
            for l in 0..LANES {
                let [d0, d1, d2, d3] = [d[0][l], d[1][l], d[2][l], d[3][l]];
                o[0][l] = d0 - d2;
                o[1][l] = d1 + d2;
                o[2][l] = d2 - d1;
                o[3][l] = d1 - d3;
            }
        }
        Tile::F4 => {
            for l in 0..LANES {
                let [d0, d1, d2, d3, d4, d5] = [d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]];
                o[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
                o[1][l] = -4.0 * (d1 + d2) + (d3 + d4);
                o[2][l] = 4.0 * (d1 - d2) + (d4 - d3);
                o[3][l] = 2.0 * (d3 - d1) + (d4 - d2);
                o[4][l] = 2.0 * (d1 - d3) + (d4 - d2);
                o[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
            }
        }
    }
    o
}

/// `A^T m` along one axis: `m` values per lane from `n`.
#[inline(always)]
fn output_1d(tile: Tile, v: &Six) -> [[f32; LANES]; 4] {
    let mut o = [[0f32; LANES]; 4];
    match tile {
        Tile::F2 => {
            for l in 0..LANES {
                let [m0, m1, m2, m3] = [v[0][l], v[1][l], v[2][l], v[3][l]];
                o[0][l] = m0 + m1 + m2;
                o[1][l] = m1 - m2 - m3;
            }
        }
        Tile::F4 => {
            for l in 0..LANES {
                let [m0, m1, m2, m3, m4, m5] = [v[0][l], v[1][l], v[2][l], v[3][l], v[4][l], v[5][l]];
                let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
                o[0][l] = m0 + s12 + s34;
                o[1][l] = d12 + 2.0 * d34;
                o[2][l] = s12 + 4.0 * s34;
                o[3][l] = d12 + 8.0 * d34 + m5;
            }
        }
    }
    o
}

thread_local! {
    /// Per-thread scratch reused across calls: the transformed input, then the products.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Whether Winograd pays off for this shape: with few channels the transforms cost more
/// than the products save (conv1_1 and its gradient), and on images of a few tiles the
/// kernel transform outweighs them.
pub fn suits(tile: Tile, s: &Conv3x3) -> bool {
    let tiles = s.height.div_ceil(tile.m()) * s.width.div_ceil(tile.m());
    s.c_in >= 16 && s.c_out >= 16 && tiles >= 64
}

/// The tiles for this shape: the larger where the image has enough of them, else the
/// smaller; `None` where neither pays off.
pub fn choose(s: &Conv3x3) -> Option<Tile> {
    [Tile::F4, Tile::F2].into_iter().find(|&t| suits(t, s))
}

/// Transformed kernels kept from one call to the next (the weights are frozen, and at 256 px
/// transforming them took ~10% of an evaluation), at most `budget` bytes of them: the first
/// that fit are kept, the others are transformed on every call as without a cache.
pub struct KernelCache {
    budget: usize,
    kept: Mutex<Vec<(Key, Arc<[f32]>)>>,
}

/// What a transformed kernel is of: a convolution (numbered by the caller, with its forward
/// `(c_in, c_out)`), which way it is applied ([`Taps`]' variant) and the tile size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    conv: usize,
    forward_dims: (usize, usize),
    flipped: bool,
    tile: Tile,
}

impl KernelCache {
    /// An empty cache that keeps at most `budget` bytes.
    pub fn new(budget: usize) -> Self {
        Self { budget, kept: Mutex::new(Vec::new()) }
    }

    /// Bytes kept now.
    pub fn used(&self) -> usize {
        used(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Key, Arc<[f32]>)>> {
        // The list is valid whatever a panicking holder did: it only ever gains whole entries.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The transformed kernel under `key`, if it is kept.
    fn kept(&self, key: Key) -> Option<Arc<[f32]>> {
        self.lock().iter().find(|(k, _)| *k == key).map(|(_, u)| Arc::clone(u))
    }

    /// The transformed kernel under `key`, transformed now if it is not kept yet and fits;
    /// `None` if it does not fit.
    fn get(&self, key: Key, s: &Conv3x3, kernel: Taps<'_>) -> Option<Arc<[f32]>> {
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

/// `conv3x3(input, kernel)` with padding 1, then `epilogue`, then ReLU if `relu`; the same
/// contract as [`Conv3x3::run`]. With `cache`, the transformed kernel is kept there (if it
/// fits) under the given number of the convolution, and taken from there on later calls.
pub fn run(
    tile: Tile,
    s: &Conv3x3,
    input: &[f32],
    kernel: Taps<'_>,
    epilogue: Epilogue<'_>,
    relu: bool,
    cache: Option<(&KernelCache, usize)>,
) -> Vec<f32> {
    s.check(input, kernel, epilogue);
    let plane = s.height * s.width;
    let mut out = vec![0f32; s.c_out * plane];
    if plane == 0 || s.c_out == 0 {
        return out;
    }
    if let Some((cache, conv)) = cache {
        let flipped = matches!(kernel, Taps::FlippedOf(_));
        let forward_dims = if flipped { (s.c_out, s.c_in) } else { (s.c_in, s.c_out) };
        let forward = Key { conv, forward_dims, flipped: false, tile };
        // An F(2x2) input gradient reads its forward pass's kernel if that is kept.
        let kept = match (flipped && tile == Tile::F2).then(|| cache.kept(forward)).flatten() {
            Some(u) => Some((u, true)),
            None => cache.get(Key { flipped, ..forward }, s, kernel).map(|u| (u, false)),
        };
        if let Some((u, transposed)) = kept {
            let u = if transposed { Transformed::ForwardF2(&u) } else { Transformed::Own(&u) };
            run_blocks(tile, s, input, u, epilogue, relu, &mut out);
            return out;
        }
    }
    // A kernel that is not kept is transformed into a buffer freed right after: kept for
    // the next call instead, it held its 38 MB (a 512 x 512 layer) through the backward
    // pass's peak. (The binary's allocator settings reuse the freed pages.)
    let mut u = Vec::new();
    transform_kernel(tile, s, kernel, &mut u);
    run_blocks(tile, s, input, Transformed::Own(&u), epilogue, relu, &mut out);
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
    relu: bool,
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
                    let lhs = u.taps(s, nn, xi, first);
                    let rhs = &v[xi * v_plane + first * tiles..];
                    let dst = &mut prod[xi * p_plane..][..s.c_out * tiles];
                    matmul(s.c_out, tiles, k, lhs, rhs, dst, first > 0);
                }
            }
            simd::widest(OutputTransform { tile, s, p: prod, rows: block, out: &mut rows });
            finish(&mut rows, epilogue, relu, pixels.start, plane);
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
    fn taps(self, s: &Conv3x3, nn: usize, xi: usize, first: usize) -> Strided<'a, f32> {
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

/// Length of one of the n x n planes `[channels, tiles]` of the transformed input or the
/// products, as laid out one after another: a cache line longer than the data, because the
/// transforms read or write all n x n planes in turn, and planes a multiple of 4 KB apart
/// (as VGG's channel and tile counts often make them) would share the same L1 sets.
fn plane_len(channels: usize, tiles: usize) -> usize {
    channels * tiles + 16
}

/// Splits the tile rows into blocks, a multiple of the thread count of them. A block's
/// transformed input and products should stay in cache ([`BLOCK_CACHE_BYTES`]) between the
/// transform that writes them and the products or transform that read them; but every block
/// reads the whole transformed kernel, so a block has at least as many tiles as make its own
/// data as large as the kernel (`c_in c_out / (c_in + c_out)` tiles), within
/// [`BLOCK_BUDGET_BYTES`]. Measured on 2 cores (input gradients, min of 15): 64 channels at
/// 192 x 256, 22 ms in blocks of 8 MB against 13 ms in blocks of one tile row; 256 channels at
/// 48 x 64, the same 2 blocks either way.
fn row_blocks(tile: Tile, s: &Conv3x3, threads: usize) -> Vec<Range<usize>> {
    let (tiles_y, tiles_x) = (s.height.div_ceil(tile.m()), s.width.div_ceil(tile.m()));
    let tile_bytes = tile.n() * tile.n() * (s.c_in + s.c_out) * std::mem::size_of::<f32>();
    let kernel_tiles = s.c_in * s.c_out / (s.c_in + s.c_out).max(1);
    let tiles = (BLOCK_CACHE_BYTES / tile_bytes).max(kernel_tiles);
    let rows = tiles.div_ceil(tiles_x).min(BLOCK_BUDGET_BYTES / (tile_bytes * tiles_x)).max(1);
    // split_work's sizes counted in tile rows: at most `rows` per block.
    split_work(tiles_y, tiles_y, rows, threads, tiles_y)
}

/// `U = G g G^T` for every (output, input) channel pair into `u`, laid out `u[co, xi, ci]`
/// with `xi = n row + column` of the n x n result.
fn transform_kernel(tile: Tile, s: &Conv3x3, kernel: Taps<'_>, u: &mut Vec<f32>) {
    let nn = tile.n() * tile.n();
    u.resize(s.c_out * nn * s.c_in, 0.0);
    u.par_chunks_mut(KERNEL_BLOCK * nn * s.c_in).enumerate().for_each(|(block, dst)| {
        KERNEL_SCRATCH.with(|scratch| {
            let scratch = &mut *scratch.borrow_mut();
            let first_co = block * KERNEL_BLOCK;
            simd::widest(KernelTransform { tile, s, kernel, first_co, dst, scratch })
        })
    });
}

/// Output channels whose kernels one task transforms: in the input gradient's (flipped)
/// layout their taps from one input channel are adjacent, so a task reads whole cache lines.
const KERNEL_BLOCK: usize = 8;

thread_local! {
    /// Per-thread scratch of [`transform_kernel_block`], reused across calls.
    static KERNEL_SCRATCH: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// [`transform_kernel`] for the output channels `first_co..`, as many as `dst` holds
/// (`[co, n * n, c_in]`). Kernel transforms run in f64 so that each transformed tap is rounded
/// once. The taps are first gathered tap-major (`g[co][tap][ci]`), so that each step of the
/// transform is a loop over the input channels, which the compiler vectorises.
#[inline(always)]
fn transform_kernel_block(
    tile: Tile,
    s: &Conv3x3,
    kernel: Taps<'_>,
    first_co: usize,
    dst: &mut [f32],
    scratch: &mut Vec<f64>,
) {
    let (c_in, n) = (s.c_in, tile.n());
    let cos = dst.len() / (n * n * c_in);
    // Rows of scratch are `c_in` values apart plus a cache line: rows a power of two apart
    // would share the L1 sets, and the gather below writes 72 of them in turn.
    let stride = c_in + 8;
    scratch.resize((cos * 9 + 3 * n + n * n) * stride, 0.0);
    let (g, rest) = scratch.split_at_mut(cos * 9 * stride);
    let (t, uu) = rest.split_at_mut(3 * n * stride);
    // g[(j * 9 + tap) * stride + ci]: tap `tap` (3 row + column, in the order the convolution
    // applies them) from input channel ci to output channel first_co + j.
    match kernel {
        Taps::Plain(k) => {
            let src = &k[first_co * c_in * 9..][..cos * c_in * 9];
            for (j, row) in src.chunks_exact(c_in * 9).enumerate() {
                for (ci, taps) in row.chunks_exact(9).enumerate() {
                    for (tap, &value) in taps.iter().enumerate() {
                        g[(j * 9 + tap) * stride + ci] = f64::from(value);
                    }
                }
            }
        }
        Taps::FlippedOf(w) => {
            // w is the forward kernel [c_in][c_out][9] of this shape, read flipped.
            for ci in 0..c_in {
                let src = &w[(ci * s.c_out + first_co) * 9..][..cos * 9];
                for (j, taps) in src.chunks_exact(9).enumerate() {
                    for (tap, &value) in taps.iter().enumerate() {
                        g[(j * 9 + 8 - tap) * stride + ci] = f64::from(value);
                    }
                }
            }
        }
    }
    for (g, dst) in g.chunks_exact(9 * stride).zip(dst.chunks_exact_mut(n * n * c_in)) {
        // t = G g, one kernel column b at a time: rows b n.. of t are G applied to column b.
        for (b, t_b) in t.chunks_exact_mut(n * stride).enumerate() {
            let x =
                [&g[b * stride..][..c_in], &g[(3 + b) * stride..][..c_in], &g[(6 + b) * stride..][..c_in]];
            kernel_1d(tile, x, t_b, stride);
        }
        // U = t G^T: row r of U is G applied to row r of t (row r of each column's result).
        for (r, u_r) in uu.chunks_exact_mut(n * stride).enumerate() {
            let t_row = |b: usize| &t[(b * n + r) * stride..][..c_in];
            kernel_1d(tile, [t_row(0), t_row(1), t_row(2)], u_r, stride);
        }
        for (d, u) in dst.chunks_exact_mut(c_in).zip(uu.chunks_exact(stride)) {
            for (d, &v) in d.iter_mut().zip(u) {
                *d = v as f32;
            }
        }
    }
}

/// `G x` along one axis of the kernel, for every input channel: `x` holds three rows of
/// kernel values (one per input channel), `out` gets the n rows of the result, `stride`
/// apart.
#[inline(always)]
fn kernel_1d(tile: Tile, x: [&[f64]; 3], out: &mut [f64], stride: usize) {
    let len = x[0].len();
    let (x0, x1, x2) = (x[0], &x[1][..len], &x[2][..len]);
    match tile {
        Tile::F2 => {
            let [o0, o1, o2, o3] = rows(out, len, stride);
            for i in 0..len {
                let s = x0[i] + x2[i];
                o0[i] = x0[i];
                o1[i] = (s + x1[i]) * G2[1][0];
                o2[i] = (s - x1[i]) * G2[1][0];
                o3[i] = x2[i];
            }
        }
        Tile::F4 => {
            // The common terms of G4's rows, shared.
            let [o0, o1, o2, o3, o4, o5] = rows(out, len, stride);
            for i in 0..len {
                let s = x0[i] + x2[i];
                let p = x0[i] * G4[3][0] + x2[i] * G4[3][2];
                let q = x1[i] * G4[3][1];
                o0[i] = x0[i] * G4[0][0];
                o1[i] = (s + x1[i]) * G4[1][0];
                o2[i] = (s - x1[i]) * G4[1][0];
                o3[i] = p + q;
                o4[i] = p - q;
                o5[i] = x2[i];
            }
        }
    }
}

/// The first `N` rows of `out`, `stride` apart, `len` values each.
#[inline(always)]
fn rows<const N: usize>(out: &mut [f64], len: usize, stride: usize) -> [&mut [f64]; N] {
    let mut rest = out;
    std::array::from_fn(|_| {
        let (row, tail) = std::mem::take(&mut rest).split_at_mut(stride);
        rest = tail;
        &mut row[..len]
    })
}

/// [`transform_kernel_block`], compiled for the CPU's vector unit.
struct KernelTransform<'a> {
    tile: Tile,
    s: &'a Conv3x3,
    kernel: Taps<'a>,
    first_co: usize,
    dst: &'a mut [f32],
    scratch: &'a mut Vec<f64>,
}

impl Kernel for KernelTransform<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        transform_kernel_block(self.tile, self.s, self.kernel, self.first_co, self.dst, self.scratch)
    }
}

/// [`transform_input`], compiled for the CPU's vector unit.
struct InputTransform<'a> {
    tile: Tile,
    s: &'a Conv3x3,
    input: &'a [f32],
    rows: Range<usize>,
    v: &'a mut [f32],
}

impl Kernel for InputTransform<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        transform_input(self.tile, self.s, self.input, self.rows, self.v)
    }
}

/// [`transform_output`], compiled for the CPU's vector unit.
struct OutputTransform<'a, 'b> {
    tile: Tile,
    s: &'a Conv3x3,
    p: &'a [f32],
    rows: Range<usize>,
    out: &'a mut [&'b mut [f32]],
}

impl Kernel for OutputTransform<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        transform_output(self.tile, self.s, self.p, self.rows, self.out)
    }
}

/// `phases[p][i] = row[M i + p]`: the `M` polyphase components of `row` (`M` times as
/// long as each of them). Written as one long loop over `row` so that the compiler turns the
/// strided reads into shuffles of whole vectors.
#[inline(always)]
fn split_phases<const M: usize>(row: &[f32], phases: &mut [f32], len: usize) {
    let (row, phases) = (&row[..M * len], &mut phases[..M * len]);
    let mut parts = phases.chunks_exact_mut(len);
    let mut parts: [&mut [f32]; M] = std::array::from_fn(|_| parts.next().expect("M parts"));
    for (i, values) in row.chunks_exact(M).enumerate() {
        for (part, &value) in parts.iter_mut().zip(values) {
            part[i] = value;
        }
    }
}

/// `row[M i + p] = phases[p][i]`, the inverse of [`split_phases`], for as much of `row` as
/// there is (its length need not be a multiple of `M`).
#[inline(always)]
fn merge_phases<const M: usize>(phases: &[f32], len: usize, row: &mut [f32]) {
    let parts: [&[f32]; M] = std::array::from_fn(|p| &phases[p * len..][..len]);
    let i = row.len() / M;
    let mut chunks = row.chunks_exact_mut(M);
    for (i, values) in chunks.by_ref().enumerate() {
        for (value, part) in values.iter_mut().zip(&parts) {
            *value = part[i];
        }
    }
    for (value, part) in chunks.into_remainder().iter_mut().zip(&parts) {
        *value = part[i];
    }
}

/// Transposes the grid of lane vectors: `t[a][b] = g[b][a]`.
#[inline(always)]
fn transpose(g: &[Six; 6]) -> [Six; 6] {
    let mut t = [[[0f32; LANES]; 6]; 6];
    for (a, ta) in t.iter_mut().enumerate() {
        for (b, tab) in ta.iter_mut().enumerate() {
            *tab = g[b][a];
        }
    }
    t
}

/// `v[xi, ci, tile] = (B^T d B)[xi]` for the n x n input patch `d` of every tile of the
/// tile rows `rows` (tiles numbered row by row from the block's first).
///
/// Column `c` of the patches of tiles `tx..tx + 16` is every m-th pixel of a row from
/// `m tx + c - 1` on; so each input row the block needs is first split into its m polyphase
/// components (zero outside the image), from which every column of 16 patches is one
/// contiguous load.
#[inline(always)]
fn transform_input(tile: Tile, s: &Conv3x3, input: &[f32], rows: Range<usize>, v: &mut [f32]) {
    let (h, w, m, n) = (s.height, s.width, tile.m(), tile.n());
    let tiles_x = w.div_ceil(m);
    let tiles = rows.len() * tiles_x;
    let v_plane = plane_len(s.c_in, tiles);
    // Each phase of a row holds whole groups of 16 tiles and one more value (columns m..n of
    // a patch are columns 0..2 of the next tile's).
    let len = tiles_x.next_multiple_of(LANES) + 1;
    // Input rows m tile_row - 1 ..= m tile_row + m of every tile row: the block's rows, with
    // the one above and the one below it.
    let (y0, lines) = ((m * rows.start) as isize - 1, m * rows.len() + 2);
    let mut padded = vec![0f32; m * len];
    let mut phases = vec![0f32; lines * m * len];
    // cols[c][r][lane]: column c, row r of lane's patch.
    let mut cols = [[[0f32; LANES]; 6]; 6];
    for (ci, plane) in input.chunks_exact(h * w).enumerate() {
        for (k, line) in phases.chunks_exact_mut(m * len).enumerate() {
            let y = y0 + k as isize;
            if y < 0 || y >= h as isize {
                line.fill(0.0);
                continue;
            }
            // Pixel x at x + 1: a patch's first column is the pixel left of its tile.
            padded[1..=w].copy_from_slice(&plane[y as usize * w..][..w]);
            match tile {
                Tile::F2 => split_phases::<2>(&padded, line, len),
                Tile::F4 => split_phases::<4>(&padded, line, len),
            }
        }
        for ty in rows.clone() {
            for tx0 in (0..tiles_x).step_by(LANES) {
                let lanes = LANES.min(tiles_x - tx0);
                for (r, line) in phases.chunks_exact(m * len).skip(m * (ty - rows.start)).take(n).enumerate()
                {
                    for (c, col) in cols.iter_mut().enumerate().take(n) {
                        col[r].copy_from_slice(&line[(c % m) * len + tx0 + c / m..][..LANES]);
                    }
                }
                // Along the rows of each column, then along the columns of each result row.
                let mut down = [[[0f32; LANES]; 6]; 6];
                for (d, col) in down.iter_mut().zip(&cols).take(n) {
                    *d = input_1d(tile, col);
                }
                let across = transpose(&down);
                let first = (ty - rows.start) * tiles_x + tx0;
                for (r, row) in across.iter().enumerate().take(n) {
                    let out = input_1d(tile, row);
                    for (c, values) in out.iter().enumerate().take(n) {
                        let xi = r * n + c;
                        let dst = &mut v[xi * v_plane + ci * tiles + first..];
                        if lanes == LANES {
                            // A fixed length: register stores instead of a call to memcpy.
                            dst[..LANES].copy_from_slice(values);
                        } else {
                            dst[..lanes].copy_from_slice(&values[..lanes]);
                        }
                    }
                }
            }
        }
    }
}

/// Writes `A^T p A` of the products `p[xi, co, tile]` into the block's output rows (raw
/// sums: the epilogue comes after).
///
/// Each output row of a tile row is gathered as its m polyphase components (output column j
/// of every tile), which the transform writes with whole-vector stores, and then merged.
#[inline(always)]
fn transform_output(tile: Tile, s: &Conv3x3, p: &[f32], rows: Range<usize>, out: &mut [&mut [f32]]) {
    let (h, w, m, n) = (s.height, s.width, tile.m(), tile.n());
    let tiles_x = w.div_ceil(m);
    let tiles = rows.len() * tiles_x;
    let p_plane = plane_len(s.c_out, tiles);
    let y_base = m * rows.start;
    let len = tiles_x.next_multiple_of(LANES);
    // phases[i][j][tile]: output column j of each tile in the tile row's output row i.
    let mut phases = vec![0f32; m * m * len];
    // cols[c][r][lane] = p[n r + c] of lane's tile (stale beyond the lanes in use).
    let mut cols = [[[0f32; LANES]; 6]; 6];
    for (co, dst) in out.iter_mut().enumerate() {
        for ty in rows.clone() {
            for tx0 in (0..tiles_x).step_by(LANES) {
                let lanes = LANES.min(tiles_x - tx0);
                let first = (ty - rows.start) * tiles_x + tx0;
                for (c, col) in cols.iter_mut().enumerate().take(n) {
                    for (r, values) in col.iter_mut().enumerate().take(n) {
                        let src = &p[(r * n + c) * p_plane + co * tiles + first..];
                        if lanes == LANES {
                            values.copy_from_slice(&src[..LANES]);
                        } else {
                            values[..lanes].copy_from_slice(&src[..lanes]);
                        }
                    }
                }
                // Along the rows of each column (m results), then along the columns.
                let mut down = [[[0f32; LANES]; 6]; 4];
                for (c, col) in cols.iter().enumerate().take(n) {
                    for (i, values) in output_1d(tile, col).into_iter().enumerate().take(m) {
                        down[i][c] = values;
                    }
                }
                for (i, row) in down.iter().enumerate().take(m) {
                    for (j, values) in output_1d(tile, row).iter().enumerate().take(m) {
                        phases[(i * m + j) * len + tx0..][..LANES].copy_from_slice(values);
                    }
                }
            }
            for (i, row_phases) in phases.chunks_exact(m * len).enumerate() {
                let y = m * ty + i;
                if y >= h {
                    break;
                }
                let line = &mut dst[(y - y_base) * w..][..w];
                match tile {
                    Tile::F2 => merge_phases::<2>(row_phases, len, line),
                    Tile::F4 => merge_phases::<4>(row_phases, len, line),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::tests::{direct, noise};
    use super::*;

    /// Relative L2 error of `got` against `want`, and the same for the direct path.
    fn errors(tile: Tile, s: &Conv3x3, seed: u64) -> (f64, f64) {
        let input = noise(s.c_in * s.height * s.width, seed);
        let scale = (2.0 / (9.0 * s.c_in as f32)).sqrt();
        let kernel: Vec<f32> = noise(s.c_out * s.c_in * 9, seed + 1).iter().map(|k| k * scale).collect();
        let bias = noise(s.c_out, seed + 2);
        let want = direct(s, &input, &kernel, &bias);
        let l2 = |got: &[f32]| {
            let (mut d, mut n) = (0f64, 0f64);
            for (&g, &e) in got.iter().zip(&want) {
                d += (f64::from(g) - e).powi(2);
                n += e * e;
            }
            (d / n).sqrt()
        };
        let ours = run(tile, s, &input, Taps::Plain(&kernel), Epilogue::Bias(&bias), false, None);
        let direct = s.run(&input, Taps::Plain(&kernel), Epilogue::Bias(&bias), false);
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
        let input = noise(s.c_in * p, 1);
        let kernel = noise(s.c_out * s.c_in * 9, 2);
        let bias = noise(s.c_out, 3);
        let add = noise(s.c_out * p, 4);
        let gate_values = noise(s.c_out * p, 5);
        let bits = super::super::kernels::positive_bits(&gate_values);
        let gate = super::super::kernels::Gate(&bits);
        for tile in [Tile::F2, Tile::F4] {
            for (epilogue, relu) in [
                (Epilogue::None, false),
                (Epilogue::Bias(&bias), true),
                (Epilogue::Gate { add: Some(&add), gate }, false),
                (Epilogue::Gate { add: None, gate }, false),
            ] {
                let ours = run(tile, &s, &input, Taps::Plain(&kernel), epilogue, relu, None);
                let direct = s.run(&input, Taps::Plain(&kernel), epilogue, relu);
                for (i, (a, b)) in ours.iter().zip(&direct).enumerate() {
                    let ok = (a - b).abs() <= 1e-4 * (1.0 + b.abs());
                    assert!(ok, "{tile:?} {epilogue:?} relu {relu} at {i}: {a} vs {b}");
                }
            }
        }
    }

    /// The AVX-512, AVX2 and baseline builds of the transforms give the same bits (those this
    /// CPU has: on an AVX-512 machine, all three).
    #[test]
    fn every_vector_unit_gives_the_same_bits() {
        let s = Conv3x3 { c_in: 24, c_out: 20, height: 13, width: 150 };
        let input = noise(s.c_in * s.height * s.width, 3);
        let kernel = noise(s.c_out * s.c_in * 9, 4);
        let bias = noise(s.c_out, 5);
        for tile in [Tile::F2, Tile::F4] {
            let runs: Vec<Vec<u32>> = [simd::Level::Baseline, simd::Level::Avx2, simd::Level::Avx512]
                .into_iter()
                .map(|level| {
                    simd::cap(level);
                    let out = run(tile, &s, &input, Taps::Plain(&kernel), Epilogue::Bias(&bias), true, None);
                    out.iter().map(|v| v.to_bits()).collect()
                })
                .collect();
            simd::cap(simd::Level::Avx512);
            assert!(runs.windows(2).all(|p| p[0] == p[1]), "{tile:?}: the variants differ");
        }
    }

    /// A kept kernel gives the same bits as one transformed per call, is transformed once
    /// per (convolution, direction, tile), and nothing is kept past the budget.
    #[test]
    fn kernel_cache_keeps_what_fits_and_changes_no_bits() {
        let s = Conv3x3 { c_in: 24, c_out: 20, height: 13, width: 40 };
        let input = noise(s.c_in * s.height * s.width, 6);
        let kernel = noise(s.c_out * s.c_in * 9, 7);
        let bytes = |tile: Tile| s.c_out * tile.n() * tile.n() * s.c_in * 4;
        let cache = KernelCache::new(bytes(Tile::F4) + bytes(Tile::F2));
        let run_with = |tile, taps, cache| run(tile, &s, &input, taps, Epilogue::None, false, cache);
        for tile in [Tile::F4, Tile::F2] {
            for taps in [Taps::Plain(&kernel), Taps::FlippedOf(&kernel)] {
                let plain = run_with(tile, taps, None);
                let first = run_with(tile, taps, Some((&cache, 3)));
                let again = run_with(tile, taps, Some((&cache, 3)));
                assert!(plain == first && first == again, "{tile:?} {taps:?}");
            }
        }
        // F(4x4) and F(2x2) of the plain kernel were kept; both flipped ones found it full.
        assert_eq!(cache.used(), bytes(Tile::F4) + bytes(Tile::F2));
        let key = Key { conv: 3, forward_dims: (24, 20), flipped: false, tile: Tile::F4 };
        let kept = cache.get(key, &s, Taps::Plain(&kernel)).expect("kept");
        assert!(Arc::ptr_eq(&kept, &cache.get(key, &s, Taps::Plain(&kernel)).expect("kept")));
        let flipped = Key { flipped: true, ..key };
        assert!(cache.get(flipped, &s, Taps::FlippedOf(&kernel)).is_none(), "over the budget");
        // Another convolution number is another kernel.
        assert!(cache.get(Key { conv: 4, ..key }, &s, Taps::Plain(&kernel)).is_none());
        assert_eq!(KernelCache::new(0).get(key, &s, Taps::Plain(&kernel)), None);
    }

    /// An F(2x2) input gradient reads its forward pass's kept kernel, transposed and permuted,
    /// for the same bits as its own.
    #[test]
    fn f2_gradient_reads_the_forward_kernel() {
        let forward = Conv3x3 { c_in: 20, c_out: 24, height: 13, width: 40 };
        let gradient = Conv3x3 { c_in: 24, c_out: 20, ..forward };
        let x = noise(forward.c_in * forward.height * forward.width, 8);
        let g = noise(gradient.c_in * gradient.height * gradient.width, 9);
        let weight = noise(forward.c_out * forward.c_in * 9, 10);
        let cache = KernelCache::new(1 << 20);
        let grad =
            |cache| run(Tile::F2, &gradient, &g, Taps::FlippedOf(&weight), Epilogue::None, false, cache);
        let own = grad(None);
        run(Tile::F2, &forward, &x, Taps::Plain(&weight), Epilogue::None, false, Some((&cache, 7)));
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
