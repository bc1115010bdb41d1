//! End-to-end tests of the `easel` binary: real runs on the test images with synthetic
//! weights, the JSON commands, weights tools, and every kind of bad input.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The command that starts the `easel` under test: the binary itself, or through the
/// runner in `EASEL_TEST_RUNNER` (words split at spaces: `qemu-aarch64 -L
/// /usr/aarch64-linux-gnu` when CI runs an aarch64 build on an x86-64 machine).
fn easel_bin() -> Command {
    let words = runner();
    let Some((program, args)) = words.split_first() else {
        return Command::new(env!("CARGO_BIN_EXE_easel"));
    };
    let mut cmd = Command::new(program);
    cmd.args(args).arg(env!("CARGO_BIN_EXE_easel"));
    cmd
}

/// `EASEL_TEST_RUNNER`'s words, none when it is unset or blank.
fn runner() -> Vec<String> {
    std::env::var("EASEL_TEST_RUNNER").unwrap_or_default().split_whitespace().map(str::to_owned).collect()
}

fn easel() -> Command {
    let mut cmd = easel_bin();
    // Keep the user's environment from choosing weights for these tests.
    cmd.env_remove("EASEL_WEIGHTS").env("XDG_DATA_HOME", scratch().join("no-data-home"));
    cmd
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// A folder shared by this test binary, holding one synthetic weights file.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir")).path()
}

fn synth_weights() -> &'static Path {
    static WEIGHTS: OnceLock<PathBuf> = OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let path = scratch().join("synth0.safetensors");
        let out = easel_bin()
            .args(["weights", "synth", "--seed", "0", "--out"])
            .arg(&path)
            .output()
            .expect("easel runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        path
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `easel ARGS --content C --style S --weights W` with the sample images and synthetic weights.
fn sample_job(args: &[&str]) -> Command {
    let mut cmd = easel();
    cmd.args(args)
        .arg("--content")
        .arg(data("content.png"))
        .arg("--style")
        .arg(data("style.png"))
        .arg("--weights")
        .arg(synth_weights());
    cmd
}

fn run_job(dir: &Path, out_name: &str, extra: &[&str]) -> (Output, PathBuf) {
    let out_path = dir.join(out_name);
    let output = sample_job(&["run"])
        .arg("--out")
        .arg(&out_path)
        .args(["--size", "64", "--iterations", "6"])
        .args(extra)
        .output()
        .expect("easel runs");
    (output, out_path)
}

/// "loss A -> B" from the run summary.
fn losses(summary: &str) -> (f64, f64) {
    let tail = summary.rsplit("loss ").next().expect("summary has a loss");
    let mut parts = tail.split(" -> ");
    let a = parts.next().and_then(|s| s.trim().parse().ok()).expect("first loss");
    let b = parts.next().and_then(|s| s.trim().parse().ok()).expect("last loss");
    (a, b)
}

#[test]
fn run_writes_a_png_of_the_requested_size_and_the_loss_falls() {
    let dir = tempfile::tempdir().expect("tmp");
    let (out, path) = run_job(dir.path(), "painting.png", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let image = image::open(&path).expect("output decodes");
    assert_eq!((image.width(), image.height()), (64, 48));
    assert_eq!(image::ImageFormat::from_path(&path).expect("format"), image::ImageFormat::Png);
    let bytes = std::fs::read(&path).expect("read");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let (first, last) = losses(&stderr(&out));
    assert!(last < first, "loss did not fall: {first} -> {last}");
    // Only the result: no temp files left beside it.
    let names: Vec<_> =
        std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, ["painting.png"]);
}

#[test]
fn run_writes_jpeg_by_extension_with_previews_and_adam() {
    let dir = tempfile::tempdir().expect("tmp");
    let (out, path) =
        run_job(dir.path(), "painting.jpg", &["--save-every", "2", "--optimizer", "adam", "--init", "noise"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&path).expect("read");
    assert_eq!(&bytes[..3], b"\xff\xd8\xff", "JPEG signature");
    let image = image::open(&path).expect("decodes");
    assert_eq!((image.width(), image.height()), (64, 48));
    for preview in ["painting_0002.jpg", "painting_0004.jpg"] {
        assert!(dir.path().join(preview).is_file(), "missing preview {preview}");
    }
    let (first, last) = losses(&stderr(&out));
    assert!(last < first, "loss did not fall: {first} -> {last}");
}

#[test]
fn two_styles_blend_and_two_scales_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let style2 = data("content.png");
    let (out, path) = run_job(
        dir.path(),
        "blend.png",
        &["--style", style2.to_str().expect("utf8"), "--style-weights", "0.7,0.3", "--scales", "2"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let image = image::open(&path).expect("decodes");
    assert_eq!((image.width(), image.height()), (64, 48));
    assert!(stderr(&out).contains("12 iterations"), "{}", stderr(&out));
}

#[test]
fn eval_reports_each_loss_as_json() {
    let dir = tempfile::tempdir().expect("tmp");
    let at = dir.path().join("gradient.png");
    image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 128]))
        .save(&at)
        .expect("save");
    let out =
        sample_job(&["eval"]).arg("--at").arg(&at).args(["--size", "128", "--json"]).output().expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let losses = v["losses"].as_array().expect("losses");
    let kinds: Vec<&str> = losses.iter().map(|l| l["type"].as_str().expect("type")).collect();
    assert_eq!(kinds, ["content", "gram", "tv"]);
    let mut total = 0.0;
    for l in losses {
        let (w, value, g) = (l["weight"].as_f64(), l["value"].as_f64(), l["grad_l2"].as_f64());
        let (w, value, g) = (w.expect("weight"), value.expect("value"), g.expect("grad_l2"));
        assert!(value > 0.0 && g > 0.0, "{l}");
        total += w * value;
    }
    let reported = v["total"].as_f64().expect("total");
    assert!((reported - total).abs() <= 1e-9 * total, "{reported} vs {total}");
}

#[test]
fn eval_without_json_prints_a_table_with_each_share() {
    let out = sample_job(&["eval"]).args(["--size", "64"]).output().expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(serde_json::from_str::<serde_json::Value>(&text).is_err(), "not JSON:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "header, three losses, total:\n{text}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["loss", "value", "weight", "share", "grad", "norm"], "{text}");
    let json = sample_job(&["eval"]).args(["--size", "64", "--json"]).output().expect("runs");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("one JSON object");
    let total = v["total"].as_f64().expect("total");
    let mut shares = 0.0;
    for (line, l) in lines[1..4].iter().zip(v["losses"].as_array().expect("losses")) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], l["type"].as_str().expect("type"), "{text}");
        let number = |i: usize| cells[i].trim_end_matches('%').parse::<f64>().expect("a number");
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * b.abs();
        assert!(close(number(1), l["value"].as_f64().expect("value")), "{line} vs {l}");
        assert!(close(number(2), l["weight"].as_f64().expect("weight")), "{line} vs {l}");
        assert!(close(number(4), l["grad_l2"].as_f64().expect("grad_l2")), "{line} vs {l}");
        let share = 100.0 * l["weight"].as_f64().expect("w") * l["value"].as_f64().expect("v") / total;
        assert!((number(3) - share).abs() <= 0.051, "{line}: share {share}");
        shares += number(3);
    }
    assert!((shares - 100.0).abs() <= 0.2, "shares add up to 100%: {shares}");
    assert!(lines[4].starts_with("total"), "{text}");
}

#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tmp");
    // A content image with alpha, so that the run logs at info level (and -v at debug).
    let rgba = dir.path().join("cut-out.png");
    image::RgbaImage::from_fn(40, 30, |x, y| image::Rgba([(x * 6) as u8, (y * 8) as u8, 90, (x * 6) as u8]))
        .save(&rgba)
        .expect("save");
    // stderr is a pipe here; NO_COLOR is left unset, so only the terminal check can hold it.
    let out = easel()
        .env_remove("NO_COLOR")
        .args(["-v", "run", "--content"])
        .arg(&rgba)
        .arg("--style")
        .arg(data("style.png"))
        .arg("--weights")
        .arg(synth_weights())
        .arg("--out")
        .arg(dir.path().join("p.png"))
        .args(["--size", "32", "--iterations", "2"])
        .output()
        .expect("runs");
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("INFO") && text.contains("DEBUG"), "log lines at info and debug:\n{text}");
    assert!(text.contains("transparent parts are painted as white"), "{text}");
    assert!(!out.stderr.contains(&0x1b), "an ESC byte in:\n{text:?}");
}

/// Runs the binary with `args` on a pseudo-terminal (stdin, stdout and stderr), as a user at
/// a terminal would, and returns all it wrote there.
fn on_a_terminal(args: &[&std::ffi::OsStr], no_color: Option<&str>) -> Vec<u8> {
    const PTY: &str = "import os, pty, sys\n\
        pid, fd = pty.fork()\n\
        if pid == 0:\n    os.execvp(sys.argv[1], sys.argv[1:])\n\
        out = b''\n\
        while True:\n    try:\n        data = os.read(fd, 65536)\n    except OSError:\n        break\n    \
        if not data:\n        break\n    out += data\n\
        _, status = os.waitpid(pid, 0)\n\
        sys.stdout.buffer.write(out)\n\
        sys.exit(os.waitstatus_to_exitcode(status))\n";
    let mut cmd = Command::new("python3");
    cmd.env_remove("EASEL_WEIGHTS")
        .env_remove("NO_COLOR")
        .args(["-c", PTY])
        .args(runner())
        .arg(env!("CARGO_BIN_EXE_easel"));
    if let Some(value) = no_color {
        cmd.env("NO_COLOR", value);
    }
    let out = cmd.args(args).output().expect("python3 runs (it is part of the test toolchain)");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    out.stdout
}

/// Whether `bytes` hold an ANSI colour (SGR) sequence, `ESC [ digits;... m`: the progress
/// bar's cursor movements are other sequences and stay.
fn has_colour(bytes: &[u8]) -> bool {
    bytes.windows(2).enumerate().any(|(i, w)| {
        w == b"\x1b[" && {
            let rest = &bytes[i + 2..];
            let end = rest.iter().position(|b| !(b.is_ascii_digit() || *b == b';'));
            end.is_some_and(|e| rest[e] == b'm')
        }
    })
}

#[test]
fn logs_are_coloured_on_a_terminal_unless_no_color_is_set() {
    let dir = tempfile::tempdir().expect("tmp");
    let (content, style, out_path) = (data("content.png"), data("style.png"), dir.path().join("p.png"));
    let args: Vec<&std::ffi::OsStr> = ["-v", "run", "--size", "32", "--iterations", "1", "--content"]
        .iter()
        .map(std::ffi::OsStr::new)
        .chain([content.as_os_str(), "--style".as_ref(), style.as_os_str(), "--weights".as_ref()])
        .chain([synth_weights().as_os_str(), "--out".as_ref(), out_path.as_os_str()])
        .collect();
    let coloured = on_a_terminal(&args, None);
    let text = String::from_utf8_lossy(&coloured);
    assert!(text.contains("DEBUG") && has_colour(&coloured), "colour on a terminal:\n{text:?}");
    for no_color in ["1", "yes"] {
        let plain = on_a_terminal(&args, Some(no_color));
        let text = String::from_utf8_lossy(&plain);
        assert!(text.contains("DEBUG") && !has_colour(&plain), "NO_COLOR={no_color}:\n{text:?}");
    }
    // An empty NO_COLOR does not count (no-color.org).
    assert!(has_colour(&on_a_terminal(&args, Some(""))));
}

#[test]
fn weights_help_texts_explain_synth_and_inspect() {
    let help = |args: &[&str]| {
        let out = easel().args(args).arg("--help").output().expect("runs");
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let synth = help(&["weights", "synth"]);
    assert!(!synth.contains("DESIGN.md"), "{synth}");
    assert!(synth.contains("splitmix64") && synth.contains("README"), "{synth}");
    assert!(
        synth.contains("--seed <SEED>") && synth.contains("the same seed always gives the same file"),
        "{synth}"
    );
    assert!(synth.contains("--out <FILE>") && synth.contains("The safetensors file to write"), "{synth}");
    let inspect = help(&["weights", "inspect"]);
    assert!(inspect.contains("<FILE>") && inspect.contains("The safetensors file to check"), "{inspect}");
    let weights = help(&["weights"]);
    assert!(!weights.contains("DESIGN.md"), "{weights}");
}

#[test]
fn config_show_follows_the_order_of_the_defaults() {
    let dir = tempfile::tempdir().expect("tmp");
    let mine = dir.path().join("mine.toml");
    std::fs::write(&mine, "[daemon]\nworkers = 2\n[run]\nsize = 256\n").expect("write");
    let out = easel().args(["config", "show"]).arg(&mine).output().expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("[run]\n"), "{text}");
    // Each table after a blank line.
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate().skip(1).filter(|(_, l)| l.starts_with('[')) {
        assert_eq!(lines[i - 1], "", "no blank line before {line}:\n{text}");
    }
    let headers: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(
        headers,
        [
            "[run]",
            "[model]",
            "[limits]",
            "[output]",
            "[daemon]",
            "[optimizer]",
            "[[loss]]",
            "[[loss]]",
            "[[loss]]"
        ],
        "{text}"
    );
    // Keys too: size before iterations in [run], type first in each [[loss]].
    let run = &text[text.find("[run]").expect("run")..text.find("[model]").expect("model")];
    assert!(
        run.find("size = 256").expect("size") < run.find("iterations = 500").expect("iterations"),
        "{run}"
    );
    assert!(text.contains("workers = 2"), "{text}");
    let loss = &text[text.find("[[loss]]").expect("loss")..];
    assert!(loss.lines().nth(1).expect("a key").starts_with("type = "), "{loss}");
    // What is printed is a config that gives the same plan.
    let shown = dir.path().join("shown.toml");
    std::fs::write(&shown, &text).expect("write");
    let again = easel().args(["config", "show"]).arg(&shown).output().expect("runs");
    assert_eq!(String::from_utf8_lossy(&again.stdout), text);
}

#[test]
fn bench_prints_timings_and_memory_as_json() {
    let out = sample_job(&["--threads", "2", "bench"])
        .args(["--size", "64", "--iterations", "3", "--optimizer", "adam", "--json"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["size"], 64);
    assert_eq!(v["iterations"], 3);
    assert_eq!(v["threads"], 2);
    assert!(v["s_per_iter"].as_f64().expect("s_per_iter") > 0.0);
    assert!(v["peak_rss_mb"].as_f64().expect("peak_rss_mb") > 1.0);
    assert!(v["loss_last"].as_f64() < v["loss_first"].as_f64(), "{v}");
    // conv1_2's and block 2's input gradients run as Winograd even at 64 px; the default
    // config keeps their transformed kernels, within its 128 MiB.
    let kept = v["kernel_cache_mb"].as_f64().expect("kernel_cache_mb");
    assert!(kept > 0.0 && kept <= 128.0, "{v}");
}

// `model.backend = "candle"` runs candle's ops, the path a GPU takes, on the CPU: the same job
// starts from the same loss as on easel's kernels, bench says which ran, and the planner counts
// the generic backend's working set (its whole trace, the flipped kernels, a convolution band).
#[test]
fn the_candle_backend_runs_the_gpu_path_on_the_cpu_and_is_planned_for() {
    let (_dir, config) = temp_file("candle.toml", b"[model]\nbackend = \"candle\"\n");
    let config = config.to_str().expect("a UTF-8 temp path");
    // Small, and each command once per backend: this test also runs under qemu in CI.
    let run = |command: &str, extra: &[&str], backend: &[&str]| {
        let out =
            sample_job(&[command]).args(backend).args(["--size", "64"]).args(extra).output().expect("runs");
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("one JSON object")
    };
    let bench = ["--iterations", "2", "--optimizer", "adam", "--json"];
    let (easel_kernels, candle) = (run("bench", &bench, &[]), run("bench", &bench, &["--config", config]));
    assert_eq!(easel_kernels["backend"], "easel", "{easel_kernels}");
    assert_eq!(candle["backend"], "candle", "{candle}");
    assert_eq!(candle["kernel_cache_mb"], 0.0, "{candle}");
    let (a, b) = (easel_kernels["loss_first"].as_f64().unwrap(), candle["loss_first"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-4 * a, "first loss {b} on candle's ops, {a} on easel's kernels");

    let (cpu, generic) = (run("plan", &["--json"], &[]), run("plan", &["--json"], &["--config", config]));
    assert_eq!(generic["backends"], serde_json::json!(["candle"]), "{generic}");
    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    assert_eq!(cpu["backends"], serde_json::json!(["easel"]), "{cpu}");
    let part = |plan: &serde_json::Value, name: &str| plan["parts_mb"][name].as_f64().expect("a part");
    assert_eq!(part(&generic, "kernel_cache"), 0.0, "{generic}");
    // Twice the kernels (parts are rounded to whole MB).
    assert!((part(&generic, "weights") - 2.0 * part(&cpu, "weights")).abs() <= 1.0, "{generic} vs {cpu}");
    // Its whole trace in f32 and conv1_2's im2col band, against bits and easel's own kernels.
    assert!(part(&generic, "evaluation") > 2.0 * part(&cpu, "evaluation"), "{generic} vs {cpu}");
}

// The default `model.device = "auto"` has only the CPU to pick in a build without GPU features;
// it says so once, with why, and bench reports the device it ran on.
#[cfg(not(any(feature = "cuda", feature = "metal")))]
#[test]
fn auto_device_picks_the_cpu_and_bench_reports_it() {
    let out = sample_job(&["bench"])
        .args(["--size", "32", "--iterations", "2", "--optimizer", "adam", "--json"])
        .output()
        .expect("runs");
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["device"], "cpu", "{v}");
    let said: Vec<&str> = text.lines().filter(|l| l.contains("model.device = \"auto\"")).collect();
    assert_eq!(said.len(), 1, "one line says which device:\n{text}");
    assert!(
        said[0].contains("using the CPU")
            && said[0].contains("built without the cuda feature")
            && said[0].contains("built without the metal feature"),
        "{}",
        said[0]
    );

    // An explicit `cpu` is the CPU as well, without the line.
    let (_dir, config) = temp_file("cpu.toml", b"[model]\ndevice = \"cpu\"\n");
    let out = sample_job(&["bench"])
        .arg("--config")
        .arg(&config)
        .args(["--size", "32", "--iterations", "2", "--optimizer", "adam", "--json"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["device"], "cpu", "{v}");
    assert!(!stderr(&out).contains("model.device"), "{}", stderr(&out));
}

// Asking for CUDA from a build without it is an error naming the key and what is missing, not a
// fallback to the CPU and not a panic.
#[cfg(not(feature = "cuda"))]
#[test]
fn device_cuda_in_a_build_without_cuda_fails_clearly() {
    let (_dir, config) = temp_file("gpu.toml", b"[model]\ndevice = \"cuda\"\n");
    for command in ["run", "bench"] {
        let dir = tempfile::tempdir().expect("tmp");
        let mut cmd = sample_job(&[command]);
        cmd.arg("--config").arg(&config).args(["--size", "32", "--iterations", "2"]);
        if command == "run" {
            cmd.arg("--out").arg(dir.path().join("x.png"));
        }
        let out = cmd.output().expect("runs");
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{command}: {text}");
        assert!(
            text.contains(
                "model.device = \"cuda\": this easel was built without the cuda feature (build with \
                 `--features cuda`, see deploy/cuda.md)"
            ),
            "{command}: {text}"
        );
        assert!(!text.contains("panicked") && !text.contains("backtrace"), "{command}: {text}");
        assert!(out.stdout.is_empty(), "{command}: nothing on stdout");
        assert!(!dir.path().join("x.png").exists());
    }
}

#[test]
fn weights_inspect_tells_usable_from_unusable() {
    let out = easel().args(["weights", "inspect"]).arg(synth_weights()).output().expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("features.34.weight") && text.contains("[512, 512, 3, 3]"), "{text}");
    assert!(text.contains("usable VGG-19: yes"), "{text}");

    let dir = tempfile::tempdir().expect("tmp");
    let partial = dir.path().join("partial.safetensors");
    // A valid safetensors file holding only conv1_1.
    let full = std::fs::read(synth_weights()).expect("read");
    let n = u64::from_le_bytes(full[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&full[8..8 + n]).expect("header");
    let mut small = serde_json::Map::new();
    let mut data = Vec::new();
    for name in ["features.0.weight", "features.0.bias"] {
        let info = &header[name];
        let (a, b) = (
            info["data_offsets"][0].as_u64().expect("a") as usize,
            info["data_offsets"][1].as_u64().expect("b") as usize,
        );
        let start = data.len();
        data.extend_from_slice(&full[8 + n + a..8 + n + b]);
        let mut entry = info.clone();
        entry["data_offsets"] = serde_json::json!([start, data.len()]);
        small.insert(name.into(), entry);
    }
    let head = serde_json::to_vec(&small).expect("json");
    let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
    bytes.extend(head);
    bytes.extend(data);
    std::fs::write(&partial, bytes).expect("write");
    let out = easel().args(["weights", "inspect"]).arg(&partial).output().expect("runs");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("usable VGG-19: no") && text.contains("features.2.weight"), "{text}");
}

#[test]
fn config_check_and_plugins() {
    let ok = easel()
        .args(["config", "check"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/pi.toml"))
        .output()
        .expect("runs");
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("pi.toml: ok"));

    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[run]\nsize = -4\ncolour = 1\n[[loss]]\ntype = \"gram\"\nweight = \"high\"\n")
        .expect("write");
    let out = easel().args(["config", "check"]).arg(&bad).output().expect("runs");
    assert!(!out.status.success());
    let text = stderr(&out);
    for expected in [
        "run.size: must be in",
        "run.colour: unknown key",
        "loss[0].weight: expected a number, got string \"high\"",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }

    let out = easel().arg("plugins").output().expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["content", "gram", "tv", "lbfgs", "adam", "gd", "layer_weights", "history"] {
        assert!(text.contains(name), "plugins output lacks {name}:\n{text}");
    }
    // Each default as the plugin's `build` uses it, rendered from the same constant.
    for default in [
        "default 0.02 ",
        "default 1e-8 ",
        "default 0.01 ",
        "default 100 ",
        "default strong_wolfe ",
        "default [\"relu4_2\"] ",
        "default 1/n each ",
    ] {
        assert!(text.contains(default), "plugins output lacks `{default}`:\n{text}");
    }
}

#[test]
fn config_check_names_the_plugins_options_for_a_typo() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        (
            "adam.toml",
            "[optimizer]\ntype = \"adam\"\nlrr = 0.1\n",
            "  optimizer.lrr: unknown key; did you mean `lr`? known keys: beta1, beta2, eps, lr, type\n",
        ),
        (
            "gram.toml",
            "[[loss]]\ntype = \"gram\"\nlayerz = [\"relu1_1\"]\n",
            "  loss[0].layerz: unknown key; did you mean `layers`? known keys: layer_weights, layers, type, \
             weight\n",
        ),
        (
            "run.toml",
            "[run]\niteratons = 10\n",
            "  run.iteratons: unknown key; did you mean `iterations`? known keys: init, iterations, \
             preserve_colors, save_every, scales, seed, size, style_scale\n",
        ),
    ];
    for (name, toml, line) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, toml).expect("write");
        let out = easel().args(["config", "check"]).arg(&path).output().expect("runs");
        assert!(!out.status.success(), "{name} passed the check");
        let text = stderr(&out);
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
}

/// Runs `easel run` on `content` with the test style and `weights` plus `extra` flags, in a
/// fresh folder, and checks that it fails: non-zero exit, an error mentioning `needle`, and no
/// output or temp file left behind.
fn assert_run_fails(content: &Path, weights: &Path, extra: &[&std::ffi::OsStr], needle: &str) {
    let dir = tempfile::tempdir().expect("tmp");
    let out_path = dir.path().join("never.png");
    let out = easel()
        .arg("run")
        .arg("--content")
        .arg(content)
        .arg("--style")
        .arg(data("style.png"))
        .arg("--weights")
        .arg(weights)
        .args(extra)
        .arg("--out")
        .arg(&out_path)
        .args(["--size", "64", "--iterations", "2"])
        .output()
        .expect("runs");
    let text = stderr(&out);
    assert!(!out.status.success(), "should fail with `{needle}`: {text}");
    assert!(text.contains(needle), "error should mention `{needle}`:\n{text}");
    let left: Vec<_> =
        std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert!(left.is_empty(), "nothing may be left behind: {left:?}");
}

/// A file in a fresh temp folder (kept alive by the returned guard).
fn temp_file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write");
    (dir, path)
}

/// `easel run` with a `--config` file holding `toml`, expected to fail with `needle`.
fn assert_config_fails(toml: &str, needle: &str) {
    let (_dir, config) = temp_file("job.toml", toml.as_bytes());
    assert_run_fails(
        &data("content.png"),
        synth_weights(),
        &[std::ffi::OsStr::new("--config"), config.as_os_str()],
        needle,
    );
}

#[test]
fn a_corrupt_image_fails() {
    let png = std::fs::read(data("content.png")).expect("read");
    let (_dir, corrupt) = temp_file("corrupt.png", &png[..png.len() / 3]);
    assert_run_fails(&corrupt, synth_weights(), &[], "corrupt.png: cannot decode image");
}

#[test]
fn a_truncated_jpeg_fails_naming_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let photo =
        image::open(data("content.png")).expect("decodes").resize(400, 400, image::imageops::Lanczos3);
    let whole = dir.path().join("whole.jpg");
    photo.to_rgb8().save(&whole).expect("save jpeg");
    let bytes = std::fs::read(&whole).expect("read");
    let (_dir, half) = temp_file("half.jpg", &bytes[..bytes.len() / 2]);
    assert_run_fails(&half, synth_weights(), &[], "half.jpg: cannot decode image: truncated JPEG");
}

#[test]
fn a_text_file_named_png_fails() {
    let (_dir, text) = temp_file("notes.png", b"these are my holiday notes, not a picture\n");
    assert_run_fails(&text, synth_weights(), &[], "notes.png: cannot decode image");
}

#[test]
fn a_missing_image_fails() {
    let dir = tempfile::tempdir().expect("tmp");
    assert_run_fails(&dir.path().join("nowhere.png"), synth_weights(), &[], "nowhere.png: No such file");
}

#[test]
fn an_image_over_the_pixel_limit_fails() {
    assert_config_fails("[limits]\nmax_pixels = 1000\n", "over the limit of 1000 (limits.max_pixels)");
}

#[test]
fn truncated_weights_fail() {
    let w = std::fs::read(synth_weights()).expect("read");
    let (_dir, truncated) = temp_file("truncated.safetensors", &w[..w.len() / 2]);
    assert_run_fails(
        &data("content.png"),
        &truncated,
        &[],
        "truncated.safetensors: truncated safetensors file",
    );
}

#[test]
fn garbage_weights_fail() {
    let (_dir, garbage) = temp_file("garbage.safetensors", b"GARBAGE GARBAGE GARBAGE GARBAGE");
    assert_run_fails(&data("content.png"), &garbage, &[], "garbage.safetensors: not a safetensors file");
}

#[test]
fn a_config_with_an_unknown_key_fails() {
    assert_config_fails("[run]\nsizes = 64\n", "run.sizes: unknown key");
}

#[test]
fn a_config_with_a_wrong_type_fails() {
    assert_config_fails("[run]\nseed = \"many\"\n", "run.seed: expected an integer, got string \"many\"");
}

#[test]
fn a_config_with_an_unknown_plugin_fails() {
    assert_config_fails(
        "[optimizer]\ntype = \"newton\"\n",
        "optimizer.type: unknown optimizer \"newton\"; available: adam, gd, lbfgs",
    );
    assert_config_fails(
        "[[loss]]\ntype = \"glow\"\n",
        "loss[0].type: unknown loss \"glow\"; available: content, gram, tv",
    );
}

#[test]
fn without_weights_it_says_how_to_get_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = easel()
        .env("HOME", dir.path())
        .arg("run")
        .arg("--content")
        .arg(data("content.png"))
        .arg("--style")
        .arg(data("style.png"))
        .arg("--out")
        .arg(dir.path().join("x.png"))
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains("easel weights fetch") && text.contains("easel weights synth"), "{text}");
    assert!(text.contains("EASEL_WEIGHTS"), "{text}");
    assert!(!dir.path().join("x.png").exists());
}

#[test]
fn refuses_to_overwrite_an_input() {
    let dir = tempfile::tempdir().expect("tmp");
    let content = dir.path().join("photo.png");
    std::fs::copy(data("content.png"), &content).expect("copy");
    let before = std::fs::read(&content).expect("read");
    let out = easel()
        .arg("run")
        .arg("--content")
        .arg(&content)
        .arg("--style")
        .arg(data("style.png"))
        .arg("--weights")
        .arg(synth_weights())
        .arg("--out")
        .arg(&content)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("would overwrite the input"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&content).expect("read"), before);
}

/// Serves `body` to each of `requests` connections with `status`, on 127.0.0.1.
fn serve(body: Vec<u8>, status: &'static str, requests: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head =
                format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{addr}/vgg19.safetensors")
}

#[test]
fn weights_fetch_downloads_checks_and_installs() {
    use sha2::Digest;
    let body = std::fs::read(synth_weights()).expect("read");
    let sha = format!("{:x}", sha2::Sha256::digest(&body));
    let dir = tempfile::tempdir().expect("tmp");

    let url = serve(body.clone(), "200 OK", 1);
    let dest = dir.path().join("models/vgg19.safetensors");
    let out = easel()
        .args(["weights", "fetch", "--url", &url, "--sha256", &sha, "--out"])
        .arg(&dest)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&dest).expect("installed"), body);

    let url = serve(body.clone(), "200 OK", 1);
    let wrong = dir.path().join("wrong.safetensors");
    let other_sha = "00ff".repeat(16);
    let out = easel()
        .args(["weights", "fetch", "--url", &url, "--sha256", &other_sha, "--out"])
        .arg(&wrong)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("expected {other_sha}")), "{}", stderr(&out));
    assert!(!wrong.exists());

    let url = serve(b"not found".to_vec(), "404 Not Found", 1);
    let missing = dir.path().join("missing.safetensors");
    let out =
        easel().args(["weights", "fetch", "--url", &url, "--out"]).arg(&missing).output().expect("runs");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));

    let url = serve(b"plain text, not weights".to_vec(), "200 OK", 1);
    let text = dir.path().join("text.safetensors");
    let out = easel().args(["weights", "fetch", "--url", &url, "--out"]).arg(&text).output().expect("runs");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a safetensors file"), "{}", stderr(&out));
    let left: Vec<_> =
        std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("e").file_name()).collect();
    assert_eq!(left, ["models"], "failed downloads leave nothing behind");
}

#[test]
fn weights_convert_reads_a_pytorch_state_dict() {
    let dir = tempfile::tempdir().expect("tmp");
    let pth = dir.path().join("vgg19.pth");
    let made = Command::new("python3")
        .arg(data("make_pth.py"))
        .arg(synth_weights())
        .arg(&pth)
        .output()
        .expect("python3 runs (it is part of the test toolchain)");
    assert!(made.status.success(), "{}", stderr(&made));
    let out_path = dir.path().join("vgg19.safetensors");
    let out =
        easel().args(["weights", "convert"]).arg(&pth).arg("--out").arg(&out_path).output().expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let original = easel_tensors(synth_weights());
    assert_eq!(easel_tensors(&out_path), original, "converted tensors equal the originals");

    let not_pth = dir.path().join("notes.pth");
    std::fs::write(&not_pth, "not a zip").expect("write");
    let bad_out = dir.path().join("bad.safetensors");
    let out =
        easel().args(["weights", "convert"]).arg(&not_pth).arg("--out").arg(&bad_out).output().expect("runs");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("notes.pth: not a PyTorch state dict"), "{}", stderr(&out));
    assert!(!bad_out.exists());
}

/// Each tensor's name and raw bytes, from a safetensors file.
fn easel_tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let mut out: Vec<(String, Vec<u8>)> = header
        .as_object()
        .expect("object")
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let a = v["data_offsets"][0].as_u64().expect("a") as usize;
            let b = v["data_offsets"][1].as_u64().expect("b") as usize;
            (k.clone(), bytes[8 + n + a..8 + n + b].to_vec())
        })
        .collect();
    out.sort();
    out
}

/// A loopback HTTP server: `answer(n, stream, request_head)` handles the n-th connection.
fn http_server(answer: impl Fn(usize, TcpStream, String) + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).map(|k| k == 1).unwrap_or(false) {
                head.push(byte[0]);
            }
            answer(n, stream, String::from_utf8_lossy(&head).to_ascii_lowercase());
        }
    });
    format!("http://{addr}/vgg19.safetensors")
}

/// Runs `cmd` to its end, killing it (and failing the test) if it is still running after
/// `limit_s`: a fetch that never gives up must not hang the test suite.
fn output_within(cmd: &mut Command, limit_s: u64) -> Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("easel starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(limit_s);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("still running after {limit_s} s; stderr:\n{}", stderr(&out));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.wait_with_output().expect("output")
}

/// The failure message of a fetch names the URL once and says how to do without it.
fn assert_network_failure(out: &Output, url: &str) {
    let text = stderr(out);
    assert!(!out.status.success(), "{text}");
    assert_eq!(text.matches(url).count(), 1, "the URL once:\n{text}");
    assert!(text.contains("easel weights convert") && text.contains("easel weights synth"), "{text}");
}

#[test]
fn weights_fetch_gives_up_on_a_silent_server_and_leaves_no_folder() {
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    // Accepts, reads the request, and never answers (the connection stays open).
    let url = http_server(move |_, stream, _| keep.lock().expect("lock").push(stream));
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("new/models/vgg19.safetensors");
    let out = output_within(
        easel().args(["weights", "fetch", "--url", &url, "--timeout", "2", "--out"]).arg(&dest),
        120,
    );
    assert_network_failure(&out, &url);
    assert!(stderr(&out).to_lowercase().contains("timed out"), "{}", stderr(&out));
    assert!(!dir.path().join("new").exists(), "no folder left behind");
    assert_eq!(held.lock().expect("lock").len(), 1, "it did connect");

    // Nobody listening at all: refused at once, same message shape, nothing left.
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let url = format!("http://127.0.0.1:{port}/vgg19.safetensors");
    let out = output_within(easel().args(["weights", "fetch", "--url", &url, "--out"]).arg(&dest), 120);
    assert_network_failure(&out, &url);
    let left: Vec<_> =
        std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("e").file_name()).collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
}

#[test]
fn weights_fetch_rejects_a_malformed_sha256_before_connecting() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let url = format!("http://{}/vgg19.safetensors", listener.local_addr().expect("addr"));
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("models/vgg19.safetensors");
    for bad in ["00ff", &"g".repeat(64), &"a".repeat(65)] {
        let out = output_within(
            easel().args(["weights", "fetch", "--url", &url, "--sha256", bad, "--out"]).arg(&dest),
            120,
        );
        assert!(!out.status.success());
        assert!(stderr(&out).contains("--sha256: expected 64 hex digits"), "{}", stderr(&out));
    }
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "no connection was made"
    );
    assert!(!dir.path().join("models").exists(), "no folder made");
}

/// A server that cuts its first answer halfway and then answers the next request with
/// `second(range_header, body)`.
fn cut_then(
    body: Vec<u8>,
    second: fn(Option<&str>, &[u8]) -> Vec<u8>,
) -> (String, std::sync::mpsc::Receiver<String>) {
    let (heads, seen) = std::sync::mpsc::channel();
    let url = http_server(move |n, mut stream, head| {
        let _ = heads.send(head.clone());
        let reply = if n == 0 {
            let mut reply =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                    .into_bytes();
            reply.extend_from_slice(&body[..body.len() / 2]);
            reply
        } else {
            let range = head.lines().find_map(|l| l.strip_prefix("range: ")).map(str::trim);
            second(range, &body)
        };
        let _ = stream.write_all(&reply);
    });
    (url, seen)
}

#[test]
fn weights_fetch_resumes_a_cut_download_with_a_range_request() {
    use sha2::Digest;
    let body = std::fs::read(synth_weights()).expect("read");
    let sha = format!("{:x}", sha2::Sha256::digest(&body));
    let half = body.len() / 2;
    let (url, seen) = cut_then(body.clone(), |range, body| {
        let start: usize = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse().ok())
            .expect("a Range request");
        let mut reply = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len() - 1,
            body.len(),
            body.len() - start
        )
        .into_bytes();
        reply.extend_from_slice(&body[start..]);
        reply
    });
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("models/vgg19.safetensors");
    let fetch = || {
        output_within(
            easel()
                .args(["weights", "fetch", "--url", &url, "--sha256", &sha, "--timeout", "5", "--out"])
                .arg(&dest),
            120,
        )
    };
    let first = fetch();
    assert_network_failure(&first, &url);
    assert!(stderr(&first).contains(&format!("{half} bytes are kept")), "{}", stderr(&first));
    assert!(!dest.exists());
    let second = fetch();
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains(&format!("resuming the download at byte {half}")),
        "{}",
        stderr(&second)
    );
    assert_eq!(std::fs::read(&dest).expect("installed"), body, "the sha256 was checked too");
    let heads: Vec<String> = seen.try_iter().collect();
    assert_eq!(heads.len(), 2);
    assert!(!heads[0].contains("range:"), "{}", heads[0]);
    assert!(heads[1].contains(&format!("range: bytes={half}-")), "{}", heads[1]);
    let names: Vec<_> = std::fs::read_dir(dest.parent().expect("dir"))
        .expect("ls")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(names, ["vgg19.safetensors"], "no .part left");
}

#[test]
fn weights_fetch_starts_over_when_the_server_ignores_the_range() {
    let body = std::fs::read(synth_weights()).expect("read");
    let (url, _seen) = cut_then(body.clone(), |_, body| {
        let mut reply =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                .into_bytes();
        reply.extend_from_slice(body);
        reply
    });
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("vgg19.safetensors");
    let fetch = || output_within(easel().args(["weights", "fetch", "--url", &url, "--out"]).arg(&dest), 120);
    assert!(!fetch().status.success());
    let second = fetch();
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(!stderr(&second).contains("resuming"), "{}", stderr(&second));
    assert_eq!(std::fs::read(&dest).expect("installed"), body);
}

/// `easel plan ARGS --json` on the sample job, parsed.
fn plan_json(args: &[&str]) -> serde_json::Value {
    let out = sample_job(&["plan", "--json"]).args(args).output().expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn plan_reports_the_peak_its_parts_the_strategy_and_the_time() {
    let v = plan_json(&["--size", "128"]);
    let parts = v["parts_mb"].as_object().expect("parts_mb");
    for part in [
        "runtime",
        "weights",
        "kernel_cache",
        "inputs",
        "evaluation",
        "image",
        "gradient",
        "targets",
        "optimizer",
    ] {
        assert!(parts.contains_key(part), "{part} missing: {v}");
    }
    let sum: f64 = parts.values().map(|p| p.as_f64().expect("MB")).sum();
    let peak = v["peak_rss_mb"].as_f64().expect("peak_rss_mb");
    assert!((sum - peak).abs() <= parts.len() as f64, "the peak is the sum of its parts: {v}");
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(128), Some(96)));
    assert_eq!(v["strategy"], "whole");
    assert_eq!(v["fits"], true);
    assert_eq!(v["optimizer"], "lbfgs");
    assert_eq!(v["lbfgs_history"], 100);
    assert!(v["budget_mb"].as_f64().expect("budget_mb") > 0.0);
    assert!(v["seconds_per_evaluation"].as_f64().expect("seconds") > 0.0, "{v}");
}

/// What `easel bench` measures as its peak is what `easel plan` predicted, within 15%, with
/// Adam and with L-BFGS once its history is full, whole and in tiles.
#[test]
fn plan_predicts_the_peak_bench_measures_within_15_percent() {
    let whole = scratch().join("history8.toml");
    std::fs::write(&whole, "[optimizer]\ntype = \"lbfgs\"\nhistory = 8\n").unwrap();
    let tiled = scratch().join("history8-tiles128.toml");
    std::fs::write(&tiled, "[optimizer]\ntype = \"lbfgs\"\nhistory = 8\n[model]\ntile_size = 128\n").unwrap();
    let cases = [
        (&whole, "adam", "3", "128"),
        (&whole, "adam", "3", "256"),
        (&whole, "lbfgs", "12", "128"),
        (&whole, "lbfgs", "12", "256"),
        (&tiled, "adam", "3", "256"),
        (&tiled, "adam", "3", "384"),
        (&tiled, "lbfgs", "12", "256"),
    ];
    for (config, optimizer, iterations, size) in cases {
        let config = config.to_str().expect("UTF-8 path");
        let args = ["--size", size, "--config", config, "--optimizer", optimizer];
        let plan = plan_json(&args);
        let predicted = plan["peak_rss_mb"].as_f64().expect("peak_rss_mb");
        let out =
            sample_job(&["bench", "--json", "--iterations", iterations]).args(args).output().expect("runs");
        assert!(out.status.success(), "{}", stderr(&out));
        let bench: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert_eq!(bench["tile_size"], plan["tile_size"], "{config}: the run is cut as planned");
        let measured = bench["peak_rss_mb"].as_f64().expect("peak_rss_mb");
        let error = (predicted - measured).abs() / measured;
        let what = format!("{optimizer} at {size} px, tiles {}", plan["tile_size"]);
        eprintln!("{what}: predicted {predicted} MB, measured {measured:.0} MB");
        assert!(error <= 0.15, "{what}: predicted {predicted} MB, measured {measured} MB");
    }
}

/// A budget too small for the whole image gets tiles that fit it, and says so.
#[test]
fn a_budget_too_small_for_the_whole_image_plans_tiles() {
    let config = scratch().join("tiles-budget.toml");
    std::fs::write(&config, "[limits]\nmemory_mb = 600\n").unwrap();
    let config = config.to_str().expect("UTF-8 path");
    let whole = plan_json(&["--size", "1024", "--optimizer", "adam"]);
    assert_eq!(whole["strategy"], "whole", "{whole}");
    assert!(whole["peak_rss_mb"].as_f64().expect("peak") > 600.0, "{whole}");
    let v = plan_json(&["--size", "1024", "--optimizer", "adam", "--config", config]);
    assert_eq!((v["fits"].clone(), v["strategy"].clone()), (true.into(), "tiled".into()), "{v}");
    let step = v["tile_size"].as_u64().expect("a tile size");
    assert!(step.is_multiple_of(64) && step < 1024, "{v}");
    assert!(v["peak_rss_mb"].as_f64().expect("peak") <= 600.0, "{v}");
}

#[test]
fn a_job_over_the_memory_budget_is_refused_before_it_allocates() {
    let dir = tempfile::tempdir().unwrap();
    // 16384 px: hundreds of GB, far past this machine; it must fail at once, not abort on an
    // allocation or wake the OOM killer.
    let result = dir.path().join("huge.png");
    let out = sample_job(&["run", "--size", "16384", "--iterations", "1"])
        .arg("--out")
        .arg(&result)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("needs about") && err.contains("limits.memory_mb") && err.contains("run.size ="),
        "{err}"
    );
    assert!(!result.exists(), "nothing written");
    // `easel plan` says the same without running anything.
    let v = plan_json(&["--size", "16384"]);
    assert_eq!(v["fits"], false);
    assert!(v["refusal"].as_str().expect("a reason").contains("run.size ="), "{v}");
}

#[test]
fn a_tight_budget_shortens_the_lbfgs_history_and_says_so() {
    let config = scratch().join("tight.toml");
    std::fs::write(&config, "[limits]\nmemory_mb = 340\n").unwrap();
    let config = config.to_str().expect("UTF-8 path");
    let v = plan_json(&["--size", "256", "--config", config]);
    assert_eq!(v["fits"], true, "{v}");
    assert_eq!(v["budget_mb"], 340.0);
    let history = v["lbfgs_history"].as_u64().expect("lbfgs_history");
    assert!((1..100).contains(&history), "{v}");
    let change = v["adjustments"][0].as_str().expect("an adjustment");
    assert_eq!(change, format!("optimizer.history lowered from 100 to {history} to fit the memory budget"));
    assert!(v["peak_rss_mb"].as_f64().expect("peak") <= 340.0, "{v}");
    // The run itself plans the same and says so in its log.
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("tight.png");
    let out = sample_job(&["run", "--size", "256", "--iterations", "1", "--config", config])
        .arg("--out")
        .arg(&result)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(change), "{}", stderr(&out));
    assert!(result.exists());
}
