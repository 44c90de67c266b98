//! Shared by the engine's examples (a folder without `main.rs`, so not an example).

/// A memory figure of this process from `/proc/self/status` (`VmRSS:`, `VmHWM:`), in
/// MB; NaN where the file or field is missing.
pub fn status_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
