//! The Winograd transforms: of the 3x3 kernels (`G g G^T`, in f64), of the input patches
//! (`B^T d B`) and of the products back to output tiles (`A^T m A`), each written lane by lane
//! for 16 tiles at a time and compiled for the CPU's vector unit ([`crate::simd`]); on aarch64
//! the input transform takes its 16 tiles 4 at a time, one NEON register per value.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use crate::conv::direct::{Conv3x3, Filter};
use crate::simd::{self, Kernel};
#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::float32x4_t;

/// Tiles transformed together: one AVX-512 register of f32 per value, or a few narrower ones.
const LANES: usize = 16;

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

/// Up to six values per lane, `L` lanes: one row or column of a patch (F(2x2) uses the first
/// four).
type Six<const L: usize = LANES> = [[f32; L]; 6];

/// Which Winograd algorithm: the output tile side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tile {
    /// F(2x2, 3x3): 16 multiplications per 4 outputs (2.25x fewer than direct); rounding
    /// error within about 1.5x of the direct path's.
    F2,
    /// F(4x4, 3x3): 36 multiplications per 16 outputs (4x fewer); rounding error about 10x
    /// the direct path's (the products of the transformed values are summed in f32).
    F4,
}

impl Tile {
    /// Output tile side.
    pub(crate) const fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// Input patch side.
    pub(crate) const fn n(self) -> usize {
        self.m() + 2
    }
}

/// `B^T d` along one axis of a patch, for `n` values per lane. (On aarch64 the transform has
/// its own in NEON intrinsics, `input_1d_neon`, and this is the tests' reference.)
#[cfg_attr(all(target_arch = "aarch64", not(test)), allow(dead_code))]
#[inline(always)]
fn input_1d<const L: usize>(tile: Tile, d: &Six<L>) -> Six<L> {
    let mut o = [[0f32; L]; 6];
    match tile {
        Tile::F2 => {
            for l in 0..L {
                let [d0, d1, d2, d3] = [d[0][l], d[1][l], d[2][l], d[3][l]];
                o[0][l] = d0 - d2;
                o[1][l] = d1 + d2;
                o[2][l] = d2 - d1;
                o[3][l] = d1 - d3;
            }
        }
        Tile::F4 => {
            for l in 0..L {
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

/// Length of one of the n x n planes `[channels, tiles]` of the transformed input or the
/// products, as laid out one after another: a cache line longer than the data, because the
/// transforms read or write all n x n planes in turn, and planes a multiple of 4 KB apart
/// (as VGG's channel and tile counts often make them) would share the same L1 sets.
pub(crate) fn plane_len(channels: usize, tiles: usize) -> usize {
    channels * tiles + 16
}

/// `U = G g G^T` for every (output, input) channel pair into `u`, laid out `u[co, xi, ci]`
/// with `xi = n row + column` of the n x n result.
pub(crate) fn transform_kernel(tile: Tile, s: &Conv3x3, kernel: Filter<'_>, u: &mut Vec<f32>) {
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
    kernel: Filter<'_>,
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
        Filter::Plain(k) => {
            let src = &k[first_co * c_in * 9..][..cos * c_in * 9];
            for (j, row) in src.chunks_exact(c_in * 9).enumerate() {
                for (ci, taps) in row.chunks_exact(9).enumerate() {
                    for (tap, &value) in taps.iter().enumerate() {
                        g[(j * 9 + tap) * stride + ci] = f64::from(value);
                    }
                }
            }
        }
        Filter::FlippedOf(w) => {
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
    kernel: Filter<'a>,
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
pub(crate) struct InputTransform<'a> {
    pub(crate) tile: Tile,
    pub(crate) s: &'a Conv3x3,
    pub(crate) input: &'a [f32],
    pub(crate) rows: Range<usize>,
    pub(crate) v: &'a mut [f32],
}

impl Kernel for InputTransform<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        transform_input(self.tile, self.s, self.input, self.rows, self.v)
    }
}

/// [`transform_output`], compiled for the CPU's vector unit.
pub(crate) struct OutputTransform<'a, 'b> {
    pub(crate) tile: Tile,
    pub(crate) s: &'a Conv3x3,
    pub(crate) p: &'a [f32],
    pub(crate) rows: Range<usize>,
    pub(crate) out: &'a mut [&'b mut [f32]],
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
#[cfg(not(target_arch = "aarch64"))]
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

/// The input rows `y0..` of `plane` that a block's patches read (as many as `phases` holds),
/// each split into its m polyphase components `len` long (zero outside the image), one after
/// another: [`transform_input`]'s source. `padded` is scratch of `m len` values. (The portable
/// [`transform_input`] has the same loop inline: moved out, it changed the x86-64 code's
/// register allocation, which is tuned and checked as it is.)
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn split_rows(
    tile: Tile,
    s: &Conv3x3,
    plane: &[f32],
    y0: isize,
    padded: &mut [f32],
    phases: &mut [f32],
    len: usize,
) {
    let (h, w, m) = (s.height, s.width, tile.m());
    for (k, line) in phases.chunks_exact_mut(m * len).enumerate() {
        let y = y0 + k as isize;
        if y < 0 || y >= h as isize {
            line.fill(0.0);
            continue;
        }
        // Pixel x at x + 1: a patch's first column is the pixel left of its tile.
        padded[1..=w].copy_from_slice(&plane[y as usize * w..][..w]);
        match tile {
            Tile::F2 => split_phases::<2>(padded, line, len),
            Tile::F4 => split_phases::<4>(padded, line, len),
        }
    }
}

/// `v[xi, ci, tile] = (B^T d B)[xi]` for the n x n input patch `d` of every tile of the
/// tile rows `rows` (tiles numbered row by row from the block's first).
///
/// Column `c` of the patches of tiles `tx..tx + 16` is every m-th pixel of a row from
/// `m tx + c - 1` on; so each input row the block needs is first split into its m polyphase
/// components (zero outside the image), from which every column of 16 patches is one
/// contiguous load.
#[cfg(not(target_arch = "aarch64"))]
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

/// [`transform_input`] on aarch64: the same source rows and results, taken 4 tiles at a time.
///
/// 16 lanes are one AVX-512 register per value but four NEON ones: the 16-lane transform's 36
/// patch values alone need 144 of NEON's 32 registers, and the compiler kept the columns, their
/// transforms and the transposition in stack arrays, filled through memcpy (in the disassembly
/// 99 stores of q registers to the stack, 14 calls to memcpy). 8 lanes for this transform
/// still spilled (60 stores); 8 for the output transform too made half of it scalar. With 4
/// lanes each patch value is one register: a column's 6 values and its 6 results fit, and only
/// the transposition goes through memory, 36 registers stored and loaded once per 4 tiles
/// (68 stores in the function, no spills, one call to memcpy, outside the tile loop). The
/// arithmetic of each lane is the same, in the same order, so the results are the other
/// architectures' bit for bit.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn transform_input(tile: Tile, s: &Conv3x3, input: &[f32], rows: Range<usize>, v: &mut [f32]) {
    let (h, w, m) = (s.height, s.width, tile.m());
    let tiles_x = w.div_ceil(m);
    let tiles = rows.len() * tiles_x;
    let v_plane = plane_len(s.c_in, tiles);
    let len = tiles_x.next_multiple_of(LANES) + 1;
    let (y0, lines) = ((m * rows.start) as isize - 1, m * rows.len() + 2);
    let mut padded = vec![0f32; m * len];
    let mut phases = vec![0f32; lines * m * len];
    // Written before it is read for every 4 tiles, so zeroed once here, not per use.
    // SAFETY: NEON is part of every aarch64 target's baseline.
    let mut down = [[unsafe { std::arch::aarch64::vdupq_n_f32(0.0) }; 6]; 6];
    for (ci, plane) in input.chunks_exact(h * w).enumerate() {
        split_rows(tile, s, plane, y0, &mut padded, &mut phases, len);
        for ty in rows.clone() {
            for tx0 in (0..tiles_x).step_by(LANES) {
                let group = InputGroup {
                    lines: &phases[m * (ty - rows.start) * m * len..],
                    len,
                    tx0,
                    lanes: LANES.min(tiles_x - tx0),
                    first: ci * tiles + (ty - rows.start) * tiles_x + tx0,
                    v_plane,
                };
                match tile {
                    Tile::F2 => group.transform::<2, 4>(&mut down, v),
                    Tile::F4 => group.transform::<4, 6>(&mut down, v),
                }
            }
        }
    }
}

/// One group of [`LANES`] tiles of a tile row (fewer at its end), for the aarch64
/// [`transform_input`]: where its patches are and where their transforms go.
#[cfg(target_arch = "aarch64")]
struct InputGroup<'a> {
    /// The tile row's n input rows, each as its m phases `len` long.
    lines: &'a [f32],
    len: usize,
    /// The group's first tile in its row, and how many tiles it has.
    tx0: usize,
    lanes: usize,
    /// Where its first tile goes in each n x n plane of `v`, and the planes' length.
    first: usize,
    v_plane: usize,
}

#[cfg(target_arch = "aarch64")]
impl InputGroup<'_> {
    /// The group's transforms into `v`, 4 tiles at a time; `down` is scratch.
    #[inline(always)]
    fn transform<const M: usize, const N: usize>(&self, down: &mut [[float32x4_t; 6]; 6], v: &mut [f32]) {
        // rows[r][p]: phase p of input row r from the group's first tile on, the LANES tiles and
        // the one after (columns m..n of a patch are the next tile's first ones). Their fixed
        // length lets the compiler drop the bounds checks of the loads below.
        let rows: [[&[f32; LANES + 1]; M]; N] = std::array::from_fn(|r| {
            std::array::from_fn(|p| {
                self.lines[(r * M + p) * self.len + self.tx0..][..LANES + 1]
                    .try_into()
                    .expect("a row phase holds the group's tiles and one more")
            })
        });
        for from in (0..LANES).step_by(4) {
            if from + 4 > self.lanes {
                break;
            }
            let first = self.first + from;
            input_quad::<M, N>(&rows, from, down, |xi, values| {
                store((&mut v[xi * self.v_plane + first..][..4]).try_into().expect("4 values"), values)
            });
        }
        if !self.lanes.is_multiple_of(4) {
            self.ragged_end::<M, N>(&rows, down, v);
        }
    }

    /// The last 1 to 3 tiles of a row, of whose 4 lanes only those that are tiles are stored.
    /// Out of line: inlined, it doubled the transform's code and brought 22 calls to memcpy
    /// and about 100 stack stores into it.
    #[inline(never)]
    fn ragged_end<const M: usize, const N: usize>(
        &self,
        rows: &[[&[f32; LANES + 1]; M]; N],
        down: &mut [[float32x4_t; 6]; 6],
        v: &mut [f32],
    ) {
        let (from, lanes) = (self.lanes / 4 * 4, self.lanes % 4);
        let first = self.first + from;
        input_quad::<M, N>(rows, from, down, |xi, values| {
            let mut quad = [0f32; 4];
            store(&mut quad, values);
            v[xi * self.v_plane + first..][..lanes].copy_from_slice(&quad[..lanes])
        });
    }
}

/// `B^T d B` of the 4 patches whose first columns are at `from` in `rows` (see
/// [`InputGroup::transform`]): each of the n x n results goes to `store` with its index
/// `xi = n r + c`. `down` is scratch.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn input_quad<const M: usize, const N: usize>(
    rows: &[[&[f32; LANES + 1]; M]; N],
    from: usize,
    down: &mut [[float32x4_t; 6]; 6],
    mut store: impl FnMut(usize, float32x4_t),
) {
    let tile = if M == 2 { Tile::F2 } else { Tile::F4 };
    // Along the rows of each column into down[r][c] (so transposed), then along each row.
    for c in 0..N {
        // F(2x2) patches have 4 rows: its last two values repeat the fourth, and are not read.
        let col: [float32x4_t; 6] = std::array::from_fn(|r| {
            load(rows[r.min(N - 1)][c % M][c / M + from..][..4].try_into().expect("4 values"))
        });
        for (r, values) in input_1d_neon(tile, &col).into_iter().enumerate().take(N) {
            down[r][c] = values;
        }
    }
    for (r, row) in down.iter().enumerate().take(N) {
        for (c, values) in input_1d_neon(tile, row).into_iter().enumerate().take(N) {
            store(r * N + c, values);
        }
    }
}

/// [`input_1d`] of 4 lanes in NEON intrinsics: the portable loop, inlined into the 4-lane
/// transform, was vectorised or not depending on what else the compiler saw (all vector in a
/// crate holding only this module, 55 scalar instructions in the F(2x2) case in easel-vgg).
/// The same operations in the same order, term for term (Rust fuses no multiply-add on its
/// own, nor do these intrinsics), so the same bits:
/// `input_transform_matches_a_tile_by_tile_reference` checks it under qemu.
/// F(2x2) reads the first 4 values and leaves the last two results as its input's.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn input_1d_neon(tile: Tile, d: &[float32x4_t; 6]) -> [float32x4_t; 6] {
    use std::arch::aarch64::{vaddq_f32, vmulq_n_f32, vsubq_f32};
    let [d0, d1, d2, d3, d4, d5] = *d;
    // SAFETY: NEON is part of every aarch64 target's baseline, so these intrinsics run on any
    // aarch64 CPU; they only compute on registers.
    unsafe {
        match tile {
            Tile::F2 => [vsubq_f32(d0, d2), vaddq_f32(d1, d2), vsubq_f32(d2, d1), vsubq_f32(d1, d3), d4, d5],
            Tile::F4 => [
                // 4 d0 - 5 d2 + d4
                vaddq_f32(vsubq_f32(vmulq_n_f32(d0, 4.0), vmulq_n_f32(d2, 5.0)), d4),
                // -4 (d1 + d2) + (d3 + d4)
                vaddq_f32(vmulq_n_f32(vaddq_f32(d1, d2), -4.0), vaddq_f32(d3, d4)),
                // 4 (d1 - d2) + (d4 - d3)
                vaddq_f32(vmulq_n_f32(vsubq_f32(d1, d2), 4.0), vsubq_f32(d4, d3)),
                // 2 (d3 - d1) + (d4 - d2)
                vaddq_f32(vmulq_n_f32(vsubq_f32(d3, d1), 2.0), vsubq_f32(d4, d2)),
                // 2 (d1 - d3) + (d4 - d2)
                vaddq_f32(vmulq_n_f32(vsubq_f32(d1, d3), 2.0), vsubq_f32(d4, d2)),
                // 4 d1 - 5 d3 + d5
                vaddq_f32(vsubq_f32(vmulq_n_f32(d1, 4.0), vmulq_n_f32(d3, 5.0)), d5),
            ],
        }
    }
}

/// 4 values into a NEON register.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn load(values: &[f32; 4]) -> float32x4_t {
    // SAFETY: NEON is part of every aarch64 target's baseline; the pointer is to 4 readable
    // f32 (vld1q_f32 needs no more alignment than f32's).
    unsafe { std::arch::aarch64::vld1q_f32(values.as_ptr()) }
}

/// A NEON register's 4 values into `out`.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn store(out: &mut [f32; 4], values: float32x4_t) {
    // SAFETY: NEON is part of every aarch64 target's baseline; the pointer is to 4 writable
    // f32 (vst1q_f32 needs no more alignment than f32's).
    unsafe { std::arch::aarch64::vst1q_f32(out.as_mut_ptr(), values) }
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
    use super::*;
    use easel_testkit::Rng;

    const LEVELS: [simd::Level; 3] = [simd::Level::Baseline, simd::Level::Avx2, simd::Level::Avx512];

    /// The bits of `f` run at every vector unit this CPU has (at least the baseline).
    fn at_every_level(f: impl Fn(simd::Level) -> Option<Vec<f32>>) -> Vec<Vec<u32>> {
        let runs: Vec<Vec<u32>> = LEVELS
            .into_iter()
            .filter_map(|level| Some(f(level)?.iter().map(|v| v.to_bits()).collect()))
            .collect();
        assert!(!runs.is_empty(), "the baseline always runs");
        runs
    }

    /// The input transform of every tile, ragged ends of rows and blocks that start below the
    /// first tile row included, against the patch gathered pixel by pixel and transformed one
    /// lane at a time: the same arithmetic in the same order, so the same bits, whatever lanes
    /// and registers the vector code uses (on aarch64, its own 4-lane form).
    #[test]
    fn input_transform_matches_a_tile_by_tile_reference() {
        let s = Conv3x3 { c_in: 3, c_out: 1, height: 13, width: 150 };
        let input = Rng::new(6).uniform_vec(s.c_in * s.height * s.width);
        let pixel = |ci: usize, y: isize, x: isize| {
            let inside = (0..s.height as isize).contains(&y) && (0..s.width as isize).contains(&x);
            if inside {
                input[(ci * s.height + y as usize) * s.width + x as usize]
            } else {
                0.0
            }
        };
        for tile in [Tile::F2, Tile::F4] {
            let (m, n) = (tile.m(), tile.n());
            let tiles_x = s.width.div_ceil(m);
            let tile_rows = s.height.div_ceil(m);
            for rows in [0..tile_rows, 1..tile_rows - 1] {
                let tiles = rows.len() * tiles_x;
                let v_plane = plane_len(s.c_in, tiles);
                let mut v = vec![f32::NAN; n * n * v_plane];
                simd::widest(InputTransform { tile, s: &s, input: &input, rows: rows.clone(), v: &mut v });
                let mut checked = 0;
                for ci in 0..s.c_in {
                    for (t, (ty, tx)) in
                        rows.clone().flat_map(|ty| (0..tiles_x).map(move |tx| (ty, tx))).enumerate()
                    {
                        let (y0, x0) = ((m * ty) as isize - 1, (m * tx) as isize - 1);
                        // Column c of the patch along its rows, then each row of the results.
                        let down: [Six<1>; 6] = std::array::from_fn(|c| {
                            let col: Six<1> = std::array::from_fn(|r| {
                                let inside = r < n && c < n;
                                [if inside { pixel(ci, y0 + r as isize, x0 + c as isize) } else { 0.0 }]
                            });
                            input_1d(tile, &col)
                        });
                        for r in 0..n {
                            let row: Six<1> = std::array::from_fn(|c| down[c][r]);
                            for (c, want) in input_1d(tile, &row).into_iter().enumerate().take(n) {
                                let got = v[(r * n + c) * v_plane + ci * tiles + t];
                                assert_eq!(
                                    got.to_bits(),
                                    want[0].to_bits(),
                                    "{tile:?} rows {rows:?}: channel {ci}, tile ({ty}, {tx}), value {r} {c}: \
                                     {got} vs {}",
                                    want[0]
                                );
                                checked += 1;
                            }
                        }
                    }
                }
                assert_eq!(checked, s.c_in * tiles * n * n);
            }
        }
    }

    /// The AVX-512, AVX2 and baseline builds of the three transforms give the same bits
    /// (those this CPU has: on an AVX-512 machine, all three).
    #[test]
    fn every_vector_unit_gives_the_same_bits() {
        let s = Conv3x3 { c_in: 24, c_out: 20, height: 13, width: 150 };
        let input = Rng::new(3).uniform_vec(s.c_in * s.height * s.width);
        let kernel = Rng::new(4).uniform_vec(s.c_out * s.c_in * 9);
        for tile in [Tile::F2, Tile::F4] {
            let (m, nn) = (tile.m(), tile.n() * tile.n());
            let rows = 0..s.height.div_ceil(m);
            let tiles = rows.len() * s.width.div_ceil(m);
            let inputs = at_every_level(|level| {
                let mut v = vec![0f32; nn * plane_len(s.c_in, tiles)];
                simd::at(
                    level,
                    InputTransform { tile, s: &s, input: &input, rows: rows.clone(), v: &mut v },
                )?;
                Some(v)
            });
            assert!(inputs.windows(2).all(|p| p[0] == p[1]), "{tile:?}: the input transforms differ");
            let products = Rng::new(5).uniform_vec(nn * plane_len(s.c_out, tiles));
            let outputs = at_every_level(|level| {
                let mut out = vec![0f32; s.c_out * s.height * s.width];
                let mut planes: Vec<&mut [f32]> = out.chunks_mut(s.height * s.width).collect();
                simd::at(
                    level,
                    OutputTransform { tile, s: &s, p: &products, rows: rows.clone(), out: &mut planes },
                )?;
                Some(out)
            });
            assert!(outputs.windows(2).all(|p| p[0] == p[1]), "{tile:?}: the output transforms differ");
            for filter in [Filter::Plain(&kernel), Filter::FlippedOf(&kernel)] {
                let kernels = at_every_level(|level| {
                    let mut u = vec![0f32; KERNEL_BLOCK * nn * s.c_in];
                    let mut scratch = Vec::new();
                    let transform = KernelTransform {
                        tile,
                        s: &s,
                        kernel: filter,
                        first_co: 8,
                        dst: &mut u,
                        scratch: &mut scratch,
                    };
                    simd::at(level, transform)?;
                    Some(u)
                });
                assert!(
                    kernels.windows(2).all(|p| p[0] == p[1]),
                    "{tile:?} {filter:?}: the kernel transforms differ"
                );
            }
        }
    }
}
