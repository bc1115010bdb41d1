//! One attempt at a job in a process of its own (`easel job DIR`), started and supervised by
//! `easel watch` (see [`crate::job`]).
//!
//! A job that needs more memory than predicted, or whose allocation fails, then ends its own
//! worker and nothing else: the daemon and the other jobs go on. The worker caps its own data
//! segment (RLIMIT_DATA) at the planned peak plus a margin before it allocates anything large,
//! dies with its supervisor, and tells it what happens as JSON lines on stdout:
//!
//! - `{"event": "started", "resumed_from": N, "total": N, "device": "cpu"}`
//! - `{"event": "progress", "done": N, "total": N, "scale": N, "scales": N, "loss": X}`
//! - and last one of `{"event": "finished", "extension": "png", "provenance_file": false}`,
//!   `{"event": "interrupted"}` (a stop: the checkpoint is written) or
//!   `{"event": "failed", "reason": "..."}` (the text of the job's `.error.txt`).
//!
//! Its log goes to stderr, which the supervisor passes on to its own. Its stdin is a pipe the
//! supervisor holds open and never writes to: end of file there means the supervisor is gone.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::DeviceLocation;
use easel_config::{ConfigLayers, DeviceChoice, OutputFormat, Plan};
use easel_core::Registry;
use easel_engine::memory::MemoryPlan;
use easel_engine::{image_dimensions, load_image, memory, save_image, Checkpoint, ModelSpec, StyleRun};
use easel_vgg::WeightsFile;
use serde_json::{json, Value};

use crate::fsops::{is_out_of_space, write_durably, FaultyFs, Fs, RealFs};
use crate::job_files::{io, panic_message, until_space, SpaceWait, CHECKPOINT, PLAN, PROVENANCE, RESULT};
use crate::names::lossy;
use crate::{DaemonError, JobError};

const MB: u64 = 1 << 20;

/// Forces the worker's memory cap to this many MB instead of the planned peak plus a margin:
/// for tests of what happens when a worker runs out of memory.
pub const CAP_VAR: &str = "EASEL_WORKER_CAP_MB";

/// What `easel job` is given.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The job's folder in `work/`, claimed (and locked) by the supervisor, with its plan frozen
    /// in `.plan.toml`.
    pub dir: PathBuf,
    /// The VGG-19 weights.
    pub weights: PathBuf,
    /// Their sha256 (hex), for the provenance, if the supervisor knows it: hashing 550 MB
    /// again for every job would cost seconds on a small board.
    pub weights_sha256: Option<String>,
    /// The daemon's memory budget in bytes, which the job is planned against.
    pub budget_bytes: u64,
}

/// How a worker's attempt ended, as it reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WorkerEnd {
    /// The result (and a JPEG's provenance file) are in the job folder.
    Finished(Finished),
    /// Stopped; its checkpoint is written.
    Interrupted,
    /// The job cannot be done; the reason is the text of its `.error.txt`.
    Failed(String),
}

/// The files a finished attempt left in the job folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finished {
    pub extension: String,
    pub provenance_file: bool,
}

/// One line a worker writes to its supervisor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Report {
    Started { resumed_from: u32, total: u32, device: String },
    Progress { done: u32, total: u32, scale: usize, scales: usize, loss: f64 },
    End(WorkerEnd),
}

impl Report {
    fn to_json(&self) -> Value {
        match self {
            Report::Started { resumed_from, total, device } => {
                json!({"event": "started", "resumed_from": resumed_from, "total": total, "device": device})
            }
            Report::Progress { done, total, scale, scales, loss } => json!({
                "event": "progress", "done": done, "total": total, "scale": scale, "scales": scales, "loss": loss,
            }),
            Report::End(WorkerEnd::Finished(f)) => json!({
                "event": "finished", "extension": f.extension, "provenance_file": f.provenance_file,
            }),
            Report::End(WorkerEnd::Interrupted) => json!({"event": "interrupted"}),
            Report::End(WorkerEnd::Failed(reason)) => json!({"event": "failed", "reason": reason}),
        }
    }

    /// The report on one line of a worker's stdout; `None` for anything else.
    pub(crate) fn parse(line: &str) -> Option<Report> {
        let v: Value = serde_json::from_str(line).ok()?;
        let u32_of = |key: &str| v[key].as_u64().and_then(|n| u32::try_from(n).ok());
        let usize_of = |key: &str| v[key].as_u64().and_then(|n| usize::try_from(n).ok());
        Some(match v["event"].as_str()? {
            "started" => Report::Started {
                resumed_from: u32_of("resumed_from")?,
                total: u32_of("total")?,
                device: v["device"].as_str()?.to_string(),
            },
            "progress" => Report::Progress {
                done: u32_of("done")?,
                total: u32_of("total")?,
                scale: usize_of("scale")?,
                scales: usize_of("scales")?,
                // JSON has no NaN: a non-finite loss arrives as null.
                loss: v["loss"].as_f64().unwrap_or(f64::NAN),
            },
            "finished" => Report::End(WorkerEnd::Finished(Finished {
                extension: v["extension"].as_str()?.to_string(),
                provenance_file: v["provenance_file"].as_bool()?,
            })),
            "interrupted" => Report::End(WorkerEnd::Interrupted),
            "failed" => Report::End(WorkerEnd::Failed(v["reason"].as_str()?.to_string())),
            _ => return None,
        })
    }
}

/// The cap on a worker's data segment for a job planned as `memory`: the planned peak plus the
/// larger of 25% and 256 MB, or [`CAP_VAR`] when it is set.
///
/// The margin covers what the prediction does not model closely: it is fitted to measured peak
/// RSS within about 15%, and RLIMIT_DATA also counts writable memory that is reserved but never
/// touched (the threads' stacks, 8 MB each by default; the allocator's partly used blocks),
/// which RSS does not. A job that passes its cap is far off its plan, not merely unlucky.
pub fn memory_cap(memory: &MemoryPlan) -> u64 {
    if let Some(mb) = std::env::var(CAP_VAR).ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        return mb.saturating_mul(MB);
    }
    let peak = memory.peak_bytes();
    peak.saturating_add((peak / 4).max(256 * MB))
}

/// Caps this process's data segment at `bytes`: past it an allocation fails (and the process
/// aborts) instead of driving the machine into the kernel's OOM killer.
///
/// RLIMIT_DATA rather than RLIMIT_AS: the address space also counts the mapped weights file
/// and glibc's per-thread arena reservations, which take no memory until touched.
#[cfg(target_os = "linux")]
fn cap_data(bytes: u64) -> std::io::Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let old = getrlimit(Resource::Data);
    // Only the soft limit: the hard one may be above what an unprivileged process may set again.
    let current = old.maximum.map_or(bytes, |max| max.min(bytes));
    setrlimit(Resource::Data, Rlimit { current: Some(current), maximum: old.maximum })?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn cap_data(_bytes: u64) -> std::io::Result<()> {
    // Elsewhere RLIMIT_DATA does not bound mmap'd memory (macOS) or does not exist: the plan
    // and the admission are the only bounds.
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "RLIMIT_DATA bounds memory on Linux only"))
}

/// Asks the kernel to kill this process when its supervisor dies (Linux); elsewhere the
/// end of stdin and a broken stdout tell the worker, which then checkpoints and exits.
#[cfg(target_os = "linux")]
fn die_with_supervisor() {
    use rustix::process::{set_parent_process_death_signal, Signal};
    if let Err(e) = set_parent_process_death_signal(Some(Signal::KILL)) {
        tracing::warn!(error = %e, "cannot ask to die with the supervisor; watching its pipe only");
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_supervisor() {}

/// Sets `stop` when stdin ends: the supervisor, which holds the other end, is gone. This also
/// covers a supervisor that died before [`die_with_supervisor`] took effect.
fn watch_supervisor(stop: Arc<AtomicBool>) -> std::io::Result<()> {
    std::thread::Builder::new().name("easel-supervisor".into()).spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut sink = [0u8; 64];
        loop {
            match stdin.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        tracing::warn!("the supervisor is gone: checkpointing and exiting");
        stop.store(true, Ordering::SeqCst);
    })?;
    Ok(())
}

/// Writes reports to stdout; a write that fails (the supervisor is gone) stops the attempt.
struct Reporter {
    stop: Arc<AtomicBool>,
}

impl Reporter {
    fn send(&self, report: &Report) {
        let mut out = std::io::stdout().lock();
        let written = writeln!(out, "{}", report.to_json()).and_then(|()| out.flush());
        if written.is_err() {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// What a worker runs its attempt with.
struct Worker<'r> {
    id: String,
    dir: PathBuf,
    registry: &'r Registry,
    weights: WeightsFile,
    weights_sha256: Option<String>,
    budget: u64,
    fs: Arc<dyn Fs>,
    stop: Arc<AtomicBool>,
    reporter: Reporter,
}

impl Worker<'_> {
    fn space_wait(&self) -> SpaceWait<'_> {
        SpaceWait { stop: &self.stop, job: &self.id }
    }
}

/// The `model.device` that names `device` itself.
fn choice_of(device: &candle_core::Device) -> DeviceChoice {
    match device.location() {
        DeviceLocation::Cpu => DeviceChoice::Cpu,
        DeviceLocation::Cuda { gpu_id } => DeviceChoice::Cuda(gpu_id),
        DeviceLocation::Metal { gpu_id } => DeviceChoice::Metal(gpu_id),
    }
}

/// `easel job DIR`: runs one attempt at the job in `args.dir` and reports it on stdout. `Err`
/// only when the attempt could not begin (signal handlers, the weights); a job's own failure
/// is reported, and is no error here.
pub fn run_worker(args: &WorkerArgs, registry: &Registry) -> Result<(), DaemonError> {
    die_with_supervisor();
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(DaemonError::Signals)?;
    }
    watch_supervisor(Arc::clone(&stop))
        .map_err(|source| DaemonError::Io { path: PathBuf::from("(stdin)"), source })?;
    // The test hook (see fsops::FaultyFs) reaches the worker through its environment.
    let fs: Arc<dyn Fs> = match FaultyFs::from_env() {
        Some(faulty) => Arc::new(faulty),
        None => Arc::new(RealFs),
    };
    let worker = Worker {
        id: args.dir.file_name().map(lossy).unwrap_or_default(),
        dir: args.dir.clone(),
        registry,
        weights: WeightsFile::open(&args.weights)?,
        weights_sha256: args.weights_sha256.clone(),
        budget: args.budget_bytes,
        fs,
        stop: Arc::clone(&stop),
        reporter: Reporter { stop },
    };
    let end = match catch_unwind(AssertUnwindSafe(|| attempt(&worker))) {
        Ok(Ok(end)) => end,
        Ok(Err(JobError::StoppedWaitingForSpace)) => WorkerEnd::Interrupted,
        Ok(Err(e)) => WorkerEnd::Failed(e.to_string()),
        Err(panic) => WorkerEnd::Failed(JobError::Panic(panic_message(panic)).to_string()),
    };
    worker.reporter.send(&Report::End(end));
    Ok(())
}

/// The job folder is an implementation detail; the user knows the file by its name.
fn named(e: easel_engine::EngineError, name: &OsStr) -> JobError {
    match e {
        easel_engine::EngineError::Image { reason, .. } => {
            JobError::Engine(easel_engine::EngineError::Image { path: PathBuf::from(name), reason })
        }
        other => JobError::Engine(other),
    }
}

/// Plans the memory of the job `plan` on the content image `name` (at `path`) against
/// `budget`: the supervisor to admit it, the worker to cap itself; both get the same answer.
/// The images' sizes are read from their headers: no pixel is decoded.
pub(crate) fn plan_memory(
    plan: &mut Plan,
    path: &Path,
    name: &OsStr,
    budget: u64,
) -> Result<MemoryPlan, JobError> {
    let content = image_dimensions(path, &plan.limits).map_err(|e| named(e, name))?;
    let styles: Vec<(u32, u32)> =
        plan.styles.iter().map(|s| image_dimensions(&s.path, &plan.limits)).collect::<Result<_, _>>()?;
    // Whole MiB, as `StyleRun::new` plans the job again from `memory_mb`: the two must agree.
    // (At least 1: 0 would mean "75% of what is available".)
    plan.limits.memory_mb = (budget >> 20).max(1);
    let budget = memory::budget_bytes(&plan.limits);
    let spec = ModelSpec::of(plan);
    Ok(memory::fit(plan, &spec, content, &styles, budget)?)
}

fn provenance(w: &Worker<'_>, image: &OsStr, plan: &Plan) -> Result<Vec<(&'static str, String)>, JobError> {
    let version = env!("CARGO_PKG_VERSION");
    Ok(vec![
        ("Software", format!("easel {version}")),
        ("easel:version", version.to_string()),
        ("easel:source", lossy(image)),
        ("easel:job", w.id.clone()),
        ("easel:seed", plan.run.seed.to_string()),
        (
            "easel:weights-sha256",
            match &w.weights_sha256 {
                Some(hex) => hex.clone(),
                None => w.weights.sha256()?.to_string(),
            },
        ),
        ("easel:config", toml::to_string(&plan.merged).unwrap_or_default()),
    ])
}

/// Writes the run's checkpoint durably through the daemon's filesystem calls (temp file
/// synced, renamed, folder synced), as every other file of the job.
fn write_checkpoint(w: &Worker<'_>, run: &StyleRun, path: &Path) -> Result<(), JobError> {
    let bytes = run.checkpoint().to_bytes()?;
    write_durably(w.fs.as_ref(), path, &bytes).map_err(io(path))
}

/// The frozen plan, and the content image's name and path.
fn job_inputs(w: &Worker<'_>) -> Result<(Plan, std::ffi::OsString), JobError> {
    let frozen = w.dir.join(PLAN);
    let plan = ConfigLayers::defaults().with_file(&frozen)?.plan(w.registry)?;
    let (image, _) = crate::claim::inputs_of(&w.dir).map_err(io(&w.dir))?;
    let image = image.ok_or_else(|| {
        io(&w.dir)(std::io::Error::new(std::io::ErrorKind::NotFound, "no image in the job folder"))
    })?;
    Ok((plan, image))
}

/// Runs (or resumes) the job to its end or to a stop; the result is left in the job folder.
fn attempt(w: &Worker<'_>) -> Result<WorkerEnd, JobError> {
    let (mut plan, image) = job_inputs(w)?;
    let content_path = w.dir.join(&image);
    let memory = plan_memory(&mut plan, &content_path, &image, w.budget)?;
    // The device first: `auto` becomes the device it finds, so the model loads where the cap
    // was decided.
    let device = easel_engine::device(plan.model.device)?;
    let spec = ModelSpec { device: choice_of(&device), ..ModelSpec::of(&plan) };
    if device.is_cpu() {
        let cap = memory_cap(&memory);
        match cap_data(cap) {
            Ok(()) => {
                tracing::debug!(job = %w.id, peak_mb = memory.peak_bytes() >> 20, cap_mb = cap >> 20, "memory capped")
            }
            Err(e) => tracing::warn!(job = %w.id, error = %e, "the worker's memory is not capped"),
        }
    } else {
        // The plan and the cap are about host memory as a CPU job uses it; a GPU's driver maps
        // host memory of its own, which a data limit would starve.
        tracing::info!(job = %w.id, device = %easel_engine::device_name(&device), "a GPU job's memory is not capped");
    }
    // What the inputs are loaded with, apart from the plan, which the run takes.
    let (limits, style_specs) = (plan.limits, plan.styles.clone());
    let load_inputs = || -> Result<_, JobError> {
        let content = load_image(&content_path, &limits).map_err(|e| named(e, &image))?;
        let mut styles = Vec::with_capacity(style_specs.len());
        for style in &style_specs {
            styles.push((load_image(&style.path, &limits)?, style.weight));
        }
        let vgg = spec.load(&w.weights)?;
        Ok((content, styles, vgg))
    };
    let checkpoint_path = w.dir.join(CHECKPOINT);
    let (content, styles, vgg) = load_inputs()?;
    let mut run = match checkpoint_path.exists() {
        false => StyleRun::new(plan, vgg, content, styles)?,
        true => {
            let resumed = Checkpoint::read(&checkpoint_path, vgg.device())
                .and_then(|checkpoint| StyleRun::resume(plan, vgg, content, styles, checkpoint));
            match resumed {
                Ok(run) => run,
                Err(e) => {
                    tracing::warn!(job = %w.id, error = %e, "checkpoint unusable; starting the job over");
                    let _ = std::fs::remove_file(&checkpoint_path);
                    // The failed resume took the plan: plan again, as the first start did.
                    let (mut plan, _) = job_inputs(w)?;
                    plan_memory(&mut plan, &content_path, &image, w.budget)?;
                    let (content, styles, vgg) = load_inputs()?;
                    StyleRun::new(plan, vgg, content, styles)?
                }
            }
        }
    };
    let resumed_from = run.iterations_done();
    w.reporter.send(&Report::Started {
        resumed_from,
        total: run.total_iterations(),
        device: easel_engine::device_name(run.vgg().device()),
    });
    tracing::info!(
        job = %w.id,
        name = %lossy(&image),
        resumed_from,
        total = run.total_iterations(),
        "job started"
    );
    let every = run.plan().daemon.checkpoint_every;
    let started = Instant::now();
    let mut ran = 0u32;
    loop {
        if w.stop.load(Ordering::SeqCst) {
            match write_checkpoint(w, &run, &checkpoint_path) {
                Ok(()) => {
                    tracing::info!(job = %w.id, iteration = run.iterations_done(), "stopping: checkpoint written")
                }
                // The previous checkpoint (if any) still holds; the job resumes from there.
                Err(e) => tracing::error!(job = %w.id, error = %e, "stopping: cannot write checkpoint"),
            }
            return Ok(WorkerEnd::Interrupted);
        }
        let Some(p) = run.step()? else { break };
        ran += 1;
        tracing::debug!(job = %w.id, iteration = p.done, total = p.total, loss = p.loss, "iteration");
        if every > 0 && p.done % every == 0 && !run.is_finished() {
            // A full disk costs resumability, not the job.
            match write_checkpoint(w, &run, &checkpoint_path) {
                Ok(()) => tracing::debug!(job = %w.id, iteration = p.done, "checkpoint written"),
                Err(e) => tracing::warn!(job = %w.id, error = %e, "cannot write checkpoint"),
            }
        }
        // Reported after its checkpoint: an iteration status.json shows is one a stop now would
        // resume after (when checkpoints are due every iteration).
        w.reporter.send(&Report::Progress {
            done: p.done,
            total: p.total,
            scale: p.scale,
            scales: p.scales,
            loss: p.loss,
        });
    }
    let plan = run.plan();
    let format = plan.output.format;
    let extension = format.extension();
    let mut text = provenance(w, &image, plan)?;
    text.push((
        "easel:memory",
        json!({
            "peak_mb_predicted": memory.peak_bytes() >> 20,
            "budget_mb": memory.budget_bytes >> 20,
            "tile_size": memory.tile_size,
            "adjustments": memory.adjustments.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
        .to_string(),
    ));
    let result = w.dir.join(format!("{RESULT}.{extension}"));
    let chunks: Vec<(&str, String)> = text.iter().map(|(k, v)| (*k, v.clone())).collect();
    let painted = run.result()?;
    let full = |e: &easel_engine::EngineError| matches!(e, easel_engine::EngineError::Write { source, .. } if is_out_of_space(source));
    let saved = until_space(&w.space_wait(), "result", full, || {
        save_image(&painted, &result, format, plan.output.jpeg_quality, &chunks)
    })?;
    if saved.is_none() {
        // Stopped while the disk was full: the finished run is kept, if there is room for it.
        if let Err(e) = write_checkpoint(w, &run, &checkpoint_path) {
            tracing::error!(job = %w.id, error = %e, "stopping: cannot write checkpoint");
        }
        return Ok(WorkerEnd::Interrupted);
    }
    let provenance_file = format != OutputFormat::Png;
    if provenance_file {
        // JPEG has no text chunks easel writes; the provenance goes beside the result.
        let map: serde_json::Map<String, Value> = text
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("easel:").to_string(), Value::String(v)))
            .collect();
        let path = w.dir.join(PROVENANCE);
        let bytes = format!("{:#}\n", Value::Object(map));
        until_space(&w.space_wait(), PROVENANCE, is_out_of_space, || {
            write_durably(w.fs.as_ref(), &path, bytes.as_bytes())
        })
        .map_err(io(&path))?
        .ok_or(JobError::StoppedWaitingForSpace)?;
    }
    tracing::info!(
        job = %w.id,
        name = %lossy(&image),
        iterations = ran,
        resumed_from,
        seconds = started.elapsed().as_secs_f64(),
        "job computed"
    );
    Ok(WorkerEnd::Finished(Finished { extension: extension.to_string(), provenance_file }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_read_back_as_written() {
        let reports = [
            Report::Started { resumed_from: 4, total: 10, device: "cpu".into() },
            Report::Progress { done: 5, total: 10, scale: 0, scales: 2, loss: 1.5 },
            Report::End(WorkerEnd::Finished(Finished { extension: "jpg".into(), provenance_file: true })),
            Report::End(WorkerEnd::Interrupted),
            Report::End(WorkerEnd::Failed("photo.png: cannot decode image: no".into())),
        ];
        for report in reports {
            assert_eq!(Report::parse(&report.to_json().to_string()), Some(report));
        }
        assert_eq!(Report::parse("memory allocation of 8 bytes failed"), None);
        assert_eq!(Report::parse(r#"{"event": "progress", "done": 1}"#), None, "incomplete");
    }

    #[test]
    fn the_cap_is_the_peak_plus_a_quarter_or_256_mb() {
        let plan = |peak: u64| MemoryPlan {
            width: 1,
            height: 1,
            parts: vec![easel_engine::memory::Part { name: "evaluation", bytes: peak }],
            budget_bytes: u64::MAX,
            adjustments: Vec::new(),
            tile_size: None,
            evaluation_bytes: peak,
        };
        assert_eq!(memory_cap(&plan(100 * MB)), 356 * MB, "256 MB at least");
        assert_eq!(memory_cap(&plan(4000 * MB)), 5000 * MB, "25% of a large peak");
    }
}
