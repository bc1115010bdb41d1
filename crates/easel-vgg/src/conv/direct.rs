//! CPU 3x3 same-padding convolution on NCHW f32 data: chunked im2col, products by `gemm`.
//!
//! The output pixels are cut into chunks; each rayon task lays out the 9 * C_in shifted
//! copies of its chunk's input (im2col, a few MiB at most, reused per thread), multiplies
//! the `[C_out, 9 C_in]` kernel by it with `gemm`'s single-threaded AVX-512/AVX2/NEON
//! kernels, and writes bias (and ReLU) into its own slices of the output. Memory stays
//! bounded by the chunk size, whatever the image size.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::cpu_caches;
use super::epilogue::Epilogue;
use super::gemm::{matmul, Strided};
use super::schedule::{split_planes, split_work};

/// Geometry of one 3x3, stride-1, pad-1 convolution of a single image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Conv3x3 {
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
}

/// The 3x3 filter a convolution applies, as it is stored.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Filter<'a> {
    /// `[c_out, c_in, 3, 3]`, applied as it is.
    Plain(&'a [f32]),
    /// The weight `[c_in, c_out, 3, 3]` of the forward convolution whose input gradient this
    /// convolution computes: applied flipped in y and x, with its channel axes swapped. Read
    /// in place, so that no flipped copy of the weights is kept.
    FlippedOf(&'a [f32]),
}

impl<'a> Filter<'a> {
    fn len(self) -> usize {
        match self {
            Filter::Plain(k) | Filter::FlippedOf(k) => k.len(),
        }
    }

    /// The `[c_out, c_in - first]` matrix of tap `tap` (`3 ky + kx`) for input channels
    /// `first..` of a convolution with `c_in` inputs and `c_out` outputs.
    pub(crate) fn matrix(self, c_in: usize, c_out: usize, tap: usize, first: usize) -> Strided<'a> {
        match self {
            // k[co, ci, tap] is at (co c_in + ci) 9 + tap.
            Filter::Plain(k) => Strided { data: &k[first * 9 + tap..], row_stride: 9 * c_in, col_stride: 9 },
            // w[ci, co, 8 - tap] is at (ci c_out + co) 9 + 8 - tap.
            Filter::FlippedOf(w) => {
                Strided { data: &w[first * c_out * 9 + 8 - tap..], row_stride: 9, col_stride: 9 * c_out }
            }
        }
    }
}

/// Upper bound on one task's im2col buffer: chunks of this size keep the buffer in L2/L3
/// and bound extra memory, and still give `gemm` products large enough to run near peak.
/// Tuned at 1 MB of L2, and scaled to this machine's ([`cpu_caches::scaled`]), as is the next.
const IM2COL_BUDGET_BYTES: usize = 6 << 20;

/// Upper bound on one task's im2col buffer and product together when all taps go into one
/// product (see [`Conv3x3::chunk_all_taps`]): there the product, `c_out` rows against `9 c_in`, is
/// the larger part, and under the im2col budget alone conv1_1's products would spill out of
/// L2 at large sizes.
const WORKING_SET_BYTES: usize = 3 << 19;

/// Input channels per product (see [`Conv3x3::chunk`]).
const CHANNEL_BLOCK: usize = 64;

/// Fewest output pixels per chunk: below this `gemm` spends more time packing the kernel
/// than multiplying.
const MIN_CHUNK_PIXELS: usize = 96;

thread_local! {
    /// Per-thread scratch reused across calls: the im2col buffer, then the product.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };

    /// Per-thread f64 scratch of the all-taps product: kernel, im2col buffer, product.
    static WIDE: RefCell<(Vec<f64>, Vec<f64>, Vec<f64>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

impl Conv3x3 {
    fn pixels(&self) -> usize {
        self.height * self.width
    }

    /// Splits the output pixels into chunks: a multiple of the thread count (so that every
    /// thread gets the same work), each small enough for [`IM2COL_BUDGET_BYTES`], or for
    /// [`WORKING_SET_BYTES`] when `all_taps` go into one product.
    fn chunks(&self, threads: usize, all_taps: bool) -> Vec<Range<usize>> {
        let p = self.pixels();
        let (bytes, budget) = if all_taps {
            ((9 * self.c_in + self.c_out) * p * std::mem::size_of::<f64>(), WORKING_SET_BYTES)
        } else {
            (9 * self.c_in * p * std::mem::size_of::<f32>(), IM2COL_BUDGET_BYTES)
        };
        let budget = cpu_caches::scaled(budget);
        split_work(p, bytes, budget, threads, p.div_ceil(MIN_CHUNK_PIXELS))
    }

    /// The stored kernel, if all its taps go into one product ([`Conv3x3::chunk_all_taps`]).
    fn all_taps<'k>(&self, kernel: Filter<'k>) -> Option<&'k [f32]> {
        match kernel {
            Filter::Plain(k) if 9 * self.c_in <= CHANNEL_BLOCK => Some(k),
            _ => None,
        }
    }

    /// `conv3x3(input, kernel)` with padding 1, then `epilogue`.
    ///
    /// `input` is `[c_in, height, width]` (row-major); the result is `[c_out, height, width]`.
    pub(crate) fn run(&self, input: &[f32], kernel: Filter<'_>, epilogue: Epilogue<'_>) -> Vec<f32> {
        self.check(input, kernel, epilogue);
        let p = self.pixels();
        let mut out = vec![0f32; self.c_out * p];
        if p == 0 || self.c_out == 0 {
            return out;
        }
        let all_taps = self.all_taps(kernel);
        let ranges = self.chunks(rayon::current_num_threads(), all_taps.is_some());
        let parts = split_planes(&mut out, p, &ranges);
        parts.into_par_iter().zip(ranges).for_each(|(mut rows, range)| {
            SCRATCH.with(|scratch| {
                let (col, product) = &mut *scratch.borrow_mut();
                let start = range.start;
                match all_taps {
                    Some(k) => self.chunk_all_taps(input, k, range, col, product),
                    None => self.chunk(input, kernel, range, col, product),
                }
                epilogue.store(&mut rows, product, start, p);
            })
        });
        out
    }

    /// Panics unless the operands have this convolution's shapes: `input` `[c_in, h, w]`,
    /// a kernel of `c_out c_in 9` taps, and the epilogue's bias, gradient and mask to match.
    pub(crate) fn check(&self, input: &[f32], kernel: Filter<'_>, epilogue: Epilogue<'_>) {
        let p = self.pixels();
        assert_eq!(input.len(), self.c_in * p, "conv input is not [c_in, h, w]");
        assert_eq!(kernel.len(), self.c_out * self.c_in * 9, "conv kernel does not have c_out c_in 9 taps");
        epilogue.check(self.c_out, p);
    }

    /// `product = kernel * im2col(input)[.., range]`, `[c_out, range.len()]`.
    ///
    /// One product per kernel tap and block of [`CHANNEL_BLOCK`] input channels, summed into
    /// `product` by `gemm`: each sum in f32 registers then runs over at most 64 terms instead
    /// of 9 c_in, which makes the result 2-3 times closer to exact (so max pooling picks the
    /// f64 reference's winners more often); the order of operations is the same for every
    /// pixel, so equal inputs still give bit-equal outputs.
    fn chunk(
        &self,
        input: &[f32],
        kernel: Filter<'_>,
        range: Range<usize>,
        col: &mut Vec<f32>,
        product: &mut Vec<f32>,
    ) {
        let n = range.len();
        product.resize(self.c_out * n, 0.0);
        col.resize(self.c_in * n, 0.0);
        for tap in 0..9 {
            self.im2col_tap(input, range.clone(), tap, col, 1);
            for first in (0..self.c_in).step_by(CHANNEL_BLOCK) {
                let k = CHANNEL_BLOCK.min(self.c_in - first);
                let taps = kernel.matrix(self.c_in, self.c_out, tap, first);
                matmul(self.c_out, n, k, taps, &col[first * n..], product, tap > 0 || first > 0);
            }
        }
    }

    /// [`Conv3x3::chunk`] for few input channels (conv1_1's 3), where a product per tap would
    /// have only `c_in` terms and `gemm` would spend its time loading and storing `product`:
    /// all `9 c_in` taps of the stored kernel `k` go into one product, which its
    /// `[c_out, c_in * 9]` layout allows. That product runs in f64: conv1_1 reads the pixels
    /// themselves (0-255 less the mean, with Caffe's pre-processing), where one f32 sum of 27
    /// terms moved a golden gradient entry by 1.2e-3 (the tolerance is 1e-3), and a product
    /// this small is bound by memory, not arithmetic.
    fn chunk_all_taps(
        &self,
        input: &[f32],
        k: &[f32],
        range: Range<usize>,
        col: &mut Vec<f32>,
        product: &mut Vec<f32>,
    ) {
        let n = range.len();
        product.resize(self.c_out * n, 0.0);
        col.resize(9 * self.c_in * n, 0.0);
        for tap in 0..9 {
            // Row ci * 9 + tap, as the kernel's column of that tap.
            self.im2col_tap(input, range.clone(), tap, col, 9);
        }
        WIDE.with(|wide| {
            let (wide_kernel, wide_col, wide_product) = &mut *wide.borrow_mut();
            let widen = |to: &mut Vec<f64>, from: &[f32]| {
                to.clear();
                to.extend(from.iter().map(|&v| f64::from(v)));
            };
            widen(wide_kernel, k);
            widen(wide_col, col);
            wide_product.resize(self.c_out * n, 0.0);
            let taps = Strided { data: &wide_kernel[..], row_stride: 9 * self.c_in, col_stride: 1 };
            matmul(self.c_out, n, 9 * self.c_in, taps, wide_col, wide_product, false);
            for (p, &w) in product.iter_mut().zip(wide_product.iter()) {
                *p = w as f32;
            }
        });
    }

    /// `col[row * n + (p - start)] = input[ci, y + ky - 1, x + kx - 1]` (zero outside the
    /// image) for output pixels `p = y * width + x` in `range`, `tap = 3 ky + kx`; the row
    /// of channel `ci` is `ci`, or `ci * 9 + tap` with `taps_per_channel` 9.
    fn im2col_tap(
        &self,
        input: &[f32],
        range: Range<usize>,
        tap: usize,
        col: &mut [f32],
        taps_per_channel: usize,
    ) {
        let (h, w) = (self.height, self.width);
        let (ky, kx) = (tap / 3, tap % 3);
        let n = range.len();
        let first_row = if taps_per_channel == 1 { 0 } else { tap };
        for (ci, plane) in input.chunks_exact(h * w).enumerate() {
            let dst = &mut col[(ci * taps_per_channel + first_row) * n..][..n];
            let mut p = range.start;
            while p < range.end {
                let (y, x0) = (p / w, p % w);
                let x1 = w.min(x0 + range.end - p);
                let seg = &mut dst[p - range.start..][..x1 - x0];
                shifted_row(plane, h, w, y as isize + ky as isize - 1, x0, kx, seg);
                p += x1 - x0;
            }
        }
    }
}

/// `seg[i] = plane[iy, x0 + i + kx - 1]`, zero where that falls outside the plane.
#[inline]
fn shifted_row(plane: &[f32], h: usize, w: usize, iy: isize, x0: usize, kx: usize, seg: &mut [f32]) {
    if iy < 0 || iy >= h as isize {
        seg.fill(0.0);
        return;
    }
    let row = &plane[iy as usize * w..][..w];
    // Source columns x0 + kx - 1 .. x0 + kx - 1 + len, clipped to 0..w.
    let start = x0 as isize + kx as isize - 1;
    let end = start + seg.len() as isize;
    let lo = start.max(0);
    let hi = end.min(w as isize);
    let lead = (lo - start) as usize;
    seg[..lead].fill(0.0);
    if hi > lo {
        let len = (hi - lo) as usize;
        seg[lead..lead + len].copy_from_slice(&row[lo as usize..hi as usize]);
        seg[lead + len..].fill(0.0);
    } else {
        seg[lead..].fill(0.0);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use easel_testkit::Rng;

    /// Straightforward direct convolution plus bias in f64: the reference of the kernels'
    /// tests (`kernel` is `[c_out, c_in, 3, 3]`).
    pub(crate) fn direct(s: &Conv3x3, input: &[f32], kernel: &[f32], bias: &[f32]) -> Vec<f64> {
        let (h, w) = (s.height as isize, s.width as isize);
        let mut out = vec![0f64; s.c_out * s.height * s.width];
        for co in 0..s.c_out {
            for y in 0..h {
                for x in 0..w {
                    let mut acc = bias[co] as f64;
                    for ci in 0..s.c_in {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (y + ky - 1, x + kx - 1);
                                if iy >= 0 && iy < h && ix >= 0 && ix < w {
                                    let v =
                                        input[(ci * s.height + iy as usize) * s.width + ix as usize] as f64;
                                    let k = kernel[((co * s.c_in + ci) * 3 + ky as usize) * 3 + kx as usize]
                                        as f64;
                                    acc += v * k;
                                }
                            }
                        }
                    }
                    out[(co * s.height + y as usize) * s.width + x as usize] = acc;
                }
            }
        }
        out
    }

    #[test]
    fn matches_direct_convolution_on_odd_shapes() {
        for &(c_in, c_out, height, width) in
            &[(3, 8, 5, 7), (1, 1, 1, 1), (4, 3, 1, 9), (5, 6, 9, 1), (16, 32, 13, 11), (2, 2, 2, 2)]
        {
            let s = Conv3x3 { c_in, c_out, height, width };
            let input = Rng::new(1).uniform_vec(c_in * height * width);
            let kernel = Rng::new(2).uniform_vec(c_out * c_in * 9);
            let bias = Rng::new(3).uniform_vec(c_out);
            let want: Vec<f32> = direct(&s, &input, &kernel, &bias).iter().map(|&v| v as f32).collect();
            let got = s.run(&input, Filter::Plain(&kernel), Epilogue::Bias(&bias));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{s:?}: {g} vs {w}");
            }
            let got = s.run(&input, Filter::Plain(&kernel), Epilogue::BiasRelu(&bias));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w.max(0.0)).abs() <= 1e-5 * (1.0 + w.abs()), "{s:?} relu: {g} vs {w}");
            }
        }
    }

    #[test]
    fn chunks_cover_every_pixel_once() {
        for &(c_in, h, w) in &[(3, 384, 512), (64, 384, 512), (512, 24, 32), (512, 1, 1), (64, 7, 3)] {
            let s = Conv3x3 { c_in, c_out: 64, height: h, width: w };
            for threads in 1..4 {
                let chunks = s.chunks(threads, c_in == 3);
                assert_eq!(chunks.first().map(|r| r.start), Some(0));
                assert_eq!(chunks.last().map(|r| r.end), Some(h * w));
                assert!(chunks.windows(2).all(|p| p[0].end == p[1].start && !p[0].is_empty()));
            }
        }
    }
}
