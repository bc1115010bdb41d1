//! The validated form of a configuration, with its plugins built.

use std::path::PathBuf;

use easel_core::{Loss, Optimizer, OptionError, Options, Registry};
use easel_vgg::{Pooling, Preprocess, Winograd, DEFAULT_KERNEL_CACHE_BYTES};
use toml::Table;

/// How the optimised image starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    Content,
    Noise,
    Style,
}

/// Where tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA if the binary has it and a GPU answers, else Metal likewise, else the CPU. Decided
    /// when the model loads (easel-engine), since validation touches no device.
    Auto,
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl std::fmt::Display for DeviceChoice {
    /// As written in `model.device` (device 0 without its number), for messages naming the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(0) => f.write_str("cuda"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal(0) => f.write_str("metal"),
            DeviceChoice::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

/// Which implementation runs the feature stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// easel's own kernels on the CPU, candle's tensor ops on a GPU.
    Auto,
    /// candle's tensor ops on any device: on the CPU, the path a GPU takes (slower than
    /// easel's kernels there), to compare results with or to measure.
    Candle,
}

/// Image format of results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
}

impl OutputFormat {
    /// The file extension, without a dot.
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpg",
        }
    }
}

/// `[run]`: sizes, schedule and start of the optimisation.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    pub size: u32,
    pub scales: u32,
    pub iterations: u32,
    pub init: Init,
    pub seed: u64,
    pub save_every: u32,
    pub style_scale: f64,
    pub preserve_colors: bool,
}

impl RunSettings {
    /// The longest edge at each scale, coarse to fine, ending at `size`.
    pub fn scale_sizes(&self) -> Vec<u32> {
        (0..self.scales).rev().map(|k| (self.size >> k).max(1)).collect()
    }
}

/// `[model]`: which weights and how the network is run.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    pub weights: Option<PathBuf>,
    pub pooling: Pooling,
    pub preprocess: Preprocess,
    pub winograd: Winograd,
    /// MiB of transformed Winograd kernels kept across iterations.
    pub kernel_cache_mb: u32,
    pub device: DeviceChoice,
    pub backend: BackendChoice,
    /// 0: evaluate the image whole if it fits the memory budget, else in tiles of the size the
    /// planner picks; N (a multiple of 64): always in tiles of N pixels.
    pub tile_size: u32,
}

/// `[limits]`: what input files are accepted, and the memory a job may plan to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_pixels: u64,
    pub max_bytes: u64,
    /// MiB a job may use at its peak; 0: 75% of the memory available when it starts (or of
    /// the cgroup's `memory.max`, if lower).
    pub memory_mb: u64,
}

/// `[output]`: how results are written by the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputSettings {
    pub format: OutputFormat,
    pub jpeg_quality: u8,
}

/// `[daemon]`: how `easel watch` runs a drop folder. Read from the daemon's config; a job's
/// sidecar may not set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonSettings {
    /// A file without a rename or close-after-write event is taken once its size and mtime
    /// have not changed for this long.
    pub settle_ms: u64,
    /// How long a complete image waits for its `NAME.toml` sidecar before it runs without one.
    pub sidecar_wait_ms: u64,
    /// Write a checkpoint every N iterations (0: only on shutdown).
    pub checkpoint_every: u32,
    /// Jobs run at once, each on its own thread.
    pub workers: u32,
    /// Rescan `inbox/` every N ms instead of using filesystem events (0: events). For NFS/SMB.
    pub poll_ms: u64,
    /// Move originals to `done/` after success (false: delete them).
    pub keep_originals: bool,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            settle_ms: 3000,
            sidecar_wait_ms: 2000,
            checkpoint_every: 20,
            workers: 1,
            poll_ms: 0,
            keep_originals: true,
        }
    }
}

/// One `[[style]]` image and its blend weight.
#[derive(Debug, Clone, PartialEq)]
pub struct StyleSpec {
    pub path: PathBuf,
    pub weight: f64,
}

/// One `[[loss]]`, built.
pub struct WeightedLoss {
    pub kind: &'static str,
    pub weight: f64,
    pub loss: Box<dyn Loss>,
}

/// The `[optimizer]`, built.
pub struct NamedOptimizer {
    /// Its `type`.
    pub kind: &'static str,
    /// The optimiser its plugin built.
    pub plugin: Box<dyn Optimizer>,
}

/// A complete, valid job description.
pub struct Plan {
    pub run: RunSettings,
    pub model: ModelSettings,
    pub limits: Limits,
    pub output: OutputSettings,
    pub styles: Vec<StyleSpec>,
    pub losses: Vec<WeightedLoss>,
    pub optimizer: NamedOptimizer,
    pub daemon: DaemonSettings,
    /// The merged configuration this plan was made from (for provenance).
    pub merged: Table,
}

const MAX_SIDE: u64 = 16384;

fn device(o: &mut Options<'_>) -> DeviceChoice {
    let Some(text) = o.string("device") else { return DeviceChoice::Auto };
    let parsed = match text.split_once(':') {
        None if text == "auto" => Some(DeviceChoice::Auto),
        None if text == "cpu" => Some(DeviceChoice::Cpu),
        None if text == "cuda" => Some(DeviceChoice::Cuda(0)),
        None if text == "metal" => Some(DeviceChoice::Metal(0)),
        Some(("cuda", n)) => n.parse().ok().map(DeviceChoice::Cuda),
        Some(("metal", n)) => n.parse().ok().map(DeviceChoice::Metal),
        _ => None,
    };
    parsed.unwrap_or_else(|| {
        o.error(
            "device",
            format!("unknown device \"{text}\"; expected auto, cpu, cuda, cuda:N, metal or metal:N"),
        );
        DeviceChoice::Auto
    })
}

fn run_settings(o: &mut Options<'_>) -> RunSettings {
    let size = o.integer("size", 512, 16, MAX_SIDE) as u32;
    let scales = o.integer("scales", 1, 1, 8) as u32;
    if (size >> (scales - 1)) < 16 {
        o.error("scales", format!("{scales} scales of size {size} start below 16 pixels"));
    }
    RunSettings {
        size,
        scales,
        iterations: o.integer("iterations", 500, 1, 1_000_000) as u32,
        init: o.choice(
            "init",
            Init::Content,
            &[("content", Init::Content), ("noise", Init::Noise), ("style", Init::Style)],
        ),
        seed: o.integer("seed", 0, 0, i64::MAX as u64),
        save_every: o.integer("save_every", 0, 0, 1_000_000) as u32,
        style_scale: o.number_in("style_scale", 1.0, 0.01, 16.0, false),
        preserve_colors: o.boolean("preserve_colors", false),
    }
}

fn model_settings(o: &mut Options<'_>) -> ModelSettings {
    ModelSettings {
        weights: o.string("weights").map(PathBuf::from),
        pooling: o.choice("pooling", Pooling::Max, &[("max", Pooling::Max), ("avg", Pooling::Avg)]),
        preprocess: o.choice(
            "preprocess",
            Preprocess::Torchvision,
            &[("torchvision", Preprocess::Torchvision), ("caffe", Preprocess::Caffe)],
        ),
        winograd: o.choice(
            "winograd",
            Winograd::Deep,
            &[
                ("none", Winograd::None),
                ("gradients", Winograd::Gradients),
                ("deep", Winograd::Deep),
                ("all", Winograd::All),
            ],
        ),
        kernel_cache_mb: o.integer("kernel_cache_mb", (DEFAULT_KERNEL_CACHE_BYTES >> 20) as u64, 0, 1 << 20)
            as u32,
        device: device(o),
        backend: o.choice(
            "backend",
            BackendChoice::Auto,
            &[("auto", BackendChoice::Auto), ("candle", BackendChoice::Candle)],
        ),
        tile_size: tile_size(o),
    }
}

/// `model.tile_size`: 0, or a multiple of 64 (where the Winograd tiles of the deepest blocks
/// start, so tiled features equal the whole image's).
fn tile_size(o: &mut Options<'_>) -> u32 {
    let size = o.integer("tile_size", 0, 0, 1 << 16) as u32;
    if !size.is_multiple_of(64) {
        let down = size / 64 * 64;
        let hint = if down == 0 { "64".to_string() } else { format!("{down} or {}", down + 64) };
        o.error(
            "tile_size",
            format!("must be 0 (as the memory planner decides) or a multiple of 64, such as {hint}"),
        );
        return 0;
    }
    size
}

fn daemon_settings(o: &mut Options<'_>) -> DaemonSettings {
    let d = DaemonSettings::default();
    DaemonSettings {
        settle_ms: o.integer("settle_ms", d.settle_ms, 0, 86_400_000),
        sidecar_wait_ms: o.integer("sidecar_wait_ms", d.sidecar_wait_ms, 0, 86_400_000),
        checkpoint_every: o.integer("checkpoint_every", d.checkpoint_every as u64, 0, 1_000_000) as u32,
        workers: o.integer("workers", d.workers as u64, 1, 256) as u32,
        poll_ms: o.integer("poll_ms", d.poll_ms, 0, 86_400_000),
        keep_originals: o.boolean("keep_originals", d.keep_originals),
    }
}

fn section<T>(top: &mut Options<'_>, key: &str, read: impl FnOnce(&mut Options<'_>) -> T) -> T {
    let empty = Table::new();
    let table = top.table(key).unwrap_or(&empty);
    let mut o = Options::new(table, key);
    let value = read(&mut o);
    top.absorb(o.finish());
    value
}

fn plugin_type<'a>(o: &mut Options<'a>, known: String) -> Option<&'a str> {
    match o.string("type") {
        Some(name) => Some(name),
        None if !o.has_errors() => {
            o.error("type", format!("missing; one of: {known}"));
            None
        }
        None => None,
    }
}

impl Plan {
    /// Validates a merged configuration table and builds its plugins from `registry`.
    pub fn from_table(merged: Table, registry: &Registry) -> Result<Plan, Vec<OptionError>> {
        let mut top = Options::new(&merged, "");
        let run = section(&mut top, "run", run_settings);
        let model = section(&mut top, "model", model_settings);
        let limits = section(&mut top, "limits", |o| Limits {
            max_pixels: o.integer("max_pixels", 50_000_000, 1, u64::MAX >> 1),
            max_bytes: o.integer("max_bytes", 256 << 20, 1, u64::MAX >> 1),
            memory_mb: o.integer("memory_mb", 0, 0, 1 << 30),
        });
        let output = section(&mut top, "output", |o| OutputSettings {
            format: o.choice(
                "format",
                OutputFormat::Png,
                &[("png", OutputFormat::Png), ("jpeg", OutputFormat::Jpeg), ("jpg", OutputFormat::Jpeg)],
            ),
            jpeg_quality: o.integer("jpeg_quality", 92, 1, 100) as u8,
        });
        let daemon = section(&mut top, "daemon", daemon_settings);

        let mut styles = Vec::new();
        for (i, table) in top.tables("style").unwrap_or_default().into_iter().enumerate() {
            let mut o = Options::new(table, format!("style[{i}]"));
            let path = o.string("path");
            if path.is_none() && !o.has_errors() {
                o.error("path", "missing: the style image's file");
            }
            let weight = o.positive("weight", 1.0);
            if let Some(path) = path {
                styles.push(StyleSpec { path: PathBuf::from(path), weight });
            }
            top.absorb(o.finish());
        }

        let mut losses = Vec::new();
        let loss_tables = top.tables("loss").unwrap_or_default();
        if loss_tables.is_empty() {
            top.error("loss", format!("at least one [[loss]] is needed; types: {}", registry.loss_names()));
        }
        for (i, table) in loss_tables.into_iter().enumerate() {
            let mut o = Options::new(table, format!("loss[{i}]"));
            let weight = o.positive("weight", 1.0);
            if let Some(name) = plugin_type(&mut o, registry.loss_names()) {
                match registry.loss(name) {
                    Some(factory) => {
                        let loss = factory.build(&mut o);
                        losses.push(WeightedLoss { kind: factory.name(), weight, loss });
                    }
                    None => {
                        let known = registry.loss_names();
                        o.error("type", format!("unknown loss \"{name}\"; available: {known}"));
                        // Without a plugin the other keys cannot be judged; do not call them unknown.
                        table.keys().for_each(|k| o.allow(k));
                    }
                }
            }
            top.absorb(o.finish());
        }

        let empty = Table::new();
        let optimizer_table = top.table("optimizer").unwrap_or(&empty);
        let mut o = Options::new(optimizer_table, "optimizer");
        let mut optimizer = None;
        if let Some(name) = plugin_type(&mut o, registry.optimizer_names()) {
            match registry.optimizer(name) {
                Some(factory) => {
                    optimizer = Some(NamedOptimizer { kind: factory.name(), plugin: factory.build(&mut o) })
                }
                None => {
                    let known = registry.optimizer_names();
                    o.error("type", format!("unknown optimizer \"{name}\"; available: {known}"));
                    optimizer_table.keys().for_each(|k| o.allow(k));
                }
            }
        }
        top.absorb(o.finish());

        let errors = top.finish();
        match optimizer {
            Some(optimizer) if errors.is_empty() => {
                Ok(Plan { run, model, limits, output, styles, losses, optimizer, daemon, merged })
            }
            _ => Err(errors),
        }
    }
}
