//! Dense products on the calling thread through `gemm`'s SIMD kernels, with a strided left operand.

/// A matrix read from `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a, T = f32> {
    pub data: &'a [T],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// The element types [`matmul`] multiplies.
pub(crate) trait Element: Copy + 'static {
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
pub(crate) fn matmul<T: Element>(
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
