//! The persistent count of a job's unfinished attempts, so that a job which keeps killing the
//! daemon (out of memory, a crash, `kill -9`) is failed instead of retried forever.
//!
//! An attempt is counted, durably, before the job starts computing, and uncounted when it
//! stops cleanly (SIGTERM); an attempt that ends any other way stays counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::fsops::{is_out_of_space, write_durably, Fs};

const ATTEMPTS: &str = ".attempts";

/// Attempts on a job that ended in a crash: a job is failed when it reaches this many.
pub const MAX_CRASHES: u32 = 2;

/// Attempts begun on the job in `dir` and not ended cleanly.
pub fn crashed_attempts(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join(ATTEMPTS)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// Records `count` attempts (synced to disk before the job goes on).
///
/// On a full disk a lower count (an attempt ended cleanly) is written over the old one in place,
/// which needs no new space, so that a stop during a disk-full spell is not taken for a crash.
pub fn record_attempts(fs: &dyn Fs, dir: &Path, count: u32) -> std::io::Result<()> {
    let path = dir.join(ATTEMPTS);
    let text = format!("{count}\n");
    match write_durably(fs, &path, text.as_bytes()) {
        Err(e) if is_out_of_space(&e) && count < crashed_attempts(dir) => {
            fs.overwrite(&path, text.as_bytes()).map_err(|_| e)?;
            fs.sync_dir(dir)
        }
        other => other,
    }
}

/// The attempts running now and each job's count before it, so that an exit in haste (a second
/// SIGTERM) can still record them as ended cleanly: a stop is never a crash.
#[derive(Debug, Default)]
pub struct RunningAttempts {
    jobs: Mutex<BTreeMap<PathBuf, u32>>,
}

impl RunningAttempts {
    fn jobs(&self) -> MutexGuard<'_, BTreeMap<PathBuf, u32>> {
        // Plain data: a panic elsewhere while it was held leaves it usable.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts an attempt on the job in `dir`, which had `before` unfinished ones.
    pub fn begin(&self, fs: &dyn Fs, dir: &Path, before: u32) -> std::io::Result<()> {
        let mut jobs = self.jobs();
        record_attempts(fs, dir, before + 1)?;
        jobs.insert(dir.to_path_buf(), before);
        Ok(())
    }

    /// The attempt on `dir` ended cleanly (a stop): it is uncounted.
    pub fn end_cleanly(&self, fs: &dyn Fs, dir: &Path) -> std::io::Result<()> {
        let mut jobs = self.jobs();
        match jobs.get(dir) {
            Some(&before) => {
                record_attempts(fs, dir, before)?;
                jobs.remove(dir);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The attempt on `dir` ended with a decided outcome (the count no longer matters).
    pub fn forget(&self, dir: &Path) {
        self.jobs().remove(dir);
    }

    /// For an exit in haste: uncounts every running attempt and returns the lock, which the
    /// caller holds until the process exits, so that no attempt begins in between.
    pub fn end_all_cleanly(&self, fs: &dyn Fs) -> MutexGuard<'_, BTreeMap<PathBuf, u32>> {
        let jobs = self.jobs();
        for (dir, &before) in jobs.iter() {
            if let Err(e) = record_attempts(fs, dir, before) {
                tracing::error!(job = %dir.display(), error = %e, "cannot record the stop in .attempts");
            }
        }
        jobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsops::fake::{enospc, Call, Recording};
    use crate::fsops::RealFs;

    #[test]
    fn counts_survive_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(crashed_attempts(dir.path()), 0);
        record_attempts(&RealFs, dir.path(), 1).unwrap();
        assert_eq!(crashed_attempts(dir.path()), 1);
        record_attempts(&RealFs, dir.path(), 0).unwrap();
        assert_eq!(crashed_attempts(dir.path()), 0);
    }

    #[test]
    fn running_attempts_are_uncounted_by_a_hasty_exit_but_finished_ones_are_not_touched() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        record_attempts(&RealFs, a.path(), 1).unwrap();
        let running = RunningAttempts::default();
        running.begin(&RealFs, a.path(), 1).unwrap();
        running.begin(&RealFs, b.path(), 0).unwrap();
        assert_eq!((crashed_attempts(a.path()), crashed_attempts(b.path())), (2, 1));
        running.forget(b.path());
        let held = running.end_all_cleanly(&RealFs);
        assert_eq!(held.len(), 1);
        assert_eq!((crashed_attempts(a.path()), crashed_attempts(b.path())), (1, 1));
    }

    #[test]
    fn on_a_full_disk_a_clean_end_is_still_recorded_and_a_new_attempt_is_not() {
        let dir = tempfile::tempdir().unwrap();
        record_attempts(&RealFs, dir.path(), 1).unwrap();
        let full = Recording::failing(|c| matches!(c, Call::Write(_)).then(enospc));
        record_attempts(&full, dir.path(), 0).unwrap();
        assert_eq!(crashed_attempts(dir.path()), 0, "uncounted in place");
        let e = record_attempts(&full, dir.path(), 1).unwrap_err();
        assert!(is_out_of_space(&e), "a new attempt waits for space: {e}");
        assert_eq!(crashed_attempts(dir.path()), 0);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [".attempts"], "no temp file is left");
    }
}
