//! What the CPU offers the model, and how many threads the model may use.
//!
//! The workspace is built for x86-64-v3 (AVX2, FMA, F16C: `.cargo/config.toml`), so the
//! compiler vectorises the f32 code around the quantized kernels too. A binary built
//! that way must not start on an older CPU: [`check_cpu`] says so in words instead of
//! dying on an illegal instruction somewhere in the first matrix product.
//!
//! Model work runs on Parley's own pool ([`crate::pool`]: the matrix products, the
//! caller plus `threads - 1` helpers that never make a product wait for a thread the
//! scheduler has put aside) and on rayon's global pool for the f32 products of
//! attention (`RAYON_NUM_THREADS`). candle's barrier pool, which would otherwise spin
//! a thread per core beside them, is left at one thread (`CANDLE_NUM_THREADS=1`: its
//! element-wise loops run on the calling thread). [`set_model_threads`] sets all of
//! this before any pool exists, so the model never has more threads than the machine
//! has cores and Whisper and Piper are not starved by oversubscription, and lets the
//! allocator keep a prefill's large buffers ([`keep_large_buffers`]).

use std::sync::OnceLock;

/// The SIMD instruction sets this build was compiled to require, as a short name for
/// the startup log ("avx2+fma+f16c", "neon", or "baseline" when none).
pub fn simd_path() -> &'static str {
    if cfg!(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )) {
        "avx2+fma+f16c"
    } else if cfg!(all(target_arch = "aarch64", target_feature = "neon")) {
        "neon"
    } else {
        "baseline"
    }
}

/// The instruction sets this build requires that the running CPU lacks, empty when it
/// has them all.
pub fn missing_cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut missing = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(target_feature = "avx2") && !std::arch::is_x86_feature_detected!("avx2") {
            missing.push("avx2");
        }
        if cfg!(target_feature = "fma") && !std::arch::is_x86_feature_detected!("fma") {
            missing.push("fma");
        }
        if cfg!(target_feature = "f16c") && !std::arch::is_x86_feature_detected!("f16c") {
            missing.push("f16c");
        }
    }
    missing
}

/// Fails with a readable message when this build needs instructions the CPU lacks
/// (call it first thing in `main`).
pub fn check_cpu() -> Result<(), String> {
    let missing = missing_cpu_features();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "this parley binary was built for CPUs with {} but this CPU lacks {}; rebuild \
         for it with RUSTFLAGS=\"-C target-cpu=native\" (or x86-64 for any x86-64 CPU)",
        simd_path(),
        missing.join(", ")
    ))
}

static MODEL_THREADS: OnceLock<usize> = OnceLock::new();

/// Cores available to this process (its affinity mask, cgroup quota aside).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets how many threads the model's matrix products use (0: one per available core,
/// or `PARLEY_MODEL_THREADS` when set), and the thread counts of the pools candle
/// uses (`RAYON_NUM_THREADS` to that number and `CANDLE_NUM_THREADS` to 1, unless the
/// operator set them). Returns the number in force.
///
/// # Safety
/// Changes the process environment: call it before any other thread exists (first
/// thing in `main`, before the async runtime starts).
pub unsafe fn set_model_threads(threads: usize) -> usize {
    let n = match threads {
        0 => threads_from_env().unwrap_or_else(available_cores),
        n => n,
    };
    let defaults = [("RAYON_NUM_THREADS", n.to_string()), ("CANDLE_NUM_THREADS", "1".to_string())];
    for (var, value) in defaults {
        if std::env::var_os(var).is_none() {
            // SAFETY: the caller guarantees no other thread reads the environment.
            unsafe { std::env::set_var(var, value) };
        }
    }
    keep_large_buffers();
    *MODEL_THREADS.get_or_init(|| n)
}

/// Largest allocation glibc serves from its heaps rather than a fresh `mmap`.
const MMAP_THRESHOLD: i32 = 64 << 20;
/// Free memory glibc keeps at the top of a heap before giving it back to the OS.
const TRIM_THRESHOLD: i32 = 128 << 20;

/// Lets the allocator keep the big buffers of a prefill for the next one.
///
/// A 650-token prefill allocates activations of up to 12 MB per product and per
/// element-wise step. With glibc's defaults many of them were fresh `mmap`s or
/// re-grown heap tops, so the kernel zeroed their pages again every time: a
/// profile of such a prefill spent 17 % of its cycles in `clear_page` and 5 % in
/// page faults. With these thresholds (`llm_speed --prompt-tokens 650`, alternated
/// with the defaults via `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_`): 364–370
/// against 243–247 tok/s; decoding unchanged (52–53 tok/s both); about 90 MB more
/// kept resident after the prefill. Environment settings of glibc's own
/// `MALLOC_*_` variables win.
pub fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str| std::env::var_os(var).is_none();
        // SAFETY: mallopt only changes glibc's tuning parameters; it is thread-safe.
        unsafe {
            if set("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            }
            if set("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            }
        }
    }
}

fn threads_from_env() -> Option<usize> {
    std::env::var("PARLEY_MODEL_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
}

/// Threads the model's products use: the caller plus the helpers of
/// [`crate::pool::model_pool`].
pub fn model_threads() -> usize {
    *MODEL_THREADS.get_or_init(|| threads_from_env().unwrap_or_else(available_cores))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_runs_this_build() {
        assert_eq!(check_cpu(), Ok(()));
        assert!(missing_cpu_features().is_empty());
    }

    #[test]
    fn the_simd_path_matches_the_build_target() {
        let path = simd_path();
        if cfg!(all(target_arch = "x86_64", target_feature = "avx2")) {
            assert_eq!(path, "avx2+fma+f16c");
        } else {
            assert!(["neon", "baseline"].contains(&path), "{path}");
        }
        assert!(model_threads() >= 1);
    }
}
