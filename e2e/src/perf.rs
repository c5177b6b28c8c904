//! Helpers for the benchmarks: linux-perf CPU profiles and syscall counts, and the
//! median and quartiles they report over rounds.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The median of a benchmark's rounds (the upper middle value; 0 when empty).
pub fn median(v: Vec<f64>) -> f64 {
    quantile(v, 0.5)
}

/// The value a fraction `q` (0 to 1) of the way through the sorted rounds, rounded
/// to the nearest one (0.5: the median, as [`median`] gives it); 0 when empty.
pub fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let at = (v.len().saturating_sub(1) as f64 * q).round() as usize;
    v.get(at).copied().unwrap_or(0.0)
}

/// Starts `perf record` (cpu-clock, 999 Hz, call graphs) for `secs` seconds on the
/// given CPUs (`-C`), or on all CPUs.
pub fn record(data: &Path, cpus: Option<&str>, secs: u32) -> anyhow::Result<Child> {
    let mut cmd = Command::new("perf");
    cmd.args(["record", "-e", "cpu-clock", "-F", "999", "-g"]);
    match cpus {
        Some(c) => cmd.args(["-C", c]),
        None => cmd.arg("-a"),
    };
    Ok(cmd
        .arg("-o")
        .arg(data)
        .args(["--", "sleep", &secs.max(1).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Waits for a `perf record` and appends its report to `text`: time per process,
/// per process and DSO, then the hottest symbols.
pub fn report(mut rec: Child, data: &Path, text: &mut Vec<u8>) -> anyhow::Result<()> {
    rec.wait()?;
    for (sort, limit) in [
        ("comm", "0.5"),
        ("comm,dso", "0.5"),
        ("comm,dso,symbol", "0.4"),
    ] {
        let report = Command::new("perf")
            .args(["report", "-i"])
            .arg(data)
            .args(["--stdio", "--no-children", "--sort", sort])
            .args(["--percent-limit", limit, "-g", "none"])
            .output()?;
        text.extend_from_slice(&report.stdout);
    }
    Ok(())
}

/// Starts counting the syscalls and context switches of `pids` into `out`.
pub fn stat(pids: &[u32], out: &Path) -> anyhow::Result<Child> {
    let pids: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
    Ok(Command::new("perf")
        .args(["stat", "-x", ",", "-e"])
        .arg("raw_syscalls:sys_enter,context-switches")
        .args(["-p", &pids.join(","), "-o"])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Stops a `perf stat` (it writes its counts when interrupted) and returns
/// (syscalls, context switches).
pub fn stat_done(child: Child, out: &Path) -> (f64, f64) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = child.wait_with_output();
    let mut counts = (0.0, 0.0);
    for line in std::fs::read_to_string(out).unwrap_or_default().lines() {
        let f: Vec<&str> = line.split(',').collect();
        let v = f.first().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        match f.get(2) {
            Some(e) if e.starts_with("raw_syscalls") => counts.0 = v,
            Some(e) if e.starts_with("context-switches") => counts.1 = v,
            _ => {}
        }
    }
    counts
}
