//! Validation of layered configurations: defaults, presets, and every kind of mistake.

use easel_config::{ConfigError, ConfigLayers, Init};
use easel_plugins::builtin;
use easel_vgg::{Pooling, Winograd};

fn errors_of(text: &str) -> Vec<String> {
    let layers = ConfigLayers::defaults().with_text("job.toml", text).expect("test TOML parses");
    match layers.plan(&builtin()) {
        Err(ConfigError::Invalid { errors, sources }) => {
            assert_eq!(sources, "defaults < job.toml");
            errors.iter().map(|e| e.to_string()).collect()
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => Vec::new(),
    }
}

#[test]
fn defaults_are_the_papers_setup() {
    let plan = ConfigLayers::defaults().plan(&builtin()).expect("defaults are valid");
    assert_eq!(plan.run.size, 512);
    assert_eq!(plan.run.init, Init::Content);
    assert_eq!(plan.optimizer.kind, "lbfgs");
    let kinds: Vec<&str> = plan.losses.iter().map(|l| l.kind).collect();
    assert_eq!(kinds, ["content", "gram", "tv"]);
    assert_eq!(plan.losses[0].loss.layers(), [easel_core::LayerId::Relu4_2]);
    assert_eq!(plan.losses[1].loss.layers().len(), 5);
    assert_eq!(plan.model.winograd, Winograd::Deep);
    assert_eq!(plan.model.kernel_cache_mb as usize, easel_vgg::DEFAULT_KERNEL_CACHE_BYTES >> 20);
}

#[test]
fn every_preset_in_configs_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/ exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let layers = ConfigLayers::defaults().with_file(&path).expect("preset parses");
            if let Err(e) = layers.plan(&builtin()) {
                panic!("{}: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "expected default.toml and presets, found {checked}");
}

#[test]
fn later_layers_override_earlier_ones() {
    let layers = ConfigLayers::defaults()
        .with_text(
            "daemon.toml",
            "[run]\nsize = 256\niterations = 10\n[model]\npooling = \"avg\"\nwinograd = \"all\"",
        )
        .and_then(|l| l.with_text("sidecar.toml", "[run]\nsize = 128"))
        .expect("parses");
    let plan = layers.plan(&builtin()).expect("valid");
    assert_eq!((plan.run.size, plan.run.iterations), (128, 10));
    assert_eq!(plan.model.pooling, Pooling::Avg);
    assert_eq!(plan.model.winograd, Winograd::All);
    assert_eq!(plan.run.scale_sizes(), [128]);
}

#[test]
fn reports_all_errors_at_once_with_key_paths() {
    let errors = errors_of(
        r#"
[run]
size = "big"
sizee = 3
iterations = 0

[model]
winograd = "sometimes"
kernel_cache_mb = -1

[optimizer]
type = "lbfgs"
history = 0

[[loss]]
type = "content"
weight = -3

[[loss]]
type = "gram"
layers = ["relu1_1", "relu6_1"]

[[loss]]
type = "sparkle"
amount = 3
"#,
    );
    assert_eq!(errors.len(), 9, "{errors:#?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("model.winograd:") && e.contains("gradients") && e.contains("deep")),
        "{errors:#?}"
    );
    assert!(errors.contains(&"run.size: expected an integer, got string \"big\"".to_string()), "{errors:#?}");
    let sizee = "run.sizee: unknown key; did you mean `size`? known keys: init, iterations, \
                 preserve_colors, save_every, scales, seed, size, style_scale";
    assert!(errors.contains(&sizee.to_string()), "{errors:#?}");
    assert!(errors.contains(&"run.iterations: must be in [1, 1000000], got 0".to_string()));
    assert!(errors.iter().any(|e| e.starts_with("model.kernel_cache_mb: must be in [0, ")), "{errors:#?}");
    assert!(errors.iter().any(|e| e.starts_with("optimizer.history:")), "{errors:#?}");
    assert!(errors.contains(&"loss[0].weight: must be > 0, got -3".to_string()));
    assert!(errors.iter().any(|e| e.starts_with("loss[1].layers[1]: unknown layer `relu6_1`")));
    assert!(
        errors.contains(&"loss[2].type: unknown loss \"sparkle\"; available: content, gram, tv".to_string())
    );
}

#[test]
fn unknown_optimizer_and_sections_are_named() {
    let errors = errors_of("[optimizer]\ntype = \"sgdx\"\n[extra]\na = 1\n[[style]]\nweight = 2");
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors
        .iter()
        .any(|e| e.starts_with("optimizer.type: unknown optimizer \"sgdx\"; available: adam, gd, lbfgs")));
    assert!(errors.iter().any(|e| e.starts_with("extra: unknown key")));
    assert!(errors.contains(&"style[0].path: missing: the style image's file".to_string()));
}

#[test]
fn an_unknown_plugin_option_lists_the_plugins_options() {
    assert_eq!(
        errors_of("[optimizer]\ntype = \"adam\"\nlrr = 0.1"),
        ["optimizer.lrr: unknown key; did you mean `lr`? known keys: beta1, beta2, eps, lr, type"]
    );
    assert_eq!(
        errors_of("[[loss]]\ntype = \"gram\"\nlayerz = [\"relu1_1\"]"),
        ["loss[0].layerz: unknown key; did you mean `layers`? known keys: layer_weights, layers, type, weight"]
    );
    // No option is close: the list alone.
    assert_eq!(
        errors_of("[[loss]]\ntype = \"tv\"\nstrength = 2"),
        ["loss[0].strength: unknown key; known keys: type, weight"]
    );
}

#[test]
fn a_typo_in_any_table_gets_a_suggestion() {
    let errors = errors_of("[model]\npoolng = \"avg\"\n[output]\njpeg_qualty = 80\n[rum]\nsize = 64");
    assert_eq!(
        errors,
        [
            "model.poolng: unknown key; did you mean `pooling`? known keys: backend, device, kernel_cache_mb, pooling, \
             preprocess, tile_size, weights, winograd",
            "output.jpeg_qualty: unknown key; did you mean `jpeg_quality`? known keys: format, jpeg_quality",
            "rum: unknown key; did you mean `run`? known keys: daemon, limits, loss, model, optimizer, output, \
             run, style",
        ]
    );
}

#[test]
fn syntax_errors_name_the_source() {
    let err = ConfigLayers::defaults().with_text("broken.toml", "[run\nsize = 3").unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("broken.toml: invalid TOML"), "{text}");
}

#[test]
fn changing_a_plugin_type_replaces_its_table() {
    let layers = ConfigLayers::defaults()
        .with_text("job.toml", "[optimizer]\ntype = \"adam\"\nlr = 0.1")
        .expect("parses");
    let plan = layers.plan(&builtin()).expect("lbfgs's `history` must not leak into adam");
    assert_eq!(plan.optimizer.kind, "adam");
}

#[test]
fn the_daemon_section_has_defaults_and_is_validated() {
    let plan = ConfigLayers::defaults().plan(&builtin()).expect("defaults are valid");
    assert_eq!(plan.daemon, easel_config::DaemonSettings::default());
    let layers = ConfigLayers::defaults()
        .with_text("daemon.toml", "[daemon]\nsettle_ms = 500\nworkers = 2\nkeep_originals = false")
        .unwrap();
    let plan = layers.plan(&builtin()).unwrap();
    assert_eq!((plan.daemon.settle_ms, plan.daemon.workers, plan.daemon.keep_originals), (500, 2, false));
    let errors = errors_of("[daemon]\nworkers = 0\nsettle = 5");
    assert!(errors.iter().any(|e| e.starts_with("daemon.workers:")), "{errors:?}");
    assert!(errors.iter().any(|e| e.starts_with("daemon.settle:")), "{errors:?}");
}

#[test]
fn the_device_defaults_to_auto_and_parses_every_form() {
    use easel_config::DeviceChoice;
    let plan = ConfigLayers::defaults().plan(&builtin()).expect("defaults are valid");
    assert_eq!(plan.model.device, DeviceChoice::Auto);
    for (text, choice) in [
        ("auto", DeviceChoice::Auto),
        ("cpu", DeviceChoice::Cpu),
        ("cuda", DeviceChoice::Cuda(0)),
        ("cuda:1", DeviceChoice::Cuda(1)),
        ("metal", DeviceChoice::Metal(0)),
        ("metal:2", DeviceChoice::Metal(2)),
    ] {
        let layers = ConfigLayers::defaults()
            .with_text("job.toml", &format!("[model]\ndevice = \"{text}\""))
            .expect("parses");
        let device = layers.plan(&builtin()).expect("valid").model.device;
        assert_eq!(device, choice, "{text}");
        // Messages name the device as the user wrote it.
        assert_eq!(device.to_string(), text);
    }
    assert_eq!(
        errors_of("[model]\ndevice = \"gpu\""),
        ["model.device: unknown device \"gpu\"; expected auto, cpu, cuda, cuda:N, metal or metal:N"]
    );
}

#[test]
fn a_tile_size_off_the_64_px_grid_is_refused_with_the_neighbours() {
    assert_eq!(
        errors_of("[model]\ntile_size = 100"),
        ["model.tile_size: must be 0 (as the memory planner decides) or a multiple of 64, such as 64 or 128"]
    );
    assert_eq!(
        errors_of("[model]\ntile_size = 30"),
        ["model.tile_size: must be 0 (as the memory planner decides) or a multiple of 64, such as 64"]
    );
    assert!(errors_of("[model]\ntile_size = 512").is_empty());
}
