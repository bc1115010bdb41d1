//! The memory planner: what a job will hold at its peak, predicted from the plan and the image
//! sizes before anything image-sized is allocated, and whether that fits the budget.
//!
//! Each part states its own share: the VGG crate the weights, the kernel cache and one
//! evaluation's working set ([`easel_vgg::memory`]); the optimiser its state
//! ([`easel_core::Optimizer::state_bytes`]); each loss its targets
//! ([`easel_core::Loss::target_bytes`]). The planner adds them up for the largest scale, so
//! `easel plan`, the run itself and the daemon use the same numbers.

use easel_config::{Limits, Plan};
use easel_core::{Adjustment, LayerId};
use easel_vgg::memory::{
    evaluation_bytes, forward_bytes, generic_evaluation_bytes, generic_weights_bytes, kernel_cache_bytes,
    layer_shape, weights_bytes, Pass,
};

use crate::terms::{layers_of, untileable};
use crate::{EngineError, ModelSpec};

const MB: u64 = 1 << 20;

/// The process itself, before any model: code, the C and Rust runtimes, the thread pool's
/// stacks, the decoded input files (bounded by `limits`). Measured with `easel bench` at
/// small sizes, where it dominates.
const RUNTIME_BYTES: u64 = 40 * MB;

/// What glibc keeps mapped of an evaluation's freed blocks, and the allocator's own overhead,
/// relative to the working set that [`evaluation_bytes`] counts (fitted to `easel bench`'s
/// peak RSS from 128 to 1024 px; see the README's memory table).
const EVALUATION_OVERHEAD: f64 = 0.9;

/// Bytes of an RGB image tensor (f32) of `width x height`.
fn image_bytes(width: u32, height: u32) -> u64 {
    3 * 4 * u64::from(width) * u64::from(height)
}

/// `(width, height)` of an image of `width x height` resized so its longest edge is `longest`,
/// as [`crate::image_io::resize_longest`] does.
pub fn fitted(width: u32, height: u32, longest: u32) -> (u32, u32) {
    let scale = f64::from(longest) / f64::from(width.max(height).max(1));
    let side = |v: u32| ((f64::from(v) * scale).round() as u32).max(1);
    (side(width), side(height))
}

/// One named part of a prediction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Part {
    pub name: &'static str,
    pub bytes: u64,
}

/// What a job is predicted to hold at its peak.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// The result's size at the last (largest) scale.
    pub width: u32,
    pub height: u32,
    /// The parts at the peak, which is their sum.
    pub parts: Vec<Part>,
    /// The budget planned against.
    pub budget_bytes: u64,
    /// What the planner changed to fit (an L-BFGS history lowered), for the log and the
    /// provenance.
    pub adjustments: Vec<Adjustment>,
    /// `Some(step)`: the image is evaluated in tiles of `step` pixels (see [`crate::tiles`]);
    /// `None`: whole.
    pub tile_size: Option<u32>,
    /// What one evaluation (of the whole image, or of a tile's window) takes, whichever phase
    /// is the peak.
    pub evaluation_bytes: u64,
}

impl MemoryPlan {
    /// The predicted peak resident memory.
    pub fn peak_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }

    /// The parts that jobs in one process share (the runtime, the weights, the kernel cache):
    /// the rest is this job's own.
    pub fn shared_bytes(&self) -> u64 {
        self.part("runtime") + self.part("weights") + self.part("kernel_cache")
    }

    /// Whether the prediction fits the budget, less [`headroom`].
    pub fn fits(&self) -> bool {
        self.peak_bytes() <= usable(self.budget_bytes)
    }

    /// The bytes of the part called `name` (0 if there is none).
    pub fn part(&self, name: &str) -> u64 {
        self.parts.iter().find(|p| p.name == name).map_or(0, |p| p.bytes)
    }
}

/// What the planner leaves unplanned of a budget: 5%, for what its model does not see (the
/// allocator's fragmentation and its bookkeeping, small buffers). Its predictions come within
/// 2-5% below the measured peak where they are low (see the README's memory table), so a job
/// planned to the brim would pass its budget by that much.
pub fn headroom(budget: u64) -> u64 {
    budget / 20
}

/// The part of `budget` a job is planned into.
fn usable(budget: u64) -> u64 {
    budget - headroom(budget)
}

/// The memory budget `limits` gives: `memory_mb`, or when it is 0, 75% of the memory
/// available now, or of the cgroup's `memory.max` if that is lower (Linux; elsewhere 0 means
/// no limit).
pub fn budget_bytes(limits: &Limits) -> u64 {
    if limits.memory_mb > 0 {
        return limits.memory_mb * MB;
    }
    match available_bytes() {
        Some(available) => available / 4 * 3,
        None => u64::MAX,
    }
}

/// Memory this process may still take: the kernel's `MemAvailable`, or what is left under the
/// cgroup's `memory.max` if that is less.
fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 =
        meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let mut available = kb * 1024;
    let cgroup = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok()?.trim().parse().ok()
    };
    if let Some(max) = cgroup("memory.max") {
        available = available.min(max.saturating_sub(cgroup("memory.current").unwrap_or(0)));
    }
    Some(available)
}

/// The backends whose working sets a prediction counts ([`ModelSpec::backends`]): easel's CPU
/// kernels, candle's ops (the generic backend, as a GPU runs them), or either, whichever
/// takes more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backends {
    pub cpu: bool,
    pub generic: bool,
}

impl Backends {
    pub const CPU: Backends = Backends { cpu: true, generic: false };
    pub const GENERIC: Backends = Backends { cpu: false, generic: true };
}

/// What one evaluation of `layers` on a `height x width` image (or tile window) is predicted
/// to take beyond the weights and the kernel cache, on the larger of `backends`.
///
/// On a GPU this is device memory; on a Jetson, whose GPU shares the board's memory, it is the
/// same memory as the rest of the plan, and the budget holds it all.
pub fn evaluation_part(backends: Backends, layers: &[LayerId], height: usize, width: usize) -> u64 {
    let cpu = if backends.cpu { evaluation_bytes(layers, height, width) } else { 0 };
    let generic = if backends.generic { generic_evaluation_bytes(layers, height, width) } else { 0 };
    (cpu.max(generic) as f64 * EVALUATION_OVERHEAD) as u64
}

/// What a forward pass alone of `layers` on a `height x width` image (or window) is predicted
/// to take on the CPU backend, as [`evaluation_part`] for an evaluation.
pub fn forward_part(layers: &[LayerId], height: usize, width: usize) -> u64 {
    (forward_bytes(layers, height, width) as f64 * EVALUATION_OVERHEAD) as u64
}

/// The largest window of a tile of `step` pixels on a `height x width` image, for `layers`.
pub(crate) fn window_of(layers: &[LayerId], height: usize, width: usize, step: u32) -> (usize, usize) {
    let deepest = layers.iter().copied().max().unwrap_or(LayerId::Pixels);
    let side = step as usize + 2 * crate::tiles::halo(deepest);
    (height.min(side), width.min(side))
}

/// The tile size of the passes that run forward only (the global losses' statistics, the
/// reference images' features): a forward pass takes less memory than an evaluation, so its
/// windows may be larger within what an evaluation's window of `step` takes, and fewer
/// halos are computed. A multiple of `step`'s alignment, at least `step`.
///
/// Counted on the CPU backend's model: the generic backend's forward pass takes one
/// convolution band more, and its evaluation a whole trace more, so the bound holds there too.
pub(crate) fn forward_step(layers: &[LayerId], height: usize, width: usize, step: usize) -> usize {
    let window = |s: usize| window_of(layers, height, width, s as u32);
    let (h, w) = window(step);
    let limit = evaluation_part(Backends::CPU, layers, h, w);
    let mut s = step;
    // Beyond the longest side a larger step changes nothing.
    while s < height.max(width) {
        let (h, w) = window(s + crate::tiles::STEP_ALIGN);
        if forward_part(layers, h, w) > limit {
            break;
        }
        s += crate::tiles::STEP_ALIGN;
    }
    s
}

/// Predicts the peak of a job of `plan` on a model of `spec`, for a content image of
/// `content` (width, height) and style images of `styles`, against `budget` bytes, with the
/// image evaluated whole. Pure: no file or device is touched.
pub fn predict(
    plan: &Plan,
    spec: &ModelSpec,
    content: (u32, u32),
    styles: &[(u32, u32)],
    budget: u64,
) -> MemoryPlan {
    predict_with(plan, spec, content, styles, budget, None)
}

/// [`predict`] with the image evaluated in tiles of `tile_size` pixels (`None`: whole). A tile's
/// window replaces the image in the evaluation and the kernel cache's passes; what is held
/// whole (the image, its gradient, the optimiser's state, the content targets) stays.
pub fn predict_with(
    plan: &Plan,
    spec: &ModelSpec,
    content: (u32, u32),
    styles: &[(u32, u32)],
    budget: u64,
    tile_size: Option<u32>,
) -> MemoryPlan {
    let layers = layers_of(&plan.losses);
    // What an evaluation (or a reference's forward pass) runs on: the image, or a tile's window.
    let evaluated = |h: usize, w: usize| match tile_size {
        Some(step) => window_of(&layers, h, w, step),
        None => (h, w),
    };
    let sizes = plan.run.scale_sizes();
    let last = sizes.last().copied().unwrap_or(plan.run.size);
    let (width, height) = fitted(content.0, content.1, last);
    let (h, w) = (height as usize, width as usize);
    let shape = |layer: LayerId| {
        let (c, lh, lw) = layer_shape(layer, h, w);
        (c as u64, (lh * lw) as u64)
    };
    // Every pass the kernel cache sees, in the order a job runs them.
    let mut passes = Vec::new();
    for &size in &sizes {
        let (cw, ch) = fitted(content.0, content.1, size);
        let (ch, cw) = evaluated(ch as usize, cw as usize);
        passes.push(Pass::Forward { height: ch, width: cw });
        let style_side = ((f64::from(size) * plan.run.style_scale).round() as u32).max(1);
        for &(sw, sh) in styles {
            let (sw, sh) = fitted(sw, sh, style_side);
            let (sh, sw) = evaluated(sh as usize, sw as usize);
            passes.push(Pass::Forward { height: sh, width: sw });
        }
        passes.push(Pass::Forward { height: ch, width: cw });
        passes.push(Pass::Backward { height: ch, width: cw });
    }
    let backends = spec.backends();
    // The kernel cache is the CPU backend's.
    let cache = if backends.cpu {
        kernel_cache_bytes(spec.deepest, spec.winograd, u64::from(spec.kernel_cache_mb) * MB, &passes)
    } else {
        0
    };
    let style_side = ((f64::from(last) * plan.run.style_scale).round() as u32).max(1);
    let style_images: u64 = styles
        .iter()
        .map(|&(sw, sh)| {
            let (sw, sh) = fitted(sw, sh, style_side);
            image_bytes(sw, sh)
        })
        .sum();
    let elements = 3 * u64::from(width) * u64::from(height);
    let (eh, ew) = evaluated(h, w);
    let evaluation = Part { name: "evaluation", bytes: evaluation_part(backends, &layers, eh, ew) };
    let image = Part { name: "image", bytes: image_bytes(width, height) };
    let gradient = Part { name: "gradient", bytes: image_bytes(width, height) };
    let previews = if plan.run.save_every > 0 { image_bytes(width, height) } else { 0 };
    let optimizer = Part { name: "optimizer", bytes: plan.optimizer.plugin.state_bytes(elements) + previews };
    // The decoded input files, kept at their own size for the whole run (colour transfer,
    // rescaling at each scale).
    let inputs = std::iter::once(content).chain(styles.iter().copied()).map(|(w, h)| image_bytes(w, h)).sum();
    let weights =
        if backends.generic { generic_weights_bytes(spec.deepest) } else { weights_bytes(spec.deepest) };
    let mut parts = vec![
        Part { name: "runtime", bytes: RUNTIME_BYTES },
        Part { name: "weights", bytes: weights },
        Part { name: "kernel_cache", bytes: cache },
        Part { name: "inputs", bytes: inputs },
        Part { name: "targets", bytes: plan.losses.iter().map(|l| l.loss.target_bytes(&shape)).sum() },
    ];
    // A job goes through three phases, each holding its own parts beside those above: the
    // reference images' features becoming targets at the start of a scale (beside the
    // previous scale's image); an evaluation; and the optimiser's step between evaluations.
    let previous = match sizes.len() {
        0 | 1 => 0,
        n => {
            let (pw, ph) = fitted(content.0, content.1, sizes[n - 2]);
            image_bytes(pw, ph) + plan.optimizer.plugin.state_bytes(3 * u64::from(pw) * u64::from(ph))
        }
    };
    let phases = [
        vec![
            Part { name: "references", bytes: image_bytes(width, height) + style_images + previous },
            evaluation.clone(),
        ],
        vec![image.clone(), optimizer.clone(), gradient.clone(), evaluation.clone()],
        vec![
            image,
            optimizer,
            gradient,
            Part { name: "step", bytes: plan.optimizer.plugin.step_bytes(elements) },
        ],
    ];
    let total = |phase: &Vec<Part>| phase.iter().map(|p| p.bytes).sum::<u64>();
    let evaluation_bytes = evaluation.bytes;
    let peak = phases.into_iter().max_by_key(total).unwrap_or_default();
    parts.extend(peak);
    MemoryPlan {
        width,
        height,
        parts,
        budget_bytes: budget,
        adjustments: Vec::new(),
        tile_size,
        evaluation_bytes,
    }
}

/// Plans `plan` against `budget` bytes, in this order: the image whole, as predicted; whole
/// with the optimiser's state shrunk to fit (an L-BFGS history lowered, said in the result's
/// `adjustments`); in the largest tiles that fit (exact, but slower: see [`crate::tiles`]);
/// in tiles with the state shrunk; else an error with the predicted need and what to change.
/// `model.tile_size` > 0 asks for tiles of that size whatever fits.
pub fn fit(
    plan: &mut Plan,
    spec: &ModelSpec,
    content: (u32, u32),
    styles: &[(u32, u32)],
    budget: u64,
) -> Result<MemoryPlan, EngineError> {
    let forced = (plan.model.tile_size > 0).then_some(plan.model.tile_size);
    let first = predict_with(plan, spec, content, styles, budget, forced);
    if first.fits() {
        return Ok(first);
    }
    if let Some(fitted) = shrink_state(plan, spec, content, styles, budget, forced) {
        return Ok(fitted);
    }
    // The smallest tiles' prediction, once tried: the least the job could take.
    let mut smallest = None;
    if forced.is_none() && tileable(plan) {
        // The largest step first: fewer tiles, less halo computed twice. (Every step is
        // predicted: pure arithmetic, well under a millisecond even at 16384 px.)
        let align = crate::tiles::STEP_ALIGN as u32;
        for step in (1..first.width.max(first.height).div_ceil(align)).rev().map(|k| k * align) {
            let tiled = predict_with(plan, spec, content, styles, budget, Some(step));
            if tiled.fits() {
                return Ok(tiled);
            }
            smallest = Some(tiled);
        }
        // Then the smallest tiles with the optimiser's state shrunk.
        let step = smallest.as_ref().and_then(|s| s.tile_size);
        if let Some(fitted) = step.and_then(|s| shrink_state(plan, spec, content, styles, budget, Some(s))) {
            return Ok(fitted);
        }
    }
    let least = smallest.unwrap_or_else(|| first.clone());
    let whole = first;
    // A size whose image-sized parts fit beside the rest, in the smallest tiles if it may be cut.
    let mut advice = advice(plan, &least);
    let blockers = untileable(&plan.losses);
    if !blockers.is_empty() {
        advice.push_str(&format!(
            "; the {} loss cannot be evaluated in tiles, which would let a larger image fit",
            blockers.join(", ")
        ));
    }
    Err(EngineError::OverBudget {
        need_mb: least.peak_bytes().min(whole.peak_bytes()).div_ceil(MB),
        budget_mb: budget / MB,
        width: whole.width,
        height: whole.height,
        advice,
    })
}

/// The plan with the optimiser's state shrunk to fit beside the rest, if its options allow.
///
/// The builtin L-BFGS shortens its history to exactly what fits, or changes nothing when not
/// even one pair would: so a refusal here leaves the plan as it was. (A third-party optimiser
/// whose `fit_state` shrinks too little would be left shrunk; the job is refused then anyway.)
fn shrink_state(
    plan: &mut Plan,
    spec: &ModelSpec,
    content: (u32, u32),
    styles: &[(u32, u32)],
    budget: u64,
    tile_size: Option<u32>,
) -> Option<MemoryPlan> {
    let predicted = predict_with(plan, spec, content, styles, budget, tile_size);
    let elements = 3 * u64::from(predicted.width) * u64::from(predicted.height);
    let others = predicted.peak_bytes() - predicted.part("optimizer");
    let change = plan.optimizer.plugin.fit_state(elements, usable(budget).saturating_sub(others))?;
    let mut refitted = predict_with(plan, spec, content, styles, budget, tile_size);
    refitted.adjustments.push(change);
    refitted.fits().then_some(refitted)
}

/// Whether every loss of `plan` can be evaluated in tiles.
fn tileable(plan: &Plan) -> bool {
    untileable(&plan.losses).is_empty()
}

/// What to change when a job does not fit: a smaller `run.size` that would, and the
/// optimiser's share if it is large.
fn advice(plan: &Plan, predicted: &MemoryPlan) -> String {
    let fixed = predicted.shared_bytes();
    let scalable = predicted.peak_bytes() - fixed;
    let mut hints = Vec::new();
    let budget = usable(predicted.budget_bytes);
    if budget > fixed && scalable > 0 {
        // Everything else grows with the pixels, so with the square of the side.
        let ratio = ((budget - fixed) as f64 / scalable as f64).sqrt();
        let size = (f64::from(plan.run.size) * ratio * 0.95).floor() as u32;
        if size >= 16 {
            hints.push(format!("run.size = {size} or less"));
        }
    } else {
        hints.push("a larger limits.memory_mb (the model itself does not fit)".to_string());
    }
    let optimizer = predicted.part("optimizer");
    // Adam's two moments are the least a builtin optimiser with state holds.
    if optimizer * 4 > predicted.peak_bytes() && plan.optimizer.kind != "adam" {
        hints.push(format!(
            "optimizer \"{}\" holds {} MB: \"adam\" holds far less (or lower optimizer.history)",
            plan.optimizer.kind,
            optimizer / MB
        ));
    }
    let cache = predicted.part("kernel_cache");
    if cache > 0 && predicted.peak_bytes() - cache <= budget {
        hints.push(format!("model.kernel_cache_mb below {}", cache / MB));
    }
    hints.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_io::resize_longest;
    use easel_config::ConfigLayers;

    fn plan(extra: &str) -> Plan {
        ConfigLayers::defaults()
            .with_text("test.toml", extra)
            .expect("parses")
            .plan(&easel_plugins::builtin())
            .expect("valid plan")
    }

    #[test]
    fn fitted_sizes_are_those_resize_longest_makes() {
        for (w, h, longest) in [(128, 96, 512), (97, 131, 64), (4000, 3000, 333), (1, 500, 17)] {
            let image = crate::RgbImage::new(w, h);
            assert_eq!(
                fitted(w, h, longest),
                resize_longest(&image, longest).dimensions(),
                "{w}x{h} to {longest}"
            );
        }
    }

    #[test]
    fn the_peak_is_the_sum_of_parts_that_grow_with_the_image() {
        let plan = plan("[optimizer]\ntype = \"adam\"");
        let spec = ModelSpec::of(&plan);
        let small = predict(&plan, &spec, (1024, 768), &[(800, 600)], u64::MAX);
        let mut larger = plan;
        larger.run.size = 1024;
        let large = predict(&larger, &spec, (1024, 768), &[(800, 600)], u64::MAX);
        assert_eq!((small.width, small.height), (512, 384));
        assert_eq!(small.peak_bytes(), small.parts.iter().map(|p| p.bytes).sum::<u64>());
        for part in ["evaluation", "image", "gradient", "targets", "optimizer"] {
            // Four times the pixels: about four times the bytes (targets' Gram part does not grow).
            assert!(
                large.part(part) > small.part(part) * 2,
                "{part}: {} vs {}",
                large.part(part),
                small.part(part)
            );
        }
        for part in ["runtime", "weights", "kernel_cache"] {
            assert_eq!(large.part(part), small.part(part), "{part} does not grow with the image");
        }
        // At the peak, an evaluation: Adam holds its two moments.
        assert_eq!(small.part("optimizer"), 8 * 3 * 512 * 384);
        assert_eq!(small.part("step"), 0, "a step's new image is not held during an evaluation");
    }

    #[test]
    fn a_tight_budget_shortens_the_lbfgs_history_and_a_tighter_one_refuses_with_advice() {
        let mut plan = plan("[run]\nsize = 512");
        let spec = ModelSpec::of(&plan);
        let full = predict(&plan, &spec, (1024, 768), &[], u64::MAX);
        let budget = full.peak_bytes() - full.part("optimizer") / 2;
        let fitted = fit(&mut plan, &spec, (1024, 768), &[], budget).expect("fits with a shorter history");
        assert!(fitted.fits() && fitted.peak_bytes() <= budget);
        let change = &fitted.adjustments[0];
        assert_eq!((change.key, change.from), ("optimizer.history", 100));
        assert!(change.to > 1 && change.to < 100, "{change}");
        assert_eq!(plan.optimizer.plugin.state_bytes(1), 4 * (2 * change.to + 6));

        // Adam at 512 px in 400 MB: too much whole, so tiles that fit.
        let mut adam = super::tests::plan("[run]\nsize = 512\n[optimizer]\ntype = \"adam\"");
        let whole = predict(&adam, &spec, (1024, 768), &[], 400 * MB);
        assert!(!whole.fits() && whole.tile_size.is_none());
        let tiled = fit(&mut adam, &spec, (1024, 768), &[], 400 * MB).expect("fits in tiles");
        let step = tiled.tile_size.expect("tiled");
        assert!(
            step.is_multiple_of(64) && step < 512 && tiled.fits() && tiled.adjustments.is_empty(),
            "{tiled:?}"
        );
        assert!(tiled.part("evaluation") < whole.part("evaluation"));
        // The next larger tile would not fit: the planner takes the largest that does.
        assert!(!predict_with(&adam, &spec, (1024, 768), &[], 400 * MB, Some(step + 64)).fits());

        // 150 MB: not even the smallest tiles fit beside the model.
        let err = fit(&mut adam, &spec, (1024, 768), &[], 150 * MB).unwrap_err();
        let EngineError::OverBudget { need_mb, budget_mb, ref advice, .. } = err else { panic!("{err}") };
        assert_eq!(budget_mb, 150);
        assert!(need_mb > 150, "{need_mb}");
        assert!(!advice.is_empty(), "{err}");
        assert!(err.to_string().contains("limits.memory_mb"), "{err}");
    }

    #[test]
    fn a_16384_px_job_is_refused_in_8_gb_and_tiled_in_64() {
        let mut plan = plan("[run]\nsize = 16384\niterations = 1\n[optimizer]\ntype = \"adam\"");
        let spec = ModelSpec::of(&plan);
        // Whole, one evaluation alone would take hundreds of GB.
        let whole = predict(&plan, &spec, (4000, 3000), &[(800, 600)], 64 << 30);
        assert!(whole.part("evaluation") > 200 << 30, "{whole:?}");
        // The image, its gradient, Adam's moments and the content targets alone exceed 8 GB.
        let err = fit(&mut plan, &spec, (4000, 3000), &[(800, 600)], 8 << 30).unwrap_err();
        let EngineError::OverBudget { need_mb, ref advice, .. } = err else { panic!("{err}") };
        assert!(need_mb > 8 << 10 && need_mb < whole.peak_bytes() / MB, "the least, in tiles: {err}");
        // The advised size fits, in tiles.
        let size: u32 = advice
            .strip_prefix("run.size = ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{advice}"));
        assert!(size > 4096, "{advice}");
        plan.run.size = size;
        assert!(fit(&mut plan, &spec, (4000, 3000), &[(800, 600)], 8 << 30).is_ok(), "{size}");
        plan.run.size = 16384;
        let tiled = fit(&mut plan, &spec, (4000, 3000), &[(800, 600)], 64 << 30).expect("tiles fit");
        assert!(tiled.tile_size.is_some() && tiled.fits(), "{tiled:?}");
    }

    #[test]
    fn forward_tiles_are_larger_within_an_evaluation_window_s_memory() {
        // The default job's layers: relu1_1..relu5_1 for style, relu4_2 for content.
        let layers = layers_of(&plan("").losses);
        for (height, width, step) in [(3072, 4096, 576), (315, 421, 64), (768, 1024, 448)] {
            let forward = forward_step(&layers, height, width, step);
            assert!(forward >= step && forward.is_multiple_of(crate::tiles::STEP_ALIGN), "{forward}");
            let (h, w) = window_of(&layers, height, width, forward as u32);
            let (eh, ew) = window_of(&layers, height, width, step as u32);
            assert!(forward_part(&layers, h, w) <= evaluation_part(Backends::CPU, &layers, eh, ew));
        }
        // An evaluation keeps about 1.75 times a forward pass's bytes per pixel: windows a
        // third wider.
        assert_eq!(forward_step(&layers, 3072, 4096, 576), 768);
        assert_eq!(forward_step(&layers, 315, 421, 64), 128);
    }
}
