//! The filesystem operations that move a job along, behind a small trait so that tests can
//! record their order (durability) or make them fail (a full disk, a crash at a chosen step).
//!
//! Every step of a job that must survive a power cut is built from these calls in one order:
//! the file's data is synced before it is renamed or linked into place, and the folder that
//! gained (or lost) the name is synced after. [`write_durably`] and [`move_no_clobber`] are those
//! steps; [`crate::claim`] and the job code use nothing else for the files they own.

use std::ffi::OsString;
use std::fmt::Debug;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The calls the daemon makes on its folders. [`RealFs`] is the real one; tests wrap or fake it.
pub trait Fs: Send + Sync + Debug {
    /// Creates a folder (not its parents).
    fn create_dir(&self, path: &Path) -> std::io::Result<()>;
    /// Creates (or truncates) `path` and writes `bytes` to it; not synced.
    fn write_new(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
    /// Overwrites the start of an existing file without creating or growing it, then syncs it:
    /// needs no free space on a filesystem that rewrites blocks in place.
    fn overwrite(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
    /// Syncs a file's data and metadata to disk (fsync).
    fn sync_file(&self, path: &Path) -> std::io::Result<()>;
    /// Syncs a folder, making the names created in or removed from it durable.
    fn sync_dir(&self, path: &Path) -> std::io::Result<()>;
    /// Renames `from` to `to` (replacing `to`, as rename(2) does).
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// Makes `to` a second name of `from`; fails if `to` exists.
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// Removes a file (or a symbolic link).
    fn remove_file(&self, path: &Path) -> std::io::Result<()>;
}

/// The operating system's filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl Fs for RealFs {
    fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir(path)
    }

    fn write_new(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::File::create(path)?.write_all(bytes)
    }

    fn overwrite(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        let old_len = file.metadata()?.len();
        if (bytes.len() as u64) > old_len {
            return Err(std::io::Error::new(ErrorKind::InvalidInput, "would grow the file"));
        }
        file.write_all(bytes)?;
        file.set_len(bytes.len() as u64)?;
        file.sync_all()
    }

    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        // fsync applies to the file, whichever descriptor it is called on; a symbolic link has
        // no data of its own (and is made durable by syncing its folder).
        if std::fs::symlink_metadata(path)?.file_type().is_symlink() {
            return Ok(());
        }
        std::fs::File::open(path)?.sync_all()
    }

    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        match std::fs::File::open(path)?.sync_all() {
            // Some filesystems (and platforms) cannot sync a folder; there is nothing more to do.
            Err(e) if matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::Unsupported) => Ok(()),
            other => other,
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::hard_link(from, to)
    }

    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)
    }
}

/// Whether `e` means the disk (or the user's quota) is full: a condition that passes, so the
/// step is retried later instead of failing the job.
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::StorageFull
        || e.kind() == ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// A short temp name in `dir`: a dotfile (ignored by the inbox scanner) that fits any
/// filesystem's name limit whatever the final name's length.
pub fn temp_in(dir: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(".tmp-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)))
}

/// The folder holding `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Writes `bytes` to `path` so that after a power cut it holds the old content or the new one:
/// a temp file is written and synced, renamed into place, and the folder synced.
pub fn write_durably(fs: &dyn Fs, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = parent_of(path);
    let tmp = temp_in(dir);
    let written =
        fs.write_new(&tmp, bytes).and_then(|()| fs.sync_file(&tmp)).and_then(|()| fs.rename(&tmp, path));
    if written.is_err() {
        let _ = fs.remove_file(&tmp);
        return written;
    }
    fs.sync_dir(dir)
}

/// How [`move_no_clobber`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Moved {
    /// `src` is now at `dst` (moved now, or by an earlier attempt that crashed before finishing).
    Done,
    /// `dst` holds some other file; pick another name.
    Taken,
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &Path, _: &Path) -> bool {
    false
}

/// Moves `src` to `dst` unless `dst` exists; durable, and safe to repeat after a crash at any
/// point.
///
/// A hard link is made (and its folder synced) before `src` is removed (and its folder synced),
/// so two daemons racing for one name cannot overwrite each other's file (a rename would replace
/// `dst` silently) and a power cut leaves the file under one name or both, never none. Where
/// links are not supported (FAT, some network shares) it falls back to check-then-rename. A
/// symbolic link is moved as a link, never followed. `src`'s data must already be durable.
pub fn move_no_clobber(fs: &dyn Fs, src: &Path, dst: &Path) -> std::io::Result<Moved> {
    match fs.hard_link(src, dst) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            if !same_file(src, dst) {
                return Ok(Moved::Taken);
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound && std::fs::symlink_metadata(src).is_err() => {
            // Moved by an earlier attempt; `dst` may since have been taken by the user.
            return Ok(Moved::Done);
        }
        Err(e) if is_out_of_space(&e) => return Err(e),
        Err(_) => {
            if std::fs::symlink_metadata(dst).is_ok() {
                return Ok(Moved::Taken);
            }
            match fs.rename(src, dst) {
                Err(e) if e.kind() == ErrorKind::CrossesDevices => copy_then_rename(fs, src, dst)?,
                other => other?,
            }
            fs.sync_dir(parent_of(dst))?;
            fs.sync_dir(parent_of(src))?;
            return Ok(Moved::Done);
        }
    }
    fs.sync_dir(parent_of(dst))?;
    match fs.remove_file(src) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs.sync_dir(parent_of(src))?;
    Ok(Moved::Done)
}

/// Moves `src` to `dst` on another filesystem (e.g. `out/` mounted elsewhere): a copy under a
/// temp name beside `dst`, synced and renamed, so `dst` never holds a partial file.
fn copy_then_rename(fs: &dyn Fs, src: &Path, dst: &Path) -> std::io::Result<()> {
    let tmp = temp_in(parent_of(dst));
    let copied = (|| {
        let meta = std::fs::symlink_metadata(src)?;
        #[cfg(unix)]
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(src)?, &tmp)?;
            return fs.rename(&tmp, dst);
        }
        let _ = meta;
        std::fs::copy(src, &tmp)?;
        fs.sync_file(&tmp)?;
        fs.rename(&tmp, dst)
    })();
    if copied.is_err() {
        let _ = fs.remove_file(&tmp);
    }
    copied?;
    fs.remove_file(src)
}

/// A test hook of the real binary (the soak test and the end-to-end tests use it; see
/// deploy/DAEMON.md, "Tests"): `EASEL_DAEMON_FAULTS=enospc-while:FILE` makes every call that
/// needs space (creating a folder or file, linking) fail with ENOSPC while FILE exists, as a
/// full disk would.
#[derive(Debug)]
pub struct FaultyFs {
    inner: RealFs,
    full_while: Option<PathBuf>,
}

/// The environment variable read by [`FaultyFs::from_env`].
pub const FAULTS_VAR: &str = "EASEL_DAEMON_FAULTS";

impl FaultyFs {
    /// The faults named in `$EASEL_DAEMON_FAULTS`, or `None` when it is unset (the usual case).
    pub fn from_env() -> Option<Self> {
        let spec: OsString = std::env::var_os(FAULTS_VAR)?;
        let spec = spec.to_string_lossy().into_owned();
        let full_while = spec.strip_prefix("enospc-while:").map(PathBuf::from);
        if full_while.is_none() {
            tracing::warn!(spec, "{FAULTS_VAR}: unknown fault; ignored");
            return None;
        }
        tracing::warn!(spec, "test hook: injecting filesystem faults");
        Some(Self { inner: RealFs, full_while })
    }

    fn space(&self) -> std::io::Result<()> {
        match &self.full_while {
            Some(flag) if flag.exists() => Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
            _ => Ok(()),
        }
    }
}

impl Fs for FaultyFs {
    fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        self.space()?;
        self.inner.create_dir(path)
    }
    fn write_new(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        self.space()?;
        self.inner.write_new(path, bytes)
    }
    fn overwrite(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.overwrite(path, bytes)
    }
    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        self.inner.sync_file(path)
    }
    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        self.inner.sync_dir(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.space()?;
        self.inner.hard_link(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove_file(path)
    }
}

/// Test doubles: a recording filesystem (the order of calls) and one that fails on demand.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::Mutex;

    use super::*;

    /// One call, with the file names involved (the last component of each path).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        CreateDir(PathBuf),
        Write(PathBuf),
        Overwrite(PathBuf),
        SyncFile(PathBuf),
        SyncDir(PathBuf),
        Rename(PathBuf, PathBuf),
        Link(PathBuf, PathBuf),
        Remove(PathBuf),
    }

    type Hook = Box<dyn Fn(&Call) -> Option<std::io::Error> + Send + Sync>;

    /// The real filesystem, with every call recorded; `hook` may fail (or panic at) a call
    /// before it is made.
    pub struct Recording {
        pub calls: Mutex<Vec<Call>>,
        hook: Hook,
    }

    impl Debug for Recording {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Recording").finish_non_exhaustive()
        }
    }

    impl Recording {
        pub fn new() -> Self {
            Self::failing(|_| None)
        }

        pub fn failing(hook: impl Fn(&Call) -> Option<std::io::Error> + Send + Sync + 'static) -> Self {
            Self { calls: Mutex::new(Vec::new()), hook: Box::new(hook) }
        }

        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        fn call(&self, call: Call, real: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
            if let Some(e) = (self.hook)(&call) {
                return Err(e);
            }
            self.calls.lock().unwrap().push(call);
            real()
        }
    }

    impl Fs for Recording {
        fn create_dir(&self, p: &Path) -> std::io::Result<()> {
            self.call(Call::CreateDir(p.into()), || RealFs.create_dir(p))
        }
        fn write_new(&self, p: &Path, bytes: &[u8]) -> std::io::Result<()> {
            self.call(Call::Write(p.into()), || RealFs.write_new(p, bytes))
        }
        fn overwrite(&self, p: &Path, bytes: &[u8]) -> std::io::Result<()> {
            self.call(Call::Overwrite(p.into()), || RealFs.overwrite(p, bytes))
        }
        fn sync_file(&self, p: &Path) -> std::io::Result<()> {
            self.call(Call::SyncFile(p.into()), || RealFs.sync_file(p))
        }
        fn sync_dir(&self, p: &Path) -> std::io::Result<()> {
            self.call(Call::SyncDir(p.into()), || RealFs.sync_dir(p))
        }
        fn rename(&self, a: &Path, b: &Path) -> std::io::Result<()> {
            self.call(Call::Rename(a.into(), b.into()), || RealFs.rename(a, b))
        }
        fn hard_link(&self, a: &Path, b: &Path) -> std::io::Result<()> {
            self.call(Call::Link(a.into(), b.into()), || RealFs.hard_link(a, b))
        }
        fn remove_file(&self, p: &Path) -> std::io::Result<()> {
            self.call(Call::Remove(p.into()), || RealFs.remove_file(p))
        }
    }

    /// ENOSPC, as a full disk reports it.
    pub fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::ENOSPC)
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{enospc, Call, Recording};
    use super::*;

    #[test]
    fn a_durable_write_syncs_the_file_before_the_rename_and_the_folder_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        let fs = Recording::new();
        write_durably(&fs, &path, b"new").unwrap();
        let calls = fs.calls();
        let Call::Write(tmp) = &calls[0] else { panic!("{calls:?}") };
        assert_eq!(
            calls,
            [
                Call::Write(tmp.clone()),
                Call::SyncFile(tmp.clone()),
                Call::Rename(tmp.clone(), path.clone()),
                Call::SyncDir(dir.path().to_path_buf())
            ]
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn a_durable_move_links_syncs_the_new_folder_then_unlinks_and_syncs_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("f"), "F").unwrap();
        let fs = Recording::new();
        assert_eq!(move_no_clobber(&fs, &a.join("f"), &b.join("g")).unwrap(), Moved::Done);
        assert_eq!(
            fs.calls(),
            [
                Call::Link(a.join("f"), b.join("g")),
                Call::SyncDir(b.clone()),
                Call::Remove(a.join("f")),
                Call::SyncDir(a.clone())
            ]
        );
        assert_eq!(std::fs::read_to_string(b.join("g")).unwrap(), "F");
    }

    #[test]
    fn a_full_disk_is_reported_as_such_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        std::fs::write(&path, "old").unwrap();
        let fs = Recording::failing(|c| matches!(c, Call::Write(_)).then(enospc));
        let e = write_durably(&fs, &path, b"new").unwrap_err();
        assert!(is_out_of_space(&e), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let quota = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert!(is_out_of_space(&quota));
        assert!(!is_out_of_space(&std::io::Error::from_raw_os_error(libc::EACCES)));
    }

    #[test]
    fn moves_never_replace_and_repeat_safely() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
        std::fs::write(&a, "A").unwrap();
        std::fs::write(&b, "B").unwrap();
        assert_eq!(move_no_clobber(&RealFs, &a, &b).unwrap(), Moved::Taken);
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "B");
        assert_eq!(move_no_clobber(&RealFs, &a, &c).unwrap(), Moved::Done);
        assert!(!a.exists());
        assert_eq!(std::fs::read_to_string(&c).unwrap(), "A");
        assert_eq!(
            move_no_clobber(&RealFs, &a, &c).unwrap(),
            Moved::Done,
            "repeating a finished move is fine"
        );
        // A crash between link and unlink leaves both names on one file.
        std::fs::hard_link(&c, &a).unwrap();
        assert_eq!(move_no_clobber(&RealFs, &a, &c).unwrap(), Moved::Done);
        assert!(!a.exists());
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_move_as_links() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        let dst = dir.path().join("m");
        assert_eq!(move_no_clobber(&RealFs, &link, &dst).unwrap(), Moved::Done);
        assert!(std::fs::symlink_metadata(&dst).unwrap().file_type().is_symlink());
    }

    #[test]
    fn overwrite_rewrites_in_place_and_never_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "12\n").unwrap();
        RealFs.overwrite(&path, b"3\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"3\n");
        assert!(RealFs.overwrite(&path, b"too long").is_err());
        assert!(RealFs.overwrite(&dir.path().join("missing"), b"1").is_err());
    }
}
