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
use crate::fsops::{move_no_clobber, Fs};
use crate::names::{role, sidecar_of, Role};
use crate::DaemonError;

const LOCK: &str = ".lock";
/// The prefix of a claim's staging folder in `work/` (see [`claim_job`]).
const STAGING: &str = ".claim-";
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

/// A new job id: claim time, process id and a counter.
fn new_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("{millis}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// The staging folder of a claim in progress: `work/.claim-ID.s` for a job with a sidecar,
/// `.claim-ID.n` without. The name records, from the first step, whether a sidecar belongs to
/// the job, so a claim cut short is completed with it.
fn staging_name(id: &str, with_sidecar: bool) -> String {
    format!("{STAGING}{id}.{}", if with_sidecar { 's' } else { 'n' })
}

/// `(id, with sidecar)` of a staging folder's name.
fn parse_staging(name: &str) -> Option<(&str, bool)> {
    let (id, flag) = name.strip_prefix(STAGING)?.rsplit_once('.')?;
    match flag {
        "s" => Some((id, true)),
        "n" => Some((id, false)),
        _ => None,
    }
}

fn open_lock(dir: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK))
}

/// The image and sidecar in a job folder (names without a leading dot).
pub(crate) fn inputs_of(dir: &Path) -> std::io::Result<(Option<OsString>, Option<OsString>)> {
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

/// Syncs a dropped file before its claim, so that a power cut cannot leave a claimed job with
/// data its writer never synced. A file the daemon may not open (it is read when the job runs,
/// and fails there with its reason) is claimed unsynced.
fn sync_dropped(fs: &dyn Fs, path: &Path) -> std::io::Result<()> {
    match fs.sync_file(path) {
        Err(e) if e.kind() == ErrorKind::PermissionDenied => Ok(()),
        other => other,
    }
}

/// The last step of a claim: the staging folder becomes `work/ID` in one rename, so a job
/// folder always holds the whole job; then the three folders involved are synced.
fn commit(fs: &dyn Fs, root: &Root, staging: &Path, id: &str) -> std::io::Result<PathBuf> {
    let dir = root.work().join(id);
    fs.rename(staging, &dir)?;
    fs.sync_dir(&dir)?;
    fs.sync_dir(&root.work())?;
    // The names left the inbox: without this a power cut could bring them back there too.
    fs.sync_dir(&root.inbox())?;
    Ok(dir)
}

/// Claims the job `image` (and its `sidecar`) from `inbox/`: both are renamed into a staging
/// folder, which is then renamed to `work/ID` in one atomic step. `Ok(None)` when the image is
/// gone: another daemon claimed it, or its owner took it back.
///
/// Each file is synced before it is renamed (the dropper may not have), and the folders after.
/// A crash before the last rename leaves a staging folder, which [`recover_jobs`] completes
/// (fetching the sidecar from `inbox/` if it was not moved yet).
pub fn claim_job(
    fs: &dyn Fs,
    root: &Root,
    image: &OsStr,
    sidecar: Option<&OsStr>,
) -> Result<Option<ClaimedJob>, DaemonError> {
    let work = root.work();
    let (id, staging) = loop {
        let id = new_id();
        let staging = work.join(staging_name(&id, sidecar.is_some()));
        match fs.create_dir(&staging) {
            Ok(()) => break (id, staging),
            // Another machine's daemon on a shared folder may have the same pid.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_error(&staging)(e)),
        }
    };
    let abandon = |dir: &Path| {
        let _ = std::fs::remove_file(dir.join(LOCK));
        let _ = std::fs::remove_dir(dir);
    };
    let lock = match open_lock(&staging).and_then(|f| f.lock().map(|()| f)) {
        Ok(lock) => lock,
        Err(e) => {
            abandon(&staging);
            return Err(io_error(&staging)(e));
        }
    };
    let from = root.inbox().join(image);
    match sync_dropped(fs, &from).and_then(|()| fs.rename(&from, &staging.join(image))) {
        Ok(()) => {}
        Err(e) => {
            abandon(&staging);
            return if e.kind() == ErrorKind::NotFound { Ok(None) } else { Err(io_error(&from)(e)) };
        }
    }
    let sidecar = sidecar.and_then(|name| {
        let from = root.inbox().join(name);
        match sync_dropped(fs, &from).and_then(|()| fs.rename(&from, &staging.join(name))) {
            Ok(()) => Some(name.to_os_string()),
            Err(e) => {
                // The job runs without it; a sidecar still in inbox/ is left for the user.
                tracing::warn!(job = %id, sidecar = %name.to_string_lossy(), error = %e, "sidecar could not be claimed");
                None
            }
        }
    });
    // On an error here the staging folder is released with the lock, and recovered.
    let dir = commit(fs, root, &staging, &id).map_err(io_error(&staging))?;
    Ok(Some(ClaimedJob { id, dir, image: Some(image.to_os_string()), sidecar, _lock: lock }))
}

/// Completes a claim that a crash cut short: the sidecar it was taking is fetched from `inbox/`
/// if it is still there, and the staging folder is committed. `None` when it holds no image
/// (the crash came before the image's rename): the folder is removed once old.
fn complete_claim(
    fs: &dyn Fs,
    root: &Root,
    staging: &Path,
    id: &str,
    with_sidecar: bool,
) -> std::io::Result<Option<(PathBuf, OsString, Option<OsString>)>> {
    let (image, mut sidecar) = inputs_of(staging)?;
    let Some(image) = image else {
        let age = std::fs::metadata(staging).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a >= ORPHAN_AGE) {
            if let Some(name) = sidecar {
                let _ = move_no_clobber(fs, &staging.join(&name), &root.inbox().join(&name));
            }
            std::fs::remove_dir_all(staging)?;
        }
        return Ok(None);
    };
    if with_sidecar && sidecar.is_none() {
        let name = sidecar_of(&image);
        let from = root.inbox().join(&name);
        match sync_dropped(fs, &from).and_then(|()| fs.rename(&from, &staging.join(&name))) {
            Ok(()) => sidecar = Some(name),
            // Taken back by its owner: the job runs without it, as a live claim would.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let dir = commit(fs, root, staging, id)?;
    Ok(Some((dir, image, sidecar)))
}

/// Takes over the jobs in `work/` that no live daemon holds (left by a crash or a stop), oldest
/// first, skipping the ids in `own`; claims a crash cut short are completed first. Empty folders
/// of crashed claims are removed once old.
pub fn recover_jobs(fs: &dyn Fs, root: &Root, own: &HashSet<String>) -> Result<Vec<ClaimedJob>, DaemonError> {
    let work = root.work();
    let mut ids: Vec<String> = std::fs::read_dir(&work)
        .map_err(io_error(&work))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| parse_staging(name).is_some() || !name.starts_with('.'))
        .filter(|name| !own.contains(name))
        .collect();
    let id_of =
        |name: &str| parse_staging(name).map(|(id, _)| id.to_string()).unwrap_or_else(|| name.to_string());
    ids.sort_by_key(|name| {
        let id = id_of(name);
        let millis: u128 = id.split('-').next().and_then(|m| m.parse().ok()).unwrap_or(0);
        (millis, id)
    });
    let mut jobs = Vec::new();
    for name in ids {
        let dir = work.join(&name);
        let Ok(lock) = open_lock(&dir) else { continue };
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => {
                tracing::warn!(job = %name, error = %e, "cannot lock job folder; skipped");
                continue;
            }
        }
        if let Some((id, with_sidecar)) = parse_staging(&name) {
            match complete_claim(fs, root, &dir, id, with_sidecar) {
                Ok(Some((dir, image, sidecar))) => {
                    tracing::info!(job = %id, sidecar = sidecar.is_some(), "completed a claim cut short");
                    jobs.push(ClaimedJob {
                        id: id.to_string(),
                        dir,
                        image: Some(image),
                        sidecar,
                        _lock: lock,
                    });
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(job = %id, error = %e, "cannot complete a claim cut short; skipped"),
            }
            continue;
        }
        let id = name;
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
            // A folder of an older easel whose claim crashed before its image's rename; a lone
            // sidecar goes back to the inbox.
            if let Some(name) = sidecar {
                let _ = move_no_clobber(fs, &dir.join(&name), &root.inbox().join(&name));
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
    use crate::fsops::fake::{Call, Recording};
    use crate::fsops::RealFs;

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
        let job =
            claim_job(&RealFs, &root, OsStr::new("a b.jpg"), Some(OsStr::new("a b.toml"))).unwrap().unwrap();
        assert!(job.dir.join("a b.jpg").is_file() && job.dir.join("a b.toml").is_file());
        assert_eq!(std::fs::read_dir(root.inbox()).unwrap().count(), 0);
        assert!(claim_job(&RealFs, &root, OsStr::new("a b.jpg"), None).unwrap().is_none());
        assert_eq!(std::fs::read_dir(root.work()).unwrap().count(), 1, "the failed claim left no folder");
    }

    #[test]
    fn held_jobs_are_not_recovered_and_released_ones_are() {
        let (_t, root) = root();
        std::fs::write(root.inbox().join("a.jpg"), "x").unwrap();
        let job = claim_job(&RealFs, &root, OsStr::new("a.jpg"), None).unwrap().unwrap();
        // Another "daemon" (a second open file description) cannot take it while it is held.
        assert!(recover_jobs(&RealFs, &root, &HashSet::new()).unwrap().is_empty());
        let id = job.id.clone();
        drop(job);
        let recovered = recover_jobs(&RealFs, &root, &HashSet::new()).unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].id, id);
        assert_eq!(recovered[0].image.as_deref(), Some(OsStr::new("a.jpg")));
        assert!(
            recover_jobs(&RealFs, &root, &HashSet::new()).unwrap().is_empty(),
            "held again by the recoverer"
        );
    }

    #[test]
    fn a_claim_syncs_each_file_before_its_rename_and_the_folders_after_the_commit() {
        let (_t, root) = root();
        std::fs::write(root.inbox().join("a.jpg"), "x").unwrap();
        std::fs::write(root.inbox().join("a.toml"), "").unwrap();
        let fs = Recording::new();
        let job = claim_job(&fs, &root, OsStr::new("a.jpg"), Some(OsStr::new("a.toml"))).unwrap().unwrap();
        let calls = fs.calls();
        let Call::CreateDir(staging) = &calls[0] else { panic!("{calls:?}") };
        let inbox = root.inbox();
        assert_eq!(
            calls,
            [
                Call::CreateDir(staging.clone()),
                Call::SyncFile(inbox.join("a.jpg")),
                Call::Rename(inbox.join("a.jpg"), staging.join("a.jpg")),
                Call::SyncFile(inbox.join("a.toml")),
                Call::Rename(inbox.join("a.toml"), staging.join("a.toml")),
                Call::Rename(staging.clone(), job.dir.clone()),
                Call::SyncDir(job.dir.clone()),
                Call::SyncDir(root.work()),
                Call::SyncDir(inbox),
            ]
        );
        assert!(job.dir.join("a.jpg").is_file() && job.dir.join("a.toml").is_file());
    }

    #[test]
    fn a_crash_between_the_image_and_its_sidecar_is_completed_with_the_sidecar() {
        let (_t, root) = root();
        std::fs::write(root.inbox().join("p.png"), "x").unwrap();
        std::fs::write(root.inbox().join("p.toml"), "[run]\n").unwrap();
        // The process "dies" (unwinds, dropping its lock as an exit would) as it is about to
        // take the sidecar.
        let fs = Recording::failing(|call| match call {
            Call::SyncFile(p) if p.ends_with("p.toml") => panic!("crash injected before the sidecar's claim"),
            _ => None,
        });
        let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            claim_job(&fs, &root, OsStr::new("p.png"), Some(OsStr::new("p.toml")))
        }));
        assert!(crashed.is_err());
        assert!(root.inbox().join("p.toml").is_file() && !root.inbox().join("p.png").exists());
        let jobs: Vec<_> = std::fs::read_dir(root.work())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.'))
            .collect();
        assert!(jobs.is_empty(), "no job folder holds the image without its sidecar: {jobs:?}");

        let recovered = recover_jobs(&RealFs, &root, &HashSet::new()).unwrap();
        assert_eq!(recovered.len(), 1);
        let job = &recovered[0];
        assert_eq!(job.image.as_deref(), Some(OsStr::new("p.png")));
        assert_eq!(job.sidecar.as_deref(), Some(OsStr::new("p.toml")));
        assert!(job.dir.join("p.png").is_file() && job.dir.join("p.toml").is_file());
        assert_eq!(job.dir.parent(), Some(root.work().as_path()));
        assert_eq!(std::fs::read_dir(root.inbox()).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(root.work()).unwrap().count(), 1, "the staging folder became the job");
    }

    #[test]
    fn a_claim_in_progress_is_not_completed_by_another_daemon() {
        let (_t, root) = root();
        std::fs::write(root.inbox().join("q.png"), "x").unwrap();
        let staging = root.work().join(staging_name("5-6-7", true));
        std::fs::create_dir(&staging).unwrap();
        std::fs::rename(root.inbox().join("q.png"), staging.join("q.png")).unwrap();
        let held = open_lock(&staging).unwrap();
        held.lock().unwrap();
        assert!(recover_jobs(&RealFs, &root, &HashSet::new()).unwrap().is_empty());
        assert!(staging.join("q.png").is_file());
        drop(held);
        let recovered = recover_jobs(&RealFs, &root, &HashSet::new()).unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].id, "5-6-7");
        assert_eq!(recovered[0].sidecar, None, "its sidecar is no longer in inbox/");
    }

    #[test]
    fn a_young_empty_folder_is_left_alone() {
        let (_t, root) = root();
        std::fs::create_dir(root.work().join("1-2-3")).unwrap();
        assert!(recover_jobs(&RealFs, &root, &HashSet::new()).unwrap().is_empty());
        assert!(root.work().join("1-2-3").is_dir(), "may be another daemon's claim in progress");
    }
}
