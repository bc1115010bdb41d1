//! How the C allocator treats the large, short-lived buffers of a run (glibc only).
//!
//! Every evaluation allocates and frees activations and gradients of tens of MB. glibc
//! gives each block above its mmap threshold (which it adjusts up to 32 MiB at most) a
//! fresh `mmap` and unmaps it when freed, so every evaluation faulted in and zeroed the same
//! amount of memory again, at a large cost in page faults and system time (the README has
//! the figures). [`reuse_large_blocks`] keeps such blocks on the heap, where the next
//! evaluation finds them already mapped. Peak memory stays the same,
//! as the same buffers are live at the peak; [`release_free_memory`] hands the free pages
//! back to the system when a long-lived process (the daemon) goes idle.
//!
//! Elsewhere (musl, macOS, Windows) both are no-ops: those allocators have their own policies.

/// Blocks up to this size come from the heap instead of a mapping of their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 << 20;

/// Free memory at the top of the heap that `free` keeps instead of returning it at once:
/// more than one evaluation at 512 px frees in a row, so the next one does not refault it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 512 << 20;

/// Makes freed large blocks reusable without new page faults; `true` if the allocator took
/// the settings. Call it once, early in the process.
pub fn reuse_large_blocks() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's malloc parameters, takes plain integers and
        // is thread-safe (it takes the arena locks); any value is valid input (it returns 0
        // for the ones it refuses).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Returns the heap's free pages to the system (after a job, before waiting for the next).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that no allocation uses; it takes the arena
    // locks itself and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
