//! `alloc::reuse_large_blocks` against the kernel's own count of page faults: a freed 64 MiB
//! block comes back without faulting its pages in again.
//!
//! A test binary of its own, without the test harness (`harness = false`): the count is per
//! process, so no other test may run beside it, and the blocks must come from the main
//! thread's heap, as the activations of a run do (a harness runs tests on other threads,
//! whose glibc heaps hold at most 64 MiB).

/// Minor page faults of this process so far, from /proc/self/stat (field 10).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat is readable");
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let rest = &stat[stat.rfind(')').expect("stat has the command in parentheses") + 2..];
    rest.split(' ').nth(7).expect("field 10").parse().expect("a number")
}

/// Allocates, writes and frees `bytes`; returns the page faults that took.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn faults_of_a_block(bytes: usize) -> u64 {
    let before = minor_faults();
    let mut block = vec![0u8; bytes];
    for page in block.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&block);
    drop(block);
    minor_faults() - before
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    const BYTES: usize = 64 << 20;
    let pages = (BYTES / 4096) as u64;
    assert!(easel_vgg::alloc::reuse_large_blocks(), "glibc refused the settings");
    let first = faults_of_a_block(BYTES);
    let second = faults_of_a_block(BYTES);
    assert!(first >= pages / 2, "the first use faults its pages in: {first} faults for {pages} pages");
    assert!(second < pages / 10, "the second use faulted {second} times for {pages} pages");
    easel_vgg::alloc::release_free_memory();
    let after_release = faults_of_a_block(BYTES);
    assert!(after_release >= pages / 2, "released pages fault in again: {after_release} for {pages}");
    println!("a freed large block is reused without page faults ... ok ({first}, {second}, {after_release} faults)");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    // Other allocators are left to their own policies: there is nothing to check.
    assert!(!easel_vgg::alloc::reuse_large_blocks());
}
