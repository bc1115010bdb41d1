//! The size of this machine's L2 cache, read once at start, from which the convolutions size
//! their blocks: the block sizes were tuned on a Zen 4 core (1 MB of L2), and a Cortex-A76
//! (a Raspberry Pi 5) has half that.
//!
//! The sizes change how the work is cut into `gemm` calls, which can change the order in which
//! `gemm` adds its products; where this machine's L2 is the tuned 1 MB, every size is the
//! constant it replaces, so results there are those of the constants, bit for bit.

use std::sync::OnceLock;

/// The L2 size the block sizes were tuned for, and what is assumed when sysfs does not say
/// (not Linux, or a kernel that does not describe the caches, as on some arm64 boards).
pub(super) const TUNED_L2_BYTES: usize = 1 << 20;

/// Bounds on a size read from sysfs: a value outside them is a misreading, not a cache.
const PLAUSIBLE: std::ops::RangeInclusive<usize> = (64 << 10)..=(64 << 20);

/// One core's share of the L2 cache, in bytes: [`TUNED_L2_BYTES`] unless sysfs says otherwise.
pub(super) fn l2_bytes() -> usize {
    static L2: OnceLock<usize> = OnceLock::new();
    *L2.get_or_init(|| read_l2("/sys/devices/system/cpu/cpu0/cache").unwrap_or(TUNED_L2_BYTES))
}

/// `bytes * num / den`, the tuned constant `bytes` rescaled to this machine's L2.
pub(super) fn scaled(bytes: usize) -> usize {
    // No overflow: bytes is at most a few MB and l2_bytes at most PLAUSIBLE's end.
    (bytes as u128 * l2_bytes() as u128 / TUNED_L2_BYTES as u128) as usize
}

/// The L2 entry among `dir/index*`: its size divided among the CPUs that share it.
fn read_l2(dir: &str) -> Option<usize> {
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        let path = entry.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).ok();
        let level = read("level")?;
        let kind = read("type")?;
        if level.trim() != "2" || kind.trim() == "Instruction" {
            continue;
        }
        let size = parse_size(&read("size")?)?;
        let sharers = read("shared_cpu_list").and_then(|l| count_cpus(&l)).unwrap_or(1).max(1);
        let share = size / sharers;
        return PLAUSIBLE.contains(&share).then_some(share);
    }
    None
}

/// sysfs's cache size: a number of bytes with a `K`, `M` or `G` suffix ("1024K").
fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let n: usize = digits.parse().ok()?;
    let unit = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// The number of CPUs in a sysfs CPU list ("0-3,8-11", "5").
fn count_cpus(list: &str) -> Option<usize> {
    let mut count = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        count += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse::<usize>().ok()?)? + 1,
            None => part.parse::<usize>().map(|_| 1).ok()?,
        };
    }
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_sizes_and_cpu_lists_parse() {
        assert_eq!(parse_size("1024K\n"), Some(1 << 20));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(count_cpus("0-3,8-11\n"), Some(8));
        assert_eq!(count_cpus("5"), Some(1));
        assert_eq!(count_cpus("3-1"), None);
    }

    #[test]
    fn the_l2_entry_is_read_and_shared_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |index: &str, level: &str, kind: &str, size: &str, cpus: &str| {
            let d = dir.path().join(index);
            std::fs::create_dir(&d).expect("index dir");
            for (name, value) in [("level", level), ("type", kind), ("size", size), ("shared_cpu_list", cpus)]
            {
                std::fs::write(d.join(name), format!("{value}\n")).expect("write");
            }
        };
        let path = dir.path().to_str().expect("utf-8 temp path");
        assert_eq!(read_l2(path), None);
        write("index0", "1", "Data", "64K", "0");
        write("index1", "1", "Instruction", "64K", "0");
        write("index3", "3", "Unified", "32768K", "0-7");
        assert_eq!(read_l2(path), None);
        // A cluster's L2 shared by four cores (as on many arm64 chips): each gets a quarter.
        write("index2", "2", "Unified", "2048K", "0-3");
        assert_eq!(read_l2(path), Some(512 << 10));
    }

    #[test]
    fn the_tuned_l2_scales_to_the_constants() {
        // Whatever this machine has, the scaling is linear in its L2 share.
        assert_eq!(scaled(TUNED_L2_BYTES), l2_bytes());
        assert!(PLAUSIBLE.contains(&l2_bytes()));
    }
}
