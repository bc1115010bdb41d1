//! End-to-end tests of `easel watch`: the real binary on temp drop folders, synthetic weights,
//! tiny images, real filesystem events and real signals.

mod daemon_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use daemon_support::*;

const LONG: Duration = Duration::from_secs(180);

/// Counts `job started` events per job name.
fn starts_by_name(events: &[serde_json::Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for f in with_message(events, "job started") {
        *counts.entry(f["name"].as_str().unwrap_or_default().to_string()).or_insert(0) += 1;
    }
    counts
}

fn weights_sha256() -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(weights()).unwrap()))
}

#[test]
fn twenty_drops_are_each_processed_exactly_once() {
    let root = TestRoot::new(&config_text(3, "sidecar_wait_ms = 1000"));
    std::fs::copy(data("content.png"), root.path("styles/other style.png")).unwrap();
    let mut daemon = root.start(&[]);
    let png = |i: u32| png_bytes(40, 30, i);
    std::thread::scope(|s| {
        // Written slowly, the file open between chunks (pauses well under settle_ms).
        for i in 0..5 {
            let root = &root;
            s.spawn(move || {
                root.drop_slowly(&format!("slow {i}.png"), &png(i), 4, Duration::from_millis(80))
            });
        }
        for i in 5..10 {
            root.drop_renamed(&format!("renamed-{i}.png"), &png(i));
        }
        for i in 10..14 {
            root.drop_file(&format!("plain_{i}.png"), &png(i));
        }
        // Sidecars: before the image, after it, and with each kind of override.
        root.drop_file("side-a.toml", b"[run]\niterations = 2\n");
        root.drop_file("side-a.png", &png(14));
        root.drop_file("side-b.toml", b"[output]\nformat = \"jpeg\"\n");
        root.drop_renamed("side-b.png", &png(15));
        root.drop_file("side-c.png", &png(16));
        std::thread::sleep(Duration::from_millis(150));
        root.drop_file("side-c.toml", b"[run]\nsize = 48\n");
        root.drop_file(
            "side-d.toml",
            b"[[style]]\npath = \"other style.png\"\n[optimizer]\ntype = \"lbfgs\"\n",
        );
        root.drop_file("side-d.png", &png(17));
        root.drop_renamed("side-e.toml", b"[run]\ninit = \"noise\"\nseed = 7\n");
        root.drop_renamed("side-e.png", &png(18));
        root.drop_file("side-f.png", &png(19));
        root.drop_file("side-f.toml", b"[[loss]]\ntype = \"gram\"\nweight = 1e6\n");
    });
    daemon.until(LONG, "20 originals in done/", || {
        root.files("done").iter().filter(|n| n.ends_with(".png")).count() == 20
    });
    daemon.until(LONG, "work/ to empty", || root.work_dirs().is_empty());
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(10)).success());

    let events = daemon.events();
    let starts = starts_by_name(&events);
    assert_eq!(starts.len(), 20, "{starts:?}");
    assert!(starts.values().all(|&n| n == 1), "a job ran twice: {starts:?}");
    assert_eq!(with_message(&events, "job done").len(), 20);
    assert!(root.files("failed").is_empty(), "{:?}", root.files("failed"));
    assert!(root.files("inbox").is_empty(), "{:?}", root.files("inbox"));
    let done = root.files("done");
    for sidecar in ["side-a.toml", "side-b.toml", "side-c.toml", "side-d.toml", "side-e.toml", "side-f.toml"]
    {
        assert!(done.contains(&sidecar.to_string()), "{sidecar} moved with its image: {done:?}");
    }

    let sha = weights_sha256();
    let out = root.files("out");
    assert_eq!(out.len(), 21, "20 results and one JPEG provenance file: {out:?}");
    for name in done.iter().filter(|n| n.ends_with(".png")) {
        let stem = name.trim_end_matches(".png");
        let (result, size) = match stem {
            "side-b" => (format!("{stem}.jpg"), 32),
            "side-c" => (format!("{stem}.png"), 48),
            _ => (format!("{stem}.png"), 32),
        };
        let path = root.path("out").join(&result);
        let (w, h, _) = pixels(&path);
        assert_eq!((w, h), (size, size * 3 / 4), "{result}");
        let bytes = std::fs::read(&path).unwrap();
        if result.ends_with(".png") {
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                text.contains("easel:weights-sha256") && text.contains(&sha),
                "{result} lacks provenance"
            );
        }
    }
    let provenance: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.path("out/side-b.jpg.json")).unwrap()).unwrap();
    assert_eq!(provenance["weights-sha256"], sha.as_str());
    assert!(provenance["config"].as_str().unwrap().contains("format = \"jpeg\""));
    let side_a =
        with_message(&events, "job started").into_iter().find(|f| f["name"] == "side-a.png").unwrap();
    assert_eq!(side_a["total"], 2, "the sidecar that came first was applied");
}

#[test]
fn bad_drops_fail_with_a_reason_while_the_others_succeed() {
    let root = TestRoot::new(&config_text(2, ""));
    let good = png_bytes(40, 30, 1);
    root.drop_file("good one.png", &good);
    root.drop_file("truncated.png", &good[..good.len() / 2]);
    root.drop_file("text.jpg", b"this is not a JPEG\n");
    root.drop_file("unknown-key.toml", b"[run]\nsizee = 64\n");
    root.drop_file("unknown-key.png", &good);
    root.drop_file("missing-style.toml", b"[[style]]\npath = \"nope.png\"\n");
    root.drop_file("missing-style.png", &good);
    root.drop_file("escape.toml", b"[[style]]\npath = \"../styles/../inbox/x.png\"\n");
    root.drop_file("escape.png", &good);
    root.drop_file("absolute.toml", b"[[style]]\npath = \"/etc/passwd\"\n");
    root.drop_file("absolute.png", &good);
    root.drop_file(
        "limits.toml",
        b"[limits]\nmax_pixels = 1\n[model]\nweights = \"/tmp/x\"\ndevice = \"cpu\"\nbackend = \"candle\"\n",
    );
    root.drop_file("limits.png", &good);
    let outside = root.logs.join("outside.png");
    std::fs::write(&outside, &good).unwrap();
    std::os::unix::fs::symlink(&outside, root.inbox("link.png")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.inbox("etc-link.jpg")).unwrap();
    root.drop_file("good two.png", &png_bytes(30, 40, 2));

    let (status, events) = root.run_once(&[]);
    assert!(status.success());
    assert_eq!(root.files("out"), ["good one.png", "good two.png"]);
    let reason = |name: &str| {
        let path = root.path("failed").join(format!("{name}.error.txt"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("no {}", path.display()));
        assert!(root.path("failed").join(name).symlink_metadata().is_ok(), "{name} is kept in failed/");
        text
    };
    let expect = |name: &str, needles: &[&str]| {
        let text = reason(name);
        for needle in needles {
            assert!(text.contains(needle), "{name}: expected \"{needle}\" in:\n{text}");
        }
    };
    expect("truncated.png", &["truncated.png", "decode"]);
    expect("text.jpg", &["text.jpg", "decode"]);
    expect("unknown-key.png", &["run.sizee", "unknown"]);
    expect("missing-style.png", &["nope.png", "not found"]);
    expect("escape.png", &["inside styles/", ".."]);
    expect("absolute.png", &["/etc/passwd", "inside styles/"]);
    expect("limits.png", &["limits", "model.weights", "model.device", "model.backend", "daemon's config"]);
    expect("link.png", &["symbolic link", "outside"]);
    expect("etc-link.jpg", &["symbolic link", "outside"]);
    let failed = root.files("failed");
    for sidecar in ["unknown-key.toml", "missing-style.toml", "escape.toml", "absolute.toml", "limits.toml"] {
        assert!(failed.contains(&sidecar.to_string()), "{sidecar} went with its image: {failed:?}");
    }
    assert_eq!(std::fs::read(&outside).unwrap(), good, "the link's target is untouched");
    assert!(root.files("inbox").is_empty() && root.work_dirs().is_empty());
    assert_eq!(with_message(&events, "job failed").len(), 9);
}

#[test]
fn kill_9_resumes_from_the_checkpoint_bit_identically_with_adam() {
    let config = config_text(40, "");
    // What an uninterrupted run makes.
    let reference = TestRoot::new(&config);
    reference.drop_file("photo.png", &png_bytes(40, 32, 9));
    assert!(reference.run_once(&[]).0.success());
    let expected = pixels(&reference.path("out/photo.png"));

    let root = TestRoot::new(&config);
    let mut daemon = root.start(&[]);
    root.drop_renamed("photo.png", &png_bytes(40, 32, 9));
    daemon.until(LONG, "a checkpoint at iteration 6 or later", || {
        job_checkpoint(&root).is_some_and(|(_, d)| d >= 6)
    });
    let worker = root.status().unwrap()["running"][0]["pid"].as_u64().expect("the worker's pid");
    daemon.signal("KILL");
    assert!(!daemon.wait(Duration::from_secs(10)).success());
    // The worker dies with its supervisor: no orphan goes on writing into the job folder.
    wait_until(Duration::from_secs(10), "the worker to die with the daemon", || {
        std::fs::read_to_string(format!("/proc/{worker}/stat")).map_or(true, |stat| {
            stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
    });
    let (job_dir, at) = job_checkpoint(&root).expect("the checkpoint survives");
    assert!(at < 40, "killed mid-job");
    assert_eq!(std::fs::read_to_string(job_dir.join(".attempts")).unwrap().trim(), "1");
    assert!(root.files("out").is_empty());

    let (status, events) = root.run_once(&[]);
    assert!(status.success());
    let started = with_message(&events, "job started");
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["resumed_from"], at, "the iteration count continues from the checkpoint");
    assert_eq!(with_message(&events, "job computed")[0]["iterations"], 40 - at);
    assert_eq!(root.files("out"), ["photo.png"]);
    assert_eq!(root.files("done"), ["photo.png"]);
    assert!(root.files("inbox").is_empty() && root.work_dirs().is_empty() && root.files("failed").is_empty());
    assert!(
        pixels(&root.path("out/photo.png")) == expected,
        "resumed result differs from an uninterrupted run"
    );
}

#[test]
fn sigterm_checkpoints_and_exits_0_within_5_s_and_the_job_resumes() {
    let root = TestRoot::new(&config_text(400, "checkpoint_every = 0"));
    let mut daemon = root.start(&[]);
    root.drop_file("long job.png", &png_bytes(40, 30, 3));
    daemon.until(LONG, "the job to be a few iterations in", || {
        root.status().is_some_and(|s| s["running"][0]["iteration"].as_u64().is_some_and(|i| i >= 3))
    });
    // model.device defaults to auto, which is the CPU in a build without GPU features.
    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    assert_eq!(root.status().expect("status.json")["running"][0]["device"], "cpu");
    assert!(job_checkpoint(&root).is_none(), "checkpoint_every = 0: none before the stop");
    let asked = Instant::now();
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert!(asked.elapsed() < Duration::from_secs(5), "took {:?}", asked.elapsed());
    let (job_dir, at) = job_checkpoint(&root).expect("a checkpoint is written on SIGTERM");
    assert!(at >= 3);
    assert_eq!(
        std::fs::read_to_string(job_dir.join(".attempts")).unwrap().trim(),
        "0",
        "a clean stop is no crash"
    );
    assert_eq!(root.status().unwrap()["state"], "stopped");

    // Resume it, and stop again at once: the count only grows.
    let mut again = root.start(&[]);
    wait_until(LONG, "the job to resume", || with_message(&again.events(), "job started").len() == 1);
    let resumed = with_message(&again.events(), "job started")[0]["resumed_from"].as_u64().unwrap();
    assert_eq!(resumed, at);
    again.signal("INT");
    assert!(again.wait(Duration::from_secs(30)).success());
    assert!(job_checkpoint(&root).unwrap().1 >= at);
}

#[test]
fn two_daemons_on_one_root_never_run_a_job_twice() {
    let root = TestRoot::new(&config_text(6, "sidecar_wait_ms = 0"));
    let mut first = root.start(&[]);
    for i in 0..10 {
        root.drop_renamed(&format!("job{i:02}.png"), &png_bytes(40, 30, i));
    }
    // The second starts while the first holds jobs in work/: it must not "resume" them.
    first.until(LONG, "the first daemon to run a job", || !root.work_dirs().is_empty());
    let mut second = root.start(&[]);
    first.until(LONG, "10 results", || root.files("done").len() == 10);
    wait_until(LONG, "work/ to empty", || root.work_dirs().is_empty());
    first.signal("TERM");
    second.signal("TERM");
    assert!(first.wait(Duration::from_secs(10)).success());
    assert!(second.wait(Duration::from_secs(10)).success());

    let names: Vec<String> = (0..10).map(|i| format!("job{i:02}.png")).collect();
    assert_eq!(root.files("out"), names);
    assert_eq!(root.files("done"), names);
    let events = root.all_events();
    let starts = starts_by_name(&events);
    assert_eq!(starts.len(), 10);
    assert!(starts.values().all(|&n| n == 1), "a job ran twice: {starts:?}");
    assert!(with_message(&events, "taking over a job left in work/").is_empty());
    let by_first = with_message(&first.events(), "job started").len();
    assert!(by_first > 0 && by_first < 10, "both daemons worked: first ran {by_first}");
}

#[test]
fn polling_mode_takes_drops_with_spaces_and_non_ascii_names() {
    let root = TestRoot::new(&config_text(2, "settle_ms = 300"));
    let mut daemon = root.start(&["--poll", "100"]);
    root.drop_file("ein schönes Foto ü.toml", b"[run]\nsize = 48\n");
    root.drop_slowly("ein schönes Foto ü.png", &png_bytes(40, 30, 4), 4, Duration::from_millis(60));
    root.drop_file("日本 の 写真.png", &png_bytes(30, 30, 5));
    daemon.until(LONG, "two results", || root.files("done").len() == 3);
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(10)).success());
    assert_eq!(root.files("out"), ["ein schönes Foto ü.png", "日本 の 写真.png"]);
    assert_eq!(pixels(&root.path("out/ein schönes Foto ü.png")).0, 48, "its sidecar applied");
    assert_eq!(root.files("done"), ["ein schönes Foto ü.png", "ein schönes Foto ü.toml", "日本 の 写真.png"]);
    assert!(root.status().unwrap()["mode"].as_str().unwrap().starts_with("poll"));
}

#[test]
fn same_names_never_overwrite_and_originals_can_be_deleted() {
    let root = TestRoot::new(&config_text(2, "settle_ms = 100\nsidecar_wait_ms = 0"));
    for seed in [1, 2] {
        root.drop_file("same.png", &png_bytes(32, 32, seed));
        assert!(root.run_once(&[]).0.success());
    }
    root.drop_file("same.jpg", &png_bytes(32, 32, 3));
    assert!(root.run_once(&[]).0.success());
    assert_eq!(root.files("out"), ["same-2.png", "same-3.png", "same.png"]);
    assert_eq!(root.files("done"), ["same-2.png", "same.jpg", "same.png"]);
    assert_ne!(pixels(&root.path("out/same.png")), pixels(&root.path("out/same-2.png")));

    std::fs::write(
        &root.config,
        config_text(2, "settle_ms = 100\nsidecar_wait_ms = 0\nkeep_originals = false"),
    )
    .unwrap();
    root.drop_file("gone.png", &png_bytes(32, 32, 4));
    assert!(root.run_once(&[]).0.success());
    assert!(root.files("out").contains(&"gone.png".to_string()));
    assert!(!root.files("done").contains(&"gone.png".to_string()), "deleted, not kept");
}

#[test]
fn a_job_that_crashes_the_daemon_twice_is_failed_not_retried() {
    let root = TestRoot::new(&config_text(400, ""));
    for round in 1..=2 {
        let mut daemon = root.start(&[]);
        if round == 1 {
            root.drop_file("killer.png", &png_bytes(40, 30, 6));
        }
        wait_until(LONG, "the job to run", || {
            with_message(&daemon.events(), "job started").len() == 1
                && root
                    .status()
                    .is_some_and(|s| s["running"][0]["iteration"].as_u64().is_some_and(|i| i >= 1))
        });
        daemon.signal("KILL");
        daemon.wait(Duration::from_secs(10));
    }
    let (status, events) = root.run_once(&[]);
    assert!(status.success());
    assert!(with_message(&events, "job started").is_empty(), "not run a third time");
    let text = std::fs::read_to_string(root.path("failed/killer.png.error.txt")).unwrap();
    assert!(text.contains("started 2 times"), "{text}");
    assert!(root.path("failed/killer.png").is_file() && root.work_dirs().is_empty());
}

#[test]
fn config_changes_apply_from_the_next_job_and_invalid_ones_are_ignored() {
    let root = TestRoot::new(&config_text(3, "sidecar_wait_ms = 0"));
    let mut daemon = root.start(&[]);
    let run = |name: &str, seed: u32| {
        root.drop_renamed(name, &png_bytes(32, 32, seed));
        wait_until(LONG, name, || root.files("done").contains(&name.to_string()));
        let events = daemon.events();
        with_message(&events, "job started").into_iter().find(|f| f["name"] == name).unwrap()["total"]
            .as_u64()
    };
    assert_eq!(run("a.png", 1), Some(3));

    std::fs::write(&root.config, config_text(5, "sidecar_wait_ms = 0")).unwrap();
    wait_until(LONG, "the reload", || {
        with_message(&daemon.events(), "config reloaded; it applies from the next job").len() == 1
    });
    assert_eq!(run("b.png", 2), Some(5));

    std::fs::write(&root.config, "[run]\nsize = -1\n").unwrap();
    let invalid = "the changed config is invalid; keeping the previous one";
    wait_until(LONG, "the invalid config to be noticed", || {
        with_message(&daemon.events(), invalid).len() == 1
    });
    daemon.signal("HUP");
    wait_until(LONG, "SIGHUP to reload (and refuse) it", || {
        with_message(&daemon.events(), invalid).len() == 2
    });
    assert_eq!(run("c.png", 3), Some(5), "the previous config is kept");
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(10)).success());
}

/// The names in `rel` that end with `suffix`.
fn ending(root: &TestRoot, rel: &str, suffix: &str) -> Vec<String> {
    root.files(rel).into_iter().filter(|n| n.ends_with(suffix)).collect()
}

#[test]
fn long_names_are_shortened_to_fit_and_never_stick_in_work() {
    let root = TestRoot::new(&config_text(2, "settle_ms = 100\nsidecar_wait_ms = 300"));
    // A bad input whose .error.txt would pass 255 bytes.
    let bad = format!("{}.png", "M".repeat(246));
    root.drop_file(&bad, b"not an image at all\n");
    // 254 bytes, with a sidecar asking for JPEG: NAME.jpg.json would be 259 bytes.
    let jpeg_stem = "J".repeat(250);
    root.drop_file(&format!("{jpeg_stem}.toml"), b"[output]\nformat = \"jpeg\"\n");
    root.drop_file(&format!("{jpeg_stem}.png"), &png_bytes(40, 30, 1));
    // 255 bytes, dropped twice: the second one's -2 names must be shortened.
    let full = format!("{}.png", "D".repeat(251));
    root.drop_file(&full, &png_bytes(40, 30, 2));
    let (status, events) = root.run_once(&[]);
    assert!(status.success());
    root.drop_file(&full, &png_bytes(40, 30, 3));
    let (status, more) = root.run_once(&[]);
    assert!(status.success());

    let all: Vec<String> = ["out", "done", "failed"].iter().flat_map(|d| root.files(d)).collect();
    assert!(all.iter().all(|n| n.len() <= 255), "{all:?}");
    assert!(root.work_dirs().is_empty(), "nothing stays in work/: {:?}", root.work_dirs());
    assert!(root.files("inbox").is_empty());

    // The bad one: in failed/ with its reason, the two sharing one (shortened) name.
    let reasons = ending(&root, "failed", ".error.txt");
    assert_eq!(reasons.len(), 1, "{:?}", root.files("failed"));
    let original = reasons[0].trim_end_matches(".error.txt").to_string();
    assert_eq!(reasons[0].len(), 255);
    assert!(original.starts_with("MMMM") && original.ends_with(".png"), "{original}");
    assert_eq!(root.files("failed"), [original.clone(), reasons[0].clone()]);
    let text = std::fs::read_to_string(root.path("failed").join(&reasons[0])).unwrap();
    assert!(text.starts_with(&bad) && text.contains("decode"), "the reason names the dropped file: {text}");
    assert_eq!(with_message(&events, "job failed").len(), 1);

    // The JPEG one: its result and provenance (shortened together) in out/, originals in done/.
    let jpegs = ending(&root, "out", ".jpg");
    assert_eq!(jpegs.len(), 1, "{:?}", root.files("out"));
    assert!(jpegs[0].starts_with("JJJJ"));
    let provenance = format!("{}.json", jpegs[0]);
    assert_eq!(provenance.len(), 255);
    assert!(root.path("out").join(&provenance).is_file(), "{:?}", root.files("out"));
    assert_eq!(pixels(&root.path("out").join(&jpegs[0])).0, 32);
    let done = root.files("done");
    assert!(
        done.contains(&format!("{jpeg_stem}.png")) && done.contains(&format!("{jpeg_stem}.toml")),
        "{done:?}"
    );

    // The 255-byte one, twice: two results and two originals, all distinct.
    let results: Vec<String> =
        ending(&root, "out", ".png").into_iter().filter(|n| n.starts_with('D')).collect();
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results.contains(&full), "{results:?}");
    let second = results.iter().find(|n| **n != full).unwrap();
    assert!(second.ends_with("-2.png") && second.len() == 255, "{second}");
    let originals: Vec<&String> = done.iter().filter(|n| n.starts_with('D')).collect();
    assert_eq!(originals.len(), 2, "{done:?}");
    assert_ne!(pixels(&root.path("out").join(&full)), pixels(&root.path("out").join(second)));
    assert_eq!(with_message(&more, "job done").len(), 1);
}

#[test]
fn a_symbolic_link_loop_or_to_nothing_is_reported_as_such() {
    let root = TestRoot::new(&config_text(2, "settle_ms = 100\nsidecar_wait_ms = 300"));
    std::os::unix::fs::symlink("loop.png", root.inbox("loop.png")).unwrap();
    std::os::unix::fs::symlink("nowhere.png", root.inbox("dangling.png")).unwrap();
    // A sidecar that is a loop of links is named as such too.
    root.drop_file("looped.png", &png_bytes(20, 20, 3));
    std::os::unix::fs::symlink("looped.toml", root.inbox("looped.toml")).unwrap();
    let (status, events) = root.run_once(&[]);
    assert!(status.success());
    let reason =
        |name: &str| std::fs::read_to_string(root.path("failed").join(format!("{name}.error.txt"))).unwrap();
    let text = reason("loop.png");
    assert!(text.contains("loop") && !text.contains("outside"), "{text}");
    let text = reason("dangling.png");
    assert!(
        text.contains("nowhere.png") && text.contains("does not exist") && !text.contains("outside"),
        "{text}"
    );
    let text = reason("looped.png");
    assert!(text.contains("looped.toml") && text.contains("loop") && !text.contains("outside"), "{text}");
    assert!(root.path("failed/loop.png").symlink_metadata().unwrap().file_type().is_symlink());
    assert_eq!(with_message(&events, "job failed").len(), 3);
    assert!(root.work_dirs().is_empty());
}

#[test]
fn a_second_sigterm_exits_at_once_and_does_not_count_as_a_crash() {
    // Iterations long enough (384 px) that the second signal comes while the first is still
    // waiting for the running one to end.
    let root = TestRoot::new(&config_text(400, "checkpoint_every = 1").replace("size = 32", "size = 384"));
    let mut daemon = root.start(&[]);
    root.drop_file("patient.png", &png_bytes(40, 30, 8));
    daemon.until(LONG, "the job to be an iteration in", || {
        root.status().is_some_and(|s| s["running"][0]["iteration"].as_u64().is_some_and(|i| i >= 1))
    });
    let (job_dir, at) = job_checkpoint(&root).expect("a checkpoint after the first iteration");
    assert_eq!(
        std::fs::read_to_string(job_dir.join(".attempts")).unwrap().trim(),
        "1",
        "counted while running"
    );
    daemon.signal("TERM");
    std::thread::sleep(Duration::from_millis(20));
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "the second signal exits at once: {status:?}");
    assert_eq!(
        std::fs::read_to_string(job_dir.join(".attempts")).unwrap().trim(),
        "0",
        "an operator's hasty stop is no crash"
    );
    assert!(job_checkpoint(&root).is_some_and(|(_, d)| d >= at), "the last checkpoint holds");
    assert!(
        with_message(&daemon.events(), "second stop signal: exiting now; the last checkpoints hold").len()
            == 1
    );
}

#[test]
fn status_counts_are_totals_across_restarts_with_this_runs_beside() {
    let root = TestRoot::new(&config_text(2, "settle_ms = 100\nsidecar_wait_ms = 0"));
    root.drop_file("one.png", &png_bytes(32, 32, 1));
    root.drop_file("bad.png", b"nope");
    assert!(root.run_once(&[]).0.success());
    let first = root.status().unwrap();
    assert_eq!((first["counts"]["done"].as_u64(), first["counts"]["failed"].as_u64()), (Some(1), Some(1)));
    root.drop_file("two.png", &png_bytes(32, 32, 2));
    assert!(root.run_once(&[]).0.success());
    let second = root.status().unwrap();
    assert_eq!((second["counts"]["done"].as_u64(), second["counts"]["failed"].as_u64()), (Some(2), Some(1)));
    assert_eq!(
        (second["this_run"]["done"].as_u64(), second["this_run"]["failed"].as_u64()),
        (Some(1), Some(0))
    );
}

#[test]
fn a_full_disk_is_waited_out_without_a_restart_and_never_counts_as_a_crash() {
    let root = TestRoot::new(&config_text(150, "settle_ms = 100\nsidecar_wait_ms = 0"));
    let flag = root.logs.join("disk-full");
    let faults = format!("enospc-while:{}", flag.display());
    let env = [("EASEL_DAEMON_FAULTS", std::ffi::OsStr::new(&faults))];
    let mut daemon = root.start_with_env(&[], &env);
    let log = daemon.log.clone();
    let count = |message: &str| with_message(&events_in(&log), message).len();
    let waits = || count("waiting for disk space");

    // 1. The disk fills while a job runs: its end waits, counted once, and completes when space returns.
    root.drop_file("first.png", &png_bytes(40, 30, 1));
    daemon.until(LONG, "the first job to run", || {
        root.status().is_some_and(|s| s["running"][0]["iteration"].as_u64().is_some_and(|i| i >= 2))
    });
    std::fs::write(&flag, "").unwrap();
    daemon.until(LONG, "the first job to wait for space", || waits() >= 2);
    let dirs = root.work_dirs();
    assert_eq!(dirs.len(), 1);
    assert_eq!(std::fs::read_to_string(dirs[0].join(".attempts")).unwrap().trim(), "1");
    assert!(root.files("out").is_empty() && root.files("failed").is_empty());
    std::fs::remove_file(&flag).unwrap();
    daemon.until(LONG, "the first job to finish", || root.files("done") == ["first.png"]);

    // 2. A drop while the disk is full cannot be claimed; it is taken once space returns.
    std::fs::write(&flag, "").unwrap();
    root.drop_file("second.png", &png_bytes(40, 30, 2));
    daemon.until(LONG, "the claim to fail", || count("cannot claim job") > 0);
    std::fs::remove_file(&flag).unwrap();
    daemon.until(LONG, "the second job to finish", || root.files("done").len() == 2);

    // 3. A stop while a job waits for space is a clean stop; the next start finishes the job.
    root.drop_file("third.png", &png_bytes(40, 30, 3));
    daemon.until(LONG, "the third job to run", || {
        root.status().is_some_and(|s| {
            s["running"][0]["name"] == "third.png"
                && s["running"][0]["iteration"].as_u64().is_some_and(|i| i >= 2)
        })
    });
    let before = waits();
    std::fs::write(&flag, "").unwrap();
    daemon.until(LONG, "the third job to wait for space", || waits() > before);
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).success());
    let dirs = root.work_dirs();
    assert_eq!(dirs.len(), 1);
    assert_eq!(
        std::fs::read_to_string(dirs[0].join(".attempts")).unwrap().trim(),
        "0",
        "a stop, not a crash"
    );
    std::fs::remove_file(&flag).unwrap();
    let (status, _) = root.run_once(&[]);
    assert!(status.success());

    assert_eq!(root.files("done"), ["first.png", "second.png", "third.png"]);
    assert_eq!(root.files("out"), ["first.png", "second.png", "third.png"]);
    assert!(root.files("failed").is_empty() && root.work_dirs().is_empty());
    let starts = starts_by_name(&root.all_events());
    assert_eq!(starts.get("first.png"), Some(&1), "not recomputed: {starts:?}");
    assert_eq!(starts.get("second.png"), Some(&1), "{starts:?}");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mount -t tmpfs failed (this test needs root)");
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
#[ignore = "needs root to mount a 3 MB tmpfs: cargo test --release --test daemon -- --ignored"]
fn a_really_full_tmpfs_is_waited_out_and_the_job_completes() {
    let disk = Tmpfs::mount("3m");
    let root =
        TestRoot::at(&disk.0.path().join("root"), &config_text(60, "settle_ms = 100\nsidecar_wait_ms = 0"));
    let mut daemon = root.start(&[]);
    root.drop_file("squeezed.png", &png_bytes(40, 30, 5));
    daemon.until(LONG, "the job to run", || {
        root.status().is_some_and(|s| s["running"][0]["iteration"].as_u64().is_some_and(|i| i >= 2))
    });
    // Fill the disk to the last byte.
    let filler = disk.0.path().join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![7u8; 4096];
    loop {
        use std::io::Write;
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("{e}"),
        }
    }
    drop(file);
    let log = daemon.log.clone();
    daemon.until(LONG, "the job to wait for space", || {
        !with_message(&events_in(&log), "waiting for disk space").is_empty()
    });
    let events = events_in(&log);
    let waits = with_message(&events, "waiting for disk space");
    assert_eq!(waits[0]["step"], "result", "the computed result waits to be written: {waits:?}");
    let dirs = root.work_dirs();
    assert_eq!(dirs.len(), 1);
    assert_eq!(std::fs::read_to_string(dirs[0].join(".attempts")).unwrap().trim(), "1");
    std::fs::remove_file(&filler).unwrap();
    daemon.until(LONG, "the job to finish", || root.files("done") == ["squeezed.png"]);
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).success());
    assert_eq!(root.files("out"), ["squeezed.png"]);
    assert!(root.files("failed").is_empty() && root.work_dirs().is_empty());
    assert_eq!(with_message(&daemon.events(), "job started").len(), 1, "never restarted nor recomputed");
}

/// A job whose sidecar asks for 16384 px is failed before it allocates (no worker is started
/// for it), with the memory it would need, while a good job beside it (two workers) is painted
/// and the daemon goes on.
#[test]
fn a_job_too_large_for_memory_fails_with_its_need_and_spares_the_others() {
    // 4 GB, as on a small board: 16384 px needs about 18 GB even in the smallest tiles (its
    // image, gradient, optimiser state and content targets alone), so on any machine it is
    // refused rather than painted in tiles for hours.
    let mut config = config_text(4, "workers = 2");
    config.push_str("\n[limits]\nmemory_mb = 4096\n");
    let root = TestRoot::new(&config);
    let mut daemon = root.start(&[]);
    root.drop_file("huge.toml", b"[run]\nsize = 16384\niterations = 1\n");
    root.drop_file("huge.png", &png_bytes(40, 30, 5));
    root.drop_file("small.png", &png_bytes(40, 30, 6));
    daemon.until(LONG, "both jobs to end", || {
        root.files("out") == ["small.png"] && root.path("failed/huge.png.error.txt").is_file()
    });
    let reason = std::fs::read_to_string(root.path("failed").join("huge.png.error.txt")).expect("a reason");
    assert!(
        reason.contains("needs about") && reason.contains("MB") && reason.contains("run.size ="),
        "{reason}"
    );
    assert!(root.files("failed").contains(&"huge.toml".to_string()));
    daemon.until(LONG, "work/ to empty", || root.work_dirs().is_empty());
    assert!(root.files("inbox").is_empty());
    let events = daemon.events();
    assert_eq!(starts_by_name(&events).get("huge.png"), None, "refused before a worker ran it");
    assert_eq!(root.status().unwrap()["state"], "running", "the daemon goes on");
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).success());
}

/// The running entry of the job named `name` in status.json.
fn running_entry(root: &TestRoot, name: &str) -> Option<serde_json::Value> {
    let status = root.status()?;
    status["running"].as_array()?.iter().find(|r| r["name"] == name).cloned()
}

/// A worker killed with SIGKILL twice (as the kernel's OOM killer would) fails its own job,
/// with a reason that names the kills and memory, while a job beside it is painted.
#[test]
fn a_worker_killed_twice_fails_only_its_own_job() {
    let root = TestRoot::new(&config_text(30, "workers = 2"));
    let mut daemon = root.start(&[]);
    let log = daemon.log.clone();
    root.drop_file("victim.toml", b"[run]\niterations = 100000\n");
    root.drop_file("victim.png", &png_bytes(40, 30, 3));
    root.drop_file("bystander.png", &png_bytes(40, 30, 4));
    let mut killed = Vec::new();
    for round in 1..=2 {
        let mut pid = None;
        daemon.until(LONG, &format!("the victim's worker {round} to iterate"), || {
            let started = starts_by_name(&events_in(&log)).get("victim.png") == Some(&round);
            pid = running_entry(&root, "victim.png")
                .filter(|_| started)
                .filter(|r| r["iteration"].as_u64().is_some_and(|i| i >= 1))
                .and_then(|r| r["pid"].as_u64())
                .filter(|p| !killed.contains(p));
            pid.is_some()
        });
        let pid = pid.unwrap();
        assert_ne!(pid, u64::from(daemon.pid()), "a worker of its own");
        let status = std::process::Command::new("kill").arg("-KILL").arg(pid.to_string()).status().unwrap();
        assert!(status.success());
        killed.push(pid);
    }
    daemon.until(LONG, "the victim to be failed and the bystander painted", || {
        root.path("failed/victim.png.error.txt").is_file()
            && root.files("out") == ["bystander.png"]
            && root.files("done") == ["bystander.png"]
    });
    let reason = std::fs::read_to_string(root.path("failed/victim.png.error.txt")).unwrap();
    assert!(
        reason.contains("killed by signal 9 (SIGKILL) twice")
            && reason.contains("planned peak")
            && reason.contains("out of memory?"),
        "{reason}"
    );
    let starts = starts_by_name(&daemon.events());
    assert_eq!(starts.get("victim.png"), Some(&2), "run twice, not a third time: {starts:?}");
    assert_eq!(starts.get("bystander.png"), Some(&1), "{starts:?}");
    assert_eq!(root.status().unwrap()["state"], "running", "the daemon goes on");
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).success());
}

/// SIGTERM with two workers running: each writes its checkpoint and exits, the daemon exits 0,
/// and the next start resumes both to results bit-identical to uninterrupted runs (Adam).
#[test]
fn sigterm_with_two_running_workers_checkpoints_both_and_both_resume_bit_identically() {
    let config = config_text(60, "workers = 2");
    let drops = [("one.png", png_bytes(40, 32, 11)), ("two.png", png_bytes(32, 40, 12))];
    let reference = TestRoot::new(&config);
    for (name, bytes) in &drops {
        reference.drop_file(name, bytes);
    }
    assert!(reference.run_once(&[]).0.success());

    let root = TestRoot::new(&config);
    let mut daemon = root.start(&[]);
    for (name, bytes) in &drops {
        root.drop_file(name, bytes);
    }
    daemon.until(LONG, "both workers to be a few iterations in", || {
        drops.iter().all(|(name, _)| {
            running_entry(&root, name).is_some_and(|r| r["iteration"].as_u64().is_some_and(|i| i >= 3))
        })
    });
    let pids: Vec<u64> =
        drops.iter().map(|(name, _)| running_entry(&root, name).unwrap()["pid"].as_u64().unwrap()).collect();
    assert!(pids[0] != pids[1], "a worker each: {pids:?}");
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).success());
    for pid in &pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "worker {pid} exited");
    }
    let dirs = root.work_dirs();
    assert_eq!(dirs.len(), 2);
    for dir in &dirs {
        let done = checkpoint_done(&dir.join(".checkpoint.safetensors")).expect("a checkpoint on SIGTERM");
        assert!((3..60).contains(&done), "{done}");
        assert_eq!(
            std::fs::read_to_string(dir.join(".attempts")).unwrap().trim(),
            "0",
            "a stop, not a crash"
        );
    }
    assert!(root.files("out").is_empty());

    let (status, events) = root.run_once(&[]);
    assert!(status.success());
    let started = with_message(&events, "job started");
    assert_eq!(started.len(), 2);
    assert!(started.iter().all(|s| s["resumed_from"].as_u64().is_some_and(|r| r >= 3)), "{started:?}");
    for (name, _) in &drops {
        assert!(
            pixels(&root.path("out").join(name)) == pixels(&reference.path("out").join(name)),
            "{name}: the resumed result differs from an uninterrupted run"
        );
    }
    assert!(root.work_dirs().is_empty() && root.files("failed").is_empty());
}

/// A worker whose memory cap (forced low with EASEL_WORKER_CAP_MB) is below what it allocates
/// ends alone: the job is failed as out of memory after two tries, the daemon goes on.
#[test]
fn a_worker_over_its_memory_cap_ends_alone_and_is_reported_out_of_memory() {
    let root = TestRoot::new(&config_text(4, ""));
    let cap = std::ffi::OsStr::new("20");
    let mut daemon = root.start_with_env(&[], &[("EASEL_WORKER_CAP_MB", cap)]);
    root.drop_file("greedy.png", &png_bytes(40, 30, 2));
    daemon.until(LONG, "the job to be failed", || root.path("failed/greedy.png.error.txt").is_file());
    let reason = std::fs::read_to_string(root.path("failed/greedy.png.error.txt")).unwrap();
    assert!(
        reason.contains("ran out of memory twice")
            && reason.contains("memory allocation of")
            && reason.contains("cap 20 MB: out of memory"),
        "{reason}"
    );
    let events = daemon.events();
    let crashed = with_message(&events, "the job's worker crashed");
    assert_eq!(crashed.len(), 2, "{crashed:?}");
    let mut last = None;
    let counted = Instant::now();
    while !last.as_ref().is_some_and(|s: &serde_json::Value| s["this_run"]["failed"] == 1) {
        assert!(counted.elapsed() < LONG, "status.json does not count the failure: {last:?}");
        std::thread::sleep(Duration::from_millis(25));
        last = root.status();
    }
    assert_eq!(last.unwrap()["state"], "running", "the daemon goes on");
    assert!(daemon.child.try_wait().unwrap().is_none(), "the daemon goes on");
    daemon.until(LONG, "work/ to empty", || root.work_dirs().is_empty());
    assert!(root.files("out").is_empty());
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).success());
}

/// With two workers and a budget that holds one 512 px job but not two, the second waits for
/// the first to end instead of running beside it; both are painted.
#[test]
fn jobs_run_side_by_side_only_while_their_memory_fits_together() {
    let mut config = config_text(2, "workers = 2");
    // One job is predicted at ~560 MB, of which ~220 MB (weights, kernel cache) are shared.
    config.push_str("\n[limits]\nmemory_mb = 700\n");
    let root = TestRoot::new(&config);
    for name in ["first", "second"] {
        root.drop_file(&format!("{name}.toml"), b"[run]\nsize = 512\n");
        root.drop_file(&format!("{name}.png"), &png_bytes(40, 30, 7));
    }
    let (status, events) = root.run_once(&[]);
    assert!(status.success());
    assert_eq!(root.files("out"), ["first.png", "second.png"]);
    let position = |message: &str| {
        events
            .iter()
            .enumerate()
            .filter(|(_, e)| e["fields"]["message"] == message)
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    let (started, done, waited) = (
        position("job started"),
        position("job done"),
        position("waiting for memory: running jobs hold the rest of the budget"),
    );
    assert_eq!((started.len(), done.len()), (2, 2), "{events:?}");
    assert_eq!(waited.len(), 1, "one job waited");
    assert!(done[0] < started[1], "the second started after the first was done: {started:?} {done:?}");
}

/// A job whose sidecar asks for tiles is painted tile by tile in its worker, and says so.
#[test]
fn a_job_in_tiles_is_painted_by_its_worker() {
    let root = TestRoot::new(&config_text(2, "workers = 1"));
    root.drop_file("tiled.toml", b"[run]\nsize = 200\n[model]\ntile_size = 64\n");
    root.drop_file("tiled.png", &png_bytes(40, 30, 8));
    let (status, events) = root.run_once(&[]);
    assert!(status.success());
    assert_eq!(root.files("out"), ["tiled.png"]);
    let tiles: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| {
            e["fields"]["message"].as_str().is_some_and(|m| m.starts_with("evaluating in tiles of 64 px"))
        })
        .collect();
    assert_eq!(tiles.len(), 1, "one scale, in tiles: {events:?}");
}
