//! easel against the golden values of an independent float64 PyTorch implementation
//! (tests/data/golden.json, see tests/data/README.md): three cases of pooling and
//! pre-processing, synthetic weights seed 0, the 128x96 test images; each case on both
//! backends (easel's CPU kernels, and candle's ops as CUDA and Metal run them).
//!
//! `EASEL_TEST_DEVICE` (`cpu` by default; `cuda`, `cuda:N`, `metal`, `metal:N`) says where the
//! model and its tensors live: on a GPU only the generic backend runs (easel's kernels are the
//! CPU's), and a device this build lacks fails every test with one line saying so.

mod support;

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use easel_config::ConfigLayers;
use easel_core::{LayerId, Objective};
use easel_engine::image_io::to_tensor;
use easel_engine::{load_image, StyleRun};
use easel_plugins::builtin;
use easel_testkit::test_device;
use easel_vgg::{Backend, Pooling, Preprocess, Vgg19};
use serde_json::Value;
use support::{data, weights};

/// Relative tolerances from the golden set's README, the same on every device. (Whether a GPU
/// meets them, with its own order of summation and its fused multiply-adds, is for a run on one
/// to show: they are not loosened ahead of that.)
const STAT_TOL: f64 = 1e-4;
const ENTRY_TOL: f64 = 1e-3;

fn golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let text = std::fs::read_to_string(data("golden.json")).expect("golden.json is readable");
        serde_json::from_str(&text).expect("golden.json parses")
    })
}

fn assert_close(what: &str, got: f64, expected: f64, tol: f64) {
    let err = (got - expected).abs() / expected.abs().max(1e-30);
    assert!(err <= tol, "{what}: got {got}, expected {expected} (relative error {err:.2e} > {tol:.0e})");
}

fn f(v: &Value) -> f64 {
    v.as_f64().expect("golden value is a number")
}

struct Case {
    golden: &'static Value,
    pooling: Pooling,
    preprocess: Preprocess,
    backend: Backend,
    name: String,
}

impl Case {
    /// The model of this case up to `depth`, on its backend.
    fn model(&self, depth: LayerId) -> Vgg19 {
        Vgg19::load(weights(), depth, self.pooling, self.preprocess, &test_device())
            .and_then(|vgg| vgg.with_backend(self.backend))
            .expect("loads")
    }
}

/// Every golden case on every backend the device has.
fn cases() -> Vec<Case> {
    let cases = golden()["cases"].as_array().expect("cases");
    let device = test_device();
    let backends: &[Backend] =
        if device.is_cpu() { &[Backend::Cpu, Backend::Generic] } else { &[Backend::Generic] };
    let on = easel_engine::device_name(&device);
    let mut all = Vec::new();
    for &backend in backends {
        for c in cases {
            let pool = c["pool"].as_str().expect("pool");
            let pre = c["preprocess"].as_str().expect("preprocess");
            all.push(Case {
                golden: c,
                pooling: if pool == "max" { Pooling::Max } else { Pooling::Avg },
                preprocess: if pre == "caffe" { Preprocess::Caffe } else { Preprocess::Torchvision },
                backend,
                name: format!("{pool}/{pre} on {backend:?} ({on})"),
            });
        }
    }
    all
}

fn limits() -> easel_config::Limits {
    easel_config::Limits { max_pixels: 1 << 24, max_bytes: 1 << 24, memory_mb: 0 }
}

/// A run on the golden images with the case's settings and loss weights; `optimizer` is a
/// TOML `[optimizer]` body.
fn run_for(case: &Case, optimizer: &str) -> StyleRun {
    let w = &case.golden["weights"];
    let pool = if case.pooling == Pooling::Max { "max" } else { "avg" };
    let pre = if case.preprocess == Preprocess::Caffe { "caffe" } else { "torchvision" };
    let text = format!(
        r#"
[run]
size = 128
iterations = 10
[model]
pooling = "{pool}"
preprocess = "{pre}"
[optimizer]
{optimizer}
[[loss]]
type = "content"
weight = {}
layers = ["relu4_2"]
[[loss]]
type = "gram"
weight = {}
[[loss]]
type = "tv"
weight = {}
"#,
        f(&w["content"]),
        f(&w["gram"]),
        f(&w["tv"])
    );
    let plan = ConfigLayers::defaults()
        .with_text("golden.toml", &text)
        .expect("parses")
        .plan(&builtin())
        .expect("valid plan");
    let vgg = case.model(LayerId::Relu5_1);
    let content = load_image(&data("content.png"), &limits()).expect("content.png");
    let style = load_image(&data("style.png"), &limits()).expect("style.png");
    StyleRun::new(plan, vgg, content, vec![(style, 1.0)]).expect("run prepares")
}

fn x0() -> Tensor {
    let content =
        to_tensor(&load_image(&data("content.png"), &limits()).expect("content"), &test_device()).expect("t");
    let style =
        to_tensor(&load_image(&data("style.png"), &limits()).expect("style"), &test_device()).expect("t");
    ((content + style).expect("add") * 0.5).expect("scale")
}

#[test]
fn content_feature_statistics() {
    for case in cases() {
        let vgg = case.model(LayerId::Pool5);
        let content =
            to_tensor(&load_image(&data("content.png"), &limits()).expect("content"), &test_device())
                .expect("t");
        let stats = case.golden["content_features"].as_object().expect("content_features");
        let layers: Vec<LayerId> = stats.keys().map(|k| k.parse().expect("layer name")).collect();
        let features = vgg.forward(&content, &layers).expect("forward");
        for (name, expected) in stats {
            let t = features.get(name.parse().expect("layer")).expect("tap");
            let shape: Vec<usize> = expected["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            assert_eq!(t.dims(), shape.as_slice(), "{} {name} shape", case.name);
            // The statistics of the device's features, taken in f64 on the CPU (Metal has no f64).
            let t64 = t.to_device(&Device::Cpu).expect("to the CPU").to_dtype(DType::F64).expect("f64");
            let mean = t64.mean_all().expect("mean").to_scalar::<f64>().expect("scalar");
            let l2 =
                t64.sqr().expect("sqr").sum_all().expect("sum").to_scalar::<f64>().expect("scalar").sqrt();
            assert_close(&format!("{} {name} mean", case.name), mean, f(&expected["mean"]), STAT_TOL);
            assert_close(&format!("{} {name} l2", case.name), l2, f(&expected["l2"]), STAT_TOL);
        }
    }
}

#[test]
fn each_loss_and_its_gradient_at_x0() {
    for case in cases() {
        let run = run_for(&case, "type = \"adam\"");
        let reports = run.objective().report(&x0()).expect("report");
        let at = &case.golden["at_x0"];
        for r in &reports {
            assert_close(
                &format!("{} {} value", case.name, r.kind),
                r.value,
                f(&at[r.kind]["value"]),
                STAT_TOL,
            );
            assert_close(
                &format!("{} {} grad_l2", case.name, r.kind),
                r.grad_l2,
                f(&at[r.kind]["grad_l2"]),
                STAT_TOL,
            );
        }
        assert_eq!(reports.len(), 3);
    }
}

#[test]
fn gram_per_layer_terms_at_x0() {
    for case in cases() {
        let vgg = case.model(LayerId::Relu5_1);
        let style =
            to_tensor(&load_image(&data("style.png"), &limits()).expect("style"), &test_device()).expect("t");
        let layers =
            [LayerId::Relu1_1, LayerId::Relu2_1, LayerId::Relu3_1, LayerId::Relu4_1, LayerId::Relu5_1];
        let mut gram = easel_loss_gram::GramLoss::new(layers.to_vec(), vec![0.2; 5]);
        let styles = [easel_core::StyleReference {
            features: vgg.forward(&style, &layers).expect("fwd"),
            weight: 1.0,
        }];
        let empty = easel_core::FeatureMaps::new();
        easel_core::Loss::prepare(&mut gram, &easel_core::References { content: &empty, styles: &styles })
            .expect("prep");
        let features = vgg.forward(&x0(), &layers).expect("forward");
        for (layer, e) in gram.per_layer(&features).expect("per layer") {
            let expected = f(&case.golden["at_x0"]["gram"]["per_layer"][layer.name()]);
            let got = e.to_device(&Device::Cpu).expect("to the CPU").to_dtype(DType::F64).expect("f64");
            let got = got.to_scalar::<f64>().expect("scalar");
            assert_close(&format!("{} gram E_{layer}", case.name), got, expected, STAT_TOL);
        }
    }
}

#[test]
fn weighted_total_and_gradient_entries_at_x0() {
    for case in cases() {
        let run = run_for(&case, "type = \"adam\"");
        let (value, grad) = run.objective().total(&x0()).expect("total");
        let expected = &case.golden["total_at_x0"];
        assert_close(&format!("{} total", case.name), value, f(&expected["value"]), STAT_TOL);
        let norm = easel_engine::l2_norm(&grad).expect("norm");
        assert_close(&format!("{} total grad_l2", case.name), norm, f(&expected["grad_l2"]), STAT_TOL);
        for (key, want) in expected["grad_samples"].as_object().expect("samples") {
            let idx: Vec<usize> = key.split(',').map(|i| i.parse().expect("index")).collect();
            let got = grad
                .get(0)
                .and_then(|g| g.get(idx[0]))
                .and_then(|g| g.get(idx[1]))
                .and_then(|g| g.get(idx[2]));
            let got = got.expect("entry").to_scalar::<f32>().expect("scalar") as f64;
            assert_close(&format!("{} grad[{key}]", case.name), got, f(want), ENTRY_TOL);
        }
    }
}

#[test]
fn adam_trajectory() {
    for case in cases() {
        let mut run = run_for(&case, "type = \"adam\"\nlr = 0.01");
        run.set_image(x0()).expect("x0 fits");
        let expected = case.golden["adam_lr0.01"].as_array().expect("trajectory");
        for (i, want) in expected.iter().enumerate().take(10) {
            let progress = run.step().expect("step").expect("not finished");
            assert_close(
                &format!("{} adam loss before step {i}", case.name),
                progress.loss,
                f(want),
                ENTRY_TOL,
            );
        }
        let (last, _) = run.objective().total(run.image()).expect("total");
        assert_close(&format!("{} adam loss after 10 steps", case.name), last, f(&expected[10]), ENTRY_TOL);
    }
}

#[test]
fn lbfgs_with_strong_wolfe_in_20_evaluations() {
    for case in cases() {
        let run = run_for(&case, "type = \"lbfgs\"\nhistory = 20\nline_search = \"strong_wolfe\"");
        let start = f(&case.golden["lbfgs_20_evals"]["start"]);
        let end = f(&case.golden["lbfgs_20_evals"]["end"]);
        let factory = easel_optim_lbfgs::LbfgsFactory;
        let table: easel_core::toml::Table =
            "history = 20\nline_search = \"strong_wolfe\"".parse().expect("toml");
        let mut options = easel_core::Options::new(&table, "optimizer");
        let mut lbfgs = easel_core::OptimizerFactory::build(&factory, &mut options);
        assert!(options.finish().is_empty());
        // Count evaluations exactly: a budgeted objective refuses the 21st.
        struct Budget<'a, O: Objective>(&'a mut O, usize);
        impl<O: Objective> Objective for Budget<'_, O> {
            fn evaluate(&mut self, x: &Tensor) -> Result<(f64, Tensor), easel_core::CoreError> {
                if self.1 == 0 {
                    return Err(easel_core::CoreError::Objective("evaluation budget spent".into()));
                }
                self.1 -= 1;
                self.0.evaluate(x)
            }
        }
        let mut objective = run.objective();
        let mut x = x0();
        let mut budget = Budget(&mut objective, 20);
        let mut first = None;
        while budget.1 > 0 {
            match lbfgs.step(&mut x, &mut budget) {
                Ok(step) => {
                    first.get_or_insert(step.loss);
                    if step.converged {
                        break;
                    }
                }
                Err(easel_core::CoreError::Objective(_)) => break,
                Err(e) => panic!("{}: {e}", case.name),
            }
        }
        assert_close(&format!("{} lbfgs start", case.name), first.expect("one step"), start, STAT_TOL);
        let (reached, _) = objective.total(&x).expect("total");
        assert!(
            reached <= 1.25 * end,
            "{}: L-BFGS reached {reached} in 20 evaluations, golden {end}",
            case.name
        );
    }
}
