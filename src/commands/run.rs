//! `easel run`: one style transfer from the command line, with a progress bar.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use easel_core::Registry;
use easel_engine::image_io::{format_for, save_image};
use indicatif::{ProgressBar, ProgressStyle};
use toml::Table;

use super::{prepare, set, JobArgs};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// The result: .png or .jpg/.jpeg.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Optimiser iterations per scale.
    #[arg(long)]
    pub iterations: Option<u32>,
    /// Seed for noise initialisation.
    #[arg(long)]
    pub seed: Option<u64>,
    /// The image the optimisation starts from.
    #[arg(long, value_enum)]
    pub init: Option<InitArg>,
    /// Write a preview (OUT_NNNN.ext) every N iterations.
    #[arg(long, value_name = "N")]
    pub save_every: Option<u32>,
    /// Coarse-to-fine scales (2: half size, then full size).
    #[arg(long)]
    pub scales: Option<u32>,
    /// Optimiser plugin (its options come from the config).
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Keep the content photo's colours.
    #[arg(long)]
    pub preserve_colors: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum InitArg {
    Content,
    Noise,
    Style,
}

/// `a/b/out.png` -> `a/b/out_0050.png`.
fn preview_path(out: &Path, iteration: u32) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = out.extension().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!("{stem}_{iteration:04}.{ext}"))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

pub fn run(args: RunArgs, registry: &Registry) -> Result<()> {
    let Some(format) = format_for(&args.out) else {
        bail!("{}: unknown output format; use a .png, .jpg or .jpeg name", args.out.display());
    };
    let inputs = std::iter::once(&args.job.content).chain(&args.job.styles);
    if let Some(input) = inputs.clone().find(|i| same_file(i, &args.out)) {
        bail!("{}: the output would overwrite the input {}", args.out.display(), input.display());
    }
    let parent = args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("{}: the output folder {} does not exist", args.out.display(), parent.display());
    }

    let mut overlay = Table::new();
    if let Some(n) = args.iterations {
        set(&mut overlay, "run", "iterations", n as i64);
    }
    if let Some(seed) = args.seed {
        set(&mut overlay, "run", "seed", seed as i64);
    }
    if let Some(init) = args.init {
        let name = match init {
            InitArg::Content => "content",
            InitArg::Noise => "noise",
            InitArg::Style => "style",
        };
        set(&mut overlay, "run", "init", name);
    }
    if let Some(n) = args.save_every {
        set(&mut overlay, "run", "save_every", n as i64);
    }
    if let Some(n) = args.scales {
        set(&mut overlay, "run", "scales", n as i64);
    }
    if let Some(name) = &args.optimizer {
        set(&mut overlay, "optimizer", "type", name.as_str());
    }
    if args.preserve_colors {
        set(&mut overlay, "run", "preserve_colors", true);
    }

    let mut job = prepare(&args.job, overlay, registry)?;
    let run = &mut job.run;
    let save_every = run.plan().run.save_every;
    let quality = run.plan().output.jpeg_quality;
    let bar = ProgressBar::new(run.total_iterations() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
            .context("progress bar template")?,
    );
    let started = Instant::now();
    let (mut first, mut last, mut iterations) = (None, None, 0u32);
    while let Some(p) = run.step()? {
        iterations += 1;
        first.get_or_insert(p.loss);
        last = Some(p.loss);
        let per_iter = started.elapsed().as_secs_f64() / iterations as f64;
        bar.set_position(p.done as u64);
        bar.set_message(format!(
            "scale {}/{} {}x{} loss {:.5e} {:.2} s/it",
            p.scale + 1,
            p.scales,
            p.width,
            p.height,
            p.loss,
            per_iter
        ));
        tracing::debug!(iteration = p.done, loss = p.loss, evaluations = p.evaluations, "iteration");
        if save_every > 0 && p.done % save_every == 0 && !run.is_finished() {
            let preview = preview_path(&args.out, p.done);
            save_image(&run.result()?, &preview, format, quality, &[])?;
        }
    }
    bar.finish_and_clear();
    let image = run.result()?;
    save_image(
        &image,
        &args.out,
        format,
        quality,
        &[("Software", format!("easel {}", env!("CARGO_PKG_VERSION")))],
    )?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} ({}x{}): {} iterations in {:.1} s ({:.3} s/iteration), loss {:.5e} -> {:.5e}",
        args.out.display(),
        image.width(),
        image.height(),
        iterations,
        secs,
        secs / iterations.max(1) as f64,
        first.unwrap_or(f64::NAN),
        last.unwrap_or(f64::NAN),
    );
    Ok(())
}
