//! `easel plan`: what a job would take (peak memory against the budget, the strategy, seconds
//! per evaluation on this machine) without running it.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use easel_core::Registry;
use easel_engine::memory::{self, Backends, MemoryPlan};
use easel_engine::{evaluation_work, load_image, EngineError, ModelSpec, StyleRun};
use easel_vgg::WeightsFile;
use serde_json::{json, Value};
use toml::Table;

use super::{resolve_weights, set, JobArgs};

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Optimiser plugin (default: the config's).
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// Longest edge of the short measurement that calibrates the time prediction.
const CALIBRATION_SIZE: u32 = 128;

pub fn plan(args: PlanArgs, registry: &Registry) -> Result<()> {
    let mut overlay = Table::new();
    if let Some(optimizer) = &args.optimizer {
        set(&mut overlay, "optimizer", "type", optimizer.as_str());
    }
    let mut plan = args.job.layers(overlay.clone())?.plan(registry)?;
    let content = load_image(&args.job.content, &plan.limits)?;
    let mut styles = Vec::with_capacity(plan.styles.len());
    for spec in &plan.styles {
        styles.push(load_image(&spec.path, &plan.limits)?.dimensions());
    }
    let spec = ModelSpec::of(&plan);
    let budget = memory::budget_bytes(&plan.limits);
    let (memory, refusal) = match memory::fit(&mut plan, &spec, content.dimensions(), &styles, budget) {
        Ok(memory) => (memory, None),
        Err(e @ EngineError::OverBudget { .. }) => {
            (memory::predict(&plan, &spec, content.dimensions(), &styles, budget), Some(e.to_string()))
        }
        Err(e) => return Err(e.into()),
    };

    // One evaluation at a small size, timed after a warm-up, scaled by the convolutions' work.
    let weights = WeightsFile::open(resolve_weights(args.job.weights.as_deref(), &plan)?)?;
    let mut small_plan = args.job.layers(overlay)?.plan(registry)?;
    small_plan.run.size = CALIBRATION_SIZE.min(plan.run.size);
    small_plan.run.scales = 1;
    // The measurement is small whatever the job: it must not be refused for the job's size.
    small_plan.limits.memory_mb = 0;
    let run = StyleRun::new(
        small_plan,
        spec.load(&weights)?,
        content.clone(),
        calibration_styles(&content, &styles),
    )?;
    let x = run.image().clone();
    run.objective().total(&x)?;
    let started = Instant::now();
    run.objective().total(&x)?;
    let measured = started.elapsed().as_secs_f64();
    let (_, _, h, w) = x.dims4()?;
    let (height, width) = (memory.height as usize, memory.width as usize);
    let tile_step = memory.tile_size.map(|s| s as usize);
    let seconds = measured * evaluation_work(&plan.losses, height, width, tile_step) as f64
        / evaluation_work(&run.plan().losses, h, w, None).max(1) as f64;

    let report = report(&memory, &plan, spec.backends(), seconds, refusal.as_deref());
    if args.json {
        println!("{report}");
    } else {
        print_summary(&memory, &report);
    }
    Ok(())
}

/// Style images for the calibration run: only their sizes matter there, so the content image
/// stands in for each.
fn calibration_styles(
    content: &easel_engine::RgbImage,
    styles: &[(u32, u32)],
) -> Vec<(easel_engine::RgbImage, f64)> {
    let n = styles.len().max(1);
    (0..n).map(|_| (content.clone(), 1.0)).collect()
}

const MB: f64 = (1 << 20) as f64;

fn report(
    memory: &MemoryPlan,
    plan: &easel_config::Plan,
    backends: Backends,
    seconds: f64,
    refusal: Option<&str>,
) -> Value {
    let parts: serde_json::Map<String, Value> =
        memory.parts.iter().map(|p| (p.name.to_string(), json!((p.bytes as f64 / MB).round()))).collect();
    let history = (plan.optimizer.kind == "lbfgs").then(|| lbfgs_history(memory, plan)).flatten();
    // Whose working set the evaluation part counts, as `model.backend` names them.
    let backends: Vec<&str> = [(backends.cpu, "easel"), (backends.generic, "candle")]
        .into_iter()
        .filter_map(|(counted, name)| counted.then_some(name))
        .collect();
    json!({
        "width": memory.width,
        "height": memory.height,
        "peak_rss_mb": (memory.peak_bytes() as f64 / MB).round(),
        "budget_mb": (memory.budget_bytes as f64 / MB).round(),
        "fits": refusal.is_none(),
        "strategy": match (refusal, memory.tile_size) {
            (Some(_), _) => Value::Null,
            (None, None) => Value::from("whole"),
            (None, Some(_)) => Value::from("tiled"),
        },
        "tile_size": memory.tile_size,
        "backends": backends,
        "optimizer": plan.optimizer.kind,
        "lbfgs_history": history,
        "adjustments": memory.adjustments.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "parts_mb": parts,
        "seconds_per_evaluation": seconds,
        "refusal": refusal,
    })
}

/// The history L-BFGS will keep: its option, or what the planner lowered it to.
fn lbfgs_history(memory: &MemoryPlan, plan: &easel_config::Plan) -> Option<u64> {
    if let Some(a) = memory.adjustments.iter().find(|a| a.key == "optimizer.history") {
        return Some(a.to);
    }
    plan.merged.get("optimizer")?.get("history")?.as_integer().and_then(|h| u64::try_from(h).ok())
}

fn print_summary(memory: &MemoryPlan, report: &Value) {
    let strategy = match memory.tile_size {
        Some(step) => format!("in tiles of {step} px"),
        None => "whole".to_string(),
    };
    println!(
        "{}x{} {strategy}: peak about {} MB of a {} MB budget; {:.2} s per evaluation on this machine",
        memory.width,
        memory.height,
        report["peak_rss_mb"],
        report["budget_mb"],
        report["seconds_per_evaluation"].as_f64().unwrap_or(f64::NAN)
    );
    for part in &memory.parts {
        println!("  {:<13} {:>8.0} MB", part.name, part.bytes as f64 / MB);
    }
    for change in &memory.adjustments {
        println!("  {change}");
    }
    if let Some(refusal) = report["refusal"].as_str() {
        println!("refused: {refusal}");
    }
}
