//! How the work of one convolution is cut into tasks for the rayon pool, and where each task writes.

use std::ops::Range;

/// Splits `0..units` into consecutive ranges of equal length (the last may be shorter) for
/// parallel tasks: as many as keep each task's share of `bytes` within `budget`, rounded up
/// to a multiple of `threads` (so that every thread gets the same work), at most `max_parts`.
pub(crate) fn split_work(
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
pub(crate) fn split_planes<'a>(
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
