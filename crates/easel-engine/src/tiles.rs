//! Where an image is cut for exact tiled evaluation: windows with a halo, on the grids that
//! keep every feature at a tile's own positions equal to the whole image's.
//!
//! Along each axis, tile `k` owns rows `b_k..b_{k+1}` with `b_0 = 0`, `b_k = k * step + halo`
//! and the last ending at the image's edge; its window reaches `halo` rows past its own on
//! either side (clamped to the image). With `step` a multiple of [`STEP_ALIGN`] and `halo` of
//! [`POOL_GRID`], a window starts at `k * step`: on the 16-px grid of the four poolings (so
//! each pooled cell is the whole image's), and on the 64-px grid on which the F(4x4) Winograd
//! tiles of blocks 3 to 5 start in the whole image (so their sums are even the same).

use std::collections::BTreeMap;
use std::ops::Range;

use easel_core::{LayerId, Placement};
use easel_vgg::memory::{layer_shape, layer_stride, receptive_reach};

/// Own boundaries lie on the grid of the deepest pooling: `2^4` px.
pub const POOL_GRID: usize = 16;

/// A tile's step is a multiple of this: see the module documentation.
pub const STEP_ALIGN: usize = 64;

/// The halo a tile needs around its own rows for features up to `deepest`: the receptive
/// reach, rounded up to the pooling grid (80 px for `relu5_1`, whose reach is 70).
pub fn halo(deepest: LayerId) -> usize {
    receptive_reach(deepest).next_multiple_of(POOL_GRID)
}

/// One tile along one axis: the rows it owns and the rows its window reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub own: Range<usize>,
    pub window: Range<usize>,
}

/// The spans that cut `len` rows with `step` and `halo` (see the module documentation).
pub fn spans(len: usize, step: usize, halo: usize) -> Vec<Span> {
    let mut bounds = vec![0];
    loop {
        let next = bounds.len() * step + halo;
        if next >= len {
            break;
        }
        bounds.push(next);
    }
    bounds.push(len);
    bounds
        .windows(2)
        .map(|b| Span { own: b[0]..b[1], window: b[0].saturating_sub(halo)..(b[1] + halo).min(len) })
        .collect()
}

/// One tile of an image: its window and where its own positions lie, at every layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileCut {
    /// Rows and columns of the image the window covers.
    pub rows: Range<usize>,
    pub cols: Range<usize>,
    /// For each layer: where the tile's own positions lie in the whole map.
    pub placements: BTreeMap<LayerId, Placement>,
    /// For each layer: the first own row and column within the window's map.
    pub offsets: BTreeMap<LayerId, (usize, usize)>,
}

/// The tiles of a `height x width` image for the features of `layers`, at `step` (a multiple
/// of [`STEP_ALIGN`]), row by row.
pub fn cut(height: usize, width: usize, step: usize, layers: &[LayerId]) -> Vec<TileCut> {
    let deepest = layers.iter().copied().max().unwrap_or(LayerId::Pixels);
    let halo = halo(deepest);
    let (rows, cols) = (spans(height, step, halo), spans(width, step, halo));
    let mut tiles = Vec::with_capacity(rows.len() * cols.len());
    for r in &rows {
        for c in &cols {
            let mut placements = BTreeMap::new();
            let mut offsets = BTreeMap::new();
            for &layer in layers {
                let s = layer_stride(layer);
                let (_, whole_height, whole_width) = layer_shape(layer, height, width);
                // The last tile owns the map to its end, floored poolings included.
                let end = |own: &Range<usize>, len: usize, whole: usize| {
                    if own.end == len {
                        whole
                    } else {
                        own.end / s
                    }
                };
                let (top, left) = (r.own.start / s, c.own.start / s);
                placements.insert(
                    layer,
                    Placement {
                        top,
                        left,
                        height: end(&r.own, height, whole_height) - top,
                        width: end(&c.own, width, whole_width) - left,
                        whole_height,
                        whole_width,
                    },
                );
                offsets.insert(layer, (top - r.window.start / s, left - c.window.start / s));
            }
            tiles.push(TileCut { rows: r.window.clone(), cols: c.window.clone(), placements, offsets });
        }
    }
    tiles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_partition_the_rows_and_windows_start_on_the_64_px_grid() {
        for (len, step) in [(1000, 256), (999, 64), (130, 64), (4096, 576), (81, 128), (700, 640)] {
            let halo = halo(LayerId::Relu5_1);
            assert_eq!(halo, 80);
            let spans = spans(len, step, halo);
            assert_eq!(spans[0].own.start, 0);
            assert_eq!(spans.last().map(|s| s.own.end), Some(len));
            for pair in spans.windows(2) {
                assert_eq!(pair[0].own.end, pair[1].own.start, "{len} / {step}: own rows are a partition");
            }
            for s in &spans {
                assert!(!s.own.is_empty(), "{len} / {step}: {s:?}");
                assert_eq!(s.window.start % STEP_ALIGN, 0, "{s:?}");
                assert_eq!(s.own.start % POOL_GRID, 0, "{s:?}");
                assert!(s.window.start == 0 || s.own.start - s.window.start >= halo, "{s:?}");
                assert!(s.window.end == len || s.window.end - s.own.end >= halo, "{s:?}");
                assert!(s.window.len() <= step + 2 * halo, "{s:?}");
            }
        }
        // The image in one tile when the step covers it.
        assert_eq!(spans(300, 256, 80), vec![Span { own: 0..300, window: 0..300 }]);
    }

    #[test]
    fn placements_partition_every_layer_map_even_with_odd_sizes() {
        let layers = [LayerId::Relu1_1, LayerId::Relu3_1, LayerId::Relu4_2, LayerId::Relu5_1];
        let (height, width) = (999, 517);
        let tiles = cut(height, width, 128, &layers);
        for layer in layers {
            let (_, mh, mw) = layer_shape(layer, height, width);
            let mut covered = vec![0u8; mh * mw];
            for tile in &tiles {
                let p = tile.placements[&layer];
                let (oy, ox) = tile.offsets[&layer];
                let (_, wh, ww) = layer_shape(layer, tile.rows.len(), tile.cols.len());
                assert!(
                    oy + p.height <= wh && ox + p.width <= ww,
                    "{layer}: own positions inside the window's map"
                );
                for y in p.top..p.top + p.height {
                    for x in p.left..p.left + p.width {
                        covered[y * mw + x] += 1;
                    }
                }
            }
            assert!(covered.iter().all(|&c| c == 1), "{layer}: every position owned exactly once");
        }
    }
}
