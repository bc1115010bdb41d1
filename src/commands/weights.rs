//! `easel weights synth|inspect|fetch`: make, check and download VGG-19 weights files.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use easel_vgg::WeightsFile;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// torchvision's ImageNet VGG-19 in safetensors form, as published by timm.
pub const DEFAULT_URL: &str = "https://huggingface.co/timm/vgg19.tv_in1k/resolve/main/model.safetensors";

#[derive(Subcommand)]
pub enum WeightsCommand {
    /// Write synthetic VGG-19 weights: every convolution filled with deterministic splitmix64
    /// pseudo-random values (He-uniform scale), bit-identical on any machine; see README.
    ///
    /// They need no download and make tests reproducible, but paint textures, not styles:
    /// real results need ImageNet-trained weights (`easel weights fetch` or `convert`).
    Synth {
        /// Seed of the values: the same seed always gives the same file.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The safetensors file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// List a file's tensors and say whether it is a usable VGG-19.
    Inspect {
        /// The safetensors file to check.
        file: PathBuf,
    },
    /// Convert a PyTorch state dict (torchvision's vgg19-dcbb9e9d.pth) to safetensors.
    Convert {
        /// The .pth file (a zip archive written by torch.save).
        input: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Download pretrained VGG-19 weights (torchvision's, 548 MB) and check them.
    Fetch {
        /// Where to download from.
        #[arg(long, default_value = DEFAULT_URL)]
        url: String,
        /// Where to write (default: $XDG_DATA_HOME/easel/vgg19.safetensors).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Expected sha256 of the file (64 hex digits); the download is refused if it differs.
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// Seconds to wait for the connection to the server.
        #[arg(long, value_name = "SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
        connect_timeout: u64,
        /// Seconds the server may stay silent (before answering, or mid-download) before
        /// the download is given up; what arrived is kept and the next fetch resumes it.
        #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
    },
}

pub fn weights(cmd: WeightsCommand) -> Result<()> {
    match cmd {
        WeightsCommand::Synth { seed, out } => {
            easel_vgg::synth::write(seed, &out)?;
            eprintln!("wrote synthetic VGG-19 weights (seed {seed}) to {}", out.display());
            Ok(())
        }
        WeightsCommand::Inspect { file } => inspect(&file),
        WeightsCommand::Convert { input, out } => convert(&input, &out),
        WeightsCommand::Fetch { url, out, sha256, connect_timeout, timeout } => {
            let out = match out {
                Some(out) => out,
                None => super::default_weights_path().context("no home folder; pass --out FILE")?,
            };
            let timeouts = Timeouts {
                connect: Duration::from_secs(connect_timeout),
                read: Duration::from_secs(timeout),
            };
            fetch(&url, &out, sha256.as_deref(), timeouts)
        }
    }
}

fn inspect(file: &Path) -> Result<()> {
    let weights = WeightsFile::open(file)?;
    let report = weights.inspect();
    println!("{}", file.display());
    println!("  {:<28} {:<6} {:<18} {:>12}", "tensor", "dtype", "shape", "bytes");
    for t in &report.tensors {
        println!("  {:<28} {:<6} {:<18} {:>12}", t.name, t.dtype, format!("{:?}", t.shape), t.bytes);
    }
    let total: usize = report.tensors.iter().map(|t| t.bytes).sum();
    println!("  {} tensors, {total} bytes, sha256 {}", report.tensors.len(), weights.sha256()?);
    if report.problems.is_empty() {
        println!("usable VGG-19: yes (all 16 convolutions present with the expected shapes)");
        Ok(())
    } else {
        println!("usable VGG-19: no");
        for p in &report.problems {
            println!("  - {p}");
        }
        bail!("{}: not a usable VGG-19 ({} problem(s))", file.display(), report.problems.len())
    }
}

/// Keeps the `features.*` convolution tensors of a PyTorch state dict, as f32 safetensors.
fn convert(input: &Path, out: &Path) -> Result<()> {
    let tensors = candle_core::pickle::read_all(input)
        .with_context(|| format!("{}: not a PyTorch state dict (.pth zip archive)", input.display()))?;
    let mut kept = std::collections::HashMap::new();
    for (name, tensor) in tensors {
        if name.starts_with("features.") {
            kept.insert(name, tensor.to_dtype(candle_core::DType::F32)?);
        }
    }
    if kept.is_empty() {
        bail!("{}: no `features.N.weight` tensors; is this a torchvision VGG-19?", input.display());
    }
    let part = easel_core::temp_path_for(out);
    let result = candle_core::safetensors::save(&kept, &part).map_err(anyhow::Error::from).and_then(|()| {
        let report = WeightsFile::open(&part)?.inspect();
        if !report.problems.is_empty() {
            bail!("{}: not a usable VGG-19: {}", input.display(), report.problems.join("; "));
        }
        std::fs::rename(&part, out).with_context(|| format!("{}: cannot write", out.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result?;
    eprintln!("converted {} tensors from {} to {}", kept.len(), input.display(), out.display());
    Ok(())
}

/// How long a download may wait on the network.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For the TCP (and TLS) connection to be made.
    pub connect: Duration,
    /// For each read: the longest the server may stay silent, mid-header or mid-body.
    pub read: Duration,
}

/// The hint printed with a network failure: both other ways to weights work offline.
const OFFLINE_HINT: &str = "to do without the download, convert torchvision's vgg19-dcbb9e9d.pth with \
     `easel weights convert FILE.pth --out FILE`, or make test weights with `easel weights synth --out FILE`";

/// `--sha256` as 64 lower-case hex digits, checked before anything is created or downloaded.
fn parse_sha256(text: &str) -> Result<String> {
    let text = text.trim();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--sha256: expected 64 hex digits, got {text:?} ({} characters)", text.len());
    }
    Ok(text.to_ascii_lowercase())
}

/// Creates `dir` and its missing ancestors, returning those it made, deepest first, so that a
/// failure can take them away again.
fn create_folders(dir: &Path) -> Result<Vec<PathBuf>> {
    let missing: Vec<PathBuf> = dir.ancestors().take_while(|a| !a.exists()).map(Path::to_path_buf).collect();
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    Ok(missing)
}

/// The partial download beside `out`, kept after a network failure so the next fetch resumes.
fn part_path(out: &Path) -> PathBuf {
    out.with_file_name(format!(
        ".{}.part",
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ))
}

/// Downloads `url` to a `.part` file beside `out`, checks the hash and that it is a usable
/// VGG-19, and only then renames it into place.
///
/// A network failure keeps what arrived, and the next call asks for the rest (HTTP Range);
/// any other failure removes the partial file and the folders this call created.
pub fn fetch(url: &str, out: &Path, expected_sha256: Option<&str>, timeouts: Timeouts) -> Result<()> {
    let expected = expected_sha256.map(parse_sha256).transpose()?;
    let created = match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => create_folders(dir)?,
        None => Vec::new(),
    };
    let part = part_path(out);
    let agent =
        ureq::AgentBuilder::new().timeout_connect(timeouts.connect).timeout_read(timeouts.read).build();
    let result = download(&agent, url, &part, expected.as_deref()).and_then(|()| {
        let report = WeightsFile::open(&part).map_err(|e| Failure::Other(e.into()))?.inspect();
        if !report.problems.is_empty() {
            return Err(Failure::Other(anyhow!(
                "{url}: the download is not a usable VGG-19: {}",
                report.problems.join("; ")
            )));
        }
        std::fs::rename(&part, out)
            .with_context(|| format!("{}: cannot move download into place", out.display()))
            .map_err(Failure::Other)
    });
    let kept = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    match result {
        Ok(()) => {
            eprintln!("saved VGG-19 weights to {}", out.display());
            Ok(())
        }
        Err(Failure::Network(e)) if kept > 0 => Err(anyhow!(
            "{e:#}\n{kept} bytes are kept in {}: run the same command again to resume\nhint: {OFFLINE_HINT}",
            part.display()
        )),
        Err(failure) => {
            let _ = std::fs::remove_file(&part);
            for dir in &created {
                // Only empty folders go: remove_dir refuses the others.
                let _ = std::fs::remove_dir(dir);
            }
            match failure {
                Failure::Network(e) => Err(anyhow!("{e:#}\nhint: {OFFLINE_HINT}")),
                Failure::Other(e) => Err(e),
            }
        }
    }
}

/// Why a download stopped: the network (worth resuming) or anything else (start over).
enum Failure {
    Network(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

/// Requests `url`, from where `part` stops if it holds a previous attempt's bytes.
///
/// Returns the response and how many bytes of `part` it continues; 0 when the server sent
/// the whole file (it ignored the Range, or there was nothing to resume).
fn request(agent: &ureq::Agent, url: &str, part: &Path) -> Result<(ureq::Response, u64), Failure> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut req = agent.get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    match req.call() {
        Ok(r) if r.status() == 206 && have > 0 => {
            let start = r
                .header("Content-Range")
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if start != Some(have) {
                return Err(Failure::Other(anyhow!(
                    "{url}: asked to resume at byte {have}, the server answered Content-Range {:?}",
                    r.header("Content-Range").unwrap_or("(none)")
                )));
            }
            Ok((r, have))
        }
        Ok(r) => Ok((r, 0)),
        // The part is as long as the file, or longer than it now is: start again.
        Err(ureq::Error::Status(416, _)) if have > 0 => {
            std::fs::remove_file(part).with_context(|| format!("{}: cannot remove", part.display()))?;
            request(agent, url, part)
        }
        Err(ureq::Error::Status(code, r)) => {
            Err(Failure::Other(anyhow!("{url}: server answered {code} {}", r.status_text())))
        }
        // ureq's own message starts with the URL; name it once.
        Err(ureq::Error::Transport(t)) => {
            let mut message = t.kind().to_string();
            if let Some(m) = t.message() {
                message = format!("{message}: {m}");
            }
            if let Some(source) = std::error::Error::source(&t) {
                message = format!("{message}: {source}");
            }
            Err(Failure::Network(anyhow!("{url}: {message}")))
        }
    }
}

fn download(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    expected_sha256: Option<&str>,
) -> Result<(), Failure> {
    let (response, resumed_at) = request(agent, url, part)?;
    let length =
        response.header("Content-Length").and_then(|v| v.parse::<u64>().ok()).map(|l| l + resumed_at);
    let mut hasher = Sha256::new();
    let mut file = if resumed_at > 0 {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(part)
            .with_context(|| format!("{}: cannot open", part.display()))?;
        std::io::copy(&mut file, &mut hasher).with_context(|| format!("{}: cannot read", part.display()))?;
        eprintln!("resuming the download at byte {resumed_at}");
        file
    } else {
        std::fs::File::create(part).with_context(|| format!("{}: cannot create", part.display()))?
    };
    // A bar on a terminal only: redrawn lines would fill a log file.
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(length.unwrap_or(0));
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                .map_err(anyhow::Error::from)?,
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    bar.set_position(resumed_at);
    let mut reader = response.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut received = resumed_at;
    let outcome = loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => {
                break Err(Failure::Network(anyhow!(
                    "{url}: download interrupted after {received} bytes: {e}"
                )))
            }
        };
        hasher.update(&buf[..n]);
        if let Err(e) = file.write_all(&buf[..n]) {
            break Err(Failure::Other(anyhow!("{}: cannot write: {e}", part.display())));
        }
        received += n as u64;
        bar.set_position(received);
    };
    bar.finish_and_clear();
    // What arrived is kept for a resume, so it must reach the disk either way.
    file.sync_all().with_context(|| format!("{}: cannot write", part.display()))?;
    outcome?;
    if let Some(len) = length.filter(|&l| l != received) {
        // A server that closes early without an error: resumable like any other cut.
        return Err(Failure::Network(anyhow!("{url}: download ended after {received} of {len} bytes")));
    }
    let digest = format!("{:x}", hasher.finalize());
    if let Some(expected) = expected_sha256.filter(|e| *e != digest) {
        return Err(Failure::Other(anyhow!("{url}: sha256 is {digest}, expected {expected}")));
    }
    Ok(())
}
