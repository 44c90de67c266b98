//! The install stamp: what `install` wrote, so `check` can be fast.
//!
//! `parley-models.json` in the models folder maps each installed file (relative path)
//! to its size and sha256 as hashed at install time. `check` compares sizes against it
//! and its hashes against the pins; `verify` re-hashes the files.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::pins::Installed;
use super::progress::Reporter;

/// The stamp's file name inside the models folder.
pub const STAMP_FILE: &str = "parley-models.json";
/// Bumped when the stamp's meaning changes, so old stamps read as "not installed".
const STAMP_FORMAT: u32 = 1;

/// Size and hash of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Stamp {
    format: u32,
    files: BTreeMap<String, FileStamp>,
}

impl Stamp {
    /// Reads the stamp; a missing, unreadable or outdated one is empty.
    pub fn load(dir: &Path) -> Self {
        std::fs::read(dir.join(STAMP_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Stamp>(&b).ok())
            .filter(|s| s.format == STAMP_FORMAT)
            .unwrap_or_default()
    }

    /// Records a file and rewrites the stamp (atomically), so a later failure keeps
    /// what has been installed so far.
    pub fn record(&mut self, dir: &Path, rel: &str, file: FileStamp) -> Result<()> {
        self.format = STAMP_FORMAT;
        self.files.insert(rel.to_string(), file);
        let json = serde_json::to_vec_pretty(self)?;
        write_atomic(&dir.join(STAMP_FILE), &json)
    }

    /// Drops a file from the stamp (it failed verification), so `install` redoes it.
    pub fn forget(&mut self, dir: &Path, rel: &str) -> Result<()> {
        if self.files.remove(rel).is_some() {
            let json = serde_json::to_vec_pretty(self)?;
            write_atomic(&dir.join(STAMP_FILE), &json)?;
        }
        Ok(())
    }

    pub fn get(&self, rel: &str) -> Option<&FileStamp> {
        self.files.get(rel)
    }

    /// Why `file` cannot be trusted without re-installing it, or `None` if it can:
    /// present, the size the stamp recorded, and (if pinned) stamped with the pin's hash.
    pub fn problem(&self, dir: &Path, file: &Installed) -> Option<String> {
        let Some(stamped) = self.get(file.rel) else {
            return Some(
                if dir.join(file.rel).exists() {
                    "not recorded by an install"
                } else {
                    "missing"
                }
                .into(),
            );
        };
        if let Some((size, sha)) = file.pin
            && (stamped.size != size || stamped.sha256 != sha)
        {
            return Some("installed from an older pin".into());
        }
        match std::fs::metadata(dir.join(file.rel)) {
            Err(_) => Some("missing".into()),
            Ok(m) if m.len() != stamped.size => {
                Some(format!("{} bytes, expected {}", m.len(), stamped.size))
            }
            Ok(_) => None,
        }
    }
}

/// `path` with `.<pid>.partial` appended: where a file is written before its rename.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.partial", std::process::id()));
    path.with_file_name(name)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut out = HashingFile::create(path, None)?;
    out.write_all(bytes)?;
    out.commit()?;
    Ok(())
}

/// A file being written under a temporary name, hashed as it goes. Dropped without
/// [`HashingFile::commit`], it deletes itself.
pub struct HashingFile {
    path: PathBuf,
    partial: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    hasher: Sha256,
    size: u64,
    bar: Option<indicatif::ProgressBar>,
}

impl HashingFile {
    pub fn create(path: &Path, bar: Option<indicatif::ProgressBar>) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let partial = partial_path(path);
        let file = std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            partial,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            hasher: Sha256::new(),
            size: 0,
            bar,
        })
    }

    /// Size and sha256 of what has been written so far.
    pub fn stamp(&self) -> FileStamp {
        FileStamp {
            size: self.size,
            sha256: hex::encode(self.hasher.clone().finalize()),
        }
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> Result<FileStamp> {
        let stamp = self.stamp();
        let file = self.file.take().context("file already committed")?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.partial, &self.path)
            .with_context(|| format!("renaming {} into place", self.path.display()))?;
        Ok(stamp)
    }
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("file already committed"))?;
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        if let Some(bar) = &self.bar {
            bar.inc(n as u64);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for HashingFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Hashes a whole file, with a progress bar on a terminal.
pub fn hash_file(path: &Path, reporter: &Reporter) -> Result<FileStamp> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    let bar = reporter.bytes_bar(
        len,
        &format!(
            "hashing {}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ),
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(FileStamp {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::tests::TestDir;

    #[test]
    fn hashing_file_commits_or_cleans_up() {
        let dir = TestDir::new("hashing");
        let path = dir.path().join("sub/out.bin");
        let mut f = HashingFile::create(&path, None).expect("create");
        f.write_all(b"abc").expect("write");
        let stamp = f.commit().expect("commit");
        assert_eq!(stamp.size, 3);
        assert_eq!(
            stamp.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(std::fs::read(&path).expect("read"), b"abc");

        let abandoned = dir.path().join("sub/abandoned.bin");
        let mut f = HashingFile::create(&abandoned, None).expect("create");
        f.write_all(b"x").expect("write");
        drop(f);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.bin")]);
    }

    #[test]
    fn stamp_problems() {
        let dir = TestDir::new("stamp");
        let pinned = Installed {
            rel: "a/x.bin",
            pin: Some((
                3,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            )),
        };
        let generated = Installed {
            rel: "a/y.json",
            pin: None,
        };
        let mut stamp = Stamp::load(dir.path());
        assert_eq!(
            stamp.problem(dir.path(), &pinned).as_deref(),
            Some("missing")
        );
        std::fs::create_dir_all(dir.path().join("a")).expect("mkdir");
        std::fs::write(dir.path().join("a/x.bin"), b"abc").expect("write");
        assert_eq!(
            stamp.problem(dir.path(), &pinned).as_deref(),
            Some("not recorded by an install")
        );
        let abc = FileStamp {
            size: 3,
            sha256: pinned.pin.expect("pinned").1.into(),
        };
        stamp.record(dir.path(), pinned.rel, abc).expect("record");
        assert_eq!(Stamp::load(dir.path()).problem(dir.path(), &pinned), None);
        std::fs::write(dir.path().join("a/x.bin"), b"abcd").expect("write");
        assert_eq!(
            stamp.problem(dir.path(), &pinned).as_deref(),
            Some("4 bytes, expected 3")
        );
        std::fs::write(dir.path().join("a/y.json"), b"{}").expect("write");
        stamp
            .record(
                dir.path(),
                generated.rel,
                FileStamp {
                    size: 2,
                    sha256: "00".into(),
                },
            )
            .expect("record");
        assert_eq!(stamp.problem(dir.path(), &generated), None);
        let wrong = FileStamp {
            size: 3,
            sha256: "00".into(),
        };
        stamp.record(dir.path(), pinned.rel, wrong).expect("record");
        assert_eq!(
            stamp.problem(dir.path(), &pinned).as_deref(),
            Some("installed from an older pin")
        );
    }
}
