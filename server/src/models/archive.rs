//! Reading one file out of a wheel (zip) or a source distribution (`.tar.gz`).

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Streams the member whose path is `member` (or ends in `/member`: sdists nest
/// everything under `name-version/`) into `out`. Returns the member's size.
pub fn copy_member(archive: &Path, member: &str, out: &mut impl Write) -> Result<u64> {
    let name = archive
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_lowercase();
    let file = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let copied = if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        copy_from_tar(file, member, out)
    } else {
        copy_from_zip(file, member, out)
    };
    copied.with_context(|| format!("reading {member} from {}", archive.display()))
}

/// The size of `member` in a zip archive (for a progress bar), if it is there.
pub fn zip_member_size(archive: &Path, member: &str) -> Option<u64> {
    let mut zip = zip::ZipArchive::new(File::open(archive).ok()?).ok()?;
    let name = zip_name(&zip, member)?;
    zip.by_name(&name).ok().map(|e| e.size())
}

fn matches(path: &str, member: &str) -> bool {
    path == member || path.strip_suffix(member).is_some_and(|p| p.ends_with('/'))
}

fn zip_name(zip: &zip::ZipArchive<File>, member: &str) -> Option<String> {
    zip.file_names()
        .find(|n| matches(n, member))
        .map(str::to_string)
}

fn copy_from_zip(file: File, member: &str, out: &mut impl Write) -> Result<u64> {
    let mut zip = zip::ZipArchive::new(file).context("not a zip archive")?;
    let Some(name) = zip_name(&zip, member) else {
        bail!("no such file in the archive")
    };
    let mut entry = zip.by_name(&name)?;
    Ok(std::io::copy(&mut entry, out)?)
}

fn copy_from_tar(file: File, member: &str, out: &mut impl Write) -> Result<u64> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in tar.entries().context("not a .tar.gz archive")? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        if matches(&path, member) {
            return Ok(std::io::copy(&mut entry as &mut dyn Read, out)?);
        }
    }
    bail!("no such file in the archive")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::tests::TestDir;

    #[test]
    fn reads_members_of_zips_and_tarballs() {
        let dir = TestDir::new("archive");
        let whl = dir.path().join("pkg-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&whl).expect("create"));
        zip.start_file("pkg/data/a.bin", zip::write::SimpleFileOptions::default())
            .expect("entry");
        zip.write_all(b"hello").expect("write");
        zip.finish().expect("finish");

        let tgz = dir.path().join("pkg-1.0.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            File::create(&tgz).expect("create"),
            flate2::Compression::fast(),
        );
        let mut tar = tar::Builder::new(gz);
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "pkg-1.0/pkg/assets/b.txt", &b"abc"[..])
            .expect("append");
        tar.into_inner().expect("tar").finish().expect("gz");

        let mut out = Vec::new();
        assert_eq!(
            copy_member(&whl, "pkg/data/a.bin", &mut out).expect("zip member"),
            5
        );
        assert_eq!(out, b"hello");
        assert_eq!(zip_member_size(&whl, "data/a.bin"), Some(5));
        let mut out = Vec::new();
        copy_member(&tgz, "pkg/assets/b.txt", &mut out).expect("tar member");
        assert_eq!(out, b"abc");
        let err = copy_member(&tgz, "kg/assets/b.txt", &mut Vec::new())
            .expect_err("partial names do not match");
        assert!(format!("{err:#}").contains("no such file"), "{err:#}");
    }
}
