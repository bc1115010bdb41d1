//! The watched root's folders, and moves that never replace an existing file.

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::DaemonError;

/// The folders of a drop-folder root (see DESIGN.md, "Drop-folder protocol").
#[derive(Debug, Clone)]
pub struct Root {
    path: PathBuf,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io { path: path.to_path_buf(), source }
}

impl Root {
    /// The root at `path`, made absolute and with its folders created.
    pub fn open(path: &Path) -> Result<Self, DaemonError> {
        std::fs::create_dir_all(path).map_err(io_error(path))?;
        let path = path.canonicalize().map_err(io_error(path))?;
        let root = Self { path };
        for dir in [root.inbox(), root.work(), root.out(), root.done(), root.failed(), root.styles()] {
            std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        Ok(root)
    }

    /// The root itself (canonical).
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Where users drop files.
    pub fn inbox(&self) -> PathBuf {
        self.path.join("inbox")
    }
    /// Claimed jobs, one folder each, with their checkpoints.
    pub fn work(&self) -> PathBuf {
        self.path.join("work")
    }
    /// Results.
    pub fn out(&self) -> PathBuf {
        self.path.join("out")
    }
    /// Originals of finished jobs.
    pub fn done(&self) -> PathBuf {
        self.path.join("done")
    }
    /// Originals of failed jobs, with `NAME.error.txt`.
    pub fn failed(&self) -> PathBuf {
        self.path.join("failed")
    }
    /// Style images that configs and sidecars name.
    pub fn styles(&self) -> PathBuf {
        self.path.join("styles")
    }
    /// The daemon's status, rewritten atomically.
    pub fn status(&self) -> PathBuf {
        self.path.join("status.json")
    }

    /// Whether `path` (resolved through symbolic links) lies inside the root.
    pub fn contains(&self, path: &Path) -> bool {
        path.canonicalize().is_ok_and(|p| p.starts_with(&self.path))
    }
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

/// Moves `src` to `dst` unless `dst` exists; safe to repeat after a crash at any point.
///
/// A hard link is made and `src` then removed, so two daemons racing for one name cannot
/// overwrite each other's file (a rename would replace `dst` silently). Where links are not
/// supported (FAT, some network shares) it falls back to check-then-rename. A symbolic link is
/// moved as a link, never followed.
pub fn move_no_clobber(src: &Path, dst: &Path) -> std::io::Result<Moved> {
    match std::fs::hard_link(src, dst) {
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
        Err(_) => {
            if std::fs::symlink_metadata(dst).is_ok() {
                return Ok(Moved::Taken);
            }
            match std::fs::rename(src, dst) {
                Err(e) if e.kind() == ErrorKind::CrossesDevices => copy_then_rename(src, dst)?,
                other => other?,
            }
            return Ok(Moved::Done);
        }
    }
    match std::fs::remove_file(src) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(Moved::Done),
    }
}

/// Moves `src` to `dst` on another filesystem (e.g. `out/` mounted elsewhere): a copy under a
/// temp name beside `dst`, synced and renamed, so `dst` never holds a partial file.
fn copy_then_rename(src: &Path, dst: &Path) -> std::io::Result<()> {
    let tmp = easel_core::temp_path_for(dst);
    let copied = (|| {
        let meta = std::fs::symlink_metadata(src)?;
        #[cfg(unix)]
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(src)?, &tmp)?;
            return std::fs::rename(&tmp, dst);
        }
        let _ = meta;
        std::fs::copy(src, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dst)
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied?;
    std::fs::remove_file(src)
}

/// Whether any of `names` exists in `dir`.
pub fn any_exists(dir: &Path, names: &[&OsStr]) -> bool {
    names.iter().any(|n| std::fs::symlink_metadata(dir.join(n)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_never_replace_and_repeat_safely() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
        std::fs::write(&a, "A").unwrap();
        std::fs::write(&b, "B").unwrap();
        assert_eq!(move_no_clobber(&a, &b).unwrap(), Moved::Taken);
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "B");
        assert_eq!(move_no_clobber(&a, &c).unwrap(), Moved::Done);
        assert!(!a.exists());
        assert_eq!(std::fs::read_to_string(&c).unwrap(), "A");
        assert_eq!(move_no_clobber(&a, &c).unwrap(), Moved::Done, "repeating a finished move is fine");
        // A crash between link and unlink leaves both names on one file.
        std::fs::hard_link(&c, &a).unwrap();
        assert_eq!(move_no_clobber(&a, &c).unwrap(), Moved::Done);
        assert!(!a.exists());
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_move_as_links() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        let dst = dir.path().join("m");
        assert_eq!(move_no_clobber(&link, &dst).unwrap(), Moved::Done);
        assert!(std::fs::symlink_metadata(&dst).unwrap().file_type().is_symlink());
    }
}
