//! One claimed job on a worker: its plan, the engine run with checkpoints, and its result or failure.
//!
//! A job's end is decided first and recorded in `.outcome.json` (which files go where), then
//! carried out with moves that never replace a file and are safe to repeat, so a crash at
//! any point leaves a job that the next start finishes without running it again.

use std::ffi::{OsStr, OsString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use easel_config::{ConfigLayers, OutputFormat, Plan};
use easel_core::Registry;
use easel_engine::{load_image, memory, save_image, Checkpoint, ModelSpec, StyleRun};
use easel_vgg::{Vgg19, WeightsFile};
use serde_json::{json, Value};

use crate::admission::Admission;
use crate::claim::{remove_job_dir, ClaimedJob, OUTCOME};
use crate::config::{sidecar_layer, DaemonConfig};
use crate::folders::{any_exists, Root};
use crate::fsops::{is_out_of_space, move_no_clobber, write_durably, Fs, Moved};
use crate::journal::{crashed_attempts, RunningAttempts, MAX_CRASHES};
use crate::names::{lossy, numbered_fit, stem, with_extension};
use crate::status::{JobEnd, StatusBoard};
use crate::{JobError, Signals};

const PLAN: &str = ".plan.toml";
const CHECKPOINT: &str = ".checkpoint.safetensors";
const ERROR: &str = ".error.txt";
const RESULT: &str = ".result";
const PROVENANCE: &str = ".result.json";
/// The first wait before a step that failed on a full disk is retried; it doubles up to
/// [`SPACE_MAX_WAIT`].
const SPACE_FIRST_WAIT: Duration = Duration::from_millis(500);
const SPACE_MAX_WAIT: Duration = Duration::from_secs(30);

/// What every worker shares: the root, the plugins, the weights (mapped once), the current
/// daemon config, the stop flag, the status board, the filesystem calls and the running attempts.
pub(crate) struct Shared<'r> {
    pub root: Root,
    pub registry: &'r Registry,
    pub weights: WeightsFile,
    pub config: Mutex<Arc<DaemonConfig>>,
    pub stop: Arc<AtomicBool>,
    pub board: StatusBoard,
    pub fs: Arc<dyn Fs>,
    pub running: Arc<RunningAttempts>,
    /// Jobs run side by side only while their predicted memory fits the budget together.
    pub admission: Admission,
    /// Models already built from the weights, by depth and conventions; clones share tensors.
    vggs: Mutex<Vec<(ModelSpec, Vgg19)>>,
}

impl<'r> Shared<'r> {
    pub fn new(
        root: Root,
        registry: &'r Registry,
        weights: WeightsFile,
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
            config: Mutex::new(Arc::new(config)),
            stop: signals.stop_flag(),
            board,
            fs,
            running: signals.running_attempts(),
            admission: Admission::new(budget),
            vggs: Mutex::new(Vec::new()),
        }
    }

    /// The daemon config as it is now; a job keeps the one it started with.
    pub fn config(&self) -> Arc<DaemonConfig> {
        Arc::clone(&self.config.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn vgg_for(&self, plan: &Plan) -> Result<Vgg19, JobError> {
        let spec = ModelSpec::of(plan);
        let mut cache = self.vggs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, vgg)) = cache.iter().find(|(s, _)| *s == spec) {
            return Ok(vgg.clone());
        }
        let vgg = spec.load(&self.weights)?;
        cache.push((spec, vgg.clone()));
        Ok(vgg)
    }
}

/// The files a finished attempt left in the job folder.
struct Finished {
    extension: &'static str,
    provenance_file: bool,
}

enum Attempt {
    Finished(Finished),
    Interrupted,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JobError + '_ {
    move |source| JobError::Io { path: path.to_path_buf(), source }
}

/// Runs `op` until it no longer fails for lack of disk space (`is_full`), waiting longer each
/// time: space may come back at any moment (a user deletes files), and a full disk is no fault
/// of the job. `Ok(None)` when a stop came while waiting.
fn until_space<T, E: std::fmt::Display>(
    shared: &Shared<'_>,
    job: &ClaimedJob,
    what: &str,
    is_full: impl Fn(&E) -> bool,
    mut op: impl FnMut() -> Result<T, E>,
) -> Result<Option<T>, E> {
    let mut wait = SPACE_FIRST_WAIT;
    loop {
        match op() {
            Err(e) if is_full(&e) => {
                tracing::warn!(job = %job.id, step = what, error = %e, retry_in_s = wait.as_secs_f64(), "waiting for disk space");
                let until = Instant::now() + wait;
                while Instant::now() < until {
                    if shared.stop.load(Ordering::SeqCst) {
                        return Ok(None);
                    }
                    std::thread::sleep((until - Instant::now()).min(Duration::from_millis(100)));
                }
                wait = (wait * 2).min(SPACE_MAX_WAIT);
            }
            other => return other.map(Some),
        }
    }
}

/// [`write_durably`], waiting for space; a stop while waiting is [`JobError::StoppedWaitingForSpace`].
fn write_waiting(shared: &Shared<'_>, job: &ClaimedJob, path: &Path, bytes: &[u8]) -> Result<(), JobError> {
    let fs = shared.fs.as_ref();
    let what = path.file_name().map(lossy).unwrap_or_default();
    until_space(shared, job, &what, is_out_of_space, || write_durably(fs, path, bytes))
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

struct Prepared {
    plan: Plan,
    vgg: Vgg19,
    content: easel_engine::RgbImage,
    styles: Vec<(easel_engine::RgbImage, f64)>,
}

fn prepare(
    shared: &Shared<'_>,
    job: &ClaimedJob,
    image: &OsStr,
    config: &DaemonConfig,
) -> Result<Prepared, JobError> {
    let plan = job_plan(shared, job, config)?;
    let content_path = job.dir.join(image);
    shared.root.check_link(&content_path, &lossy(image))?;
    let content = load_image(&content_path, &plan.limits).map_err(|e| match e {
        // The job folder is an implementation detail; the user knows the file by its name.
        easel_engine::EngineError::Image { reason, .. } => {
            JobError::Engine(easel_engine::EngineError::Image { path: PathBuf::from(image), reason })
        }
        other => JobError::Engine(other),
    })?;
    let mut styles = Vec::with_capacity(plan.styles.len());
    for spec in &plan.styles {
        styles.push((load_image(&spec.path, &plan.limits)?, spec.weight));
    }
    let vgg = shared.vgg_for(&plan)?;
    Ok(Prepared { plan, vgg, content, styles })
}

fn provenance(
    shared: &Shared<'_>,
    job: &ClaimedJob,
    image: &OsStr,
    plan: &Plan,
) -> Result<Vec<(&'static str, String)>, JobError> {
    let version = env!("CARGO_PKG_VERSION");
    Ok(vec![
        ("Software", format!("easel {version}")),
        ("easel:version", version.to_string()),
        ("easel:source", lossy(image)),
        ("easel:job", job.id.clone()),
        ("easel:seed", plan.run.seed.to_string()),
        ("easel:weights-sha256", shared.weights.sha256()?.to_string()),
        ("easel:config", toml::to_string(&plan.merged).unwrap_or_default()),
    ])
}

/// Writes the run's checkpoint durably through the daemon's filesystem calls (temp file
/// synced, renamed, folder synced), as every other file of the job.
fn write_checkpoint(shared: &Shared<'_>, run: &StyleRun, path: &Path) -> Result<(), JobError> {
    let bytes = run.checkpoint().to_bytes()?;
    write_durably(shared.fs.as_ref(), path, &bytes).map_err(io(path))
}

/// Runs (or resumes) the job to its end or to a stop; the result is left in the job folder.
fn attempt(
    shared: &Shared<'_>,
    job: &ClaimedJob,
    image: &OsStr,
    config: &DaemonConfig,
) -> Result<Attempt, JobError> {
    let checkpoint_path = job.dir.join(CHECKPOINT);
    let mut prepared = prepare(shared, job, image, config)?;
    let budget = shared.admission.budget();
    prepared.plan.limits.memory_mb = budget >> 20;
    let spec = ModelSpec::of(&prepared.plan);
    let styles: Vec<(u32, u32)> = prepared.styles.iter().map(|(image, _)| image.dimensions()).collect();
    let memory = memory::fit(&mut prepared.plan, &spec, prepared.content.dimensions(), &styles, budget)?;
    let waiting = || {
        let need_mb = memory.peak_bytes() >> 20;
        tracing::info!(job = %job.id, need_mb, "waiting for memory: running jobs hold the rest of the budget");
    };
    let Some(_admitted) = shared.admission.admit(&memory, &shared.stop, waiting) else {
        return Ok(Attempt::Interrupted);
    };
    let mut run = match checkpoint_path.exists() {
        false => StyleRun::new(prepared.plan, prepared.vgg, prepared.content, prepared.styles)?,
        true => {
            let resumed = Checkpoint::read(&checkpoint_path, prepared.vgg.device()).and_then(|checkpoint| {
                StyleRun::resume(prepared.plan, prepared.vgg, prepared.content, prepared.styles, checkpoint)
            });
            match resumed {
                Ok(run) => run,
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "checkpoint unusable; starting the job over");
                    let _ = std::fs::remove_file(&checkpoint_path);
                    let mut p = prepare(shared, job, image, config)?;
                    p.plan.limits.memory_mb = budget >> 20;
                    StyleRun::new(p.plan, p.vgg, p.content, p.styles)?
                }
            }
        }
    };
    let resumed_from = run.iterations_done();
    shared.board.resumed(&job.id, resumed_from, run.total_iterations());
    shared.board.device(&job.id, easel_engine::device_name(run.vgg().device()));
    tracing::info!(
        job = %job.id,
        name = %lossy(image),
        resumed_from,
        total = run.total_iterations(),
        "job started"
    );
    let every = run.plan().daemon.checkpoint_every;
    let started = Instant::now();
    let mut ran = 0u32;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            match write_checkpoint(shared, &run, &checkpoint_path) {
                Ok(()) => {
                    tracing::info!(job = %job.id, iteration = run.iterations_done(), "stopping: checkpoint written")
                }
                // The previous checkpoint (if any) still holds; the job resumes from there.
                Err(e) => tracing::error!(job = %job.id, error = %e, "stopping: cannot write checkpoint"),
            }
            return Ok(Attempt::Interrupted);
        }
        let Some(p) = run.step()? else { break };
        ran += 1;
        shared.board.progress(&job.id, &p);
        tracing::debug!(job = %job.id, iteration = p.done, total = p.total, loss = p.loss, "iteration");
        if every > 0 && p.done % every == 0 && !run.is_finished() {
            // A full disk costs resumability, not the job.
            match write_checkpoint(shared, &run, &checkpoint_path) {
                Ok(()) => tracing::debug!(job = %job.id, iteration = p.done, "checkpoint written"),
                Err(e) => tracing::warn!(job = %job.id, error = %e, "cannot write checkpoint"),
            }
        }
    }
    let plan = run.plan();
    let format = plan.output.format;
    let extension = format.extension();
    let mut text = provenance(shared, job, image, plan)?;
    text.push((
        "easel:memory",
        json!({
            "peak_mb_predicted": memory.peak_bytes() >> 20,
            "budget_mb": memory.budget_bytes >> 20,
            "adjustments": memory.adjustments.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
        .to_string(),
    ));
    let result = job.dir.join(format!("{RESULT}.{extension}"));
    let chunks: Vec<(&str, String)> = text.iter().map(|(k, v)| (*k, v.clone())).collect();
    let painted = run.result()?;
    let full = |e: &easel_engine::EngineError| matches!(e, easel_engine::EngineError::Write { source, .. } if is_out_of_space(source));
    let saved = until_space(shared, job, "result", full, || {
        save_image(&painted, &result, format, plan.output.jpeg_quality, &chunks)
    })?;
    if saved.is_none() {
        // Stopped while the disk was full: the finished run is kept, if there is room for it.
        if let Err(e) = write_checkpoint(shared, &run, &checkpoint_path) {
            tracing::error!(job = %job.id, error = %e, "stopping: cannot write checkpoint");
        }
        return Ok(Attempt::Interrupted);
    }
    let provenance_file = format != OutputFormat::Png;
    if provenance_file {
        // JPEG has no text chunks easel writes; the provenance goes beside the result.
        let map: serde_json::Map<String, Value> = text
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("easel:").to_string(), Value::String(v)))
            .collect();
        let path = job.dir.join(PROVENANCE);
        write_waiting(shared, job, &path, format!("{:#}\n", Value::Object(map)).as_bytes())?;
    }
    tracing::info!(
        job = %job.id,
        name = %lossy(image),
        iterations = ran,
        resumed_from,
        seconds = started.elapsed().as_secs_f64(),
        "job computed"
    );
    Ok(Attempt::Finished(Finished { extension, provenance_file }))
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
    let result_name = with_extension(&stem(image), finished.extension);
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
            let moved =
                until_space(shared, job, "move", is_out_of_space, || move_no_clobber(fs, &from, &dst))
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

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs a claimed job to its end: its result in `out/`, a failure in `failed/`, or (on stop) a
/// checkpoint in its folder. Never panics and never stops the daemon.
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
        let fs = shared.fs.as_ref();
        let counted = until_space(shared, &job, ".attempts", is_out_of_space, || {
            shared.running.begin(fs, &job.dir, crashes)
        })
        .map_err(io(&job.dir))?;
        if counted.is_none() {
            return Ok(JobEnd::Interrupted);
        }
        let config = shared.config();
        let end = match catch_unwind(AssertUnwindSafe(|| attempt(shared, &job, &image, &config))) {
            Ok(Ok(Attempt::Finished(finished))) => succeed(shared, &job, &image, &finished),
            Ok(Ok(Attempt::Interrupted)) | Ok(Err(JobError::StoppedWaitingForSpace)) => {
                Ok(JobEnd::Interrupted)
            }
            Ok(Err(e)) => fail(shared, &job, &e),
            Err(panic) => fail(shared, &job, &JobError::Panic(panic_message(panic))),
        };
        match end {
            // A stop is no crash: the attempt is uncounted (a no-op once its outcome is decided).
            Ok(JobEnd::Interrupted) => {
                shared.running.end_cleanly(fs, &job.dir).map_err(io(&job.dir))?;
                Ok(JobEnd::Interrupted)
            }
            other => {
                shared.running.forget(&job.dir);
                other
            }
        }
    })();
    // The run's buffers stay mapped for reuse while it runs (see easel_vgg::alloc); between
    // jobs a small board gets them back.
    easel_vgg::alloc::release_free_memory();
    match ended {
        Ok(end) => end,
        Err(e) => {
            shared.running.forget(&job.dir);
            tracing::error!(job = %job.id, error = %e, "job could not be finished; it stays in work/");
            JobEnd::Stuck
        }
    }
}
