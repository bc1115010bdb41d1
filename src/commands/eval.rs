//! `easel eval`: each loss's value and gradient norm at an image, to balance loss weights.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use easel_core::Registry;
use easel_engine::image_io::{resize_exact, to_tensor};
use easel_engine::load_image;
use serde_json::json;
use toml::Table;

use super::{prepare, set, JobArgs};

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// The image to evaluate (resized to the content's size); default: the initial image.
    #[arg(long, value_name = "IMAGE")]
    pub at: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn eval(args: EvalArgs, registry: &Registry) -> Result<()> {
    let mut overlay = Table::new();
    // One scale at the full size: the numbers describe the result's resolution.
    set(&mut overlay, "run", "scales", 1i64);
    let mut job = prepare(&args.job, overlay, registry)?;
    if let Some(path) = &args.at {
        let image = load_image(path, &job.run.plan().limits)?;
        let (_, _, h, w) = job.run.image().dims4()?;
        let x = to_tensor(&resize_exact(&image, w as u32, h as u32), job.run.image().device())?;
        job.run.set_image(x)?;
    }
    let x = job.run.image().clone();
    let reports = job.run.objective().report(&x)?;
    let total: f64 = reports.iter().map(|r| r.weight * r.value).sum();
    if args.json {
        let losses: Vec<_> = reports
            .iter()
            .map(|r| json!({"type": r.kind, "weight": r.weight, "value": r.value, "grad_l2": r.grad_l2}))
            .collect();
        println!("{}", json!({"losses": losses, "total": total}));
        return Ok(());
    }
    println!("{:<10} {:>12} {:>12} {:>8} {:>12}", "loss", "value", "weight", "share", "grad norm");
    for r in &reports {
        // The share of the weighted total is what balancing acts on.
        let share = if total != 0.0 { 100.0 * r.weight * r.value / total } else { 0.0 };
        println!(
            "{:<10} {:>12.4e} {:>12.4e} {:>7.1}% {:>12.4e}",
            r.kind, r.value, r.weight, share, r.grad_l2
        );
    }
    println!("{:<10} {:>12.4e}   (sum of weight x value)", "total", total);
    Ok(())
}
