//! Checkpoint and resume: a run stopped at any iteration, written to disk and resumed ends
//! with exactly the bits of a run that never stopped.

mod support;

use candle_core::Device;
use easel_config::ConfigLayers;
use easel_core::LayerId;
use easel_engine::{load_image, Checkpoint, RgbImage, StyleRun};
use easel_plugins::builtin;
use easel_vgg::Vgg19;
use support::{data, weights};

/// A small two-scale job (24 then 48 px) with the given optimiser table.
fn parts(optimizer: &str) -> (easel_config::Plan, Vgg19, RgbImage, Vec<(RgbImage, f64)>) {
    let text = format!("[run]\nsize = 48\nscales = 2\niterations = 6\ninit = \"noise\"\n{optimizer}");
    let plan = ConfigLayers::defaults().with_text("test", &text).unwrap().plan(&builtin()).unwrap();
    let limits = plan.limits;
    let content = load_image(&data("content.png"), &limits).unwrap();
    let style = load_image(&data("style.png"), &limits).unwrap();
    let vgg =
        Vgg19::load(weights(), LayerId::Relu5_1, plan.model.pooling, plan.model.preprocess, &Device::Cpu)
            .unwrap();
    (plan, vgg, content, vec![(style, 1.0)])
}

fn bits(run: &StyleRun) -> Vec<u32> {
    run.image().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn check_resume_is_exact(optimizer: &str, stop_after: &[u32]) {
    let (plan, vgg, content, styles) = parts(optimizer);
    let mut straight = StyleRun::new(plan, vgg, content, styles).unwrap();
    while straight.step().unwrap().is_some() {}
    let expected = bits(&straight);

    let dir = tempfile::tempdir().unwrap();
    for &k in stop_after {
        let path = dir.path().join(format!("k{k}.safetensors"));
        let (plan, vgg, content, styles) = parts(optimizer);
        let mut first = StyleRun::new(plan, vgg, content, styles).unwrap();
        for _ in 0..k {
            first.step().unwrap();
        }
        assert_eq!(first.iterations_done(), k);
        first.checkpoint().write(&path).unwrap();
        drop(first);

        let (plan, vgg, content, styles) = parts(optimizer);
        let checkpoint = Checkpoint::read(&path, &Device::Cpu).unwrap();
        let mut resumed = StyleRun::resume(plan, vgg, content, styles, checkpoint).unwrap();
        assert_eq!(resumed.iterations_done(), k);
        let mut last = None;
        while let Some(p) = resumed.step().unwrap() {
            last = Some(p.done);
        }
        assert_eq!(last, Some(12), "the iteration count continues to the planned total");
        assert!(
            bits(&resumed) == expected,
            "{optimizer}: resumed after {k} differs from an uninterrupted run"
        );
    }
}

#[test]
fn adam_resumes_bit_identically_within_and_between_scales() {
    check_resume_is_exact("[optimizer]\ntype = \"adam\"\nlr = 0.05", &[1, 4, 6, 9]);
}

#[test]
fn lbfgs_resumes_bit_identically_with_its_history() {
    check_resume_is_exact("[optimizer]\ntype = \"lbfgs\"\nhistory = 5", &[3, 8]);
}

#[test]
fn a_checkpoint_of_another_optimizer_is_refused() {
    let (plan, vgg, content, styles) = parts("[optimizer]\ntype = \"adam\"");
    let mut run = StyleRun::new(plan, vgg, content, styles).unwrap();
    run.step().unwrap();
    let checkpoint = run.checkpoint();
    let (plan, vgg, content, styles) = parts("[optimizer]\ntype = \"lbfgs\"");
    let err = StyleRun::resume(plan, vgg, content, styles, checkpoint).err().expect("refused");
    assert!(err.to_string().contains("adam"), "{err}");
}
