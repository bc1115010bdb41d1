//! Why the daemon could not start or go on, and why a job failed.

use std::path::PathBuf;

/// What stops the daemon itself (a job's failure never does).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] easel_config::ConfigError),
    #[error("daemon config: {0}")]
    Styles(String),
    #[error("weights: {0}")]
    Weights(#[from] easel_vgg::VggError),
    #[error("cannot watch {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Why a job ended in `failed/`; the message is what `NAME.error.txt` says.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("sidecar {0}")]
    Sidecar(String),
    #[error(transparent)]
    Config(#[from] easel_config::ConfigError),
    #[error(
        "no style image: add [[style]] path = \"NAME.jpg\" (a file in styles/) to the job's sidecar or to the daemon's config"
    )]
    NoStyle,
    #[error(
        "{name} is a symbolic link to {target}, outside the drop folder; easel never follows links out of it"
    )]
    LinkOutside { name: String, target: String },
    #[error("{name} is a symbolic link to {target}, which leads back to itself (a loop of links); it cannot be read")]
    LinkLoop { name: String, target: String },
    #[error("{name} is a symbolic link to {target}, which does not exist")]
    LinkDangling { name: String, target: String },
    /// A stop came while the job waited for disk space; it stays in `work/` (never in `failed/`).
    #[error("stopped while waiting for disk space")]
    StoppedWaitingForSpace,
    #[error(transparent)]
    Engine(#[from] easel_engine::EngineError),
    #[error(transparent)]
    Vgg(#[from] easel_vgg::VggError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "the job was started {0} times and never finished: the daemon was killed or crashed while running it \
         (out of memory?); it is not retried"
    )]
    Crashed(u32),
    #[error("internal error (panic): {0}")]
    Panic(String),
    /// A job error its worker process reported, as it worded it.
    #[error("{0}")]
    Worker(String),
    /// Its worker processes crashed [`crate::journal::MAX_CRASHES`] times.
    #[error("{how}; planned peak {peak_mb} MB, cap {cap_mb} MB: {verdict}")]
    WorkerCrashed { how: String, peak_mb: u64, cap_mb: u64, verdict: &'static str },
}
