//! The main loop: watch `inbox/`, claim ready jobs, feed the workers, reload the config, stop on signals.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use easel_config::DaemonSettings;
use easel_core::Registry;
use easel_vgg::WeightsFile;
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};

use crate::claim::{claim_job, recover_jobs, ClaimedJob};
use crate::config::{fingerprint, DaemonConfig};
use crate::folders::Root;
use crate::fsops::{FaultyFs, Fs, RealFs};
use crate::job::{process, Shared};
use crate::journal::RunningAttempts;
use crate::names::lossy;
use crate::settle::{Intake, Stat};
use crate::status::{JobEnd, StatusBoard};
use crate::DaemonError;

/// How often the loop wakes without events: the resolution of settle and sidecar timers.
const TICK: Duration = Duration::from_millis(100);
/// With events, `inbox/` is still rescanned this often, in case an event was lost silently.
const SAFETY_RESCAN: Duration = Duration::from_secs(60);
/// How often `work/` is checked for jobs another (crashed) daemon left.
const RECOVER_EVERY: Duration = Duration::from_secs(10);
/// How often the config file is checked for changes.
const CONFIG_CHECK: Duration = Duration::from_secs(1);
/// A job whose claim failed (permissions, ...) is retried after this.
const CLAIM_RETRY: Duration = Duration::from_secs(5);
const STATUS_EVERY: Duration = Duration::from_millis(500);

/// Command-line overrides of the `[daemon]` settings, and the run mode.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// Process what is in `inbox/` (and left in `work/`), then exit.
    pub once: bool,
    /// Poll every N ms instead of using filesystem events (overrides `daemon.poll_ms`).
    pub poll_ms: Option<u64>,
    /// Jobs at once (overrides `daemon.workers`).
    pub workers: Option<u32>,
    /// How to start a job's worker process; `None`: this program (`std::env::current_exe`),
    /// with no arguments before `job`.
    pub worker: Option<WorkerCommand>,
}

/// How the daemon starts a worker: `PROGRAM ARGS... job DIR --weights FILE --weights-sha256 HEX
/// --budget-bytes N`, where PROGRAM is an easel binary (its hidden `job` subcommand calls
/// [`crate::run_worker`]) and ARGS its global options (the log format, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<std::ffi::OsString>,
}

impl WatchOptions {
    fn apply(&self, settings: &DaemonSettings) -> DaemonSettings {
        DaemonSettings {
            poll_ms: self.poll_ms.unwrap_or(settings.poll_ms),
            workers: self.workers.unwrap_or(settings.workers).max(1),
            ..*settings
        }
    }
}

/// Where the control loop reads the time: the system's monotonic clock, or a test's.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The system's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The flags the signal handlers set: SIGTERM/SIGINT stop (a second one exits at once with
/// status 1), SIGHUP reloads the config.
#[derive(Debug, Clone, Default)]
pub struct Signals {
    stop: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
    /// What a second stop signal records before it exits.
    running: Arc<RunningAttempts>,
}

impl Signals {
    /// Installs the handlers: signal-hook's flag-setting handlers, and a thread that counts stop
    /// signals through a self-pipe. At the second it records the running attempts as ended
    /// cleanly (a stop, however hasty, is no crash) and exits with status 1; the last
    /// checkpoints hold.
    pub fn install() -> Result<Self, DaemonError> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        use std::io::Read;
        let signals = Self::default();
        let (mut counted, counter) = std::os::unix::net::UnixStream::pair().map_err(DaemonError::Signals)?;
        for signal in [SIGTERM, SIGINT] {
            signal_hook::flag::register(signal, Arc::clone(&signals.stop)).map_err(DaemonError::Signals)?;
            let counter = counter.try_clone().map_err(DaemonError::Signals)?;
            signal_hook::low_level::pipe::register(signal, counter).map_err(DaemonError::Signals)?;
        }
        signal_hook::flag::register(SIGHUP, Arc::clone(&signals.reload)).map_err(DaemonError::Signals)?;
        let running = Arc::clone(&signals.running);
        std::thread::Builder::new()
            .name("easel-signals".into())
            .spawn(move || {
                // One byte per signal (the pipe never fills: the second one ends the process).
                let (mut seen, mut buf) = (0, [0u8; 8]);
                loop {
                    match counted.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => seen += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    }
                    if seen >= 2 {
                        let _held = running.end_all_cleanly(&RealFs);
                        tracing::warn!("second stop signal: exiting now; the last checkpoints hold");
                        std::process::exit(1);
                    }
                }
            })
            .map_err(DaemonError::Signals)?;
        Ok(signals)
    }

    /// The flag a stop sets, shared with the workers.
    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// The attempts a second stop signal records as ended cleanly.
    pub(crate) fn running_attempts(&self) -> Arc<RunningAttempts> {
        Arc::clone(&self.running)
    }

    /// Asks the daemon to stop as SIGTERM does.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Asks the daemon to reload its config as SIGHUP does.
    pub fn request_reload(&self) {
        self.reload.store(true, Ordering::SeqCst);
    }
}

/// What a daemon run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub done: u64,
    pub failed: u64,
    /// It ended because of SIGTERM/SIGINT.
    pub stopped: bool,
}

/// A drop-folder daemon on one root, ready to run.
pub struct Daemon<'r> {
    root: Root,
    registry: &'r Registry,
    config: DaemonConfig,
    /// The weights file, checked (and hashed, once) here; each worker maps it for itself.
    weights: WeightsFile,
    options: WatchOptions,
}

fn start_watcher(
    inbox: &Path,
    events: Sender<notify::Result<notify::Event>>,
) -> Result<notify::RecommendedWatcher, DaemonError> {
    let error = |source| DaemonError::Watch { path: inbox.to_path_buf(), source };
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = events.send(event);
    })
    .map_err(error)?;
    watcher.watch(inbox, RecursiveMode::NonRecursive).map_err(error)?;
    Ok(watcher)
}

fn worker(shared: &Shared<'_>, jobs: Receiver<ClaimedJob>, reports: Sender<(String, JobEnd)>) {
    for job in jobs.iter() {
        let id = job.id.clone();
        let end = if shared.stop.load(Ordering::SeqCst) {
            // Left in work/ (the lock goes with `job`) for the next start.
            JobEnd::Interrupted
        } else {
            shared.board.started(&id, &job.image.as_deref().map(lossy).unwrap_or_default());
            process(shared, job)
        };
        shared.board.finished(&id, end);
        let _ = reports.send((id, end));
    }
}

/// How the inbox is looked at on a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Read the whole folder.
    Full,
    /// Re-stat the files already known (events tell about the others).
    Refresh,
}

/// When the control loop's periodic tasks are due: pure over the instants it is given, so that
/// tests drive it with a fake clock (as [`Intake`] is).
#[derive(Debug)]
struct Schedule {
    /// `Some`: poll the inbox this often instead of using events.
    poll: Option<Duration>,
    last_scan: Instant,
    last_recover: Instant,
    last_config: Instant,
}

impl Schedule {
    fn new(start: Instant, poll: Option<Duration>) -> Self {
        Self { poll, last_scan: start, last_recover: start, last_config: start }
    }

    /// Whether to look at the config file for changes now.
    fn config_check_due(&mut self, now: Instant) -> bool {
        let due = now.duration_since(self.last_config) >= CONFIG_CHECK;
        if due {
            self.last_config = now;
        }
        due
    }

    /// How to look at the inbox now: with events, a full rescan when the watcher asked for one
    /// (`need_rescan`) or every [`SAFETY_RESCAN`]; when polling, a full scan every poll period.
    fn scan(&mut self, now: Instant, need_rescan: bool) -> Option<Scan> {
        let since = now.duration_since(self.last_scan);
        let full = match self.poll {
            Some(every) => since >= every,
            None => need_rescan || since >= SAFETY_RESCAN,
        };
        if full {
            self.last_scan = now;
            return Some(Scan::Full);
        }
        self.poll.is_none().then_some(Scan::Refresh)
    }

    /// Whether to look in `work/` for jobs a dead daemon left.
    fn recover_due(&mut self, now: Instant) -> bool {
        let due = now.duration_since(self.last_recover) >= RECOVER_EVERY;
        if due {
            self.last_recover = now;
        }
        due
    }
}

/// The controller's state between ticks.
struct Control<'s, 'r> {
    shared: &'s Shared<'r>,
    options: &'s WatchOptions,
    clock: &'s dyn Clock,
    inbox: PathBuf,
    intake: Intake,
    /// Jobs this daemon holds (queued or running), never "recovered" by itself.
    own: HashSet<String>,
    /// Claimed or recovered jobs waiting for room in the queue.
    backlog: VecDeque<ClaimedJob>,
    in_flight: usize,
    need_rescan: bool,
    config_fingerprint: crate::config::Fingerprint,
}

impl Control<'_, '_> {
    fn rescan(&mut self, now: Instant) {
        self.need_rescan = false;
        let entries = match std::fs::read_dir(&self.inbox) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(inbox = %self.inbox.display(), error = %e, "cannot read the inbox");
                return;
            }
        };
        let mut seen = HashSet::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            self.intake.observe(&name, Stat::of(&entry.path()), now);
            seen.insert(name);
        }
        for name in self.intake.names() {
            if !seen.contains(&name) {
                self.intake.forget(&name);
            }
        }
    }

    fn refresh(&mut self, now: Instant) {
        for name in self.intake.names() {
            self.intake.observe(&name, Stat::of(&self.inbox.join(&name)), now);
        }
    }

    fn on_event(&mut self, event: notify::Result<notify::Event>, now: Instant) {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, "watcher error; rescanning the inbox");
                self.need_rescan = true;
                return;
            }
        };
        if event.need_rescan() {
            tracing::warn!("watcher overflow; rescanning the inbox");
            self.need_rescan = true;
        }
        let in_inbox = |p: &PathBuf| p.parent() == Some(self.inbox.as_path()) && p.file_name().is_some();
        let names = |paths: &[PathBuf]| -> Vec<(PathBuf, std::ffi::OsString)> {
            paths
                .iter()
                .filter(|p| in_inbox(p))
                .filter_map(|p| Some((p.clone(), p.file_name()?.to_os_string())))
                .collect()
        };
        match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                for (path, name) in names(&event.paths) {
                    self.intake.completed(&name, Stat::of(&path), now);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                // paths[0] is where the file was, paths[1] where it is now.
                for (k, path) in event.paths.iter().enumerate().filter(|(_, p)| in_inbox(p)) {
                    let Some(name) = path.file_name() else { continue };
                    match k {
                        0 => self.intake.observe(name, Stat::of(path), now),
                        _ => self.intake.completed(name, Stat::of(path), now),
                    }
                }
            }
            EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Data(_))
            | EventKind::Modify(ModifyKind::Any) => {
                for (path, name) in names(&event.paths) {
                    match Stat::of(&path) {
                        Some(stat) if stat.symlink => self.intake.observe(&name, Some(stat), now),
                        _ => self.intake.written(&name, now),
                    }
                }
            }
            _ => {
                for (path, name) in names(&event.paths) {
                    self.intake.observe(&name, Stat::of(&path), now);
                }
            }
        }
    }

    fn reload(&mut self) {
        let current = self.shared.config();
        let Some(source) = current.source() else {
            tracing::info!("no config file to reload");
            return;
        };
        let shared = self.shared;
        match DaemonConfig::load(Some(source), &shared.root, shared.registry) {
            Ok(new) => {
                let (old, fresh) = (self.options.apply(&current.settings), self.options.apply(&new.settings));
                if (old.workers, old.poll_ms) != (fresh.workers, fresh.poll_ms) {
                    tracing::warn!("daemon.workers and daemon.poll_ms changes apply after a restart");
                }
                self.intake.set_timing(
                    Duration::from_millis(fresh.settle_ms),
                    Duration::from_millis(fresh.sidecar_wait_ms),
                );
                self.config_fingerprint = new.fingerprint;
                *shared.config.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
                tracing::info!(config = %source.display(), "config reloaded; it applies from the next job");
            }
            Err(e) => {
                self.config_fingerprint = fingerprint(source);
                tracing::error!(config = %source.display(), error = %e, "the changed config is invalid; keeping the previous one");
            }
        }
    }

    fn recover(&mut self) {
        match recover_jobs(self.shared.fs.as_ref(), &self.shared.root, &self.own) {
            Ok(jobs) => {
                for job in jobs {
                    tracing::info!(job = %job.id, name = %job.image.as_deref().map(lossy).unwrap_or_default(), "taking over a job left in work/");
                    self.own.insert(job.id.clone());
                    self.backlog.push_back(job);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot look for jobs left in work/"),
        }
    }

    /// Claims ready jobs while the queue has room; recovered jobs go first.
    fn dispatch(&mut self, queue: &Sender<ClaimedJob>, room: usize, now: Instant) {
        let mut ready = self.intake.ready(now).into_iter();
        while queue.len() < room {
            let job = match self.backlog.pop_front() {
                Some(job) => job,
                None => {
                    let Some(next) = ready.next() else { break };
                    let claimed = claim_job(
                        self.shared.fs.as_ref(),
                        &self.shared.root,
                        &next.image,
                        next.sidecar.as_deref(),
                    );
                    match claimed {
                        Ok(Some(job)) => {
                            self.intake.forget(&next.image);
                            if let Some(sidecar) = &next.sidecar {
                                self.intake.forget(sidecar);
                            }
                            tracing::info!(job = %job.id, name = %lossy(&next.image), sidecar = job.sidecar.is_some(), "job claimed");
                            self.own.insert(job.id.clone());
                            job
                        }
                        Ok(None) => {
                            self.intake.forget(&next.image);
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(name = %lossy(&next.image), error = %e, "cannot claim job");
                            if self.options.once {
                                self.intake.forget(&next.image);
                            } else {
                                self.intake.defer(&next.image, now + CLAIM_RETRY);
                            }
                            continue;
                        }
                    }
                }
            };
            let name = job.image.as_deref().map(lossy).unwrap_or_default();
            let id = job.id.clone();
            match queue.try_send(job) {
                Ok(()) => {
                    self.shared.board.queued(&id, &name);
                    self.in_flight += 1;
                }
                Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                    self.backlog.push_front(job);
                    break;
                }
            }
        }
    }

    fn on_report(&mut self, id: String, end: JobEnd) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if end != JobEnd::Stuck {
            self.own.remove(&id);
        }
    }
}

impl<'r> Daemon<'r> {
    /// A daemon on `root` with `config`; the weights at `weights` are checked here, and hashed
    /// once for the results' provenance (each job's worker maps them for itself).
    pub fn new(
        root: Root,
        config: DaemonConfig,
        weights: &Path,
        registry: &'r Registry,
        options: WatchOptions,
    ) -> Result<Self, DaemonError> {
        let weights = WeightsFile::open(weights)?;
        Ok(Self { root, registry, config, weights, options })
    }

    /// Runs until stopped by `signals` (or, with `--once`, until the inbox is empty). Jobs
    /// that are running when a stop comes are checkpointed and left in `work/`.
    pub fn run(self, signals: &Signals) -> Result<Summary, DaemonError> {
        self.run_with_clock(signals, &SystemClock)
    }

    /// [`Daemon::run`], its control loop reading the time from `clock`.
    pub fn run_with_clock(self, signals: &Signals, clock: &dyn Clock) -> Result<Summary, DaemonError> {
        let settings = self.options.apply(&self.config.settings);
        let workers = settings.workers as usize;
        let mut poll = (settings.poll_ms > 0).then(|| Duration::from_millis(settings.poll_ms));
        let inbox = self.root.inbox();
        let (event_tx, event_rx) = crossbeam_channel::unbounded();
        let _watcher = match poll {
            Some(_) => None,
            None => match start_watcher(&inbox, event_tx) {
                Ok(watcher) => Some(watcher),
                Err(e) => {
                    tracing::warn!(error = %e, "filesystem events unavailable; polling every second");
                    poll = Some(Duration::from_secs(1));
                    None
                }
            },
        };
        let mode = match poll {
            Some(p) => format!("poll every {} ms", p.as_millis()),
            None => "events".to_string(),
        };
        tracing::info!(root = %self.root.path().display(), mode, workers, "watching");
        let board = StatusBoard::new(self.root.status(), mode, self.config.source().map(Path::to_path_buf));
        board.count_existing(&self.root);
        let config_fingerprint = self.config.fingerprint;
        // The test hook (see fsops::FaultyFs) is read here only; unset, the real calls are made.
        let fs: Arc<dyn Fs> = match FaultyFs::from_env() {
            Some(faulty) => Arc::new(faulty),
            None => Arc::new(RealFs),
        };
        let command = match &self.options.worker {
            Some(worker) => worker.clone(),
            None => WorkerCommand {
                program: std::env::current_exe()
                    .map_err(|source| DaemonError::Io { path: PathBuf::from("(this program)"), source })?,
                args: Vec::new(),
            },
        };
        let shared =
            Shared::new(self.root, self.registry, self.weights, command, self.config, board, fs, signals);
        let (job_tx, job_rx) = crossbeam_channel::bounded::<ClaimedJob>(workers);
        let (report_tx, report_rx) = crossbeam_channel::unbounded();
        let mut control = Control {
            shared: &shared,
            options: &self.options,
            clock,
            inbox,
            intake: Intake::new(
                Duration::from_millis(settings.settle_ms),
                Duration::from_millis(settings.sidecar_wait_ms),
            ),
            own: HashSet::new(),
            backlog: VecDeque::new(),
            in_flight: 0,
            need_rescan: false,
            config_fingerprint,
        };
        std::thread::scope(|scope| -> Result<(), DaemonError> {
            for i in 0..workers {
                let (jobs, reports, shared) = (job_rx.clone(), report_tx.clone(), &shared);
                std::thread::Builder::new()
                    .name(format!("easel-worker-{i}"))
                    .spawn_scoped(scope, move || worker(shared, jobs, reports))
                    .map_err(|source| DaemonError::Io { path: shared.root.path().to_path_buf(), source })?;
            }
            drop(report_tx);
            control.run(job_tx, &report_rx, &event_rx, signals, poll, workers);
            Ok(())
        })?;
        let stopped = signals.stop.load(Ordering::SeqCst);
        shared.board.set_state("stopped");
        shared.board.write_now();
        let (done, failed) = shared.board.counts();
        tracing::info!(done, failed, "daemon stopped");
        Ok(Summary { done, failed, stopped })
    }
}

impl Control<'_, '_> {
    fn run(
        &mut self,
        queue: Sender<ClaimedJob>,
        reports: &Receiver<(String, JobEnd)>,
        events: &Receiver<notify::Result<notify::Event>>,
        signals: &Signals,
        poll: Option<Duration>,
        room: usize,
    ) {
        let start = self.clock.now();
        self.recover();
        self.rescan(start);
        self.shared.board.set_state("running");
        let mut schedule = Schedule::new(start, poll);
        loop {
            crossbeam_channel::select! {
                recv(events) -> event => if let Ok(event) = event { self.on_event(event, self.clock.now()) },
                recv(reports) -> report => if let Ok((id, end)) = report { self.on_report(id, end) },
                default(TICK) => {}
            }
            while let Ok(event) = events.try_recv() {
                self.on_event(event, self.clock.now());
            }
            while let Ok((id, end)) = reports.try_recv() {
                self.on_report(id, end);
            }
            let now = self.clock.now();
            if signals.stop.load(Ordering::SeqCst) {
                tracing::info!("stopping: taking no new jobs, checkpointing running ones");
                self.shared.board.set_state("stopping");
                self.shared.board.write_now();
                break;
            }
            let changed = schedule.config_check_due(now)
                && self.shared.config().source().is_some_and(|p| fingerprint(p) != self.config_fingerprint);
            if signals.reload.swap(false, Ordering::SeqCst) || changed {
                self.reload();
            }
            match schedule.scan(now, self.need_rescan) {
                Some(Scan::Full) => self.rescan(now),
                Some(Scan::Refresh) => self.refresh(now),
                None => {}
            }
            if schedule.recover_due(now) {
                self.recover();
            }
            self.dispatch(&queue, room, now);
            self.shared.board.set_inbox(self.intake.pending_images());
            self.shared.board.write_if_due(STATUS_EVERY);
            if self.options.once
                && self.backlog.is_empty()
                && self.intake.pending_images() == 0
                && self.in_flight == 0
            {
                tracing::info!("inbox is empty; exiting (--once)");
                break;
            }
        }
        // Jobs still in the backlog are released (their locks drop) for the next start.
        self.backlog.clear();
        drop(queue);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A clock that moves only when told to.
    struct FakeClock(Mutex<Instant>);

    impl FakeClock {
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    /// Runs ticks of `step` until `until` has passed, returning the tick times (in ms from the
    /// start) at which `what` happened.
    fn ticks(
        clock: &FakeClock,
        step: Duration,
        until: Duration,
        mut what: impl FnMut(Instant) -> bool,
    ) -> Vec<u128> {
        let start = clock.now();
        let mut at = Vec::new();
        while clock.now().duration_since(start) < until {
            clock.advance(step);
            if what(clock.now()) {
                at.push(clock.now().duration_since(start).as_millis());
            }
        }
        at
    }

    #[test]
    fn with_events_the_inbox_is_refreshed_each_tick_and_rescanned_every_minute_or_on_demand() {
        let clock = FakeClock(Mutex::new(Instant::now()));
        let mut schedule = Schedule::new(clock.now(), None);
        let full = ticks(&clock, TICK, Duration::from_secs(150), |now| {
            schedule.scan(now, false) == Some(Scan::Full)
        });
        assert_eq!(full, [60_000, 120_000]);
        assert_eq!(schedule.scan(clock.now(), false), Some(Scan::Refresh));
        assert_eq!(schedule.scan(clock.now(), true), Some(Scan::Full), "the watcher overflowed");
    }

    #[test]
    fn when_polling_the_inbox_is_read_every_period_only() {
        let clock = FakeClock(Mutex::new(Instant::now()));
        let mut schedule = Schedule::new(clock.now(), Some(Duration::from_millis(250)));
        let mut scans = Vec::new();
        let at = ticks(&clock, TICK, Duration::from_secs(1), |now| {
            let scan = schedule.scan(now, true);
            scans.extend(scan);
            scan.is_some()
        });
        assert_eq!(at, [300, 600, 900], "the first tick at or after each period");
        assert!(scans.iter().all(|s| *s == Scan::Full));
    }

    #[test]
    fn work_is_searched_every_10_s_and_the_config_checked_every_second() {
        let clock = FakeClock(Mutex::new(Instant::now()));
        let mut schedule = Schedule::new(clock.now(), None);
        let mut configs = 0;
        let recovers = ticks(&clock, TICK, Duration::from_secs(35), |now| {
            configs += usize::from(schedule.config_check_due(now));
            schedule.recover_due(now)
        });
        assert_eq!(recovers, [10_000, 20_000, 30_000]);
        assert_eq!(configs, 35);
    }
}
