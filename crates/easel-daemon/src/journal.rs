//! The persistent count of a job's unfinished attempts, so that a job which keeps killing the
//! daemon (out of memory, a crash, `kill -9`) is failed instead of retried forever.
//!
//! An attempt is counted, durably, before the job starts computing, and uncounted when it
//! stops cleanly (SIGTERM); an attempt that ends any other way stays counted.

use std::path::Path;

use easel_core::write_atomically;

const ATTEMPTS: &str = ".attempts";

/// Attempts on a job that ended in a crash: a job is failed when it reaches this many.
pub const MAX_CRASHES: u32 = 2;

/// Attempts begun on the job in `dir` and not ended cleanly.
pub fn crashed_attempts(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join(ATTEMPTS)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// Records `count` attempts (synced to disk before the job goes on).
pub fn record_attempts(dir: &Path, count: u32) -> std::io::Result<()> {
    write_atomically(&dir.join(ATTEMPTS), format!("{count}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(crashed_attempts(dir.path()), 0);
        record_attempts(dir.path(), 1).unwrap();
        assert_eq!(crashed_attempts(dir.path()), 1);
        record_attempts(dir.path(), 0).unwrap();
        assert_eq!(crashed_attempts(dir.path()), 0);
    }
}
