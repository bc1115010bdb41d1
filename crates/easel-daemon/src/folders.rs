//! The watched root's folders, and moves that never replace an existing file.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::{DaemonError, JobError};

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

    /// Refuses a dropped symbolic link (an image or a sidecar, called `name` in the error)
    /// that leads out of the root, nowhere, or round in a loop; anything else passes.
    pub fn check_link(&self, path: &Path, name: &str) -> Result<(), JobError> {
        let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            return Ok(());
        }
        let target = std::fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
        let name = name.to_string();
        match path.canonicalize() {
            Ok(resolved) if resolved.starts_with(&self.path) => Ok(()),
            Ok(_) => Err(JobError::LinkOutside { name, target }),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(JobError::LinkLoop { name, target }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(JobError::LinkDangling { name, target })
            }
            Err(_) => Err(JobError::LinkOutside { name, target }),
        }
    }
}

/// Whether any of `names` exists in `dir`.
pub fn any_exists(dir: &Path, names: &[&OsStr]) -> bool {
    names.iter().any(|n| std::fs::symlink_metadata(dir.join(n)).is_ok())
}
