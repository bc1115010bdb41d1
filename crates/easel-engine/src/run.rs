//! A job's optimisation, one iteration at a time, across coarse-to-fine scales.

use candle_core::Tensor;
use easel_config::{Init, Plan};
use easel_core::{References, StyleReference};
use easel_vgg::Vgg19;

use crate::checkpoint::Checkpoint;
use crate::image_io::{self, from_tensor, resize_exact, resize_longest, to_tensor, RgbImage};
use crate::memory::{self, MemoryPlan};
use crate::objective::StyleObjective;
use crate::terms::layers_of;
use crate::tiled;
use crate::{EngineError, ModelSpec};

/// Where a run stands after an iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Scale index, 0-based, and the number of scales.
    pub scale: usize,
    pub scales: usize,
    pub width: u32,
    pub height: u32,
    /// Iterations done in this scale (1-based after a step) and planned for it.
    pub iteration: u32,
    pub iterations: u32,
    /// Iterations done over all scales, and planned in all.
    pub done: u32,
    pub total: u32,
    /// Loss at the start of this iteration.
    pub loss: f64,
    /// Objective evaluations this iteration spent.
    pub evaluations: usize,
    /// The optimiser stopped early in this scale (no further progress possible).
    pub converged: bool,
}

/// A style-transfer run: owns the plan's plugins and the image being optimised.
pub struct StyleRun {
    plan: Plan,
    vgg: Vgg19,
    content: RgbImage,
    styles: Vec<(RgbImage, f64)>,
    sizes: Vec<u32>,
    scale: usize,
    iteration: u32,
    done: u32,
    x: Tensor,
    finished: bool,
    memory: MemoryPlan,
    /// `Some(step)`: this scale is evaluated in tiles of `step` pixels.
    tile_step: Option<usize>,
}

/// Uniform noise in [0, 1], the same for a seed on every platform and device.
fn noise(seed: u64, width: u32, height: u32) -> RgbImage {
    let mut state = seed ^ 0x6A09_E667_F3BC_C908;
    RgbImage::from_fn(width, height, |_, _| {
        image::Rgb([(); 3].map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
        }))
    })
}

impl StyleRun {
    /// Prepares the first scale: resizes the images, extracts reference features, builds the
    /// losses' targets and the initial image. `styles` pairs each style image with its
    /// blend weight; `vgg` must reach the deepest layer any loss reads.
    pub fn new(
        plan: Plan,
        vgg: Vgg19,
        content: RgbImage,
        styles: Vec<(RgbImage, f64)>,
    ) -> Result<Self, EngineError> {
        let mut run = Self::unstarted(plan, vgg, content, styles)?;
        run.enter_scale(0, None)?;
        Ok(run)
    }

    fn unstarted(
        plan: Plan,
        vgg: Vgg19,
        content: RgbImage,
        styles: Vec<(RgbImage, f64)>,
    ) -> Result<Self, EngineError> {
        let mut plan = plan;
        let images: Vec<(u32, u32)> = styles.iter().map(|(img, _)| img.dimensions()).collect();
        let budget = memory::budget_bytes(&plan.limits);
        // Before any image-sized tensor exists: a job that cannot fit is refused here, with
        // what it would need.
        let spec = ModelSpec::of(&plan);
        let memory = memory::fit(&mut plan, &spec, content.dimensions(), &images, budget)?;
        for change in &memory.adjustments {
            tracing::warn!("{change}");
        }
        let sizes = plan.run.scale_sizes();
        let placeholder = Tensor::zeros((1, 3, 1, 1), candle_core::DType::F32, vgg.device())?;
        let total_weight: f64 = styles.iter().map(|(_, w)| w).sum();
        let styles = styles.into_iter().map(|(img, w)| (img, w / total_weight)).collect();
        Ok(Self {
            plan,
            vgg,
            content,
            styles,
            sizes,
            scale: 0,
            iteration: 0,
            done: 0,
            x: placeholder,
            finished: false,
            memory,
            tile_step: None,
        })
    }

    /// Continues a run from `checkpoint`, taken by [`StyleRun::checkpoint`] of a run with the
    /// same plan and images. The scale's targets are rebuilt exactly as the interrupted run built
    /// them, then the image and the optimiser's state are put back bit for bit, so the rest of
    /// the run is the same as if it had never stopped.
    pub fn resume(
        plan: Plan,
        vgg: Vgg19,
        content: RgbImage,
        styles: Vec<(RgbImage, f64)>,
        checkpoint: Checkpoint,
    ) -> Result<Self, EngineError> {
        let mut run = Self::unstarted(plan, vgg, content, styles)?;
        let bad = |reason: String| Err(EngineError::Checkpoint(reason));
        if checkpoint.optimizer != run.plan.optimizer.kind {
            return bad(format!(
                "it was taken with optimizer \"{}\" but the plan uses \"{}\"",
                checkpoint.optimizer, run.plan.optimizer.kind
            ));
        }
        if checkpoint.scale >= run.sizes.len() || checkpoint.iteration > run.plan.run.iterations {
            return bad(format!(
                "it stands at scale {} iteration {}, beyond this plan's {} scale(s) of {} iterations",
                checkpoint.scale,
                checkpoint.iteration,
                run.sizes.len(),
                run.plan.run.iterations
            ));
        }
        run.enter_scale(checkpoint.scale, None)?;
        if checkpoint.image.dims() != run.x.dims() {
            return bad(format!(
                "its image has shape {:?} but this scale's is {:?}",
                checkpoint.image.dims(),
                run.x.dims()
            ));
        }
        let device = run.vgg.device().clone();
        run.x = checkpoint.image.to_device(&device)?;
        let mut state = checkpoint.state;
        for (_, t) in &mut state.tensors {
            *t = t.to_device(&device)?;
        }
        run.plan.optimizer.plugin.restore(&state)?;
        run.iteration = checkpoint.iteration;
        run.done = checkpoint.done;
        run.finished = checkpoint.finished;
        Ok(run)
    }

    /// A snapshot from which [`StyleRun::resume`] continues exactly where this run stands.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            scale: self.scale,
            iteration: self.iteration,
            done: self.done,
            finished: self.finished,
            optimizer: self.plan.optimizer.kind.to_string(),
            image: self.x.clone(),
            state: self.plan.optimizer.plugin.state(),
        }
    }

    /// Iterations done over all scales (those skipped by an early-converged scale included).
    pub fn iterations_done(&self) -> u32 {
        self.done
    }

    /// The memory it was planned to take, and what the planner changed to fit.
    pub fn memory(&self) -> &MemoryPlan {
        &self.memory
    }

    /// The plan this run follows.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The content image at the current scale's size.
    fn content_at(&self, scale: usize) -> RgbImage {
        resize_longest(&self.content, self.sizes[scale])
    }

    /// Whether a scale of `width x height` is evaluated in tiles, and of what size: always when
    /// `model.tile_size` asks for it; else when the planner chose tiles for the largest scale
    /// and this scale's whole evaluation would take more than a tile's.
    fn tile_step_at(&self, width: u32, height: u32) -> Option<usize> {
        let step = self.memory.tile_size? as usize;
        if self.plan.model.tile_size > 0 {
            return Some(step);
        }
        let backends = ModelSpec::of(&self.plan).backends();
        let whole =
            memory::evaluation_part(backends, &layers_of(&self.plan.losses), height as usize, width as usize);
        (whole > self.memory.evaluation_bytes).then_some(step)
    }

    fn enter_scale(&mut self, scale: usize, previous: Option<&Tensor>) -> Result<(), EngineError> {
        let device = self.vgg.device().clone();
        let content = self.content_at(scale);
        let (w, h) = content.dimensions();
        let style_side = ((self.sizes[scale] as f64 * self.plan.run.style_scale).round() as u32).max(1);
        self.tile_step = self.tile_step_at(w, h);
        if let Some(step) = self.tile_step {
            tracing::info!(
                width = w,
                height = h,
                tile_size = step,
                "evaluating in tiles of {step} px (exact; each window reads {} px around its tile)",
                crate::tiles::halo(
                    layers_of(&self.plan.losses).iter().copied().max().unwrap_or(easel_core::LayerId::Pixels)
                )
            );
            let styles = self
                .styles
                .iter()
                .map(|(image, weight)| Ok((to_tensor(&resize_longest(image, style_side), &device)?, *weight)))
                .collect::<Result<Vec<_>, EngineError>>()?;
            let content = to_tensor(&content, &device)?;
            tiled::prepare(&self.vgg, &mut self.plan.losses, &content, &styles, step)?;
        } else {
            let layers = layers_of(&self.plan.losses);
            let content_features = self.vgg.forward(&to_tensor(&content, &device)?, &layers)?;
            let mut style_refs = Vec::with_capacity(self.styles.len());
            for (image, weight) in &self.styles {
                let resized = resize_longest(image, style_side);
                let features = self.vgg.forward(&to_tensor(&resized, &device)?, &layers)?;
                style_refs.push(StyleReference { features, weight: *weight });
            }
            let references = References { content: &content_features, styles: &style_refs };
            for loss in &mut self.plan.losses {
                loss.loss.prepare(&references)?;
            }
        }
        self.plan.optimizer.plugin.reset();
        self.x = match previous {
            Some(x) => to_tensor(&resize_exact(&from_tensor(x)?, w, h), &device)?,
            None => match self.plan.run.init {
                Init::Content => to_tensor(&content, &device)?,
                Init::Noise => to_tensor(&noise(self.plan.run.seed, w, h), &device)?,
                Init::Style => match self.styles.first() {
                    Some((style, _)) => to_tensor(&resize_exact(style, w, h), &device)?,
                    None => {
                        return Err(EngineError::Core(easel_core::CoreError::MissingReference(
                            "run.init = \"style\" needs a style image".into(),
                        )))
                    }
                },
            },
        };
        self.scale = scale;
        self.iteration = 0;
        Ok(())
    }

    /// Replaces the image being optimised (same shape), e.g. to start from a given image.
    pub fn set_image(&mut self, x: Tensor) -> Result<(), EngineError> {
        if x.dims() != self.x.dims() {
            return Err(EngineError::Shape(format!(
                "image of shape {:?} does not fit this scale's {:?}",
                x.dims(),
                self.x.dims()
            )));
        }
        self.x = x;
        self.plan.optimizer.plugin.reset();
        Ok(())
    }

    /// The image being optimised, `[1, 3, H, W]`, unclamped.
    pub fn image(&self) -> &Tensor {
        &self.x
    }

    /// Iterations planned over all scales.
    pub fn total_iterations(&self) -> u32 {
        self.plan.run.iterations * self.sizes.len() as u32
    }

    /// Whether every scale is done.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The feature stack the run optimises through.
    pub fn vgg(&self) -> &Vgg19 {
        &self.vgg
    }

    /// An objective over the current scale's targets (for `easel eval`).
    pub fn objective(&self) -> StyleObjective<'_> {
        StyleObjective::new(&self.vgg, &self.plan.losses).tiled(self.tile_step)
    }

    /// `Some(step)` while the current scale is evaluated in tiles of `step` pixels.
    pub fn tile_step(&self) -> Option<usize> {
        self.tile_step
    }

    /// Runs one optimiser iteration; moves to the next scale when this one is done.
    /// Returns `None` once the run is finished.
    pub fn step(&mut self) -> Result<Option<Progress>, EngineError> {
        if self.finished {
            return Ok(None);
        }
        let iterations = self.plan.run.iterations;
        let Plan { losses, optimizer, .. } = &mut self.plan;
        let mut objective = StyleObjective::new(&self.vgg, losses).tiled(self.tile_step);
        let step = optimizer.plugin.step(&mut self.x, &mut objective)?;
        self.iteration += 1;
        self.done += 1;
        let (_, _, h, w) = self.x.dims4()?;
        let progress = Progress {
            scale: self.scale,
            scales: self.sizes.len(),
            width: w as u32,
            height: h as u32,
            iteration: self.iteration,
            iterations,
            done: self.done,
            total: self.total_iterations(),
            loss: step.loss,
            evaluations: step.evaluations,
            converged: step.converged,
        };
        if self.iteration >= iterations || step.converged {
            // Skipped iterations of a converged scale still count as done for ETA purposes.
            self.done += iterations - self.iteration;
            if self.scale + 1 < self.sizes.len() {
                let x = self.x.clone();
                self.enter_scale(self.scale + 1, Some(&x))?;
            } else {
                self.finished = true;
            }
        }
        Ok(Some(progress))
    }

    /// The current image as a picture: clamped, with the content's colours if configured.
    pub fn result(&self) -> Result<RgbImage, EngineError> {
        let image = from_tensor(&self.x)?;
        Ok(if self.plan.run.preserve_colors {
            image_io::transfer_luminance(&image, &self.content)
        } else {
            image
        })
    }
}
