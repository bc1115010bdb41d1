//! GFLOP/s of the 3x3 convolutions of VGG-19 (to relu5_1) at one image size: forward and
//! input gradient, easel's CPU kernels against candle's `conv2d`.
//!
//! `cargo bench -p easel-vgg --bench conv [-- --size 256 --reps 5 --no-candle]`; the
//! thread count is rayon's (`RAYON_NUM_THREADS`, default all cores). The image is
//! `size x (3/4 size)`, as the test pictures are at `--size`.

use std::time::Instant;

#[path = "measure/mod.rs"]
mod measure;
use measure::cpu_seconds;

use candle_core::{Device, Tensor};

use easel_testkit::Rng;
use easel_vgg::conv_bench::{self, Pass};

/// (name, c_in, c_out, downsampling) of every conv up to conv5_1.
const LAYERS: &[(&str, usize, usize, usize)] = &[
    ("conv1_1", 3, 64, 1),
    ("conv1_2", 64, 64, 1),
    ("conv2_1", 64, 128, 2),
    ("conv2_2", 128, 128, 2),
    ("conv3_1", 128, 256, 4),
    ("conv3_2", 256, 256, 4),
    ("conv4_1", 256, 512, 8),
    ("conv4_2", 512, 512, 8),
    ("conv5_1", 512, 512, 16),
];

/// How many times each layer shape runs in one forward pass to relu5_1.
fn repeats(name: &str) -> usize {
    match name {
        "conv3_2" | "conv4_2" => 3,
        _ => 1,
    }
}

/// Median wall seconds of `reps` runs of `f` after one warm-up run, and the mean CPU
/// seconds per run (to see through a busy machine: work / CPU time is what the code does).
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let cpu0 = cpu_seconds();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    let cpu = (cpu_seconds() - cpu0) / reps as f64;
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], cpu)
}

/// One thread's GFLOP/s of `gemm` alone on the products the convolutions hand it, in the
/// layouts that matter (row-major `c_out x pixels` output, kernel `c_out x 9 c_in`, im2col
/// `9 c_in x pixels`; and the same with the pixels as rows): the ceiling for the kernels.
fn gemm_ceiling(reps: usize) -> candle_core::Result<()> {
    println!("gemm alone, 1 thread, GFLOP/s (per CPU-second)");
    for &(m, n, k) in &[
        (64, 1024, 576),
        (64, 4096, 576),
        (128, 1024, 1152),
        (256, 1024, 2304),
        (512, 384, 4608),
        (512, 768, 4608),
        (3, 1024, 576),
    ] {
        let lhs = Rng::new(1).uniform_vec(m * k);
        let rhs = Rng::new(2).uniform_vec(k * n);
        let mut dst = vec![0f32; m * n];
        let gflop = 2.0 * (m * n * k) as f64 / 1e9;
        let mut run =
            |dst_cs: isize, dst_rs: isize, lhs_cs: isize, lhs_rs: isize, rhs_cs: isize, rhs_rs: isize| {
                let (_, cpu) = time(reps.max(20), || {
                    // SAFETY: every stride pattern below addresses exactly the m*k, k*n and m*n
                    // elements of the buffers above, on this thread only.
                    unsafe {
                        gemm::gemm(
                            m,
                            n,
                            k,
                            dst.as_mut_ptr(),
                            dst_cs,
                            dst_rs,
                            false,
                            lhs.as_ptr(),
                            lhs_cs,
                            lhs_rs,
                            rhs.as_ptr(),
                            rhs_cs,
                            rhs_rs,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        )
                    }
                });
                gflop / cpu.max(1e-9)
            };
        let (mm, nn, kk) = (m as isize, n as isize, k as isize);
        // dst[m,n] row-major = lhs[m,k] row-major * rhs[k,n] row-major
        let a = run(1, nn, 1, kk, 1, nn);
        // dst^T stored [n,m] row-major (pixels as rows), rhs^T [n,k] row-major (NHWC im2col)
        let b = run(mm, 1, 1, kk, kk, 1);
        // dst^T [n,m] row-major; rhs [k,n] row-major (CHW im2col)
        let c = run(mm, 1, 1, kk, 1, nn);
        println!("m={m:<4} n={n:<5} k={k:<5}  rowmajor {a:6.0}  nhwc {b:6.0}  nhwc-out/chw-col {c:6.0}");
    }
    Ok(())
}

fn main() -> candle_core::Result<()> {
    // As the easel binary does: outputs reuse freed blocks instead of faulting in new pages.
    easel_vgg::alloc::reuse_large_blocks();
    let mut size = 256usize;
    let mut reps = 5usize;
    let mut candle = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => size = args.next().and_then(|v| v.parse().ok()).unwrap_or(size),
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(reps),
            "--no-candle" => candle = false,
            "--gemm" => return gemm_ceiling(reps),
            _ => {} // cargo bench passes --bench
        }
    }
    let (h0, w0) = (size * 3 / 4, size);
    println!("VGG-19 3x3 convs at {w0}x{h0}, {} threads, median of {reps}", rayon::current_num_threads());
    println!("GFLOP/s as `wall/per-CPU-second`: the second is what one core does, whatever else runs;");
    println!(
        "Winograd's are direct-convolution FLOPs over its time (F(4x4) does 1/4 of the multiplications,"
    );
    println!("F(2x2) 4/9; each layer takes the tiles `easel` would give it)");
    println!(
        "{:<8} {:>5} {:>5} {:>7} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9}",
        "layer", "c_in", "c_out", "pixels", "fwd", "fwd wino", "fwd cndl", "grad", "grad wino", "grad cndl"
    );
    // Seconds of one pass over all 13 convs: forward and gradient, direct / Winograd / candle.
    let mut totals = [[0f64; 3]; 2];
    for &(name, c_in, c_out, down) in LAYERS {
        let (h, w) = (h0 / down, w0 / down);
        let (fwd, grad) = ((c_in, c_out, h, w), (c_out, c_in, h, w));
        let x = Rng::new(1).uniform_vec(c_in * h * w);
        let g = Rng::new(2).uniform_vec(c_out * h * w);
        let k = Rng::new(3).uniform_vec(c_out * c_in * 9);
        let b = Rng::new(4).uniform_vec(c_out);
        let gflop = 18.0 * (c_in * c_out * h * w) as f64 / 1e9;
        let rate = |(wall, cpu): (f64, f64)| format!("{:.0}/{:.0}", gflop / wall, gflop / cpu.max(1e-9));
        let n = repeats(name) as f64;
        let forward = Pass::Forward { bias: &b };
        let fd = time(reps, || drop(conv_bench::direct(fwd, &x, &k, forward)));
        let gd = time(reps, || drop(conv_bench::direct(grad, &g, &k, Pass::InputGradient)));
        // Whether Winograd suits a shape is known before timing: one run says.
        let fw = conv_bench::winograd(fwd, &x, &k, forward)
            .map(|_| time(reps, || drop(conv_bench::winograd(fwd, &x, &k, forward))));
        let gw = conv_bench::winograd(grad, &g, &k, Pass::InputGradient)
            .map(|_| time(reps, || drop(conv_bench::winograd(grad, &g, &k, Pass::InputGradient))));
        if fw.is_none() {
            totals[0][1] += fd.0 * n;
        }
        if gw.is_none() {
            totals[1][1] += gd.0 * n;
        }
        let mut cell = |pass: usize, path: usize, t: Option<(f64, f64)>| match t {
            Some(t) => {
                totals[pass][path] += t.0 * n;
                rate(t)
            }
            None => "-".to_string(),
        };
        let (fe, ge) = (cell(0, 0, Some(fd)), cell(1, 0, Some(gd)));
        let (fw, gw) = (cell(0, 1, fw), cell(1, 1, gw));
        let (fc, gc) = if candle {
            let dev = Device::Cpu;
            let xt = Tensor::from_slice(&x, (1, c_in, h, w), &dev)?;
            let gt = Tensor::from_slice(&g, (1, c_out, h, w), &dev)?;
            let kt = Tensor::from_slice(&k, (c_out, c_in, 3, 3), &dev)?;
            let kf = Tensor::from_slice(&k, (c_in, c_out, 3, 3), &dev)?;
            let bt = Tensor::from_slice(&b, (1, c_out, 1, 1), &dev)?;
            let fc = time(reps, || drop(xt.conv2d(&kt, 1, 1, 1, 1).and_then(|y| y.broadcast_add(&bt))));
            let gc = time(reps, || drop(gt.conv2d(&kf, 1, 1, 1, 1)));
            (cell(0, 2, Some(fc)), cell(1, 2, Some(gc)))
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{name:<8} {c_in:>5} {c_out:>5} {:>7} | {fe:>9} {fw:>9} {fc:>9} | {ge:>9} {gw:>9} {gc:>9}",
            h * w
        );
    }
    println!("seconds for all 13 convs to relu5_1 (Winograd's column counts the direct path where it does not apply):");
    for (pass, name) in [(0, "forward"), (1, "gradient")] {
        let [direct, wino, candle_s] = totals[pass];
        println!("  {name:<8} direct {direct:.3}  winograd {wino:.3}  candle {candle_s:.3}");
    }
    Ok(())
}
