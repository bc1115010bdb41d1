//! Run-time choice of the vector unit for easel's own loops (`gemm` makes its own choice).
//!
//! Release builds target the architecture's baseline (SSE2 on x86-64), so that one binary runs
//! on every CPU; loops written lane by lane then use 4-wide vectors. [`widest`] compiles a
//! piece of work ([`Kernel`]) a second and third time with AVX-512 and AVX2 enabled and calls
//! the best one the CPU has. The vector code does the same arithmetic in the same order as
//! the baseline (Rust never fuses a multiply and an add on its own), so results do not depend
//! on the CPU (a test checks this bit for bit). aarch64's baseline already has NEON.

/// The vector units [`widest`] can use, narrowest first (only the baseline off x86-64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Level {
    Baseline,
    Avx2,
    Avx512,
}

/// The widest level this CPU has.
#[inline(always)]
fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// A piece of work to compile for several vector units: `run` must be `#[inline(always)]`
/// (and so must what it calls), so that it is compiled into each of [`widest`]'s variants.
/// (A closure would not do: its body is compiled once, with the baseline features.)
pub(crate) trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `k` compiled for AVX-512 or AVX2 when the CPU has them (checked at run time, cached
/// by std), else for the baseline.
#[inline(always)]
pub(crate) fn widest<K: Kernel>(k: K) -> K::Output {
    // SAFETY: `detected` is what this CPU supports.
    unsafe { run_at(detected(), k) }
}

/// Runs `k` compiled for `level`, if this CPU has that vector unit (`None` if not): how tests
/// compare the variants, without a process-wide setting that tests running in parallel
/// would share.
#[cfg(test)]
pub(crate) fn at<K: Kernel>(level: Level, k: K) -> Option<K::Output> {
    // SAFETY: checked against what this CPU supports just before.
    (level <= detected()).then(|| unsafe { run_at(level, k) })
}

/// Runs `k` compiled for `level`.
///
/// # Safety
///
/// The CPU must support `level` (it must be at most [`detected`]).
#[inline(always)]
unsafe fn run_at<K: Kernel>(level: Level, k: K) -> K::Output {
    match level {
        // SAFETY: this CPU supports `level`, by this function's contract.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { avx512(k) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2(k) },
        _ => baseline(k),
    }
}

/// `k.run()` compiled for the architecture's baseline (NEON on aarch64), kept out of line as
/// the other variants are: each kernel is then one function of its own, `simd::baseline::<K>`
/// (under the v0 symbol mangling), which `.ci/neon-check.sh` finds in the disassembly.
#[inline(never)]
fn baseline<K: Kernel>(k: K) -> K::Output {
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
