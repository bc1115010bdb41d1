//! Claiming jobs: an atomic rename from `inbox/` into a job folder of `work/`, held by a lock.
//!
//! Each claimed job has its own folder `work/ID/` holding the dropped image and sidecar under
//! their own names, and the daemon's files under dot names (`.lock`, `.attempts`, `.plan.toml`,
//! `.checkpoint.safetensors`, `.outcome.json`, ...). Dropped files never start with a dot (dot
//! names are temp names in `inbox/`), so the two cannot clash.
//!
//! The daemon holding a job keeps an exclusive lock on its `.lock` from before the rename until
//! the folder is removed. The lock dies with the process, so after a crash any daemon can take
//! the job over, and a daemon starting beside a running one never touches the other's jobs.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::folders::Root;
use crate::names::{role, Role};
use crate::DaemonError;

const LOCK: &str = ".lock";
/// Written once a job's result or failure is decided; its presence means "finish, do not rerun".
pub(crate) const OUTCOME: &str = ".outcome.json";
/// A job folder without inputs younger than this may be a claim in progress by another daemon.
const ORPHAN_AGE: Duration = Duration::from_secs(60);

/// A job this daemon holds: its folder in `work/` and the lock that keeps others out.
#[derive(Debug)]
pub struct ClaimedJob {
    /// Unique among all daemons on the root: claim time, process id and a counter.
    pub id: String,
    /// `work/ID`.
    pub dir: PathBuf,
    /// The dropped image's file name (absent only when a crash left a finished job's folder).
    pub image: Option<OsString>,
    /// The sidecar's file name, if the job has one.
    pub sidecar: Option<OsString>,
    /// Held until the job's folder is gone; dropping it hands the job back.
    _lock: File,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io { path: path.to_path_buf(), source }
}

fn new_job_dir(work: &Path) -> Result<(String, PathBuf), DaemonError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    loop {
        let millis = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let id = format!("{millis}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let dir = work.join(&id);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok((id, dir)),
            // Another machine's daemon on a shared folder may have the same pid.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_error(&dir)(e)),
        }
    }
}

fn open_lock(dir: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK))
}

/// The image and sidecar in a job folder (names without a leading dot).
fn inputs_of(dir: &Path) -> std::io::Result<(Option<OsString>, Option<OsString>)> {
    let (mut image, mut sidecar) = (None, None);
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        match role(&name) {
            Role::Image if image.is_none() => image = Some(name),
            Role::Sidecar if sidecar.is_none() => sidecar = Some(name),
            _ => {}
        }
    }
    Ok((image, sidecar))
}

/// Claims the job `image` (and its `sidecar`) from `inbox/` by renaming them into a new job
/// folder. `Ok(None)` when the image is gone: another daemon claimed it, or its owner took it back.
pub fn claim_job(
    root: &Root,
    image: &OsStr,
    sidecar: Option<&OsStr>,
) -> Result<Option<ClaimedJob>, DaemonError> {
    let (id, dir) = new_job_dir(&root.work())?;
    let abandon = |dir: &Path| {
        let _ = std::fs::remove_file(dir.join(LOCK));
        let _ = std::fs::remove_dir(dir);
    };
    let lock = match open_lock(&dir).and_then(|f| f.lock().map(|()| f)) {
        Ok(lock) => lock,
        Err(e) => {
            abandon(&dir);
            return Err(io_error(&dir)(e));
        }
    };
    let from = root.inbox().join(image);
    match std::fs::rename(&from, dir.join(image)) {
        Ok(()) => {}
        Err(e) => {
            abandon(&dir);
            return if e.kind() == ErrorKind::NotFound { Ok(None) } else { Err(io_error(&from)(e)) };
        }
    }
    let sidecar = sidecar.and_then(|name| match std::fs::rename(root.inbox().join(name), dir.join(name)) {
        Ok(()) => Some(name.to_os_string()),
        Err(e) => {
            // The job runs without it; a sidecar still in inbox/ is left for the user.
            tracing::warn!(job = %id, sidecar = %name.to_string_lossy(), error = %e, "sidecar could not be claimed");
            None
        }
    });
    Ok(Some(ClaimedJob { id, dir, image: Some(image.to_os_string()), sidecar, _lock: lock }))
}

/// Takes over the jobs in `work/` that no live daemon holds (left by a crash or a stop), oldest
/// first, skipping the ids in `own`. Empty folders of crashed claims are removed once old.
pub fn recover_jobs(root: &Root, own: &HashSet<String>) -> Result<Vec<ClaimedJob>, DaemonError> {
    let work = root.work();
    let mut ids: Vec<String> = std::fs::read_dir(&work)
        .map_err(io_error(&work))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|id| !id.starts_with('.') && !own.contains(id))
        .collect();
    ids.sort_by_key(|id| {
        let millis: u128 = id.split('-').next().and_then(|m| m.parse().ok()).unwrap_or(0);
        (millis, id.clone())
    });
    let mut jobs = Vec::new();
    for id in ids {
        let dir = work.join(&id);
        let Ok(lock) = open_lock(&dir) else { continue };
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => {
                tracing::warn!(job = %id, error = %e, "cannot lock job folder; skipped");
                continue;
            }
        }
        let (image, sidecar) = match inputs_of(&dir) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "cannot read job folder; skipped");
                continue;
            }
        };
        if image.is_some() || dir.join(OUTCOME).exists() {
            jobs.push(ClaimedJob { id, dir, image, sidecar, _lock: lock });
            continue;
        }
        let age = std::fs::metadata(&dir).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a >= ORPHAN_AGE) {
            // A claim that crashed before its rename; a lone sidecar goes back to the inbox.
            if let Some(name) = sidecar {
                let _ = crate::folders::move_no_clobber(&dir.join(&name), &root.inbox().join(&name));
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(job = %id, error = %e, "cannot remove empty job folder");
            }
        }
    }
    Ok(jobs)
}

/// Removes a finished job's folder (checkpoints, journal, lock); the lock goes with it.
pub fn remove_job_dir(job: &ClaimedJob) -> std::io::Result<()> {
    std::fs::remove_dir_all(&job.dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, Root) {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        (dir, root)
    }

    #[test]
    fn a_claim_moves_image_and_sidecar_and_a_second_claim_finds_nothing() {
        let (_t, root) = root();
        std::fs::write(root.inbox().join("a b.jpg"), "x").unwrap();
        std::fs::write(root.inbox().join("a b.toml"), "").unwrap();
        let job = claim_job(&root, OsStr::new("a b.jpg"), Some(OsStr::new("a b.toml"))).unwrap().unwrap();
        assert!(job.dir.join("a b.jpg").is_file() && job.dir.join("a b.toml").is_file());
        assert_eq!(std::fs::read_dir(root.inbox()).unwrap().count(), 0);
        assert!(claim_job(&root, OsStr::new("a b.jpg"), None).unwrap().is_none());
        assert_eq!(std::fs::read_dir(root.work()).unwrap().count(), 1, "the failed claim left no folder");
    }

    #[test]
    fn held_jobs_are_not_recovered_and_released_ones_are() {
        let (_t, root) = root();
        std::fs::write(root.inbox().join("a.jpg"), "x").unwrap();
        let job = claim_job(&root, OsStr::new("a.jpg"), None).unwrap().unwrap();
        // Another "daemon" (a second open file description) cannot take it while it is held.
        assert!(recover_jobs(&root, &HashSet::new()).unwrap().is_empty());
        let id = job.id.clone();
        drop(job);
        let recovered = recover_jobs(&root, &HashSet::new()).unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].id, id);
        assert_eq!(recovered[0].image.as_deref(), Some(OsStr::new("a.jpg")));
        assert!(recover_jobs(&root, &HashSet::new()).unwrap().is_empty(), "held again by the recoverer");
    }

    #[test]
    fn a_young_empty_folder_is_left_alone() {
        let (_t, root) = root();
        std::fs::create_dir(root.work().join("1-2-3")).unwrap();
        assert!(recover_jobs(&root, &HashSet::new()).unwrap().is_empty());
        assert!(root.work().join("1-2-3").is_dir(), "may be another daemon's claim in progress");
    }
}
