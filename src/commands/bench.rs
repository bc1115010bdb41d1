//! `easel bench`: seconds per iteration and peak memory of a job, as one JSON object.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use easel_core::Registry;
use serde_json::json;
use toml::Table;

use super::{prepare, set, JobArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Iterations to time (the first is reported separately: it warms caches up).
    #[arg(long, default_value_t = 10)]
    pub iterations: u32,
    /// Optimiser plugin.
    #[arg(long, default_value = "lbfgs")]
    pub optimizer: String,
    /// Print JSON (the only format; accepted for scripts that pass it).
    #[arg(long)]
    pub json: bool,
}

/// Peak resident set size of this process in MiB (Linux's VmHWM), if the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub fn bench(args: BenchArgs, registry: &Registry) -> Result<()> {
    if args.iterations < 2 {
        bail!("--iterations must be at least 2: the first iteration is not timed");
    }
    let mut overlay = Table::new();
    set(&mut overlay, "run", "iterations", args.iterations as i64);
    set(&mut overlay, "run", "scales", 1i64);
    set(&mut overlay, "optimizer", "type", args.optimizer.as_str());
    let load_started = Instant::now();
    let mut job = prepare(&args.job, overlay, registry)?;
    let load_s = load_started.elapsed().as_secs_f64();
    let rss_after_load = peak_rss_mb();
    let (_, _, h, w) = job.run.image().dims4()?;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let mut evaluations = 0usize;
    loop {
        let started = Instant::now();
        let Some(p) = job.run.step()? else { break };
        times.push(started.elapsed().as_secs_f64());
        losses.push(p.loss);
        evaluations += p.evaluations;
        if p.converged {
            break;
        }
    }
    let first_s = times.first().copied().unwrap_or(f64::NAN);
    let mut timed: Vec<f64> = times.iter().skip(1).copied().collect();
    let s_per_iter = if timed.is_empty() { f64::NAN } else { median(&mut timed) };
    let total_s: f64 = times.iter().sum();
    println!(
        "{}",
        json!({
            "size": job.run.plan().run.size,
            "width": w,
            "height": h,
            "optimizer": args.optimizer,
            "iterations": times.len(),
            "s_per_iter": s_per_iter,
            "s_first_iter": first_s,
            "s_per_eval": total_s / evaluations.max(1) as f64,
            "evaluations": evaluations,
            "load_s": load_s,
            "peak_rss_mb": peak_rss_mb(),
            "rss_after_load_mb": rss_after_load,
            "kernel_cache_mb": job.run.vgg().kernel_cache_used() as f64 / (1 << 20) as f64,
            // What `easel plan` predicted for this job, to set beside the measured peak.
            "peak_rss_mb_predicted": (job.run.memory().peak_bytes() >> 20),
            "tile_size": job.run.tile_step(),
            "device": easel_engine::device_name(job.run.vgg().device()),
            // As `model.backend` names them: easel's kernels, or candle's ops.
            "backend": match job.run.vgg().backend() {
                easel_vgg::Backend::Cpu => "easel",
                easel_vgg::Backend::Generic => "candle",
            },
            "threads": candle_core::utils::get_num_threads(),
            "loss_first": losses.first(),
            "loss_last": losses.last(),
            "weights_sha256": job.weights.sha256()?,
        })
    );
    Ok(())
}
