//! Shared set-up of the `easel watch` end-to-end tests: a drop-folder root with a style and a
//! daemon config, the real binary started on it, and bounded waits on what it writes.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// Synthetic weights (seed 0), made once and kept in cargo's per-target temp folder: the
/// file is deterministic, so every test binary and run may share it.
pub fn weights() -> &'static Path {
    static WEIGHTS: OnceLock<PathBuf> = OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("daemon-synth0.safetensors");
        if !path.is_file() {
            let part = path.with_extension(format!("{}.part", std::process::id()));
            let out = Command::new(env!("CARGO_BIN_EXE_easel"))
                .args(["weights", "synth", "--seed", "0", "--out"])
                .arg(&part)
                .output()
                .expect("easel runs");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            std::fs::rename(&part, &path).expect("weights renamed into place");
        }
        path
    })
}

/// A tiny PNG whose pixels depend on `seed`.
pub fn png_bytes(width: u32, height: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        let v = |k: u32| ((x * (7 + k + seed % 5) + y * (3 + seed % 7) + k * 50 + seed * 37) % 256) as u8;
        image::Rgb([v(0), v(1), v(2)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("PNG encodes");
    out.into_inner()
}

/// A drop-folder root in a temp folder, with `styles/style.png` and a daemon config.
pub struct TestRoot {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub config: PathBuf,
    pub logs: PathBuf,
}

/// The default daemon config of the tests: 32 px, Adam, a few iterations, short timers.
/// `daemon_extra` holds `key = value` lines that replace or add `[daemon]` settings.
pub fn config_text(iterations: u32, daemon_extra: &str) -> String {
    let mut daemon: Vec<(String, String)> =
        [("settle_ms", "400"), ("sidecar_wait_ms", "300"), ("checkpoint_every", "2")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    for line in daemon_extra.lines().filter(|l| !l.trim().is_empty()) {
        let (key, value) = line.split_once('=').expect("key = value");
        let (key, value) = (key.trim().to_string(), value.trim().to_string());
        match daemon.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => daemon.push((key, value)),
        }
    }
    let daemon: String = daemon.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    format!(
        "[run]\nsize = 32\niterations = {iterations}\n\n[optimizer]\ntype = \"adam\"\nlr = 0.05\n\n\
         [[style]]\npath = \"style.png\"\n\n[daemon]\n{daemon}"
    )
}

impl TestRoot {
    pub fn new(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("drop root");
        Self::with_root(dir, root, config)
    }

    /// A root at `root` (e.g. on a small filesystem of its own), with the config and the logs
    /// in a temp folder elsewhere.
    pub fn at(root: &Path, config: &str) -> Self {
        Self::with_root(tempfile::tempdir().expect("temp dir"), root.to_path_buf(), config)
    }

    fn with_root(dir: tempfile::TempDir, root: PathBuf, config: &str) -> Self {
        std::fs::create_dir_all(root.join("styles")).unwrap();
        std::fs::create_dir_all(root.join("inbox")).unwrap();
        std::fs::copy(data("style.png"), root.join("styles/style.png")).unwrap();
        let config_path = dir.path().join("daemon.toml");
        std::fs::write(&config_path, config).unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        Self { _dir: dir, root, config: config_path, logs }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn inbox(&self, name: &str) -> PathBuf {
        self.root.join("inbox").join(name)
    }

    /// Drops `bytes` as `name` in one write (closed after writing).
    pub fn drop_file(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.inbox(name), bytes).unwrap();
    }

    /// Writes `name.part` and renames it into the inbox.
    pub fn drop_renamed(&self, name: &str, bytes: &[u8]) {
        let part = self.inbox(&format!("{name}.part"));
        std::fs::write(&part, bytes).unwrap();
        std::fs::rename(&part, self.inbox(name)).unwrap();
    }

    /// Writes `name` in `chunks` pieces `pause` apart, the file open all the while.
    pub fn drop_slowly(&self, name: &str, bytes: &[u8], chunks: usize, pause: Duration) {
        let mut file = File::create(self.inbox(name)).unwrap();
        for chunk in bytes.chunks(bytes.len().div_ceil(chunks)) {
            file.write_all(chunk).unwrap();
            file.flush().unwrap();
            std::thread::sleep(pause);
        }
    }

    /// File names in `rel` (a folder of the root), sorted.
    pub fn files(&self, rel: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path(rel))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Job folders in `work/`.
    pub fn work_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.path("work"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect())
            .unwrap_or_default()
    }

    pub fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_easel"));
        cmd.env_remove("EASEL_WEIGHTS")
            .env_remove("RUST_LOG")
            .args(["--log-format", "json", "--threads", "1", "watch"])
            .arg(&self.root)
            .arg("--config")
            .arg(&self.config)
            .arg("--weights")
            .arg(weights())
            .args(extra);
        cmd
    }

    /// Starts `easel watch` on this root; its JSON log goes to a file in `logs/`.
    pub fn start(&self, extra: &[&str]) -> Daemon {
        self.start_with_env(extra, &[])
    }

    /// [`TestRoot::start`] with extra environment variables (e.g. the fault hook
    /// `EASEL_DAEMON_FAULTS`).
    pub fn start_with_env(&self, extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Daemon {
        let n = std::fs::read_dir(&self.logs).unwrap().count();
        let log = self.logs.join(format!("daemon-{n}.log"));
        let mut command = self.command(extra);
        for (key, value) in env {
            command.env(key, value);
        }
        let child =
            command.stdout(Stdio::null()).stderr(File::create(&log).unwrap()).spawn().expect("easel starts");
        let mut daemon = Daemon { child, log };
        // Signals sent before the handlers are installed would kill it outright.
        let deadline = Instant::now() + Duration::from_secs(60);
        while with_message(&daemon.events(), "watching").is_empty()
            && daemon.child.try_wait().unwrap().is_none()
        {
            assert!(Instant::now() < deadline, "easel watch did not start: {}", daemon.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon
    }

    /// Runs `easel watch --once` to its end.
    pub fn run_once(&self, extra: &[&str]) -> (ExitStatus, Vec<Value>) {
        let mut args = vec!["--once"];
        args.extend_from_slice(extra);
        let mut daemon = self.start(&args);
        let status = daemon.wait(Duration::from_secs(180));
        (status, daemon.events())
    }

    /// The events of every daemon started on this root.
    pub fn all_events(&self) -> Vec<Value> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&self.logs).unwrap() {
            all.extend(events_in(&entry.unwrap().path()));
        }
        all
    }

    /// The status file, once it parses.
    pub fn status(&self) -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(self.path("status.json")).ok()?).ok()
    }
}

/// A running `easel watch`.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`TERM`, `KILL`, `HUP`, ...) with the system's `kill`.
    pub fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("easel watch did not exit within {timeout:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `done()` holds, at most `timeout`, failing at once if the daemon exits.
    pub fn until(&mut self, timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("easel watch exited ({status}) while waiting for {what}");
            }
            assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn events(&self) -> Vec<Value> {
        events_in(&self.log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- {} (last lines) ---", self.log.display());
            tail.iter().rev().for_each(|l| eprintln!("{l}"));
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The JSON log lines of a file (other lines, e.g. a panic message, are skipped).
pub fn events_in(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// The events whose message is `message`, as their `fields`.
pub fn with_message<'a>(events: &'a [Value], message: &str) -> Vec<&'a Value> {
    events.iter().map(|e| &e["fields"]).filter(|f| f["message"] == message).collect()
}

/// Waits until `done()` holds, at most `timeout`; `what` explains a timeout.
pub fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `done` of a checkpoint file (iterations done when it was written), read from its header.
pub fn checkpoint_done(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: Value = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
    let meta: Value = serde_json::from_str(header["__metadata__"]["easel.checkpoint"].as_str()?).ok()?;
    meta["done"].as_u64()
}

/// The checkpoint of the (single) job in `work/`, if one is written.
pub fn job_checkpoint(root: &TestRoot) -> Option<(PathBuf, u64)> {
    root.work_dirs().into_iter().find_map(|d| {
        let path = d.join(".checkpoint.safetensors");
        checkpoint_done(&path).map(|done| (d, done))
    })
}

/// Decoded RGB8 pixels and size of an image file.
pub fn pixels(path: &Path) -> (u32, u32, Vec<u8>) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
    (img.width(), img.height(), img.into_raw())
}
