//! Converts a tiny synthetic CTranslate2 Whisper model and reads the ggml file back.

use std::collections::BTreeMap;
use std::io::Write;

use super::*;

const STATE: usize = 4;
const MELS: usize = 2;
const VOCAB: usize = 5;

/// A CTranslate2 `model.bin` writer for tests; every float is f16 holding its own
/// flat index within the tensor plus `base`, so splits can be checked by value.
struct Ct2Writer {
    vars: Vec<(String, Vec<usize>, u8, Vec<u8>)>,
}

impl Ct2Writer {
    fn f16(&mut self, name: &str, shape: &[usize], base: f32) {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .flat_map(|i| half::f16::from_f32(base + i as f32).to_le_bytes())
            .collect();
        self.vars.push((name.into(), shape.to_vec(), 4, data));
    }

    fn i16(&mut self, name: &str, v: i16) {
        self.vars
            .push((name.into(), vec![], 2, v.to_le_bytes().to_vec()));
    }

    fn bytes(&self) -> Vec<u8> {
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&((s.len() + 1) as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        };
        let mut out = 6u32.to_le_bytes().to_vec();
        string(&mut out, "WhisperSpec");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.vars.len() as u32).to_le_bytes());
        for (name, shape, dtype, data) in &self.vars {
            string(&mut out, name);
            out.push(shape.len() as u8);
            for d in shape {
                out.extend_from_slice(&(*d as u32).to_le_bytes());
            }
            out.push(*dtype);
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data);
        }
        out.extend_from_slice(&1u32.to_le_bytes());
        string(&mut out, "decoder/projection/weight");
        string(&mut out, "decoder/embeddings/weight");
        out
    }
}

fn attention(w: &mut Ct2Writer, p: &str, fused: usize) {
    w.f16(&format!("{p}/layer_norm/gamma"), &[STATE], 1.0);
    w.f16(&format!("{p}/layer_norm/beta"), &[STATE], 0.0);
    w.f16(
        &format!("{p}/linear_0/weight"),
        &[fused * STATE, STATE],
        0.0,
    );
    w.f16(&format!("{p}/linear_0/bias"), &[fused * STATE], 0.0);
    w.f16(&format!("{p}/linear_1/weight"), &[STATE, STATE], 0.0);
    w.f16(&format!("{p}/linear_1/bias"), &[STATE], 0.0);
}

fn ffn(w: &mut Ct2Writer, p: &str) {
    w.f16(&format!("{p}/ffn/layer_norm/gamma"), &[STATE], 1.0);
    w.f16(&format!("{p}/ffn/layer_norm/beta"), &[STATE], 0.0);
    w.f16(
        &format!("{p}/ffn/linear_0/weight"),
        &[4 * STATE, STATE],
        0.0,
    );
    w.f16(&format!("{p}/ffn/linear_0/bias"), &[4 * STATE], 0.0);
    w.f16(
        &format!("{p}/ffn/linear_1/weight"),
        &[STATE, 4 * STATE],
        0.0,
    );
    w.f16(&format!("{p}/ffn/linear_1/bias"), &[STATE], 0.0);
}

fn tiny_model() -> Vec<u8> {
    let mut w = Ct2Writer { vars: Vec::new() };
    w.i16("encoder/num_heads", 2);
    w.i16("decoder/num_heads", 2);
    w.f16("encoder/conv1/weight", &[STATE, MELS, 3], 0.0);
    w.f16("encoder/conv1/bias", &[STATE], 0.0);
    w.f16("encoder/conv2/weight", &[STATE, STATE, 3], 0.0);
    w.f16("encoder/conv2/bias", &[STATE], 0.0);
    w.f16("encoder/position_encodings/encodings", &[6, STATE], 0.0);
    attention(&mut w, "encoder/layer_0/self_attention", 3);
    ffn(&mut w, "encoder/layer_0");
    w.f16("encoder/layer_norm/gamma", &[STATE], 1.0);
    w.f16("encoder/layer_norm/beta", &[STATE], 0.0);
    w.f16("decoder/embeddings/weight", &[VOCAB + 3, STATE], 0.0);
    w.f16("decoder/position_encodings/encodings", &[3, STATE], 0.0);
    attention(&mut w, "decoder/layer_0/self_attention", 3);
    w.f16("decoder/layer_0/attention/layer_norm/gamma", &[STATE], 1.0);
    w.f16("decoder/layer_0/attention/layer_norm/beta", &[STATE], 0.0);
    w.f16(
        "decoder/layer_0/attention/linear_0/weight",
        &[STATE, STATE],
        0.0,
    );
    w.f16("decoder/layer_0/attention/linear_0/bias", &[STATE], 0.0);
    w.f16(
        "decoder/layer_0/attention/linear_1/weight",
        &[2 * STATE, STATE],
        0.0,
    );
    w.f16("decoder/layer_0/attention/linear_1/bias", &[2 * STATE], 0.0);
    w.f16(
        "decoder/layer_0/attention/linear_2/weight",
        &[STATE, STATE],
        0.0,
    );
    w.f16("decoder/layer_0/attention/linear_2/bias", &[STATE], 0.0);
    ffn(&mut w, "decoder/layer_0");
    w.f16("decoder/layer_norm/gamma", &[STATE], 1.0);
    w.f16("decoder/layer_norm/beta", &[STATE], 0.0);
    w.bytes()
}

fn mel_npz(path: &Path) {
    let values: Vec<u8> = (0..MELS * 3)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({MELS}, 3), }}\n");
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    npy.extend_from_slice(&values);
    let mut zip = zip::ZipWriter::new(File::create(path).expect("create npz"));
    let opts = zip::write::SimpleFileOptions::default();
    zip.start_file(format!("mel_{MELS}.npy"), opts)
        .expect("zip entry");
    zip.write_all(&npy).expect("zip write");
    zip.finish().expect("zip finish");
}

/// A parsed ggml file: hyper-parameters and tensors by name (type, dims, raw data).
struct Ggml {
    hparams: Vec<i32>,
    mel: (i32, i32, Vec<f32>),
    vocab: Vec<Vec<u8>>,
    tensors: BTreeMap<String, (i32, Vec<i32>, Vec<u8>)>,
}

fn read_ggml(bytes: &[u8]) -> Ggml {
    let pos = std::cell::Cell::new(0);
    let take = |n: usize| {
        let s = &bytes[pos.get()..pos.get() + n];
        pos.set(pos.get() + n);
        s
    };
    let i32_ = |b: &[u8]| i32::from_le_bytes(b.try_into().expect("4 bytes"));
    assert_eq!(
        u32::from_le_bytes(take(4).try_into().expect("magic")),
        GGML_MAGIC
    );
    let hparams = (0..11).map(|_| i32_(take(4))).collect();
    let (n_mel, n_fft) = (i32_(take(4)), i32_(take(4)));
    let mel = (0..n_mel * n_fft)
        .map(|_| f32::from_le_bytes(take(4).try_into().expect("f32")))
        .collect();
    let n_vocab = i32_(take(4));
    let vocab = (0..n_vocab)
        .map(|_| {
            let len = u32::from_le_bytes(take(4).try_into().expect("len")) as usize;
            take(len).to_vec()
        })
        .collect();
    let mut tensors = BTreeMap::new();
    while pos.get() < bytes.len() {
        let (n_dims, name_len, ttype) = (i32_(take(4)), i32_(take(4)), i32_(take(4)));
        let ne: Vec<i32> = (0..n_dims).map(|_| i32_(take(4))).collect();
        let name = String::from_utf8(take(name_len as usize).to_vec()).expect("utf-8 name");
        let size = if ttype == GGML_TYPE_F16 { 2 } else { 4 };
        let n: i32 = ne.iter().product();
        let data = take(n as usize * size).to_vec();
        tensors.insert(name, (ttype, ne, data));
    }
    Ggml {
        hparams,
        mel: (n_mel, n_fft, mel),
        vocab,
        tensors,
    }
}

fn convert_tiny() -> Ggml {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("model.bin"), tiny_model()).expect("write model");
    mel_npz(&dir.path().join("mel.npz"));
    std::fs::write(
        dir.path().join("vocab.tiktoken"),
        "IQ== 0\nIg== 1\nIGE= 2\n",
    )
    .expect("vocab");
    let out = dir.path().join("ggml.bin");
    ct2_to_ggml(
        dir.path(),
        &dir.path().join("mel.npz"),
        &dir.path().join("vocab.tiktoken"),
        &out,
    )
    .expect("converts");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary file left behind");
    read_ggml(&std::fs::read(out).expect("read output"))
}

#[test]
fn header_holds_hparams_mel_and_vocab() {
    let g = convert_tiny();
    // n_vocab, audio ctx/state/head/layer, text ctx/state/head/layer, mels, ftype
    assert_eq!(g.hparams, vec![8, 6, 4, 2, 1, 3, 4, 2, 1, 2, 1]);
    assert_eq!(g.mel, (2, 3, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]));
    assert_eq!(g.vocab, vec![b"!".to_vec(), b"\"".to_vec(), b" a".to_vec()]);
}

#[test]
fn tensor_set_matches_what_whisper_cpp_loads() {
    let g = convert_tiny();
    // whisper.cpp: 7 encoder globals + 15 per encoder layer, 4 decoder globals + 24 per
    // decoder layer.
    assert_eq!(g.tensors.len(), 7 + 15 + 4 + 24);
    assert!(g.tensors.keys().all(|k| !k.contains('/')));
    assert!(!g.tensors.contains_key("encoder.blocks.0.attn.key.bias"));
    let (t, ne, _) = &g.tensors["encoder.conv1.bias"];
    assert_eq!((*t, ne.clone()), (GGML_TYPE_F32, vec![1, STATE as i32]));
    let (t, ne, _) = &g.tensors["encoder.conv1.weight"];
    assert_eq!(
        (*t, ne.clone()),
        (GGML_TYPE_F16, vec![3, MELS as i32, STATE as i32])
    );
    let (t, ne, _) = &g.tensors["decoder.token_embedding.weight"];
    assert_eq!((*t, ne.clone()), (GGML_TYPE_F16, vec![STATE as i32, 8]));
    let (t, ne, _) = &g.tensors["encoder.positional_embedding"];
    assert_eq!((*t, ne.clone()), (GGML_TYPE_F32, vec![STATE as i32, 6]));
    let (t, ne, _) = &g.tensors["decoder.blocks.0.mlp_ln.weight"];
    assert_eq!((*t, ne.clone()), (GGML_TYPE_F32, vec![STATE as i32]));
}

fn f16_values(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

fn f32_values(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn fused_projections_split_by_rows() {
    let g = convert_tiny();
    let block = (STATE * STATE) as f32;
    for (name, first) in [
        ("encoder.blocks.0.attn.query.weight", 0.0),
        ("encoder.blocks.0.attn.key.weight", block),
        ("encoder.blocks.0.attn.value.weight", 2.0 * block),
        ("decoder.blocks.0.cross_attn.key.weight", 0.0),
        ("decoder.blocks.0.cross_attn.value.weight", block),
    ] {
        let (_, ne, data) = &g.tensors[name];
        assert_eq!(ne, &vec![STATE as i32, STATE as i32], "{name}");
        let values = f16_values(data);
        assert_eq!(values[0], first, "{name}");
        assert_eq!(values[STATE * STATE - 1], first + block - 1.0, "{name}");
    }
    let (_, _, data) = &g.tensors["encoder.blocks.0.attn.value.bias"];
    assert_eq!(f32_values(data), vec![8.0, 9.0, 10.0, 11.0]);
    let (_, _, data) = &g.tensors["decoder.blocks.0.cross_attn.value.bias"];
    assert_eq!(f32_values(data), vec![4.0, 5.0, 6.0, 7.0]);
}

#[test]
fn not_a_whisper_model_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let none = dir.path().join("missing");
    let err =
        ct2_to_ggml(dir.path(), &none, &none, &dir.path().join("out.bin")).expect_err("fails");
    assert!(err.to_string().contains("model.bin"), "{err}");
    assert!(!dir.path().join("out.bin").exists());
}
