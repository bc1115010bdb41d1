//! `easel watch ROOT`: the drop-folder daemon (the protocol lives in `easel-daemon`).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use easel_core::Registry;
use easel_daemon::{Daemon, DaemonConfig, Root, Signals, WatchOptions, WorkerCommand};

use super::resolve_weights;

#[derive(Args)]
pub struct WatchArgs {
    /// The drop folder: inbox/, work/, out/, done/, failed/, styles/ are created in it.
    pub root: PathBuf,
    /// The daemon's config (laid over the defaults; its [daemon] section tunes the daemon).
    /// Edits, or SIGHUP, apply from the next job.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// VGG-19 weights (safetensors); else model.weights, $EASEL_WEIGHTS, or the data dir.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Process what is in the inbox (and left in work/), then exit: for cron and timers.
    #[arg(long)]
    pub once: bool,
    /// Rescan the inbox every MS milliseconds instead of using filesystem events (NFS, SMB).
    #[arg(long, value_name = "MS")]
    pub poll: Option<u64>,
    /// Jobs to run at once (default: daemon.workers, 1).
    #[arg(long, value_name = "N")]
    pub workers: Option<u32>,
}

/// Runs the daemon; each job runs in a worker process of this program, started with
/// `worker_args` (the global options) before `job`.
pub fn watch(args: WatchArgs, worker_args: Vec<OsString>, registry: &Registry) -> Result<()> {
    // First, so that a stop asked for during start-up is a clean stop, not a kill.
    let signals = Signals::install()?;
    let root = Root::open(&args.root)?;
    let config = DaemonConfig::load(args.config.as_deref(), &root, registry)?;
    let weights = resolve_weights(args.weights.as_deref(), &config.plan(registry)?)?;
    let program = std::env::current_exe().context("finding this program, to start workers with")?;
    let options = WatchOptions {
        once: args.once,
        poll_ms: args.poll.filter(|&ms| ms > 0),
        workers: args.workers,
        worker: Some(WorkerCommand { program, args: worker_args }),
    };
    let daemon = Daemon::new(root, config, &weights, registry, options)
        .with_context(|| format!("opening weights {}", weights.display()))?;
    daemon.run(&signals)?;
    Ok(())
}
