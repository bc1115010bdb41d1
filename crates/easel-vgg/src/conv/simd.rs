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
pub(super) enum Level {
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

/// Tests lower the level to compare the variants on one machine (process-wide: the work
/// runs on rayon's threads; the variants give equal results, so other tests do not notice).
#[cfg(test)]
static CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(Level::Avx512 as u8);

/// Makes [`widest`] use at most `level` (tests only).
#[cfg(test)]
pub(super) fn cap(level: Level) {
    CAP.store(level as u8, std::sync::atomic::Ordering::SeqCst);
}

/// The level [`widest`] uses now.
#[inline(always)]
pub(super) fn level() -> Level {
    #[cfg(test)]
    let cap = match CAP.load(std::sync::atomic::Ordering::SeqCst) {
        0 => Level::Baseline,
        1 => Level::Avx2,
        _ => Level::Avx512,
    };
    #[cfg(not(test))]
    let cap = Level::Avx512;
    detected().min(cap)
}

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
    match level() {
        // SAFETY: `level` is at most what `detected` found this CPU to support.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { avx512(k) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2(k) },
        _ => k.run(),
    }
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
