//! When a dropped file is complete, and when a job (image plus optional sidecar) is ready to claim.
//!
//! Pure bookkeeping over observations (stats, filesystem events) stamped with a caller-supplied
//! `Instant`, so tests drive the clock; the daemon feeds it from `notify` or from polling.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::time::{Duration, Instant, SystemTime};

use crate::names::{role, sidecar_of, Role};

/// What a stat of a dropped file showed; a change in any field restarts the settle clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub len: u64,
    pub modified: Option<SystemTime>,
    /// Symbolic links are created atomically, so they are complete when first seen.
    pub symlink: bool,
}

impl Stat {
    /// The stat of `path` without following a symbolic link; `None` for a missing file or a folder.
    pub fn of(path: &std::path::Path) -> Option<Stat> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        if meta.is_dir() {
            return None;
        }
        Some(Stat { len: meta.len(), modified: meta.modified().ok(), symlink: meta.file_type().is_symlink() })
    }
}

#[derive(Debug)]
struct Entry {
    stat: Option<Stat>,
    /// When a change of the file was last seen (or when it was first seen).
    changed_at: Instant,
    /// When it was renamed in or closed after writing, if not written to since.
    completed_at: Option<Instant>,
    /// A failed claim is not retried before this.
    deferred_until: Option<Instant>,
}

/// A job whose files are complete: claim it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyJob {
    pub image: OsString,
    pub sidecar: Option<OsString>,
}

/// The files of `inbox/` not yet claimed, and how complete each is.
#[derive(Debug)]
pub struct Intake {
    settle: Duration,
    sidecar_wait: Duration,
    files: BTreeMap<OsString, Entry>,
}

impl Intake {
    /// Files are complete after `settle` without change; an image without a sidecar waits
    /// `sidecar_wait` after it is complete, in case its sidecar follows it.
    pub fn new(settle: Duration, sidecar_wait: Duration) -> Self {
        Self { settle, sidecar_wait, files: BTreeMap::new() }
    }

    /// Changes the timings (after a config reload); files keep their history.
    pub fn set_timing(&mut self, settle: Duration, sidecar_wait: Duration) {
        self.settle = settle;
        self.sidecar_wait = sidecar_wait;
    }

    /// Records a stat of `name` taken at `now`; `None` means it is gone. Temp names are ignored.
    pub fn observe(&mut self, name: &OsStr, stat: Option<Stat>, now: Instant) {
        if role(name) == Role::Temporary {
            return;
        }
        let Some(stat) = stat else {
            self.files.remove(name);
            return;
        };
        let entry = self.files.entry(name.to_os_string()).or_insert(Entry {
            stat: None,
            changed_at: now,
            completed_at: None,
            deferred_until: None,
        });
        if entry.stat != Some(stat) {
            if entry.stat.is_some() {
                // Changed after it was complete: someone is writing to it again.
                entry.completed_at = None;
                entry.changed_at = now;
            }
            entry.stat = Some(stat);
        }
        if stat.symlink && entry.completed_at.is_none() {
            entry.completed_at = Some(now);
        }
    }

    /// An event said `name` is being written: not complete until closed, renamed or settled.
    pub fn written(&mut self, name: &OsStr, now: Instant) {
        if role(name) == Role::Temporary {
            return;
        }
        let entry = self.files.entry(name.to_os_string()).or_insert(Entry {
            stat: None,
            changed_at: now,
            completed_at: None,
            deferred_until: None,
        });
        entry.changed_at = now;
        entry.completed_at = None;
    }

    /// An event said `name` was renamed in or closed after writing; `stat` is taken after it.
    pub fn completed(&mut self, name: &OsStr, stat: Option<Stat>, now: Instant) {
        self.observe(name, stat, now);
        if let Some(entry) = self.files.get_mut(name) {
            entry.completed_at = Some(now);
            entry.changed_at = now;
        }
    }

    /// Forgets `name` (claimed, or gone).
    pub fn forget(&mut self, name: &OsStr) {
        self.files.remove(name);
    }

    /// Do not offer `name` again before `until` (its claim failed).
    pub fn defer(&mut self, name: &OsStr, until: Instant) {
        if let Some(entry) = self.files.get_mut(name) {
            entry.deferred_until = Some(until);
        }
    }

    /// Every tracked name, for refreshing their stats.
    pub fn names(&self) -> Vec<OsString> {
        self.files.keys().cloned().collect()
    }

    /// Images not yet claimed (complete or not).
    pub fn pending_images(&self) -> usize {
        self.files.keys().filter(|n| role(n) == Role::Image).count()
    }

    /// Since when `name` is complete, if it is at `now`.
    pub fn complete_since(&self, name: &OsStr, now: Instant) -> Option<Instant> {
        let entry = self.files.get(name)?;
        entry.stat?;
        let settled = entry.changed_at + self.settle;
        let settled = (now >= settled).then_some(settled);
        match (entry.completed_at, settled) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Jobs ready at `now`: complete images whose sidecar is complete, or that waited
    /// `sidecar_wait` without one appearing. First complete first.
    pub fn ready(&self, now: Instant) -> Vec<ReadyJob> {
        let mut out = Vec::new();
        for (name, entry) in &self.files {
            if role(name) != Role::Image || entry.deferred_until.is_some_and(|t| now < t) {
                continue;
            }
            let Some(since) = self.complete_since(name, now) else { continue };
            let sidecar = sidecar_of(name);
            if self.files.contains_key(&sidecar) {
                if self.complete_since(&sidecar, now).is_some() {
                    out.push((since, ReadyJob { image: name.clone(), sidecar: Some(sidecar) }));
                }
            } else if now.duration_since(since) >= self.sidecar_wait {
                out.push((since, ReadyJob { image: name.clone(), sidecar: None }));
            }
        }
        // Stable: equal times keep name order.
        out.sort_by_key(|(since, _)| *since);
        out.into_iter().map(|(_, job)| job).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    fn stat(len: u64, secs: u64) -> Option<Stat> {
        Some(Stat { len, modified: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)), symlink: false })
    }

    fn names(jobs: Vec<ReadyJob>) -> Vec<String> {
        jobs.into_iter()
            .map(|j| match j.sidecar {
                Some(s) => format!("{}+{}", j.image.to_string_lossy(), s.to_string_lossy()),
                None => j.image.to_string_lossy().into_owned(),
            })
            .collect()
    }

    #[test]
    fn a_growing_file_is_taken_only_after_it_settles() {
        let t = Instant::now();
        let mut intake = Intake::new(Duration::from_millis(500), Duration::ZERO);
        let a = OsStr::new("a.jpg");
        intake.observe(a, stat(10, 1), ms(t, 0));
        intake.observe(a, stat(20, 2), ms(t, 400));
        assert!(intake.ready(ms(t, 800)).is_empty(), "changed at 400 ms, settles at 900 ms");
        intake.observe(a, stat(20, 2), ms(t, 850));
        assert!(intake.ready(ms(t, 899)).is_empty());
        assert_eq!(names(intake.ready(ms(t, 900))), ["a.jpg"]);
    }

    #[test]
    fn close_after_write_and_rename_complete_a_file_at_once() {
        let t = Instant::now();
        let mut intake = Intake::new(Duration::from_secs(60), Duration::ZERO);
        intake.written(OsStr::new("a.jpg"), ms(t, 0));
        assert!(intake.ready(ms(t, 10)).is_empty(), "open for writing");
        intake.completed(OsStr::new("a.jpg"), stat(5, 1), ms(t, 20));
        intake.completed(OsStr::new("b.png"), stat(5, 1), ms(t, 20));
        assert_eq!(names(intake.ready(ms(t, 20))), ["a.jpg", "b.png"]);
        // Written again after closing: incomplete again.
        intake.written(OsStr::new("a.jpg"), ms(t, 30));
        assert_eq!(names(intake.ready(ms(t, 40))), ["b.png"]);
        // A stat that differs from the one at completion also means a new writer.
        intake.observe(OsStr::new("b.png"), stat(9, 2), ms(t, 50));
        assert!(intake.ready(ms(t, 60)).is_empty());
    }

    #[test]
    fn temp_names_are_ignored_and_symlinks_are_complete_at_once() {
        let t = Instant::now();
        let mut intake = Intake::new(Duration::from_secs(60), Duration::ZERO);
        intake.completed(OsStr::new("a.jpg.part"), stat(5, 1), ms(t, 0));
        intake.observe(OsStr::new(".hidden.jpg"), stat(5, 1), ms(t, 0));
        let link = Some(Stat { len: 7, modified: None, symlink: true });
        intake.observe(OsStr::new("link.jpg"), link, ms(t, 0));
        assert_eq!(names(intake.ready(ms(t, 0))), ["link.jpg"]);
        assert_eq!(intake.pending_images(), 1);
    }

    #[test]
    fn an_image_waits_for_its_sidecar_for_sidecar_wait() {
        let t = Instant::now();
        let mut intake = Intake::new(Duration::from_secs(60), Duration::from_millis(300));
        intake.completed(OsStr::new("a.jpg"), stat(5, 1), ms(t, 0));
        assert!(intake.ready(ms(t, 100)).is_empty(), "waiting for a.toml");
        intake.written(OsStr::new("a.toml"), ms(t, 150));
        assert!(intake.ready(ms(t, 400)).is_empty(), "a.toml is being written");
        intake.completed(OsStr::new("a.toml"), stat(3, 1), ms(t, 450));
        assert_eq!(names(intake.ready(ms(t, 450))), ["a.jpg+a.toml"]);
        intake.completed(OsStr::new("b.jpg"), stat(5, 1), ms(t, 0));
        assert!(names(intake.ready(ms(t, 299))).iter().all(|n| n != "b.jpg"));
        assert!(names(intake.ready(ms(t, 300))).iter().any(|n| n == "b.jpg"));
        intake.forget(OsStr::new("a.jpg"));
        intake.defer(OsStr::new("b.jpg"), ms(t, 1000));
        assert!(intake.ready(ms(t, 999)).is_empty());
        assert_eq!(names(intake.ready(ms(t, 1000))), ["b.jpg"]);
    }

    #[test]
    fn the_first_complete_is_offered_first() {
        let t = Instant::now();
        let mut intake = Intake::new(Duration::from_secs(60), Duration::ZERO);
        intake.completed(OsStr::new("b.jpg"), stat(1, 1), ms(t, 0));
        intake.completed(OsStr::new("a.jpg"), stat(1, 1), ms(t, 5));
        assert_eq!(names(intake.ready(ms(t, 10))), ["b.jpg", "a.jpg"]);
    }

    #[test]
    fn a_vanished_file_is_forgotten() {
        let t = Instant::now();
        let mut intake = Intake::new(Duration::ZERO, Duration::ZERO);
        intake.observe(OsStr::new("a.jpg"), stat(1, 1), ms(t, 0));
        intake.observe(OsStr::new("a.jpg"), None, ms(t, 1));
        assert!(intake.ready(ms(t, 2)).is_empty());
        assert_eq!(intake.pending_images(), 0);
    }
}
