//! Seconds of the VGG-19 feature stack as a style-transfer evaluation uses it: the traced
//! forward pass to relu5_1 (taps relu1_1 relu2_1 relu3_1 relu4_1 relu4_2 relu5_1) and the
//! input gradient back from those taps, with synthetic weights (seed 0).
//!
//! `cargo bench -p easel-vgg --bench vgg [-- --size 512 --reps 5 --pooling avg]`; the image
//! is `size x (3/4 size)`. Threads: rayon's (`RAYON_NUM_THREADS`, default all cores).

use std::time::Instant;

#[path = "measure/mod.rs"]
mod measure;
use measure::cpu_seconds;

use candle_core::{Device, Tensor};
use easel_core::LayerId;
use easel_vgg::{synth, Pooling, Preprocess, Vgg19, WeightsFile};

const TAPS: [LayerId; 6] = [
    LayerId::Relu1_1,
    LayerId::Relu2_1,
    LayerId::Relu3_1,
    LayerId::Relu4_1,
    LayerId::Relu4_2,
    LayerId::Relu5_1,
];

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok());
    kb.unwrap_or(0.0) / 1024.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As the easel binary does: outputs reuse freed blocks instead of faulting in new pages.
    easel_vgg::alloc::reuse_large_blocks();
    let (mut size, mut reps, mut pooling) = (256usize, 5usize, Pooling::Max);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => size = args.next().and_then(|v| v.parse().ok()).unwrap_or(size),
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(reps),
            "--pooling" if args.next().as_deref() == Some("avg") => pooling = Pooling::Avg,
            _ => {} // cargo bench passes --bench
        }
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("synth0.safetensors");
    synth::write(0, &path)?;
    let weights = WeightsFile::open(&path)?;
    let device = Device::Cpu;
    let vgg = Vgg19::load(&weights, LayerId::Relu5_1, pooling, Preprocess::Torchvision, &device)?;
    let (h, w) = (size * 3 / 4, size);
    let pixels = Tensor::rand(0f32, 1f32, (1, 3, h, w), &device)?;
    let rss_loaded = peak_rss_mb();
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let mut cpu = 0.0;
    for rep in 0..=reps {
        if rep == 1 {
            cpu = cpu_seconds();
        }
        let start = Instant::now();
        let (features, trace) = vgg.forward_traced(&pixels, &TAPS)?;
        fwd.push(start.elapsed().as_secs_f64());
        let grads = TAPS
            .iter()
            .map(|&l| Ok((l, features.get(l)?.ones_like()?)))
            .collect::<Result<Vec<_>, easel_core::CoreError>>()?;
        let start = Instant::now();
        let g = vgg.backward(&trace, &grads)?;
        bwd.push(start.elapsed().as_secs_f64());
        drop(g);
    }
    let cpu = (cpu_seconds() - cpu) / reps as f64;
    let (f, b) = (median(fwd[1..].to_vec()), median(bwd[1..].to_vec()));
    println!(
        "{w}x{h} {pooling:?} pooling, {} threads: forward {f:.3} s, backward {b:.3} s, total {:.3} s, CPU {cpu:.3} s; \
         peak RSS {:.0} MB ({rss_loaded:.0} MB after load)",
        rayon::current_num_threads(),
        f + b,
        peak_rss_mb()
    );
    Ok(())
}
