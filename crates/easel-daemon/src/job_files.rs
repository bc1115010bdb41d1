//! A job folder's files, and what the supervisor and a worker both do when they write there:
//! wait out a full disk, name the path in an I/O error, report a caught panic.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::JobError;

/// The plan frozen at a job's first start.
pub(crate) const PLAN: &str = ".plan.toml";
/// The run's checkpoint.
pub(crate) const CHECKPOINT: &str = ".checkpoint.safetensors";
/// The result before it is moved out (with its format's extension).
pub(crate) const RESULT: &str = ".result";
/// The provenance beside a result whose format has no text chunks.
pub(crate) const PROVENANCE: &str = ".result.json";

/// The first wait before a step that failed on a full disk is retried; it doubles up to
/// [`SPACE_MAX_WAIT`].
const SPACE_FIRST_WAIT: Duration = Duration::from_millis(500);
const SPACE_MAX_WAIT: Duration = Duration::from_secs(30);

/// What waiting for disk space needs: the flag that ends the wait, and the job's id for the log.
pub(crate) struct SpaceWait<'a> {
    pub stop: &'a AtomicBool,
    pub job: &'a str,
}

/// An I/O error on `path`, as a job error.
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JobError + '_ {
    move |source| JobError::Io { path: path.to_path_buf(), source }
}

/// Runs `op` until it no longer fails for lack of disk space (`is_full`), waiting longer each
/// time: space may come back at any moment (a user deletes files), and a full disk is no fault
/// of the job. `Ok(None)` when a stop came while waiting.
pub(crate) fn until_space<T, E: std::fmt::Display>(
    wait_for: &SpaceWait<'_>,
    what: &str,
    is_full: impl Fn(&E) -> bool,
    mut op: impl FnMut() -> Result<T, E>,
) -> Result<Option<T>, E> {
    let mut wait = SPACE_FIRST_WAIT;
    loop {
        match op() {
            Err(e) if is_full(&e) => {
                tracing::warn!(job = %wait_for.job, step = what, error = %e, retry_in_s = wait.as_secs_f64(), "waiting for disk space");
                let until = Instant::now() + wait;
                while Instant::now() < until {
                    if wait_for.stop.load(Ordering::SeqCst) {
                        return Ok(None);
                    }
                    std::thread::sleep((until - Instant::now()).min(Duration::from_millis(100)));
                }
                wait = (wait * 2).min(SPACE_MAX_WAIT);
            }
            other => return other.map(Some),
        }
    }
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
