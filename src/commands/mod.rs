//! The subcommands, sharing how a job is set up from flags, config files and weights.

pub mod bench;
pub mod config;
pub mod eval;
pub mod job;
pub mod plan;
pub mod run;
pub mod watch;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use easel_config::{ConfigLayers, Plan};
use easel_core::Registry;
use easel_engine::{load_image, ModelSpec, StyleRun};
use easel_vgg::WeightsFile;
use toml::{Table, Value};

/// Flags that describe the inputs of any job.
#[derive(Args, Clone)]
pub struct JobArgs {
    /// The photo to paint.
    #[arg(long, value_name = "IMAGE")]
    pub content: PathBuf,
    /// A style image; repeat for a blend of several.
    #[arg(long = "style", value_name = "IMAGE")]
    pub styles: Vec<PathBuf>,
    /// Blend weights of the style images, comma-separated (default: equal).
    #[arg(long, value_name = "W1,W2,...", value_delimiter = ',')]
    pub style_weights: Vec<f64>,
    /// A TOML config laid over the defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// VGG-19 weights (safetensors); else model.weights, $EASEL_WEIGHTS, or the data dir.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Longest edge of the result in pixels.
    #[arg(long)]
    pub size: Option<u32>,
    /// Pooling between blocks.
    #[arg(long, value_enum)]
    pub pooling: Option<PoolingArg>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PoolingArg {
    Max,
    Avg,
}

/// Sets `section.key = value` in a flags overlay.
pub fn set(overlay: &mut Table, section: &str, key: &str, value: impl Into<Value>) {
    let entry = overlay.entry(section).or_insert_with(|| Value::Table(Table::new()));
    if let Value::Table(t) = entry {
        t.insert(key.to_string(), value.into());
    }
}

impl JobArgs {
    /// The config layers: defaults < `--config` < these flags (and `extra`, set by the caller).
    pub fn layers(&self, mut overlay: Table) -> Result<ConfigLayers> {
        let mut layers = ConfigLayers::defaults();
        if let Some(path) = &self.config {
            layers = layers.with_file(path)?;
        }
        if let Some(size) = self.size {
            set(&mut overlay, "run", "size", size as i64);
        }
        if let Some(pooling) = self.pooling {
            set(
                &mut overlay,
                "model",
                "pooling",
                if matches!(pooling, PoolingArg::Max) { "max" } else { "avg" },
            );
        }
        if !self.style_weights.is_empty() && self.style_weights.len() != self.styles.len() {
            bail!(
                "--style-weights has {} values but {} --style images were given",
                self.style_weights.len(),
                self.styles.len()
            );
        }
        if !self.styles.is_empty() {
            let styles = self
                .styles
                .iter()
                .enumerate()
                .map(|(i, path)| {
                    let mut t = Table::new();
                    t.insert("path".into(), Value::String(path.display().to_string()));
                    t.insert(
                        "weight".into(),
                        Value::Float(self.style_weights.get(i).copied().unwrap_or(1.0)),
                    );
                    Value::Table(t)
                })
                .collect();
            overlay.insert("style".into(), Value::Array(styles));
        }
        Ok(layers.with_table("command-line flags", overlay))
    }
}

/// Where `easel weights fetch` puts weights and where jobs look last.
pub fn default_weights_path() -> Option<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(data.join("easel/vgg19.safetensors"))
}

/// The weights file to use: `--weights`, then `model.weights`, `$EASEL_WEIGHTS`, the data dir.
pub fn resolve_weights(flag: Option<&Path>, plan: &Plan) -> Result<PathBuf> {
    if let Some(path) = flag.map(Path::to_path_buf).or_else(|| plan.model.weights.clone()) {
        return Ok(path);
    }
    if let Some(path) = std::env::var_os("EASEL_WEIGHTS") {
        return Ok(PathBuf::from(path));
    }
    let default = default_weights_path();
    if let Some(path) = default.as_ref().filter(|p| p.is_file()) {
        return Ok(path.clone());
    }
    let looked = default
        .map(|p| format!(" (looked for --weights, model.weights, $EASEL_WEIGHTS and {})", p.display()));
    bail!(
        "no VGG-19 weights{}.\n\
         Get pretrained ImageNet weights (548 MB) with:\n    easel weights fetch\n\
         or convert torchvision's vgg19-dcbb9e9d.pth with:\n    easel weights convert vgg19-dcbb9e9d.pth --out vgg19.safetensors\n\
         or, for tests only (texture-like results), make synthetic ones:\n    easel weights synth --seed 0 --out synth.safetensors\n\
         then pass --weights FILE, set model.weights in a config, or set EASEL_WEIGHTS.",
        looked.unwrap_or_default()
    )
}

/// A job ready to iterate, and what it was made from.
pub struct PreparedJob {
    pub run: StyleRun,
    pub weights: WeightsFile,
}

/// Plans, loads weights and images, and builds the run: everything that can fail on bad
/// input fails here, before any output is written.
pub fn prepare(job: &JobArgs, overlay: Table, registry: &Registry) -> Result<PreparedJob> {
    let plan = job.layers(overlay)?.plan(registry)?;
    let weights_path = resolve_weights(job.weights.as_deref(), &plan)?;
    let content = load_image(&job.content, &plan.limits)?;
    let mut styles = Vec::with_capacity(plan.styles.len());
    for spec in &plan.styles {
        styles.push((load_image(&spec.path, &plan.limits)?, spec.weight));
    }
    let weights = WeightsFile::open(&weights_path)?;
    let vgg = ModelSpec::of(&plan).load(&weights)?;
    let run = StyleRun::new(plan, vgg, content, styles).context("preparing the run")?;
    Ok(PreparedJob { run, weights })
}
