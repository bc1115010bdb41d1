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

use super::simd;

/// Geometry of one 3x3, stride-1, pad-1 convolution of a single image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3x3 {
    pub c_in: usize,
    pub c_out: usize,
    pub height: usize,
    pub width: usize,
}

/// Which elements of a gradient pass back through a ReLU: those where its output was > 0,
/// one bit per element (element `i` is bit `i % 64` of word `i / 64`): 1/32 of the memory of
/// keeping the output.
#[derive(Debug, Clone, Copy)]
pub struct Gate<'a>(pub &'a [u64]);

impl Gate<'_> {
    /// The ReLU's backward pass in place: `values` (elements `first..` of the gradient) become
    /// `values + add` where the ReLU output was > 0 and 0 elsewhere. `add`, if any, is the
    /// ReLU's own upstream gradient, whole.
    pub fn pass(&self, values: &mut [f32], add: Option<&[f32]>, first: usize) {
        let add = add.map(|a| &a[first..first + values.len()]);
        simd::widest(GatePass { bits: self.0, values, add, first });
    }

    /// Number of elements it covers, at least (it rounds up to 64).
    pub fn len(&self) -> usize {
        self.0.len() * 64
    }
}

/// [`Gate::pass`] (`add` cut to the values' span), compiled for the CPU's vector unit: whole
/// words of the mask at a time, where each bit selects a lane.
struct GatePass<'a> {
    bits: &'a [u64],
    values: &'a mut [f32],
    add: Option<&'a [f32]>,
    first: usize,
}

impl simd::Kernel for GatePass<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        match self.add {
            Some(add) => gate_pass(self.bits, self.values, self.first, |d, j| d + add[j]),
            None => gate_pass(self.bits, self.values, self.first, |d, _| d),
        }
    }
}

/// `values[j] = f(values[j], j)` where bit `first + j` is set, else 0: the elements up to the
/// next word boundary one by one, then 64 at a time.
#[inline(always)]
fn gate_pass(bits: &[u64], values: &mut [f32], first: usize, f: impl Fn(f32, usize) -> f32) {
    let open = |i: usize| (bits[i / 64] >> (i % 64)) & 1 == 1;
    let n = values.len();
    let head = ((64 - first % 64) % 64).min(n);
    let (head_values, rest) = values.split_at_mut(head);
    for (j, d) in head_values.iter_mut().enumerate() {
        *d = if open(first + j) { f(*d, j) } else { 0.0 };
    }
    let mut words = rest.chunks_exact_mut(64);
    let word0 = (first + head) / 64;
    for (w, chunk) in words.by_ref().enumerate() {
        let chunk: &mut [f32; 64] = chunk.try_into().expect("64 values");
        let (word, j0) = (bits[word0 + w], head + 64 * w);
        for (k, d) in chunk.iter_mut().enumerate() {
            *d = if (word >> k) & 1 == 1 { f(*d, j0 + k) } else { 0.0 };
        }
    }
    let tail = words.into_remainder();
    let j0 = n - tail.len();
    for (j, d) in (j0..).zip(tail) {
        *d = if open(first + j) { f(*d, j) } else { 0.0 };
    }
}

/// Packs `values > 0` (NaN is not) into the bits of a [`Gate`], on the rayon pool.
pub fn positive_bits(values: &[f32]) -> Vec<u64> {
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
            let chunk: &[f32; 64] = chunk.try_into().expect("64 values");
            *word = pack(chunk);
        }
        if let Some(word) = self.words.get_mut(self.values.len() / 64) {
            *word = pack(chunks.remainder());
        }
    }
}

/// What happens to `kernel * input` before it is stored.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// Stored as is (input gradients).
    None,
    /// `+ bias[c_out]`.
    Bias(&'a [f32]),
    /// `(x + add) * [gate open]`: the ReLU backward of the layer below this convolution's
    /// input, with that layer's own upstream gradient `add` (`[c_out, h, w]`) summed in first.
    Gate { add: Option<&'a [f32]>, gate: Gate<'a> },
}

/// The 3x3 kernel a convolution applies, as it is stored.
#[derive(Debug, Clone, Copy)]
pub enum Taps<'a> {
    /// `[c_out, c_in, 3, 3]`, applied as it is.
    Plain(&'a [f32]),
    /// The weight `[c_in, c_out, 3, 3]` of the forward convolution whose input gradient this
    /// convolution computes: applied flipped in y and x, with its channel axes swapped. Read
    /// in place, so that no flipped copy of the weights is kept.
    FlippedOf(&'a [f32]),
}

impl<'a> Taps<'a> {
    fn len(self) -> usize {
        match self {
            Taps::Plain(k) | Taps::FlippedOf(k) => k.len(),
        }
    }

    /// The `[c_out, c_in - first]` matrix of tap `tap` (`3 ky + kx`) for input channels
    /// `first..` of a convolution with `c_in` inputs and `c_out` outputs.
    pub(super) fn matrix(self, c_in: usize, c_out: usize, tap: usize, first: usize) -> Strided<'a> {
        match self {
            // k[co, ci, tap] is at (co c_in + ci) 9 + tap.
            Taps::Plain(k) => Strided { data: &k[first * 9 + tap..], row_stride: 9 * c_in, col_stride: 9 },
            // w[ci, co, 8 - tap] is at (ci c_out + co) 9 + 8 - tap.
            Taps::FlippedOf(w) => {
                Strided { data: &w[first * c_out * 9 + 8 - tap..], row_stride: 9, col_stride: 9 * c_out }
            }
        }
    }
}

/// Upper bound on one task's im2col buffer: chunks of this size keep the buffer in L2/L3
/// and bound extra memory, and still give `gemm` products large enough to run near peak.
const IM2COL_BUDGET_BYTES: usize = 6 << 20;

/// Upper bound on one task's im2col buffer and product together when all taps go into one
/// product (see [`Conv3x3::chunk_all_taps`]): there the product, `c_out` rows against `9 c_in`, is
/// the larger part. Under the im2col budget alone, conv1_1's chunks at 512 px had 12 MB
/// products; keeping both within L2 made it about 1.5x faster.
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
        split_work(p, bytes, budget, threads, p.div_ceil(MIN_CHUNK_PIXELS))
    }

    /// The stored kernel, if all its taps go into one product ([`Conv3x3::chunk_all_taps`]).
    fn all_taps<'k>(&self, kernel: Taps<'k>) -> Option<&'k [f32]> {
        match kernel {
            Taps::Plain(k) if 9 * self.c_in <= CHANNEL_BLOCK => Some(k),
            _ => None,
        }
    }

    /// `conv3x3(input, kernel)` with padding 1, then `epilogue`, then ReLU if `relu`.
    ///
    /// `input` is `[c_in, height, width]` (row-major); the result is `[c_out, height, width]`.
    pub fn run(&self, input: &[f32], kernel: Taps<'_>, epilogue: Epilogue<'_>, relu: bool) -> Vec<f32> {
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
                store(&mut rows, product, epilogue, relu, start, p);
            })
        });
        out
    }

    /// Panics unless the operands have this convolution's shapes: `input` `[c_in, h, w]`,
    /// a kernel of `c_out c_in 9` taps, and the epilogue's bias, gradient and gate to match.
    pub(super) fn check(&self, input: &[f32], kernel: Taps<'_>, epilogue: Epilogue<'_>) {
        let p = self.pixels();
        assert_eq!(input.len(), self.c_in * p, "conv input is not [c_in, h, w]");
        assert_eq!(kernel.len(), self.c_out * self.c_in * 9, "conv kernel does not have c_out c_in 9 taps");
        match epilogue {
            Epilogue::None => {}
            Epilogue::Bias(b) => assert_eq!(b.len(), self.c_out, "conv bias is not [c_out]"),
            Epilogue::Gate { add, gate } => {
                if let Some(a) = add {
                    assert_eq!(a.len(), self.c_out * p, "added gradient is not [c_out, h, w]");
                }
                assert!(gate.len() >= self.c_out * p, "ReLU gate is not [c_out, h, w]");
            }
        }
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
        kernel: Taps<'_>,
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

/// Splits `0..units` into consecutive ranges of equal length (the last may be shorter) for
/// parallel tasks: as many as keep each task's share of `bytes` within `budget`, rounded up
/// to a multiple of `threads` (so that every thread gets the same work), at most `max_parts`.
pub(super) fn split_work(
    units: usize,
    bytes: usize,
    budget: usize,
    threads: usize,
    max_parts: usize,
) -> Vec<Range<usize>> {
    let threads = threads.max(1);
    let n = (bytes.div_ceil(budget).max(threads).div_ceil(threads) * threads).min(max_parts).max(1);
    let len = units.div_ceil(n).max(1);
    (0..units).step_by(len).map(|start| start..(start + len).min(units)).collect()
}

/// Cuts every `plane`-long channel plane of `out` at the boundaries of `ranges` (consecutive
/// ranges covering `0..plane`): part `i` holds range `i` of each plane, so that tasks can
/// write their own parts in parallel without locks.
pub(super) fn split_planes<'a>(
    out: &'a mut [f32],
    plane: usize,
    ranges: &[Range<usize>],
) -> Vec<Vec<&'a mut [f32]>> {
    let mut parts: Vec<Vec<&mut [f32]>> = ranges.iter().map(|_| Vec::new()).collect();
    for row in out.chunks_mut(plane) {
        let mut rest = row;
        for (part, range) in parts.iter_mut().zip(ranges) {
            let (mine, tail) = rest.split_at_mut(range.len());
            part.push(mine);
            rest = tail;
        }
    }
    parts
}

/// Applies the epilogue (and ReLU) in place to output slices that hold raw products; the
/// slices hold output pixels `start..` of planes of `plane` pixels.
pub(super) fn finish(
    rows: &mut [&mut [f32]],
    epilogue: Epilogue<'_>,
    relu: bool,
    start: usize,
    plane: usize,
) {
    for (co, dst) in rows.iter_mut().enumerate() {
        match epilogue {
            Epilogue::None if !relu => {}
            Epilogue::None => dst.iter_mut().for_each(|d| *d = d.max(0.0)),
            Epilogue::Bias(bias) => {
                let b = bias[co];
                if relu {
                    dst.iter_mut().for_each(|d| *d = (*d + b).max(0.0));
                } else {
                    dst.iter_mut().for_each(|d| *d += b);
                }
            }
            Epilogue::Gate { add, gate } => {
                gate.pass(dst, add, co * plane + start);
            }
        }
    }
}

/// Copies each channel's row of `product` into the output slices, then applies the epilogue
/// ([`finish`]); the slices hold output pixels `start..` of planes of `plane` pixels.
fn store(
    rows: &mut [&mut [f32]],
    product: &[f32],
    epilogue: Epilogue<'_>,
    relu: bool,
    start: usize,
    plane: usize,
) {
    let n = rows.first().map_or(0, |r| r.len());
    for (dst, src) in rows.iter_mut().zip(product.chunks_exact(n.max(1))) {
        dst.copy_from_slice(src);
    }
    finish(rows, epilogue, relu, start, plane);
}

/// A matrix read from `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(super) struct Strided<'a, T = f32> {
    pub data: &'a [T],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// The element types [`matmul`] multiplies.
pub(super) trait Element: Copy + 'static {
    const ZERO: Self;
    const ONE: Self;
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl Element for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// `dst[m, n] (+)= lhs[m, k] * rhs[k, n]` (`+=` if `accumulate`), `rhs` and `dst` dense
/// row-major, on the calling thread.
pub(super) fn matmul<T: Element>(
    m: usize,
    n: usize,
    k: usize,
    lhs: Strided<'_, T>,
    rhs: &[T],
    dst: &mut [T],
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::ZERO);
        }
        return;
    }
    let lhs_last = (m - 1) * lhs.row_stride + (k - 1) * lhs.col_stride;
    assert!(
        lhs_last < lhs.data.len() && rhs.len() >= k * n && dst.len() >= m * n,
        "matmul operand too small"
    );
    let (lhs_rs, lhs_cs) = (lhs.row_stride as isize, lhs.col_stride as isize);
    // SAFETY: the assert above guarantees that every element gemm touches is in bounds:
    // dst[i * n + j], lhs[i * row_stride + l * col_stride] and rhs[l * n + j] for i < m,
    // j < n, l < k. `dst` is an exclusive borrow, the inputs are shared borrows that outlive
    // the call, and `Parallelism::None` keeps all accesses on this thread. dst is read only
    // when `accumulate`, and it is initialised memory either way.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            1,
            n as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn gate_pass_matches_a_per_element_reference() {
        let n = 64 * 7 + 5;
        let mask: Vec<f32> = noise(n, 11);
        let bits = positive_bits(&mask);
        let add = noise(n, 12);
        // -0.0 must stay -0.0 where the gate is open and nothing is added.
        let grad: Vec<f32> =
            noise(n, 13).into_iter().enumerate().map(|(i, v)| if i % 5 == 0 { -0.0 } else { v }).collect();
        for (first, len) in [(0, n), (3, 61), (3, 200), (64, 128), (70, n - 70), (n - 1, 1), (5, 0)] {
            for with_add in [false, true] {
                let mut got = grad[first..first + len].to_vec();
                Gate(&bits).pass(&mut got, with_add.then_some(&add[..]), first);
                for (j, &g) in got.iter().enumerate() {
                    let i = first + j;
                    let v = if with_add { grad[i] + add[i] } else { grad[i] };
                    let want = if mask[i] > 0.0 { v } else { 0.0 };
                    assert_eq!(g.to_bits(), want.to_bits(), "first {first} len {len} add {with_add} at {i}");
                }
            }
        }
    }

    #[test]
    fn positive_bits_mark_the_values_above_zero() {
        // Several tasks, and lengths that end mid-word.
        for n in [0, 1, 63, 64, 65, 64 * 1024 * 2 + 5] {
            let values: Vec<f32> = noise(n, n as u64)
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

    /// Straightforward direct convolution plus bias in f64: the reference of the kernels'
    /// tests (`kernel` is `[c_out, c_in, 3, 3]`).
    pub(in super::super) fn direct(s: &Conv3x3, input: &[f32], kernel: &[f32], bias: &[f32]) -> Vec<f64> {
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

    /// Uniform values in [-1, 1) from a fixed seed.
    pub(in super::super) fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut z = seed;
        (0..n)
            .map(|_| {
                z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_direct_convolution_on_odd_shapes() {
        for &(c_in, c_out, height, width) in
            &[(3, 8, 5, 7), (1, 1, 1, 1), (4, 3, 1, 9), (5, 6, 9, 1), (16, 32, 13, 11), (2, 2, 2, 2)]
        {
            let s = Conv3x3 { c_in, c_out, height, width };
            let input = noise(c_in * height * width, 1);
            let kernel = noise(c_out * c_in * 9, 2);
            let bias = noise(c_out, 3);
            let want: Vec<f32> = direct(&s, &input, &kernel, &bias).iter().map(|&v| v as f32).collect();
            let got = s.run(&input, Taps::Plain(&kernel), Epilogue::Bias(&bias), false);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{s:?}: {g} vs {w}");
            }
            let got = s.run(&input, Taps::Plain(&kernel), Epilogue::Bias(&bias), true);
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
