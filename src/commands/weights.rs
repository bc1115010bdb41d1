//! `easel weights synth|inspect|fetch`: make, check and download VGG-19 weights files.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use easel_vgg::WeightsFile;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// torchvision's ImageNet VGG-19 in safetensors form, as published by timm.
pub const DEFAULT_URL: &str = "https://huggingface.co/timm/vgg19.tv_in1k/resolve/main/model.safetensors";

#[derive(Subcommand)]
pub enum WeightsCommand {
    /// Write the deterministic synthetic weights of DESIGN.md (for tests; texture-like results).
    Synth {
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// List a file's tensors and say whether it is a usable VGG-19.
    Inspect { file: PathBuf },
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
        /// Expected sha256 of the file; the download is refused if it differs.
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
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
        WeightsCommand::Fetch { url, out, sha256 } => {
            let out = match out {
                Some(out) => out,
                None => super::default_weights_path().context("no home folder; pass --out FILE")?,
            };
            fetch(&url, &out, sha256.as_deref())
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

/// Downloads `url` to a temp name beside `out`, checks the hash and that it is a usable
/// VGG-19, and only then renames it into place.
pub fn fetch(url: &str, out: &Path, expected_sha256: Option<&str>) -> Result<()> {
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    }
    let part = out.with_file_name(format!(
        ".{}.part",
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    let result = download(url, &part, expected_sha256).and_then(|()| {
        let report = WeightsFile::open(&part)?.inspect();
        if !report.problems.is_empty() {
            bail!("{url}: the download is not a usable VGG-19: {}", report.problems.join("; "));
        }
        std::fs::rename(&part, out)
            .with_context(|| format!("{}: cannot move download into place", out.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result?;
    eprintln!("saved VGG-19 weights to {}", out.display());
    Ok(())
}

fn download(url: &str, part: &Path, expected_sha256: Option<&str>) -> Result<()> {
    let response = match ureq::get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => bail!("{url}: server answered {code} {}", r.status_text()),
        Err(e) => bail!("{url}: {e}"),
    };
    let length = response.header("Content-Length").and_then(|v| v.parse::<u64>().ok());
    let bar = ProgressBar::new(length.unwrap_or(0));
    bar.set_style(ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")?);
    let mut reader = response.into_reader();
    let mut file =
        std::fs::File::create(part).with_context(|| format!("{}: cannot create", part.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut received = 0u64;
    loop {
        let n = reader.read(&mut buf).with_context(|| format!("{url}: download interrupted"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).with_context(|| format!("{}: cannot write", part.display()))?;
        received += n as u64;
        bar.set_position(received);
    }
    file.sync_all()?;
    bar.finish_and_clear();
    if let Some(len) = length.filter(|&l| l != received) {
        bail!("{url}: download ended after {received} of {len} bytes");
    }
    let digest = format!("{:x}", hasher.finalize());
    if let Some(expected) = expected_sha256.filter(|e| !e.eq_ignore_ascii_case(&digest)) {
        bail!("{url}: sha256 is {digest}, expected {expected}");
    }
    Ok(())
}
