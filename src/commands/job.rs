//! `easel job DIR` (hidden): one attempt at a drop-folder job in a process of its own, started
//! by `easel watch` (the work lives in `easel_daemon::run_worker`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use easel_core::Registry;
use easel_daemon::{run_worker, WorkerArgs};

#[derive(Args)]
pub struct JobArgs {
    /// The job's folder in ROOT/work/, claimed by the `easel watch` that started this.
    pub dir: PathBuf,
    /// VGG-19 weights (safetensors).
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    /// The weights' sha256 (hex), for the provenance; else computed here.
    #[arg(long, value_name = "HEX")]
    pub weights_sha256: Option<String>,
    /// The daemon's memory budget in bytes, which the job is planned against.
    #[arg(long, value_name = "N")]
    pub budget_bytes: u64,
}

pub fn job(args: JobArgs, registry: &Registry) -> Result<()> {
    let args = WorkerArgs {
        dir: args.dir,
        weights: args.weights,
        weights_sha256: args.weights_sha256,
        budget_bytes: args.budget_bytes,
    };
    run_worker(&args, registry)?;
    Ok(())
}
