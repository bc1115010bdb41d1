//! Soak test of `easel watch` (ignored by default; see deploy/DAEMON.md): 200 tiny jobs dropped
//! in every way while the daemon is killed at random, stopped (sometimes with two signals in a
//! row) and starved of disk space in spells (the `EASEL_DAEMON_FAULTS` hook), with bad files
//! and names as long as ext4 allows among them. Every input must end in exactly one of `done/`
//! (with its result) or `failed/` (with its reason).
//!
//! `cargo test --release --test daemon_soak -- --ignored --nocapture`
//! (`EASEL_SOAK_SEED=N` picks another random sequence, `EASEL_SOAK_JOBS=N` another size).

mod daemon_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use daemon_support::*;
use easel_testkit::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Good,
    /// Must fail: not an image, a truncated one, or a sidecar with an unknown key.
    Bad,
}

/// The name a file gets in a folder where `follower` (e.g. `.error.txt`) goes with it: the
/// daemon cuts the stem so both fit in 255 bytes (ASCII names here).
fn fitted(name: &str, follower: &str) -> String {
    if name.len() + follower.len() <= 255 {
        return name.to_string();
    }
    let (stem, ext) = name.rsplit_once('.').unwrap();
    format!("{}.{ext}", &stem[..255 - follower.len() - ext.len() - 1])
}

/// Sends `signal` to `pid` without insisting (a daemon that already exited is fine).
fn try_signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status();
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
        // One in ten is 250 bytes long (the dropper's NAME.part must still fit in 255), so
        // that NAME.error.txt would not fit.
        let name = match rng.below(10) {
            0 => format!("job {i:03} {}.{ext}", "L".repeat(250 - 9 - 1 - ext.len())),
            _ => format!("job {i:03}.{ext}"),
        };
        plan.push((name, kind, rng.next_u64()));
    }

    let started = Instant::now();
    let (mut kills, mut stops, mut double_stops, mut hasty, mut spells) = (0, 0, 0, 0, 0);
    // While this file exists every daemon call that needs disk space fails with ENOSPC.
    let full_flag = root.logs.join("disk-full");
    let faults = format!("enospc-while:{}", full_flag.display());
    let env = [("EASEL_DAEMON_FAULTS", std::ffi::OsStr::new(&faults))];
    let (dropped, spells_over) = (AtomicBool::new(false), AtomicBool::new(false));
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
            dropped.store(true, Ordering::SeqCst);
        });
        // Run the daemon, killing (mostly -9) or stopping it at random, until all is dropped
        // and processed.
        // Disk-full spells of 0.2-2 s, 1-4 s apart, until the last daemon is started.
        let spell_maker = s.spawn(|| {
            let mut rng = Rng::new(seed.rotate_left(49));
            let mut count = 0;
            while !spells_over.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1000 + rng.below(3000)));
                std::fs::write(&full_flag, "").unwrap();
                std::thread::sleep(Duration::from_millis(200 + rng.below(1800)));
                std::fs::remove_file(&full_flag).unwrap();
                count += 1;
            }
            count
        });
        let mut rng = Rng::new(seed.rotate_left(33));
        while !(dropped.load(Ordering::SeqCst) && settled(&root)) {
            assert!(started.elapsed() < Duration::from_secs(1200), "soak did not finish in 20 minutes");
            let mut daemon = root.start_with_env(&[], &env);
            std::thread::sleep(Duration::from_millis(300 + rng.below(2500)));
            match rng.below(8) {
                0 | 1 => {
                    daemon.signal("TERM");
                    assert!(daemon.wait(Duration::from_secs(30)).success(), "SIGTERM exits 0");
                    stops += 1;
                }
                2 => {
                    // An impatient operator: the second signal may find the daemon gone.
                    daemon.signal("TERM");
                    std::thread::sleep(Duration::from_millis(rng.below(30)));
                    try_signal(daemon.pid(), "TERM");
                    let code = daemon.wait(Duration::from_secs(30)).code();
                    assert!(matches!(code, Some(0) | Some(1)), "a double stop exits 0 or 1: {code:?}");
                    double_stops += 1;
                    hasty += usize::from(code == Some(1));
                }
                _ => {
                    daemon.signal("KILL");
                    daemon.wait(Duration::from_secs(30));
                    kills += 1;
                }
            }
        }
        dropper.join().unwrap();
        spells_over.store(true, Ordering::SeqCst);
        spells = spell_maker.join().unwrap();
    });
    assert!(!full_flag.exists());
    // Then let one daemon finish everything.
    let mut daemon = root.start_with_env(&[], &env);
    daemon.until(Duration::from_secs(600), "inbox/ and work/ to empty", || {
        settled(&root) && root.status().is_some_and(|s| s["running"].as_array().is_some_and(|r| r.is_empty()))
    });
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).success());
    let events = root.all_events();
    eprintln!(
        "soak: {kills} kills, {stops} stops, {double_stops} double stops ({hasty} exited at the second), \
         {spells} disk-full spells ({} waits for space, {} claims refused), {:.0} s",
        with_message(&events, "waiting for disk space").len(),
        with_message(&events, "cannot claim job").len(),
        started.elapsed().as_secs_f64()
    );

    let done = root.files("done");
    let failed = root.files("failed");
    let out = root.files("out");
    let mut crashed = 0;
    let mut outcomes: BTreeMap<&str, &str> = BTreeMap::new();
    // Every name an input may have in done/ or failed/.
    let mut known: BTreeSet<String> = BTreeSet::new();
    for (name, kind, _) in &plan {
        let failed_name = fitted(name, ".error.txt");
        let in_done = done.contains(name);
        let in_failed = failed.contains(&failed_name);
        assert!(in_done != in_failed, "{name}: in done/ {in_done}, in failed/ {in_failed}");
        if in_done {
            assert_eq!(*kind, Kind::Good, "{name} should have failed");
            let result = format!("{}.png", name.rsplit_once('.').unwrap().0);
            assert!(out.contains(&result), "{name}: no out/{result}");
            let (w, h, _) = pixels(&root.path("out").join(&result));
            assert_eq!(w.max(h), 32, "{result}");
            outcomes.insert(name, "done");
            known.insert(name.clone());
        } else {
            let reason =
                std::fs::read_to_string(root.path("failed").join(format!("{failed_name}.error.txt")))
                    .unwrap_or_else(|_| panic!("{name}: no reason in failed/"));
            assert!(reason.starts_with(name.as_str()), "{name}: {reason}");
            if *kind == Kind::Good {
                // Only a job killed twice mid-run may fail without a fault of its own.
                assert!(reason.contains("started 2 times"), "{name}: {reason}");
                crashed += 1;
            }
            outcomes.insert(name, "failed");
            known.insert(failed_name);
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
        .filter(|n| !known.contains(n.as_str()))
        .collect();
    assert!(extra.is_empty(), "files that were never dropped: {extra:?}");
    let long = plan.iter().filter(|(name, _, _)| name.len() > 200).count();
    eprintln!(
        "soak: {} done, {} failed ({crashed} after two crashes), {long} with 250-byte names",
        images_done,
        outcomes.len() - images_done
    );
}
