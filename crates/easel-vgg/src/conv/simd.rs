//! Run-time choice of the vector unit for easel's own loops (`gemm` makes its own choice).
//!
//! Release builds target the architecture's baseline (SSE2 on x86-64), so that one binary runs
//! on every CPU; loops written lane by lane then use 4-wide vectors. [`widest`] compiles a
//! piece of work ([`Kernel`]) a second and third time with AVX-512 and AVX2 enabled and calls the best one the
//! CPU has. The vector code does the same arithmetic in the same order as the baseline (Rust
//! never fuses a multiply and an add on its own), so results do not depend on the CPU.
//! aarch64's baseline already has NEON.

/// A piece of work to compile for several vector units: `run` must be `#[inline(always)]`
/// (and so must what it calls), so that it is compiled into each of [`widest`]'s variants.
/// (A closure would not do: its body is compiled once, with the baseline features.)
pub(super) trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `k` compiled for AVX-512 or AVX2 when the CPU has them (checked at run time, cached
/// by std), else for the baseline.
#[inline(always)]
pub(super) fn widest<K: Kernel>(k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { avx512(k) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { avx2(k) };
        }
    }
    k.run()
}

/// `k.run()` compiled with AVX-512F.
///
/// # Safety
///
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<K: Kernel>(k: K) -> K::Output {
    k.run()
}

/// `k.run()` compiled with AVX2.
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2<K: Kernel>(k: K) -> K::Output {
    k.run()
}
