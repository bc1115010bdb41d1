//! Soak test of `easel watch` (ignored by default; see deploy/DAEMON.md): 200 tiny jobs dropped
//! in every way while the daemon is killed at random, with bad files among them. Every input
//! must end in exactly one of `done/` (with its result) or `failed/` (with its reason).
//!
//! `cargo test --release --test daemon_soak -- --ignored --nocapture`
//! (`EASEL_SOAK_SEED=N` picks another random sequence, `EASEL_SOAK_JOBS=N` another size).

mod daemon_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use daemon_support::*;
use easel_testkit::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Good,
    /// Must fail: not an image, a truncated one, or a sidecar with an unknown key.
    Bad,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// No input is left in `inbox/` or in a job folder of `work/` (a claim cut short by a kill may
/// leave an empty folder, removed by a later start once a minute old).
fn settled(root: &TestRoot) -> bool {
    root.files("inbox").is_empty()
        && root.work_dirs().iter().all(|d| {
            std::fs::read_dir(d)
                .map(|d| d.flatten().all(|e| e.file_name().to_string_lossy().starts_with('.')))
                .unwrap_or(true)
        })
}

#[test]
#[ignore = "soak test: minutes long; run with --ignored (see deploy/DAEMON.md)"]
fn soak_jobs_with_random_kills_and_bad_files() {
    let seed = env_u64("EASEL_SOAK_SEED", 20261126);
    let jobs = env_u64("EASEL_SOAK_JOBS", 200) as usize;
    eprintln!("soak: {jobs} jobs, seed {seed}");
    let root = TestRoot::new(&config_text(
        2,
        "settle_ms = 300\nsidecar_wait_ms = 150\ncheckpoint_every = 1\nworkers = 2",
    ));
    let mut rng = Rng::new(seed);
    let mut plan: Vec<(String, Kind, u64)> = Vec::new();
    for i in 0..jobs {
        let roll = rng.below(100);
        let kind = if roll < 15 { Kind::Bad } else { Kind::Good };
        let ext = if kind == Kind::Bad && roll < 5 { "jpg" } else { "png" };
        plan.push((format!("job {i:03}.{ext}"), kind, rng.next_u64()));
    }

    let started = Instant::now();
    let (mut kills, mut stops) = (0, 0);
    std::thread::scope(|s| {
        let dropper = s.spawn(|| {
            let mut rng = Rng::new(seed.rotate_left(17));
            for (name, kind, r) in &plan {
                let good = png_bytes(24 + (*r % 24) as u32, 24 + (*r / 24 % 24) as u32, (*r % 1000) as u32);
                let stem = name.rsplit_once('.').unwrap().0;
                let bytes = match (kind, r % 3) {
                    (Kind::Good, _) => good,
                    (Kind::Bad, 0) if name.ends_with(".jpg") => b"not a jpeg at all".to_vec(),
                    (Kind::Bad, 0) | (Kind::Bad, 1) => good[..good.len() / 3].to_vec(),
                    (Kind::Bad, _) => {
                        root.drop_file(&format!("{stem}.toml"), b"[run]\nnot_a_key = 1\n");
                        good
                    }
                };
                if *kind == Kind::Good && r % 7 == 0 {
                    root.drop_renamed(&format!("{stem}.toml"), b"[run]\niterations = 3\n");
                }
                match rng.below(3) {
                    0 => root.drop_file(name, &bytes),
                    1 => root.drop_renamed(name, &bytes),
                    _ => root.drop_slowly(name, &bytes, 3, Duration::from_millis(20)),
                }
                std::thread::sleep(Duration::from_millis(rng.below(60)));
            }
        });
        // Run the daemon, killing (mostly -9) or stopping it at random, until all is dropped
        // and processed.
        let mut rng = Rng::new(seed.rotate_left(33));
        while !(dropper.is_finished() && settled(&root)) {
            assert!(started.elapsed() < Duration::from_secs(1200), "soak did not finish in 20 minutes");
            let mut daemon = root.start(&[]);
            std::thread::sleep(Duration::from_millis(300 + rng.below(2500)));
            if rng.below(4) == 0 {
                daemon.signal("TERM");
                assert!(daemon.wait(Duration::from_secs(30)).success(), "SIGTERM exits 0");
                stops += 1;
            } else {
                daemon.signal("KILL");
                daemon.wait(Duration::from_secs(30));
                kills += 1;
            }
        }
        dropper.join().unwrap();
    });
    // Then let one daemon finish everything.
    let mut daemon = root.start(&[]);
    daemon.until(Duration::from_secs(600), "inbox/ and work/ to empty", || {
        settled(&root) && root.status().is_some_and(|s| s["running"].as_array().is_some_and(|r| r.is_empty()))
    });
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).success());
    eprintln!("soak: {kills} kills, {stops} stops, {:.0} s", started.elapsed().as_secs_f64());

    let done = root.files("done");
    let failed = root.files("failed");
    let out = root.files("out");
    let mut crashed = 0;
    let mut outcomes: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, kind, _) in &plan {
        let in_done = done.contains(name);
        let in_failed = failed.contains(name);
        assert!(in_done != in_failed, "{name}: in done/ {in_done}, in failed/ {in_failed}");
        if in_done {
            assert_eq!(*kind, Kind::Good, "{name} should have failed");
            let result = format!("{}.png", name.rsplit_once('.').unwrap().0);
            assert!(out.contains(&result), "{name}: no out/{result}");
            let (w, h, _) = pixels(&root.path("out").join(&result));
            assert_eq!(w.max(h), 32, "{result}");
            outcomes.insert(name, "done");
        } else {
            let reason = std::fs::read_to_string(root.path("failed").join(format!("{name}.error.txt")))
                .unwrap_or_else(|_| panic!("{name}: no reason in failed/"));
            assert!(reason.starts_with(name.as_str()), "{name}: {reason}");
            if *kind == Kind::Good {
                // Only a job killed twice mid-run may fail without a fault of its own.
                assert!(reason.contains("started 2 times"), "{name}: {reason}");
                crashed += 1;
            }
            outcomes.insert(name, "failed");
        }
    }
    let images_done = done.iter().filter(|n| !n.ends_with(".toml")).count();
    let results = out.iter().filter(|n| n.ends_with(".png")).count();
    assert_eq!(results, images_done, "one result per finished job, none duplicated: {out:?}");
    assert!(out.iter().all(|n| !n.contains("-2.")), "no job ran twice into a numbered name: {out:?}");
    let extra: Vec<&String> = done
        .iter()
        .chain(&failed)
        .filter(|n| !n.ends_with(".toml") && !n.ends_with(".txt"))
        .filter(|n| !outcomes.contains_key(n.as_str()))
        .collect();
    assert!(extra.is_empty(), "files that were never dropped: {extra:?}");
    eprintln!(
        "soak: {} done, {} failed ({crashed} after two crashes)",
        images_done,
        outcomes.len() - images_done
    );
}
