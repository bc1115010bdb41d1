//! Measurement shared by the benches: CPU time, which still says what code costs when other
//! work shares the machine.

/// CPU seconds this process's threads have run, from /proc (Linux; 0 elsewhere).
pub fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    let ns: f64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum();
    ns * 1e-9
}
