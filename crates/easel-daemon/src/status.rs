//! `status.json`: the queue, the running jobs with progress and ETA, and counts, rewritten atomically.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use easel_core::write_atomically;

/// A job being computed.
#[derive(Debug, Clone)]
struct Running {
    name: String,
    started: Instant,
    /// Iterations done when this attempt began (from a checkpoint), and now.
    resumed_from: u32,
    done: u32,
    total: u32,
    scale: usize,
    scales: usize,
    loss: Option<f64>,
    /// Where its tensors live (`cpu`, `cuda:0`, ...), once its model is loaded.
    device: Option<String>,
    /// The process computing it (see [`crate::worker`]), once started.
    pid: Option<u32>,
}

#[derive(Debug)]
struct Board {
    state: &'static str,
    queue: Vec<(String, String)>,
    running: BTreeMap<String, Running>,
    inbox: usize,
    /// Finished in this run.
    done: u64,
    failed: u64,
    /// Found in the folders when the daemon started (results in `out/`, reasons in `failed/`).
    done_before: u64,
    failed_before: u64,
    dirty: bool,
    last_write: Option<Instant>,
}

/// The daemon's state as users and scripts see it in `ROOT/status.json`.
#[derive(Debug)]
pub struct StatusBoard {
    path: PathBuf,
    mode: String,
    config: Option<PathBuf>,
    board: Mutex<Board>,
}

/// How a job left a worker, for the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// Its result is in `out/`.
    Done,
    /// It is in `failed/` with its reason.
    Failed,
    /// Stopped by a shutdown; it stays in `work/` (with a checkpoint) for the next start.
    Interrupted,
    /// Could not be finished or failed (e.g. the disk is full); left in `work/`.
    Stuck,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl StatusBoard {
    /// A board written to `path`; `mode` says how the inbox is watched.
    pub fn new(path: PathBuf, mode: String, config: Option<PathBuf>) -> Self {
        Self {
            path,
            mode,
            config,
            board: Mutex::new(Board {
                state: "starting",
                queue: Vec::new(),
                running: BTreeMap::new(),
                inbox: 0,
                done: 0,
                failed: 0,
                done_before: 0,
                failed_before: 0,
                dirty: true,
                last_write: None,
            }),
        }
    }

    fn board(&self) -> MutexGuard<'_, Board> {
        // The board holds plain data; a panic elsewhere while it was held leaves it usable.
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        board.dirty = true;
        board
    }

    /// `running`, `stopping`, `stopped`.
    pub fn set_state(&self, state: &'static str) {
        self.board().state = state;
    }

    /// Images waiting in `inbox/`.
    pub fn set_inbox(&self, pending: usize) {
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        if board.inbox != pending {
            board.inbox = pending;
            board.dirty = true;
        }
    }

    /// A claimed job waits for a worker.
    pub fn queued(&self, id: &str, name: &str) {
        self.board().queue.push((id.to_string(), name.to_string()));
    }

    /// A worker took the job (it leaves the queue).
    pub fn started(&self, id: &str, name: &str) {
        let mut board = self.board();
        board.queue.retain(|(q, _)| q != id);
        board.running.insert(
            id.to_string(),
            Running {
                name: name.to_string(),
                started: Instant::now(),
                resumed_from: 0,
                done: 0,
                total: 0,
                scale: 0,
                scales: 0,
                loss: None,
                device: None,
                pid: None,
            },
        );
    }

    /// The job resumed from a checkpoint at `done` iterations of `total`.
    pub fn resumed(&self, id: &str, done: u32, total: u32) {
        if let Some(r) = self.board().running.get_mut(id) {
            r.resumed_from = done;
            r.done = done;
            r.total = total;
            r.started = Instant::now();
        }
    }

    /// The device the job's model was loaded on.
    pub fn device(&self, id: &str, device: String) {
        if let Some(r) = self.board().running.get_mut(id) {
            r.device = Some(device);
        }
    }

    /// The worker process computing the job.
    pub fn worker(&self, id: &str, pid: u32) {
        if let Some(r) = self.board().running.get_mut(id) {
            r.pid = Some(pid);
        }
    }

    /// Progress of a running job after an iteration.
    pub fn progress(&self, id: &str, p: &easel_engine::Progress) {
        self.progress_at(id, p.done, p.total, p.scale, p.scales, p.loss);
    }

    /// [`StatusBoard::progress`] from the values a worker reports: `done` of `total`
    /// iterations, at scale `scale` (0-based) of `scales`, with `loss`.
    pub fn progress_at(&self, id: &str, done: u32, total: u32, scale: usize, scales: usize, loss: f64) {
        if let Some(r) = self.board().running.get_mut(id) {
            r.done = done;
            r.total = total;
            r.scale = scale;
            r.scales = scales;
            r.loss = Some(loss);
        }
    }

    /// The job left its worker (or the queue) and how.
    pub fn finished(&self, id: &str, end: JobEnd) {
        let mut board = self.board();
        board.queue.retain(|(q, _)| q != id);
        board.running.remove(id);
        match end {
            JobEnd::Done => board.done += 1,
            JobEnd::Failed => board.failed += 1,
            JobEnd::Interrupted | JobEnd::Stuck => {}
        }
    }

    /// Counts the jobs finished before this start, from the folders: the results in `out/`
    /// (a JPEG's `.json` provenance is no result) and the reasons in `failed/`. Totals then
    /// survive restarts, and follow a user who clears the folders.
    pub fn count_existing(&self, root: &crate::Root) {
        let count = |dir: std::path::PathBuf, keep: &dyn Fn(&str) -> bool| -> u64 {
            std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| {
                            let name = e.file_name().to_string_lossy().into_owned();
                            !name.starts_with('.') && keep(&name)
                        })
                        .count() as u64
                })
                .unwrap_or(0)
        };
        let done = count(root.out(), &|n| !n.ends_with(".json"));
        let failed = count(root.failed(), &|n| n.ends_with(".error.txt"));
        let mut board = self.board();
        board.done_before = done;
        board.failed_before = failed;
    }

    /// (done, failed) since the daemon started.
    pub fn counts(&self) -> (u64, u64) {
        let board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        (board.done, board.failed)
    }

    /// The status as JSON.
    pub fn to_json(&self) -> Value {
        let board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        self.json_of(&board)
    }

    fn json_of(&self, board: &Board) -> Value {
        let running: Vec<Value> = board
            .running
            .iter()
            .map(|(id, r)| {
                let elapsed = r.started.elapsed().as_secs_f64();
                let ran = r.done.saturating_sub(r.resumed_from);
                let eta = (ran > 0).then(|| elapsed / ran as f64 * r.total.saturating_sub(r.done) as f64);
                json!({
                    "job": id,
                    "name": r.name,
                    "iteration": r.done,
                    "total": r.total,
                    "progress": if r.total > 0 { r.done as f64 / r.total as f64 } else { 0.0 },
                    "scale": r.scale + 1,
                    "scales": r.scales,
                    "loss": r.loss,
                    "device": r.device,
                    "pid": r.pid,
                    "resumed_from": r.resumed_from,
                    "elapsed_s": elapsed,
                    "eta_s": eta,
                })
            })
            .collect();
        json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "state": board.state,
            "mode": self.mode,
            "config": self.config.as_ref().map(|p| p.display().to_string()),
            "updated_unix": unix_now(),
            "inbox": board.inbox,
            "queue": board.queue.iter().map(|(id, name)| json!({"job": id, "name": name})).collect::<Vec<_>>(),
            "running": running,
            "counts": {"done": board.done_before + board.done, "failed": board.failed_before + board.failed},
            "this_run": {"done": board.done, "failed": board.failed},
        })
    }

    /// Rewrites `status.json` if something changed and the last write is `min_interval` old.
    pub fn write_if_due(&self, min_interval: Duration) {
        {
            let board = self.board.lock().unwrap_or_else(|e| e.into_inner());
            let running = !board.running.is_empty();
            let due = board.last_write.is_none_or(|t| t.elapsed() >= min_interval);
            if !due || !(board.dirty || running) {
                return;
            }
        }
        self.write_now();
    }

    /// Rewrites `status.json` now.
    pub fn write_now(&self) {
        // The snapshot is taken and the board marked clean at once: a change made while the
        // file is being written (a job that ends during the fsync) leaves the board dirty for
        // the next write instead of being lost with the mark.
        let text = {
            let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
            board.dirty = false;
            board.last_write = Some(Instant::now());
            format!("{:#}\n", self.json_of(&board))
        };
        if let Err(e) = write_atomically(&self.path, text.as_bytes()) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write status");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_running_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let board = StatusBoard::new(dir.path().join("status.json"), "events".into(), None);
        board.queued("1", "a.jpg");
        board.queued("2", "b.jpg");
        board.started("1", "a.jpg");
        board.finished("1", JobEnd::Done);
        board.started("2", "b.jpg");
        board.device("2", "cpu".into());
        board.worker("2", 4242);
        board.write_now();
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("status.json")).unwrap()).unwrap();
        assert_eq!(v["queue"].as_array().unwrap().len(), 0);
        assert_eq!(v["running"][0]["name"], "b.jpg");
        assert_eq!(v["running"][0]["device"], "cpu");
        assert_eq!(v["running"][0]["pid"], 4242);
        assert_eq!(v["counts"]["done"], 1);
        assert_eq!(v["counts"]["failed"], 0);
    }

    #[test]
    fn counts_are_totals_from_the_folders_plus_this_run() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::Root::open(dir.path()).unwrap();
        for name in ["a.png", "b.jpg", "b.jpg.json", ".c.png.1.tmp"] {
            std::fs::write(root.out().join(name), "").unwrap();
        }
        for name in ["x.png", "x.png.error.txt", "y.toml"] {
            std::fs::write(root.failed().join(name), "").unwrap();
        }
        let board = StatusBoard::new(root.status(), "events".into(), None);
        board.count_existing(&root);
        board.finished("1", JobEnd::Done);
        board.finished("2", JobEnd::Failed);
        board.finished("3", JobEnd::Interrupted);
        let v = board.to_json();
        assert_eq!((v["counts"]["done"].as_u64(), v["counts"]["failed"].as_u64()), (Some(3), Some(2)));
        assert_eq!((v["this_run"]["done"].as_u64(), v["this_run"]["failed"].as_u64()), (Some(1), Some(1)));
        assert_eq!(board.counts(), (1, 1));
    }
}
