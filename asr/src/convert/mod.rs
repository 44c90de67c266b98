//! CTranslate2 Whisper → ggml, the file format whisper.cpp loads.
//!
//! The package index ships Whisper only as a CTranslate2 model (`model.bin`), so the
//! model installer converts it once. A ggml Whisper file is, all little-endian:
//!
//! 1. the magic `0x67676d6c` and eleven `i32` hyper-parameters (vocabulary size, audio
//!    context, width, heads and layers of encoder and decoder, text context, mel bands,
//!    and the file type: 1 for f16 weights);
//! 2. the mel filterbank: `i32` bands, `i32` FFT bins, then `f32` values;
//! 3. the vocabulary: `i32` count, then each token as `u32` length and raw bytes;
//! 4. tensors until end of file: `i32` rank, `i32` name length, `i32` type (0 f32,
//!    1 f16), the dimensions innermost first, the name, then the data.
//!
//! whisper.cpp wants matrices (including the token embedding and the convolution
//! kernels) in f16, and vectors (biases, layer norms) and the positional embeddings in
//! f32; convolution biases are stored as `[1, width]`. CTranslate2 fuses the attention
//! projections (query, key and value in one matrix for self-attention; key and value
//! for cross-attention), so they are split back by rows. Whisper's key projection has
//! no bias; CTranslate2's zero key bias is dropped.

mod assets;
mod ct2;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ct2::{Ct2Model, DType, Variable};

use crate::AsrError;

/// ggml's file magic, "ggml" read as a little-endian `u32`.
const GGML_MAGIC: u32 = 0x6767_6d6c;
/// ggml type id of f32 tensors.
const GGML_TYPE_F32: i32 = 0;
/// ggml type id of f16 tensors, also the file type "mostly f16".
const GGML_TYPE_F16: i32 = 1;

/// Converts a CTranslate2 Whisper model to a ggml file whisper.cpp loads.
///
/// - `ct2_dir`: the directory holding CTranslate2's `model.bin` (hyper-parameters are
///   read from its tensors, so `config.json` is not needed);
/// - `mel_filters_npz`: openai-whisper's `assets/mel_filters.npz`;
/// - `tiktoken`: the model's vocabulary, `assets/gpt2.tiktoken` for the English-only
///   models (`multilingual.tiktoken` for the others);
/// - `out`: the ggml file to write. It is written under a temporary name beside it and
///   renamed once complete, so `out` is either absent or whole.
///
/// # Example
///
/// ```no_run
/// use std::path::Path;
/// parley_asr::convert::ct2_to_ggml(
///     Path::new("model"),
///     Path::new("whisper/assets/mel_filters.npz"),
///     Path::new("whisper/assets/gpt2.tiktoken"),
///     Path::new("ggml-tiny.en.bin"),
/// )?;
/// # Ok::<(), parley_asr::AsrError>(())
/// ```
pub fn ct2_to_ggml(
    ct2_dir: &Path,
    mel_filters_npz: &Path,
    tiktoken: &Path,
    out: &Path,
) -> Result<(), AsrError> {
    let model_path = ct2_dir.join("model.bin");
    let bytes = std::fs::read(&model_path)
        .map_err(|e| AsrError::Convert(format!("{}: {e}", model_path.display())))?;
    let model = Ct2Model::parse(&bytes)?;
    if !model.spec.is_empty() && model.spec != "WhisperSpec" {
        return Err(AsrError::Convert(format!(
            "{} holds a {} model, not Whisper",
            model_path.display(),
            model.spec
        )));
    }
    let hparams = HParams::from_model(&model)?;
    let mel = assets::read_mel_filters(mel_filters_npz, hparams.n_mels)?;
    let vocab = assets::read_tiktoken(tiktoken)?;
    if vocab.len() > hparams.n_vocab {
        return Err(AsrError::Convert(format!(
            "{} has {} tokens, more than the model's {}: wrong vocabulary file?",
            tiktoken.display(),
            vocab.len(),
            hparams.n_vocab
        )));
    }
    let tensors = plan(&hparams);

    let tmp = temp_path(out);
    let result = (|| -> std::io::Result<()> {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write_header(&mut w, &hparams, &mel, &vocab)?;
        for t in &tensors {
            let src = model.get(&t.src).map_err(std::io::Error::other)?;
            write_tensor(&mut w, t, &src).map_err(std::io::Error::other)?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, out)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        AsrError::Convert(format!("writing {}: {e}", out.display()))
    })
}

/// `out` with a `.partial` suffix, in the same directory so the final rename is atomic.
fn temp_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.partial", std::process::id()));
    out.with_file_name(name)
}

/// Whisper's hyper-parameters, read from tensor shapes rather than trusted from a
/// config file.
#[derive(Debug, Clone, PartialEq)]
struct HParams {
    n_vocab: usize,
    n_audio_ctx: usize,
    n_audio_state: usize,
    n_audio_head: usize,
    n_audio_layer: usize,
    n_text_ctx: usize,
    n_text_state: usize,
    n_text_head: usize,
    n_text_layer: usize,
    n_mels: usize,
}

impl HParams {
    fn from_model(m: &Ct2Model<'_>) -> Result<Self, AsrError> {
        let matrix = |name: &str| -> Result<(usize, usize), AsrError> {
            match m.get(name)?.shape[..] {
                [a, b] => Ok((a, b)),
                ref s => Err(AsrError::Convert(format!(
                    "{name} has shape {s:?}, expected 2-D"
                ))),
            }
        };
        let heads = |name: &str| -> Result<usize, AsrError> {
            m.get(name)?
                .scalar_int()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| AsrError::Convert(format!("{name} is not a head count")))
        };
        let (n_vocab, _) = matrix("decoder/embeddings/weight")?;
        let (n_audio_ctx, n_audio_state) = matrix("encoder/position_encodings/encodings")?;
        let (n_text_ctx, n_text_state) = matrix("decoder/position_encodings/encodings")?;
        let n_mels = match m.get("encoder/conv1/weight")?.shape[..] {
            [_, mels, 3] => mels,
            ref s => {
                return Err(AsrError::Convert(format!(
                    "encoder/conv1/weight has shape {s:?}"
                )));
            }
        };
        let h = Self {
            n_vocab,
            n_audio_ctx,
            n_audio_state,
            n_audio_head: heads("encoder/num_heads")?,
            n_audio_layer: m.count_layers("encoder"),
            n_text_ctx,
            n_text_state,
            n_text_head: heads("decoder/num_heads")?,
            n_text_layer: m.count_layers("decoder"),
            n_mels,
        };
        if h.n_audio_state != h.n_text_state || h.n_audio_layer == 0 || h.n_text_layer == 0 {
            return Err(AsrError::Convert(format!("not a Whisper model: {h:?}")));
        }
        Ok(h)
    }
}

/// How a CTranslate2 tensor becomes a ggml one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// A matrix or convolution kernel, stored f16.
    F16,
    /// A vector or positional embedding, stored f32.
    F32,
    /// A convolution bias, stored f32 with shape `[width, 1]` (ggml `[1, width]`).
    ConvBias,
}

/// One output tensor: its ggml name, and which rows of which CTranslate2 tensor.
#[derive(Debug, Clone, PartialEq)]
struct Planned {
    dst: String,
    src: String,
    /// `(i, n)`: the `i`-th of `n` equal row blocks (for fused projections).
    part: (usize, usize),
    kind: Kind,
}

fn planned(dst: String, src: String, kind: Kind) -> Planned {
    Planned {
        dst,
        src,
        part: (0, 1),
        kind,
    }
}

/// A linear layer: weight (f16) and, unless `bias` is false, bias (f32).
fn linear(out: &mut Vec<Planned>, dst: &str, src: &str, part: (usize, usize), bias: bool) {
    out.push(Planned {
        dst: format!("{dst}.weight"),
        src: format!("{src}/weight"),
        part,
        kind: Kind::F16,
    });
    if bias {
        out.push(Planned {
            dst: format!("{dst}.bias"),
            src: format!("{src}/bias"),
            part,
            kind: Kind::F32,
        });
    }
}

fn layer_norm(out: &mut Vec<Planned>, dst: &str, src: &str) {
    out.push(planned(
        format!("{dst}.weight"),
        format!("{src}/gamma"),
        Kind::F32,
    ));
    out.push(planned(
        format!("{dst}.bias"),
        format!("{src}/beta"),
        Kind::F32,
    ));
}

/// Query, key and value from one fused `[3·width, width]` projection.
fn fused_qkv(out: &mut Vec<Planned>, dst: &str, src: &str) {
    linear(out, &format!("{dst}.query"), src, (0, 3), true);
    linear(out, &format!("{dst}.key"), src, (1, 3), false);
    linear(out, &format!("{dst}.value"), src, (2, 3), true);
}

/// A block's self-attention (layer norm, fused QKV split, output projection): the
/// same layout in encoder and decoder blocks.
fn self_attention(out: &mut Vec<Planned>, dst: &str, src: &str) {
    layer_norm(out, &format!("{dst}.attn_ln"), &format!("{src}/self_attention/layer_norm"));
    fused_qkv(out, &format!("{dst}.attn"), &format!("{src}/self_attention/linear_0"));
    linear(out, &format!("{dst}.attn.out"), &format!("{src}/self_attention/linear_1"), (0, 1), true);
}

fn mlp(out: &mut Vec<Planned>, dst: &str, src: &str) {
    layer_norm(
        out,
        &format!("{dst}.mlp_ln"),
        &format!("{src}/ffn/layer_norm"),
    );
    linear(
        out,
        &format!("{dst}.mlp.0"),
        &format!("{src}/ffn/linear_0"),
        (0, 1),
        true,
    );
    linear(
        out,
        &format!("{dst}.mlp.2"),
        &format!("{src}/ffn/linear_1"),
        (0, 1),
        true,
    );
}

/// Every tensor whisper.cpp expects, in file order.
fn plan(h: &HParams) -> Vec<Planned> {
    let mut out = Vec::new();
    out.push(planned(
        "encoder.positional_embedding".into(),
        "encoder/position_encodings/encodings".into(),
        Kind::F32,
    ));
    for conv in ["conv1", "conv2"] {
        out.push(planned(
            format!("encoder.{conv}.weight"),
            format!("encoder/{conv}/weight"),
            Kind::F16,
        ));
        out.push(planned(
            format!("encoder.{conv}.bias"),
            format!("encoder/{conv}/bias"),
            Kind::ConvBias,
        ));
    }
    for i in 0..h.n_audio_layer {
        let (dst, src) = (format!("encoder.blocks.{i}"), format!("encoder/layer_{i}"));
        self_attention(&mut out, &dst, &src);
        mlp(&mut out, &dst, &src);
    }
    layer_norm(&mut out, "encoder.ln_post", "encoder/layer_norm");

    out.push(planned(
        "decoder.positional_embedding".into(),
        "decoder/position_encodings/encodings".into(),
        Kind::F32,
    ));
    out.push(planned(
        "decoder.token_embedding.weight".into(),
        "decoder/embeddings/weight".into(),
        Kind::F16,
    ));
    for i in 0..h.n_text_layer {
        let (dst, src) = (format!("decoder.blocks.{i}"), format!("decoder/layer_{i}"));
        self_attention(&mut out, &dst, &src);
        let cross = format!("{dst}.cross_attn");
        layer_norm(
            &mut out,
            &format!("{dst}.cross_attn_ln"),
            &format!("{src}/attention/layer_norm"),
        );
        linear(
            &mut out,
            &format!("{cross}.query"),
            &format!("{src}/attention/linear_0"),
            (0, 1),
            true,
        );
        linear(
            &mut out,
            &format!("{cross}.key"),
            &format!("{src}/attention/linear_1"),
            (0, 2),
            false,
        );
        linear(
            &mut out,
            &format!("{cross}.value"),
            &format!("{src}/attention/linear_1"),
            (1, 2),
            true,
        );
        linear(
            &mut out,
            &format!("{cross}.out"),
            &format!("{src}/attention/linear_2"),
            (0, 1),
            true,
        );
        mlp(&mut out, &dst, &src);
    }
    layer_norm(&mut out, "decoder.ln", "decoder/layer_norm");
    out
}

fn write_i32(w: &mut impl Write, v: usize) -> std::io::Result<()> {
    let v = i32::try_from(v).map_err(std::io::Error::other)?;
    w.write_all(&v.to_le_bytes())
}

fn write_header(
    w: &mut impl Write,
    h: &HParams,
    mel: &assets::MelFilters,
    vocab: &[Vec<u8>],
) -> std::io::Result<()> {
    w.write_all(&GGML_MAGIC.to_le_bytes())?;
    for v in [
        h.n_vocab,
        h.n_audio_ctx,
        h.n_audio_state,
        h.n_audio_head,
        h.n_audio_layer,
        h.n_text_ctx,
        h.n_text_state,
        h.n_text_head,
        h.n_text_layer,
        h.n_mels,
    ] {
        write_i32(w, v)?;
    }
    w.write_all(&GGML_TYPE_F16.to_le_bytes())?;

    write_i32(w, mel.n_mel)?;
    write_i32(w, mel.n_fft)?;
    for v in &mel.data {
        w.write_all(&v.to_le_bytes())?;
    }

    write_i32(w, vocab.len())?;
    for token in vocab {
        let len = u32::try_from(token.len()).map_err(std::io::Error::other)?;
        w.write_all(&len.to_le_bytes())?;
        w.write_all(token)?;
    }
    Ok(())
}

fn write_tensor(w: &mut impl Write, t: &Planned, src: &Variable<'_>) -> Result<(), AsrError> {
    let bad = |msg: String| AsrError::Convert(format!("{} → {}: {msg}", t.src, t.dst));
    let (index, parts) = t.part;
    let mut shape = src.shape.clone();
    let rows = *shape.first().ok_or_else(|| bad("is a scalar".into()))?;
    if rows % parts != 0 {
        return Err(bad(format!("{rows} rows do not split in {parts}")));
    }
    shape[0] = rows / parts;
    let block = src.data.len() / parts;
    let data = &src.data[index * block..(index + 1) * block];

    let (ggml_type, bytes) = match t.kind {
        Kind::F16 => (
            GGML_TYPE_F16,
            to_f16_bytes(src.dtype, data).ok_or_else(|| bad(format!("{:?} data", src.dtype)))?,
        ),
        Kind::F32 | Kind::ConvBias => (
            GGML_TYPE_F32,
            to_f32_bytes(src.dtype, data).ok_or_else(|| bad(format!("{:?} data", src.dtype)))?,
        ),
    };
    if t.kind == Kind::ConvBias {
        shape.push(1);
    }
    // ggml lists dimensions innermost first: the reverse of PyTorch's order.
    let ne: Vec<usize> = shape.iter().rev().copied().collect();
    let io = |e: std::io::Error| bad(e.to_string());
    write_i32(w, ne.len()).map_err(io)?;
    write_i32(w, t.dst.len()).map_err(io)?;
    w.write_all(&ggml_type.to_le_bytes()).map_err(io)?;
    for d in ne {
        write_i32(w, d).map_err(io)?;
    }
    w.write_all(t.dst.as_bytes()).map_err(io)?;
    w.write_all(&bytes).map_err(io)
}

/// Decodes floating-point data of type `dtype` to `f32` values.
fn floats(dtype: DType, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        DType::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::I8 | DType::I16 | DType::I32 => return None,
    })
}

fn to_f32_bytes(dtype: DType, data: &[u8]) -> Option<Vec<u8>> {
    if dtype == DType::F32 {
        return Some(data.to_vec());
    }
    Some(
        floats(dtype, data)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    )
}

fn to_f16_bytes(dtype: DType, data: &[u8]) -> Option<Vec<u8>> {
    if dtype == DType::F16 {
        return Some(data.to_vec());
    }
    Some(
        floats(dtype, data)?
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
    )
}

#[cfg(test)]
mod tests;
