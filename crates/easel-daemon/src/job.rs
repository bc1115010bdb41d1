//! One claimed job, supervised: its plan and admission here, its computation in a worker
//! process ([`crate::worker`]), then its result or failure.
//!
//! A job's end is decided first and recorded in `.outcome.json` (which files go where), then
//! carried out with moves that never replace a file and are safe to repeat, so a crash at
//! any point leaves a job that the next start finishes without running it again.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use easel_config::{ConfigLayers, Plan};
use easel_core::Registry;
use easel_engine::memory::{self, MemoryPlan};
use easel_vgg::WeightsFile;
use serde_json::{json, Value};

use crate::admission::Admission;
use crate::claim::{remove_job_dir, ClaimedJob, OUTCOME};
use crate::config::{sidecar_layer, DaemonConfig};
use crate::folders::{any_exists, Root};
use crate::fsops::{is_out_of_space, move_no_clobber, write_durably, Fs, Moved};
use crate::job_files::{io, until_space, SpaceWait, PLAN, PROVENANCE, RESULT};
use crate::journal::{crashed_attempts, RunningAttempts, MAX_CRASHES};
use crate::names::{lossy, numbered_fit, stem, with_extension};
use crate::status::{JobEnd, StatusBoard};
use crate::worker::{memory_cap, plan_memory, Finished, Report, WorkerEnd};
use crate::{JobError, Signals, WorkerCommand};

const ERROR: &str = ".error.txt";
/// How often a supervisor looks at the stop flag while its worker runs.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// What every supervising thread shares: the root, the plugins, the weights file, how to start
/// a worker, the current daemon config, the stop flag, the status board, the filesystem calls,
/// the running attempts and the memory budget.
pub(crate) struct Shared<'r> {
    pub root: Root,
    pub registry: &'r Registry,
    /// The weights file, which each worker maps for itself; its hash is computed once, here,
    /// for the results' provenance.
    pub weights: WeightsFile,
    pub worker: WorkerCommand,
    pub config: Mutex<Arc<DaemonConfig>>,
    pub stop: Arc<AtomicBool>,
    pub board: StatusBoard,
    pub fs: Arc<dyn Fs>,
    pub running: Arc<RunningAttempts>,
    /// Jobs run side by side only while their predicted memory fits the budget together.
    pub admission: Admission,
}

impl<'r> Shared<'r> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        root: Root,
        registry: &'r Registry,
        weights: WeightsFile,
        worker: WorkerCommand,
        config: DaemonConfig,
        board: StatusBoard,
        fs: Arc<dyn Fs>,
        signals: &Signals,
    ) -> Self {
        // The budget is the memory available when the daemon starts (or limits.memory_mb):
        // every job plans against it, and the running jobs share it.
        let budget = config.plan(registry).map_or(u64::MAX, |plan| memory::budget_bytes(&plan.limits));
        Self {
            root,
            registry,
            weights,
            worker,
            config: Mutex::new(Arc::new(config)),
            stop: signals.stop_flag(),
            board,
            fs,
            running: signals.running_attempts(),
            admission: Admission::new(budget),
        }
    }

    /// The daemon config as it is now; a job keeps the one it started with.
    pub fn config(&self) -> Arc<DaemonConfig> {
        Arc::clone(&self.config.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn space_wait<'a>(&'a self, job: &'a ClaimedJob) -> SpaceWait<'a> {
        SpaceWait { stop: &self.stop, job: &job.id }
    }
}

/// [`write_durably`], waiting for space; a stop while waiting is [`JobError::StoppedWaitingForSpace`].
fn write_waiting(shared: &Shared<'_>, job: &ClaimedJob, path: &Path, bytes: &[u8]) -> Result<(), JobError> {
    let fs = shared.fs.as_ref();
    let what = path.file_name().map(lossy).unwrap_or_default();
    until_space(&shared.space_wait(job), &what, is_out_of_space, || write_durably(fs, path, bytes))
        .map_err(io(path))?
        .ok_or(JobError::StoppedWaitingForSpace)
}

/// The job's plan: frozen in `.plan.toml` at its first start, so that a resumed job follows the
/// plan its checkpoint was made with even if the daemon's config changed since.
fn job_plan(shared: &Shared<'_>, job: &ClaimedJob, config: &DaemonConfig) -> Result<Plan, JobError> {
    let frozen = job.dir.join(PLAN);
    if frozen.exists() {
        return Ok(ConfigLayers::defaults().with_file(&frozen)?.plan(shared.registry)?);
    }
    let mut layers = config.layers();
    if let Some(sidecar) = &job.sidecar {
        let table = sidecar_layer(&job.dir.join(sidecar), &shared.root).map_err(JobError::Sidecar)?;
        layers = layers.with_table(&lossy(sidecar), table);
    }
    let plan = layers.plan(shared.registry)?;
    if plan.styles.is_empty() {
        return Err(JobError::NoStyle);
    }
    let text = toml::to_string(&plan.merged)
        .map_err(|e| io(&frozen)(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())))?;
    write_waiting(shared, job, &frozen, text.as_bytes())?;
    Ok(plan)
}

/// A file name as JSON: a string when it is UTF-8, else its bytes.
fn name_json(name: &OsStr) -> Value {
    match name.to_str() {
        Some(s) => Value::String(s.to_string()),
        #[cfg(unix)]
        None => {
            use std::os::unix::ffi::OsStrExt;
            json!(name.as_bytes())
        }
        #[cfg(not(unix))]
        None => Value::String(name.to_string_lossy().into_owned()),
    }
}

fn name_from_json(value: &Value) -> Option<OsString> {
    match value {
        Value::String(s) => Some(OsString::from(s)),
        #[cfg(unix)]
        Value::Array(bytes) => {
            use std::os::unix::ffi::OsStringExt;
            let bytes: Option<Vec<u8>> =
                bytes.iter().map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok())).collect();
            Some(OsString::from_vec(bytes?))
        }
        _ => None,
    }
}

/// Where a job's files go: `(file in the job folder, folder of the root, new name)`.
#[derive(Debug)]
struct Outcome {
    done: bool,
    moves: Vec<(OsString, &'static str, OsString)>,
    deletes: Vec<OsString>,
}

impl Outcome {
    fn to_json(&self) -> Value {
        json!({
            "kind": if self.done { "done" } else { "failed" },
            "moves": self.moves.iter().map(|(s, d, n)| json!([name_json(s), d, name_json(n)])).collect::<Vec<_>>(),
            "deletes": self.deletes.iter().map(|s| name_json(s)).collect::<Vec<_>>(),
        })
    }

    fn from_json(v: &Value) -> Option<Outcome> {
        let dir = |d: &Value| match d.as_str()? {
            "out" => Some("out"),
            "done" => Some("done"),
            "failed" => Some("failed"),
            _ => None,
        };
        let moves = v["moves"]
            .as_array()?
            .iter()
            .map(|m| Some((name_from_json(&m[0])?, dir(&m[1])?, name_from_json(&m[2])?)))
            .collect::<Option<Vec<_>>>()?;
        let deletes = v["deletes"].as_array()?.iter().map(name_from_json).collect::<Option<Vec<_>>>()?;
        Some(Outcome { done: v["kind"].as_str()? == "done", moves, deletes })
    }

    fn write(&self, shared: &Shared<'_>, job: &ClaimedJob) -> Result<(), JobError> {
        let path = job.dir.join(OUTCOME);
        write_waiting(shared, job, &path, format!("{:#}\n", self.to_json()).as_bytes())
    }
}

fn folder(root: &Root, name: &str) -> PathBuf {
    root.path().join(name)
}

/// The first `n` for which every name `make(n)` is free in `dir`.
fn free_number(dir: &Path, make: impl Fn(u32) -> Vec<OsString>) -> u32 {
    (1..)
        .find(|&n| !any_exists(dir, &make(n).iter().map(OsString::as_os_str).collect::<Vec<_>>()))
        .unwrap_or(1)
}

/// The name `name` + `suffix` (`photo.png` + `.json`).
fn followed(name: &OsStr, suffix: &str) -> OsString {
    let mut n = name.to_os_string();
    n.push(suffix);
    n
}

/// What follows a moved file's name in its folder: its provenance beside a JPEG result in
/// `out/`, its reason beside a failed original.
fn follower_in(dir: &str, provenance_file: bool) -> &'static str {
    match dir {
        "out" if provenance_file => ".json",
        "failed" => ERROR_SUFFIX,
        _ => "",
    }
}

const ERROR_SUFFIX: &str = ".error.txt";

fn success_outcome(shared: &Shared<'_>, job: &ClaimedJob, image: &OsStr, finished: &Finished) -> Outcome {
    let result_name = with_extension(&stem(image), &finished.extension);
    let follower = follower_in("out", finished.provenance_file);
    let output_for = |n| numbered_fit(&[(&result_name, follower)], n).remove(0);
    let out = folder(&shared.root, "out");
    let n = free_number(&out, |n| {
        let name = output_for(n);
        vec![followed(&name, ".json"), name]
    });
    let output = output_for(n);
    let mut moves = vec![(OsString::from(format!("{RESULT}.{}", finished.extension)), "out", output.clone())];
    if finished.provenance_file {
        moves.push((OsString::from(PROVENANCE), "out", followed(&output, ".json")));
    }
    let mut deletes = Vec::new();
    let inputs: Vec<&OsString> =
        std::iter::once(job.image.as_ref()).flatten().chain(job.sidecar.as_ref()).collect();
    if shared.config().settings.keep_originals {
        let done = folder(&shared.root, "done");
        let names_for = |n| numbered_fit(&inputs.iter().map(|i| (i.as_os_str(), "")).collect::<Vec<_>>(), n);
        let n = free_number(&done, names_for);
        moves.extend(inputs.iter().zip(names_for(n)).map(|(i, name)| ((*i).clone(), "done", name)));
    } else {
        deletes.extend(inputs.into_iter().cloned());
    }
    Outcome { done: true, moves, deletes }
}

fn failure_outcome(shared: &Shared<'_>, job: &ClaimedJob) -> Outcome {
    let failed = folder(&shared.root, "failed");
    let image = job.image.clone().unwrap_or_else(|| OsString::from(&job.id));
    // The original and its reason share one name, shortened if need be (NAME.EXT.error.txt).
    let names_for = |n| {
        let mut list = vec![(image.as_os_str(), ERROR_SUFFIX)];
        list.extend(job.sidecar.iter().map(|s| (s.as_os_str(), "")));
        numbered_fit(&list, n)
    };
    let n = free_number(&failed, |n| {
        let mut names = names_for(n);
        names.push(followed(&names[0], ERROR_SUFFIX));
        names
    });
    let names = names_for(n);
    let mut moves = Vec::new();
    if job.image.is_some() {
        moves.push((image.clone(), "failed", names[0].clone()));
    }
    moves.push((OsString::from(ERROR), "failed", followed(&names[0], ERROR_SUFFIX)));
    moves.extend(job.sidecar.iter().zip(&names[1..]).map(|(s, name)| (s.clone(), "failed", name.clone())));
    Outcome { done: false, moves, deletes: Vec::new() }
}

/// Carries out a recorded outcome; safe to repeat after a crash at any point. Every move is
/// durable (see [`move_no_clobber`]); on a full disk it waits, and a stop while waiting leaves
/// the job (its outcome recorded) for the next start: [`JobEnd::Interrupted`].
fn carry_out(shared: &Shared<'_>, job: &ClaimedJob, mut outcome: Outcome) -> Result<JobEnd, JobError> {
    let fs = shared.fs.as_ref();
    let provenance_file = outcome.moves.iter().any(|(s, _, _)| s == PROVENANCE);
    for i in 0..outcome.moves.len() {
        loop {
            let (src, dir, name) = &outcome.moves[i];
            let dir_path = folder(&shared.root, dir);
            let dst = dir_path.join(name);
            let from = job.dir.join(src);
            let moved = until_space(&shared.space_wait(job), "move", is_out_of_space, || {
                move_no_clobber(fs, &from, &dst)
            })
            .map_err(io(&dst))?;
            match moved {
                None => return Ok(JobEnd::Interrupted),
                Some(Moved::Done) => break,
                Some(Moved::Taken) => {
                    // Another daemon took the name since it was chosen: take the next free one.
                    let follower = follower_in(dir, provenance_file);
                    let next = |n: u32| numbered_fit(&[(name.as_os_str(), follower)], n + 1).remove(0);
                    let n = free_number(&dir_path, |n| vec![next(n)]);
                    outcome.moves[i].2 = next(n);
                    match outcome.write(shared, job) {
                        Err(JobError::StoppedWaitingForSpace) => return Ok(JobEnd::Interrupted),
                        other => other?,
                    }
                }
            }
        }
    }
    for name in &outcome.deletes {
        let path = job.dir.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&path)(e)),
            _ => {}
        }
    }
    remove_job_dir(job).map_err(io(&job.dir))?;
    Ok(if outcome.done { JobEnd::Done } else { JobEnd::Failed })
}

fn output_of(outcome: &Outcome) -> String {
    outcome.moves.first().map(|(_, d, n)| format!("{d}/{}", lossy(n))).unwrap_or_default()
}

/// Records `outcome` and carries it out; a stop while the disk is full is `Interrupted`.
fn decide(shared: &Shared<'_>, job: &ClaimedJob, outcome: Outcome) -> Result<JobEnd, JobError> {
    match outcome.write(shared, job) {
        Err(JobError::StoppedWaitingForSpace) => return Ok(JobEnd::Interrupted),
        other => other?,
    }
    shared.running.forget(&job.dir);
    carry_out(shared, job, outcome)
}

fn succeed(
    shared: &Shared<'_>,
    job: &ClaimedJob,
    image: &OsStr,
    finished: &Finished,
) -> Result<JobEnd, JobError> {
    let outcome = success_outcome(shared, job, image, finished);
    let output = output_of(&outcome);
    let end = decide(shared, job, outcome)?;
    if end == JobEnd::Done {
        tracing::info!(job = %job.id, name = %lossy(image), output, "job done");
    }
    Ok(end)
}

fn fail(shared: &Shared<'_>, job: &ClaimedJob, error: &JobError) -> Result<JobEnd, JobError> {
    let name = job.image.as_deref().map(lossy).unwrap_or_default();
    let reason = error.to_string();
    let headline = if reason.starts_with(&name) { reason.clone() } else { format!("{name}: {reason}") };
    let text = format!(
        "{headline}\n\n(job {}, easel {}; the original is beside this file)\n",
        job.id,
        env!("CARGO_PKG_VERSION")
    );
    let path = job.dir.join(ERROR);
    match write_waiting(shared, job, &path, text.as_bytes()) {
        Err(JobError::StoppedWaitingForSpace) => return Ok(JobEnd::Interrupted),
        other => other?,
    }
    let outcome = failure_outcome(shared, job);
    let end = decide(shared, job, outcome)?;
    if end == JobEnd::Failed {
        tracing::warn!(job = %job.id, name, reason, "job failed");
    }
    Ok(end)
}

/// How a worker process ended without reporting an end: killed by a signal, or exited
/// with a failure status (an aborted allocation among them).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Crash {
    signal: Option<i32>,
    code: Option<i32>,
    /// The allocator's "memory allocation of N bytes failed", if the worker said it.
    allocation: Option<String>,
}

/// The usual name of a signal a worker may die of.
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => return None,
    })
}

impl Crash {
    fn of(status: ExitStatus, allocation: Option<String>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self { signal: status.signal(), code: status.code(), allocation }
    }

    /// What happened, for the log: "the worker was killed by signal 9 (SIGKILL)".
    fn describe(&self) -> String {
        match &self.allocation {
            Some(line) => format!("{} ({line})", self.kind()),
            None => self.kind(),
        }
    }

    /// What happened, without the particulars that differ from one crash to the next (the
    /// size of the allocation that failed).
    fn kind(&self) -> String {
        if self.allocation.is_some() {
            return "the worker ran out of memory".to_string();
        }
        match (self.signal, self.code) {
            (Some(signal), _) => match signal_name(signal) {
                Some(name) => format!("the worker was killed by signal {signal} ({name})"),
                None => format!("the worker was killed by signal {signal}"),
            },
            (None, Some(code)) => format!("the worker exited with status {code} without a result"),
            (None, None) => "the worker ended without a result".to_string(),
        }
    }
}

/// Why a job whose workers crashed `crashes` times in all (`seen` of them under this daemon,
/// the last last) is failed: what happened, and the plan's figures when memory is the likely
/// cause.
fn crash_error(crashes: u32, seen: &[Crash], memory: &MemoryPlan) -> JobError {
    let Some(last) = seen.last() else { return JobError::Crashed(crashes) };
    let times = match crashes {
        1 => "once".to_string(),
        2 => "twice".to_string(),
        n => format!("{n} times"),
    };
    let mut how = if seen.len() as u32 == crashes && seen.iter().all(|c| c.kind() == last.kind()) {
        format!("{} {times}", last.kind())
    } else {
        format!("{} (the last of {crashes} crashes)", last.kind())
    };
    if let Some(line) = &last.allocation {
        how.push_str(&format!(" (the last time: {line})"));
    }
    // A kill nobody asked for is most often the kernel's OOM killer; a signal a program
    // raises itself (a fault) is not.
    let verdict = match (&last.allocation, last.signal) {
        (Some(_), _) => "out of memory",
        (None, Some(9)) => "out of memory?",
        _ => "not retried",
    };
    JobError::WorkerCrashed {
        how,
        peak_mb: memory.peak_bytes() >> 20,
        cap_mb: memory_cap(memory) >> 20,
        verdict,
    }
}

/// Plans the job for admission: its frozen plan, and its memory from the images' headers (no
/// pixel is decoded here).
fn plan_job(
    shared: &Shared<'_>,
    job: &ClaimedJob,
    image: &OsStr,
    config: &DaemonConfig,
) -> Result<MemoryPlan, JobError> {
    let mut plan = job_plan(shared, job, config)?;
    let content_path = job.dir.join(image);
    shared.root.check_link(&content_path, &lossy(image))?;
    plan_memory(&mut plan, &content_path, image, shared.admission.budget())
}

/// Starts a worker on the job and follows it to its end: its reports go to the status board,
/// a stop is passed on to it as SIGTERM. `Ok(Err(crash))` when it ended without a report.
fn supervise(shared: &Shared<'_>, job: &ClaimedJob) -> Result<Result<WorkerEnd, Crash>, JobError> {
    let program = &shared.worker.program;
    let mut child = Command::new(program)
        .args(&shared.worker.args)
        .arg("job")
        .arg(&job.dir)
        .arg("--weights")
        .arg(shared.weights.path())
        .arg("--weights-sha256")
        .arg(shared.weights.sha256()?)
        .arg("--budget-bytes")
        .arg(shared.admission.budget().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(program))?;
    let pid = child.id();
    // Held open until the worker is reaped: its end of file tells the worker we are gone.
    let _alive = child.stdin.take();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    shared.board.worker(&job.id, pid);
    tracing::debug!(job = %job.id, pid, "worker started");
    let (reports_tx, reports) = crossbeam_channel::unbounded();
    let read_reports = move || {
        let Some(stdout) = stdout else { return };
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            match Report::parse(&line) {
                Some(report) => {
                    if reports_tx.send(report).is_err() {
                        break;
                    }
                }
                None => tracing::warn!(pid, line, "unexpected output from a worker"),
            }
        }
    };
    // The worker's log joins the daemon's; the allocator's last words are kept for the reason.
    let pass_log_on = move || -> Option<String> {
        let mut allocation = None;
        let Some(stderr) = stderr else { return allocation };
        let mut stderr = BufReader::new(stderr);
        let mut line = Vec::new();
        while stderr.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line);
            // What Rust's allocation-failure handler prints before it aborts.
            if text.starts_with("memory allocation of") {
                allocation = Some(text.trim_end().to_string());
            }
            let _ = std::io::stderr().lock().write_all(&line);
            line.clear();
        }
        allocation
    };
    let threads = std::thread::Builder::new()
        .name(format!("easel-reports-{pid}"))
        .spawn(read_reports)
        .and_then(|reader| {
            let log = std::thread::Builder::new().name(format!("easel-log-{pid}")).spawn(pass_log_on)?;
            Ok((reader, log))
        });
    let (reader, log) = match threads {
        Ok(threads) => threads,
        Err(e) => {
            // Unsupervised, the worker would run blind: end it (the attempt is no crash).
            let _ = child.kill();
            let _ = child.wait();
            return Err(io(program)(e));
        }
    };
    let mut end = None;
    let mut forwarded = false;
    loop {
        match reports.recv_timeout(STOP_CHECK) {
            Ok(Report::Started { resumed_from, total, device }) => {
                shared.board.resumed(&job.id, resumed_from, total);
                shared.board.device(&job.id, device);
            }
            Ok(Report::Progress { done, total, scale, scales, loss }) => {
                shared.board.progress_at(&job.id, done, total, scale, scales, loss)
            }
            Ok(Report::End(reported)) => end = Some(reported),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
        if !forwarded && shared.stop.load(Ordering::SeqCst) {
            forwarded = true;
            stop_worker(pid);
        }
    }
    let status = child.wait().map_err(io(program))?;
    let _ = reader.join();
    let allocation = log.join().ok().flatten();
    // A reported end stands even if the worker died after it: its files were written first.
    Ok(match end {
        Some(end) => Ok(end),
        None => Err(Crash::of(status, allocation)),
    })
}

/// Asks the worker `pid` to checkpoint and exit, as a SIGTERM to the daemon asks it.
fn stop_worker(pid: u32) {
    use rustix::process::{kill_process, Pid, Signal};
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else { return };
    // The worker is not reaped yet, so its pid is still its own.
    if let Err(e) = kill_process(pid, Signal::TERM) {
        tracing::warn!(pid = pid.as_raw_nonzero().get(), error = %e, "cannot pass the stop on to a worker");
    }
}

/// Runs a claimed job to its end: its result in `out/`, a failure in `failed/`, or (on stop) a
/// checkpoint in its folder. Never panics and never stops the daemon: the job is computed by a
/// worker process, which is started again after a crash until the job has crashed
/// [`MAX_CRASHES`] times.
pub(crate) fn process(shared: &Shared<'_>, job: ClaimedJob) -> JobEnd {
    let ended = (|| -> Result<JobEnd, JobError> {
        let recorded = std::fs::read_to_string(job.dir.join(OUTCOME)).ok();
        if let Some(text) = recorded {
            let outcome = serde_json::from_str(&text).ok().as_ref().and_then(Outcome::from_json);
            return match outcome {
                Some(outcome) => {
                    tracing::info!(job = %job.id, "finishing a job decided before a restart");
                    carry_out(shared, &job, outcome)
                }
                None => {
                    let path = job.dir.join(OUTCOME);
                    Err(io(&path)(std::io::Error::new(std::io::ErrorKind::InvalidData, "unreadable")))
                }
            };
        }
        let Some(image) = job.image.clone() else { return Ok(JobEnd::Stuck) };
        let crashes = crashed_attempts(&job.dir);
        if crashes >= MAX_CRASHES {
            return fail(shared, &job, &JobError::Crashed(crashes));
        }
        let config = shared.config();
        let memory = match plan_job(shared, &job, &image, &config) {
            Ok(memory) => memory,
            Err(JobError::StoppedWaitingForSpace) => return Ok(JobEnd::Interrupted),
            // Refused before anything is allocated, with the need when it is too large.
            Err(e) => return fail(shared, &job, &e),
        };
        let waiting = || {
            let need_mb = memory.peak_bytes() >> 20;
            tracing::info!(job = %job.id, need_mb, "waiting for memory: running jobs hold the rest of the budget");
        };
        let Some(_admitted) = shared.admission.admit(&memory, &shared.stop, waiting) else {
            return Ok(JobEnd::Interrupted);
        };
        let fs = shared.fs.as_ref();
        let mut seen = Vec::new();
        loop {
            let crashes = crashed_attempts(&job.dir);
            if crashes >= MAX_CRASHES {
                return fail(shared, &job, &crash_error(crashes, &seen, &memory));
            }
            let counted = until_space(&shared.space_wait(&job), ".attempts", is_out_of_space, || {
                shared.running.begin(fs, &job.dir, crashes)
            })
            .map_err(io(&job.dir))?;
            if counted.is_none() {
                return Ok(JobEnd::Interrupted);
            }
            let worker = match supervise(shared, &job) {
                Ok(worker) => worker,
                Err(e) => {
                    // No worker ran (it could not be started): no crash either.
                    shared.running.end_cleanly(fs, &job.dir).map_err(io(&job.dir))?;
                    return Err(e);
                }
            };
            let end = match worker {
                Ok(WorkerEnd::Finished(finished)) => succeed(shared, &job, &image, &finished),
                Ok(WorkerEnd::Interrupted) => Ok(JobEnd::Interrupted),
                Ok(WorkerEnd::Failed(reason)) => fail(shared, &job, &JobError::Worker(reason)),
                // A worker stopped before its handlers were installed dies of the stop signal
                // itself: a stop still, not a crash.
                Err(crash) if shared.stop.load(Ordering::SeqCst) && matches!(crash.signal, Some(2 | 15)) => {
                    Ok(JobEnd::Interrupted)
                }
                Err(crash) => {
                    // The attempt stays counted; the next turn of the loop tries again or fails it.
                    shared.running.forget(&job.dir);
                    tracing::warn!(job = %job.id, reason = crash.describe(), "the job's worker crashed");
                    seen.push(crash);
                    if shared.stop.load(Ordering::SeqCst) {
                        return Ok(JobEnd::Interrupted);
                    }
                    continue;
                }
            };
            return match end {
                // A stop is no crash: the attempt is uncounted (a no-op once its outcome is decided).
                Ok(JobEnd::Interrupted) => {
                    shared.running.end_cleanly(fs, &job.dir).map_err(io(&job.dir))?;
                    Ok(JobEnd::Interrupted)
                }
                other => {
                    shared.running.forget(&job.dir);
                    other
                }
            };
        }
    })();
    match ended {
        Ok(end) => end,
        Err(e) => {
            shared.running.forget(&job.dir);
            tracing::error!(job = %job.id, error = %e, "job could not be finished; it stays in work/");
            JobEnd::Stuck
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_engine::memory::Part;

    fn planned(peak_mb: u64) -> MemoryPlan {
        MemoryPlan {
            width: 1,
            height: 1,
            parts: vec![Part { name: "evaluation", bytes: peak_mb << 20 }],
            budget_bytes: u64::MAX,
            adjustments: Vec::new(),
            tile_size: None,
            evaluation_bytes: peak_mb << 20,
        }
    }

    fn killed(signal: i32) -> Crash {
        Crash { signal: Some(signal), code: None, allocation: None }
    }

    fn out_of_memory(bytes: u64) -> Crash {
        Crash {
            signal: Some(6),
            code: None,
            allocation: Some(format!("memory allocation of {bytes} bytes failed")),
        }
    }

    #[test]
    fn a_job_failed_after_crashes_says_how_its_workers_died_and_names_memory_when_likely() {
        let memory = planned(100);
        let cap = memory_cap(&memory) >> 20;
        let kills = crash_error(2, &[killed(9), killed(9)], &memory).to_string();
        assert_eq!(
            kills,
            format!("the worker was killed by signal 9 (SIGKILL) twice; planned peak 100 MB, cap {cap} MB: out of memory?")
        );
        let allocations = crash_error(2, &[out_of_memory(10), out_of_memory(20)], &memory).to_string();
        assert_eq!(
            allocations,
            format!(
                "the worker ran out of memory twice (the last time: memory allocation of 20 bytes failed); \
                 planned peak 100 MB, cap {cap} MB: out of memory"
            )
        );
        let mixed = crash_error(2, &[killed(9), killed(11)], &memory).to_string();
        assert!(
            mixed.starts_with("the worker was killed by signal 11 (SIGSEGV) (the last of 2 crashes)"),
            "{mixed}"
        );
        assert!(mixed.ends_with("not retried"), "a fault is no memory shortage: {mixed}");
        let earlier = crash_error(2, &[killed(9)], &memory).to_string();
        assert!(earlier.contains("(the last of 2 crashes)"), "one crash came before this daemon: {earlier}");
        let unseen = crash_error(2, &[], &memory).to_string();
        assert!(unseen.contains("started 2 times"), "crashes of earlier daemons only: {unseen}");
    }
}
