//! easel's drop-folder protocol (`easel watch`): files dropped into `ROOT/inbox/` become
//! paintings in `ROOT/out/`, on machines that may lose power at any time.
//!
//! The pieces, each usable and tested on its own: [`names`] (what a dropped name means),
//! [`settle`] (when a file is complete, with an injected clock), [`claim`] (atomic claims and
//! per-job locks), [`fsops`] (durable writes and moves, behind a trait tests can record or
//! fail), [`journal`] (persistent attempt counts), [`status`] (`status.json`),
//! [`config`] (the daemon's config and job sidecars), and [`Daemon`], which runs them with a
//! watcher, a queue and a pool of supervising threads, each job computed by a worker process
//! of its own ([`run_worker`], `easel job`).

mod admission;
pub mod claim;
pub mod config;
mod daemon;
mod error;
pub mod folders;
pub mod fsops;
mod job;
mod job_files;
pub mod journal;
pub mod names;
pub mod settle;
pub mod status;
mod worker;

pub use claim::{claim_job, recover_jobs, ClaimedJob};
pub use config::DaemonConfig;
pub use daemon::{Clock, Daemon, Signals, Summary, SystemClock, WatchOptions, WorkerCommand};
pub use error::{DaemonError, JobError};
pub use folders::Root;
pub use settle::{Intake, ReadyJob, Stat};
pub use status::{JobEnd, StatusBoard};
pub use worker::{memory_cap, run_worker, WorkerArgs, CAP_VAR};
