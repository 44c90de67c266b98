//! A Qwen2 decoder forward pass on candle, split so many calls share one model.
//!
//! [`Qwen2Weights`] is immutable after loading: every session of an engine shares it
//! behind an `Arc` and runs [`Qwen2Weights::forward`] concurrently. The attention
//! state lives in a separate [`KvCache`] per session, which can be truncated to any
//! token position so a session keeps the prefix its next prompt shares with the
//! previous one and recomputes only the rest.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};

use crate::LlmError;
use crate::q8::Q8Matrix;
use crate::requant::{Conversion, WeightSummary, to_fast_cpu_format};

/// Shape and numerics of a Qwen2 model, read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2Config {
    /// Number of decoder blocks.
    pub n_layer: usize,
    /// Query heads per block.
    pub n_head: usize,
    /// Key/value heads per block (grouped-query attention: `n_head` is a multiple).
    pub n_kv_head: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Epsilon of every RMS norm.
    pub rms_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// The context the model was trained for.
    pub trained_context: usize,
    /// Rows of the token embedding (and of the output logits).
    pub vocab_size: usize,
}

/// How to load the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2LoadOptions {
    /// Dequantize every matrix to f32 at load (about 1.9 GB resident for the 0.5B
    /// model instead of about 0.5 GB, and decode reads four times the bytes per
    /// token). Off (the default), matrices stay quantized and any format without a
    /// SIMD kernel is converted to Q8_0 at load ([`crate::requant`]); kept for
    /// comparison. An output head stored as Q8_0 stays quantized either way.
    pub dequantize: bool,
    /// Longest sequence a session may hold (prompt plus reply). Sizes the RoPE
    /// tables; capped at the model's trained context.
    pub max_context: usize,
    /// A forward pass over at least this many tokens (a prefill) multiplies by
    /// dequantized f32 copies of the quantized matrices, made one matrix at a time and
    /// dropped at once, with a dense GEMM. Fewer tokens use the quantized kernels.
    /// 0 (the default) never dequantizes.
    pub dense_prefill_min_tokens: usize,
    /// Multiply by Q8_0 matrices with Parley's own tiled kernel ([`crate::q8`])
    /// rather than candle's per-element `vec_dot` (off only to compare the two).
    pub q8_kernel: bool,
    /// Keep Q5_0 matrices as stored on CPUs whose kernels unpack them, instead of
    /// converting them to Q8_0: lighter, slower where decoding is bound by arithmetic
    /// ([`Q8Matrix::from_qtensor`] has the figures). Off by default.
    pub keep_q5_0: bool,
}

/// Default for [`Qwen2LoadOptions::dense_prefill_min_tokens`]: never. With candle's
/// Q8_0 `vec_dot` (about 50–100 tok/s) the dense GEMM paid off from about 70 tokens;
/// with the tiled kernel of [`crate::q8`] the quantized path is faster at every
/// length measured (`llm_speed --dense-min 0` against `--dense-min 96`, 0.5B model,
/// 2 cores: 150 tokens 264–278 against 170 tok/s, 650 tokens 213–217 against
/// 189–198 tok/s), and it never holds an f32 copy of a matrix.
pub const DEFAULT_DENSE_PREFILL_MIN_TOKENS: usize = 0;

/// How one forward pass multiplies by the weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulPath {
    /// Quantized kernels straight on the stored weights (one activation row at a
    /// time, the weights read once per tile of rows).
    Quantized,
    /// Dequantize each matrix to f32 and run a dense GEMM (many rows).
    Dense,
}

impl MatmulPath {
    /// The path for a forward pass over `tokens` tokens.
    pub fn for_tokens(tokens: usize, dense_min_tokens: usize) -> Self {
        if dense_min_tokens > 0 && tokens >= dense_min_tokens {
            Self::Dense
        } else {
            Self::Quantized
        }
    }
}

/// One weight matrix of a block, held the way its kernel wants it.
enum Linear {
    /// candle's own: f32 (dequantized), or a format candle has a fast kernel for.
    Candle(QMatMul),
    /// Q8_0 with Parley's tiled kernel (shared: a tied output head is also the
    /// embedding table).
    Q8(Arc<Q8Matrix>),
}

/// Multiplies `x` by a weight matrix along the chosen path.
fn linear(w: &Linear, x: &Tensor, path: MatmulPath) -> candle_core::Result<Tensor> {
    match (path, w) {
        (MatmulPath::Dense, Linear::Candle(QMatMul::QTensor(q))) => {
            let dense = q.dequantize(x.device())?;
            x.broadcast_matmul(&dense.t()?)
        }
        (MatmulPath::Dense, Linear::Q8(q)) => x.broadcast_matmul(&q.dequantize(x.device())?.t()?),
        (MatmulPath::Quantized, Linear::Q8(q)) => q.forward(x),
        (_, Linear::Candle(w)) => w.forward(x),
    }
}

impl Default for Qwen2LoadOptions {
    fn default() -> Self {
        Self {
            dequantize: false,
            max_context: 4096,
            dense_prefill_min_tokens: DEFAULT_DENSE_PREFILL_MIN_TOKENS,
            q8_kernel: true,
            keep_q5_0: false,
        }
    }
}

/// One decoder block's weights.
struct Block {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    bq: Tensor,
    bk: Tensor,
    bv: Tensor,
    wo: Linear,
    ffn_norm: Tensor,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// The token embedding table. Quantized, it is the output head's own tensor when the
/// model ties them (Qwen2.5's small models do): one copy, 145 MB in Q8_0 for the 0.5B
/// model instead of another 272 MB in f16.
enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    Q8(Arc<Q8Matrix>),
}

impl Embedding {
    fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(t) => t.index_select(ids, 0)?.to_dtype(DType::F32),
            Self::Quantized(q) => q.embedding(ids)?.to_dtype(DType::F32),
            Self::Q8(q) => {
                let device = ids.device().clone();
                let ids = ids.to_vec1::<u32>()?;
                let mut rows = Vec::with_capacity(ids.len() * q.cols());
                for &id in &ids {
                    if !q.push_row(id as usize, &mut rows) {
                        candle_core::bail!("token id {id} is outside the embedding table ({} rows)", q.rows());
                    }
                }
                Tensor::from_vec(rows, (ids.len(), q.cols()), &device)
            }
        }
    }
}

/// The immutable weights of a Qwen2 model, loaded once and shared by every session.
pub struct Qwen2Weights {
    config: Qwen2Config,
    max_context: usize,
    dense_prefill_min_tokens: usize,
    device: Device,
    /// Token embeddings, `(vocab, hidden)`: looked up row by row.
    embed: Embedding,
    /// Matrices per storage format, as loaded (for the startup log).
    summary: WeightSummary,
    blocks: Vec<Block>,
    final_norm: Tensor,
    output: Linear,
    /// RoPE tables, `(max_context, head_dim / 2)`.
    cos: Tensor,
    sin: Tensor,
}

/// Converts a candle error into an [`LlmError::Model`] saying what was being done.
pub(crate) trait ModelContext<T> {
    fn context(self, what: &str) -> Result<T, LlmError>;
}

impl<T> ModelContext<T> for candle_core::Result<T> {
    fn context(self, what: &str) -> Result<T, LlmError> {
        self.map_err(|e| LlmError::Model(format!("{what}: {e}")))
    }
}

impl Qwen2Weights {
    /// Loads a `qwen2` GGUF file onto `device`.
    pub fn load(
        path: &Path,
        device: &Device,
        options: &Qwen2LoadOptions,
    ) -> Result<Self, LlmError> {
        let load_err = |reason: String| LlmError::Load {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| load_err(format!("cannot open: {e}")))?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| load_err(format!("not a readable GGUF file: {e}")))?;
        let weights = Self::from_gguf(&content, &mut reader, device, options).map_err(load_err)?;
        release_freed_memory();
        Ok(weights)
    }

    fn from_gguf<R: std::io::Read + std::io::Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        options: &Qwen2LoadOptions,
    ) -> Result<Self, String> {
        let md = |key: &str| {
            content
                .metadata
                .get(key)
                .ok_or_else(|| format!("metadata has no `{key}`"))
        };
        let md_usize = |key: &str| -> Result<usize, String> {
            let v = md(key)?;
            v.to_u32()
                .map(|x| x as usize)
                .or_else(|_| v.to_u64().map(|x| x as usize))
                .map_err(|e| format!("{key}: {e}"))
        };
        let md_f64 = |key: &str| -> Result<f64, String> {
            let v = md(key)?;
            v.to_f32()
                .map(f64::from)
                .or_else(|_| v.to_f64())
                .map_err(|e| format!("{key}: {e}"))
        };

        let arch = md("general.architecture")?
            .to_string()
            .map_err(|e| format!("general.architecture: {e}"))?;
        if arch != "qwen2" {
            return Err(format!(
                "architecture `{arch}` is not supported (only `qwen2`)"
            ));
        }
        let n_head = md_usize("qwen2.attention.head_count")?;
        let n_kv_head = md_usize("qwen2.attention.head_count_kv")?;
        let hidden = md_usize("qwen2.embedding_length")?;
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 || hidden % n_head != 0 {
            return Err(format!(
                "inconsistent attention shape: {n_head} heads, {n_kv_head} kv heads, width {hidden}"
            ));
        }
        let head_dim = hidden / n_head;
        let trained_context = md_usize("qwen2.context_length")?;
        let rope_theta = md_f64("qwen2.rope.freq_base").unwrap_or(10_000.0);
        let rms_eps = md_f64("qwen2.attention.layer_norm_rms_epsilon")?;
        let n_layer = md_usize("qwen2.block_count")?;
        let max_context = options.max_context.clamp(1, trained_context.max(1));

        let tensor = |reader: &mut R, name: &str| -> Result<QTensor, String> {
            content
                .tensor(reader, name, device)
                .map_err(|e| format!("tensor `{name}`: {e}"))
        };
        let dense = |q: QTensor, name: &str| -> Result<Tensor, String> {
            q.dequantize(device)
                .map_err(|e| format!("dequantizing `{name}`: {e}"))
        };
        let summary = std::cell::RefCell::new(WeightSummary::default());
        let matmul = |q: QTensor, name: &str| -> Result<QMatMul, String> {
            let float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            if options.dequantize || float {
                let t = dense(q, name)?;
                let bytes = t.elem_count() * t.dtype().size_in_bytes();
                summary
                    .borrow_mut()
                    .add(&format!("{:?}", t.dtype()), bytes, Conversion::Kept);
                Ok(QMatMul::Tensor(t))
            } else {
                let (q, conversion) = to_fast_cpu_format(q, device)
                    .map_err(|e| format!("converting `{name}`: {e}"))?;
                summary.borrow_mut().add(
                    &format!("{:?}", q.dtype()),
                    q.storage_size_in_bytes(),
                    conversion,
                );
                Ok(QMatMul::QTensor(Arc::new(q)))
            }
        };
        // Parley's Q8_0 kernel takes every quantized matrix whose rows are whole
        // 32-value blocks: Q8_0 as stored, Q5_0 rewritten exactly (or kept, with
        // `keep_q5_0`, where the AVX2 kernels unpack it), the K-quants
        // (`ffn_down` in Q4_K/Q6_K here) requantized from their values, which costs
        // about 50 MB for the 0.5B model and keeps every product off candle's barrier
        // pool ([`crate::pool`] says why that matters). `None`: candle keeps it.
        let q8 = |q: QTensor, name: &str| -> Result<Result<Q8Matrix, QTensor>, String> {
            let float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            let whole_blocks = q.shape().dims().last().is_some_and(|k| k % crate::q8::BLOCK == 0);
            if !options.q8_kernel || options.dequantize || !device.is_cpu() || float || !whole_blocks {
                return Ok(Err(q));
            }
            let err = |e: String| format!("`{name}` to Q8_0: {e}");
            let (matrix, conversion) = match q.dtype() {
                GgmlDType::Q8_0 => (Q8Matrix::from_qtensor(q, false).map_err(|e| err(e.to_string()))?, Conversion::Kept),
                // Q8_0 exactly, or kept as Q5_0 when asked and the kernels unpack it.
                GgmlDType::Q5_0 => {
                    let matrix = Q8Matrix::from_qtensor(q, options.keep_q5_0).map_err(|e| err(e.to_string()))?;
                    let conversion = match matrix.stored_format() {
                        "Q5_0" => Conversion::Kept,
                        _ => Conversion::Exact,
                    };
                    (matrix, conversion)
                }
                _ => {
                    let (n, k) = q.shape().dims2().map_err(|e| err(e.to_string()))?;
                    let values = q
                        .dequantize(device)
                        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                        .map_err(|e| err(e.to_string()))?;
                    (Q8Matrix::quantize(n, k, &values).map_err(|e| err(e.to_string()))?, Conversion::Requantized)
                }
            };
            summary.borrow_mut().add(matrix.stored_format(), matrix.size_in_bytes(), conversion);
            Ok(Ok(matrix))
        };
        let load_dense = |reader: &mut R, name: &str| dense(tensor(reader, name)?, name);
        // A block's matrix: on Parley's kernel where it can, else candle's.
        let linear = |q: QTensor, name: &str| -> Result<Linear, String> {
            match q8(q, name)? {
                Ok(matrix) => Ok(Linear::Q8(Arc::new(matrix))),
                Err(q) => Ok(Linear::Candle(matmul(q, name)?)),
            }
        };

        // Tied embeddings: without `output.weight` the head is the embedding matrix.
        let head_name = match content.tensor_infos.contains_key("output.weight") {
            true => "output.weight",
            false => "token_embd.weight",
        };
        let tied = head_name == "token_embd.weight";
        let vocab_size = match content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims().first().copied().unwrap_or(0),
            None => return Err("the file has no `token_embd.weight`".into()),
        };
        // The head only ever multiplies one row (the last position), where memory
        // traffic is the whole cost: stored as Q8_0 (as in this model) it is kept
        // quantized, a quarter of f32's bytes. On the CPU it goes to Parley's kernel,
        // read from the file a chunk at a time; other formats follow `dequantize`.
        // A Q8_0 table read straight into a `Q8Matrix`, a chunk at a time (`None`:
        // not Q8_0, or Parley's kernel is not in use).
        let q8_direct = |reader: &mut R, name: &str| -> Result<Option<Q8Matrix>, String> {
            let info = content.tensor_infos.get(name).ok_or_else(|| format!("the file has no `{name}`"))?;
            if info.ggml_dtype != GgmlDType::Q8_0 || !options.q8_kernel || options.dequantize || !device.is_cpu() {
                return Ok(None);
            }
            let (n, k) = info.shape.dims2().map_err(|e| format!("`{name}`: {e}"))?;
            reader
                .seek(std::io::SeekFrom::Start(content.tensor_data_offset + info.offset))
                .map_err(|e| format!("`{name}`: {e}"))?;
            let matrix = Q8Matrix::read_gguf(reader, n, k).map_err(|e| format!("`{name}`: {e}"))?;
            summary.borrow_mut().add("Q8_0", matrix.size_in_bytes(), Conversion::Kept);
            Ok(Some(matrix))
        };
        let head_q8 = content.tensor_infos.get(head_name).is_some_and(|i| i.ggml_dtype == GgmlDType::Q8_0);
        let output = if let Some(matrix) = q8_direct(reader, head_name)? {
            Linear::Q8(Arc::new(matrix))
        } else if head_q8 {
            let head = tensor(reader, head_name)?;
            summary
                .borrow_mut()
                .add("Q8_0", head.storage_size_in_bytes(), Conversion::Kept);
            Linear::Candle(QMatMul::QTensor(Arc::new(head)))
        } else {
            Linear::Candle(matmul(tensor(reader, head_name)?, head_name)?)
        };
        let embed = match (&output, tied && !options.dequantize) {
            // Tied and quantized: rows are dequantized from the head as they are looked up.
            (Linear::Q8(q), true) => Embedding::Q8(Arc::clone(q)),
            (Linear::Candle(QMatMul::QTensor(q)), true) => Embedding::Quantized(Arc::clone(q)),
            // Its own table (the 0.5B model's GGUF carries a separate `output.weight`):
            // on the CPU it stays in its stored format and only looked-up rows are
            // dequantized (111 MB in Q6_K for the 0.5B model, where an f16 copy took
            // 272 MB and making it passed through 545 MB of f32, the whole load's
            // peak). Otherwise f16 halves it at no speed cost. Looked-up rows are f32.
            _ if !options.dequantize && device.is_cpu() => match q8_direct(reader, "token_embd.weight")? {
                Some(table) => Embedding::Q8(Arc::new(table)),
                None => {
                    let table = tensor(reader, "token_embd.weight")?;
                    summary.borrow_mut().add(&format!("{:?}", table.dtype()), table.storage_size_in_bytes(), Conversion::Kept);
                    Embedding::Quantized(Arc::new(table))
                }
            },
            _ => Embedding::Dense(
                load_dense(reader, "token_embd.weight")?
                    .to_dtype(DType::F16)
                    .map_err(|e| format!("token_embd.weight to f16: {e}"))?,
            ),
        };
        let final_norm = load_dense(reader, "output_norm.weight")?;

        let mut blocks = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let name = |part: &str| format!("blk.{i}.{part}");
            let mm = |reader: &mut R, part: &str| {
                let n = name(part);
                linear(tensor(reader, &n)?, &n)
            };
            blocks.push(Block {
                wq: mm(reader, "attn_q.weight")?,
                wk: mm(reader, "attn_k.weight")?,
                wv: mm(reader, "attn_v.weight")?,
                wo: mm(reader, "attn_output.weight")?,
                w_gate: mm(reader, "ffn_gate.weight")?,
                w_up: mm(reader, "ffn_up.weight")?,
                w_down: mm(reader, "ffn_down.weight")?,
                attn_norm: load_dense(reader, &name("attn_norm.weight"))?,
                ffn_norm: load_dense(reader, &name("ffn_norm.weight"))?,
                bq: load_dense(reader, &name("attn_q.bias"))?,
                bk: load_dense(reader, &name("attn_k.bias"))?,
                bv: load_dense(reader, &name("attn_v.bias"))?,
            });
            // Each block's file bytes and conversion copies are garbage now; hand
            // them back as we go, or they pile up into a loading peak (1041 MB
            // against 860 MB resident for the 0.5B model).
            release_freed_memory();
        }

        let (cos, sin) = rope_tables(head_dim, rope_theta, max_context, device)
            .map_err(|e| format!("RoPE tables: {e}"))?;
        Ok(Self {
            config: Qwen2Config {
                n_layer,
                n_head,
                n_kv_head,
                head_dim,
                hidden,
                rms_eps,
                rope_theta,
                trained_context,
                vocab_size,
            },
            max_context,
            dense_prefill_min_tokens: options.dense_prefill_min_tokens,
            device: device.clone(),
            embed,
            summary: summary.into_inner(),
            blocks,
            final_norm,
            output,
            cos,
            sin,
        })
    }

    /// The model's shape, as read from the file.
    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    /// The longest sequence a [`KvCache`] of this model may hold.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Matrices per storage format as loaded, and what was converted (for the log).
    pub fn summary(&self) -> &WeightSummary {
        &self.summary
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for one session of this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.config.n_layer)
                .map(|_| LayerKv::default())
                .collect(),
            len: 0,
        }
    }

    /// Runs `tokens` through the model at positions `cache.len()..`, appending their
    /// keys and values to `cache`, and returns the logits for the token after the
    /// last one as an f32 vector of `vocab_size`.
    ///
    /// Any number of tokens may be given at once (a prefill), on top of any cache
    /// contents: each new token attends to the whole cache and to the new tokens up to
    /// itself. On error the cache keeps its previous length and contents.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor, LlmError> {
        let seq = tokens.len();
        if seq == 0 {
            return Err(LlmError::Model("forward called with no tokens".into()));
        }
        if cache.layers.len() != self.blocks.len() {
            return Err(LlmError::Model(
                "KV cache belongs to a different model".into(),
            ));
        }
        let pos = cache.len;
        if pos + seq > self.max_context {
            return Err(LlmError::ContextFull {
                tokens: pos + seq,
                limit: self.max_context,
            });
        }
        self.forward_inner(tokens, cache, pos)
            .context("forward pass")
    }

    fn forward_inner(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        pos: usize,
    ) -> candle_core::Result<Tensor> {
        let seq = tokens.len();
        let eps = self.config.rms_eps as f32;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.lookup(&ids)?.unsqueeze(0)?;
        let mask = causal_mask(seq, pos, &self.device)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        let path = MatmulPath::for_tokens(seq, self.dense_prefill_min_tokens);

        for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &block.attn_norm, eps)?;
            let attn = self.attention(block, &h, kv, pos, &cos, &sin, mask.as_ref(), path)?;
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, eps)?;
            let gate = linear(&block.w_gate, &h, path)?.silu()?;
            let up = linear(&block.w_up, &h, path)?;
            x = (x + linear(&block.w_down, &(gate * up)?, path)?)?;
        }
        cache.len = pos + seq;

        let last = x.narrow(1, seq - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.final_norm, eps)?;
        linear(&self.output, &last, MatmulPath::Quantized)?
            .flatten_all()?
            .to_dtype(DType::F32)
    }

    /// Grouped-query self-attention of one block over cache + new tokens.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        block: &Block,
        x: &Tensor,
        kv: &mut LayerKv,
        pos: usize,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        path: MatmulPath,
    ) -> candle_core::Result<Tensor> {
        let Qwen2Config {
            n_head,
            n_kv_head,
            head_dim,
            hidden,
            ..
        } = self.config;
        let (b, seq, _) = x.dims3()?;
        let group = n_head / n_kv_head;

        let q = linear(&block.wq, x, path)?.broadcast_add(&block.bq)?;
        let k = linear(&block.wk, x, path)?.broadcast_add(&block.bk)?;
        let v = linear(&block.wv, x, path)?.broadcast_add(&block.bv)?;
        // (b, seq, heads * dim) -> (b, heads, seq, dim)
        let q = q
            .reshape((b, seq, n_head, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = k
            .reshape((b, seq, n_kv_head, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((b, seq, n_kv_head, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;

        let (k, v) = kv.append(&k, &v, pos, self.max_context)?;
        let kv_len = pos + seq;
        // A decode step on our kernel; a prefill's many query rows are a GEMM, which
        // candle does better than our row-by-row scoring (an 18-token turn on top of
        // 1,122 tokens: 75–84 ms through candle, 85–100 through ours).
        if seq == 1
            && let Some(out) = kv.attend_on_cpu(&q, &self.config, pos, seq)?
        {
            return linear(&block.wo, &out, path);
        }

        // Grouped-query attention without copying K/V per query head: the `group`
        // query heads sharing one kv head are stacked along the sequence axis, so
        // q becomes (b, n_kv_head, group * seq, dim) against k (b, n_kv_head, kv_len, dim).
        let scale = 1.0 / (head_dim as f64).sqrt();
        let q = (q * scale)?.reshape((b, n_kv_head, group * seq, head_dim))?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match mask {
            Some(mask) => scores
                .reshape((b, n_kv_head, group, seq, kv_len))?
                .broadcast_add(mask)?
                .reshape((b, n_kv_head, group * seq, kv_len))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // (b, n_kv_head, group * seq, dim)
        let out = out
            .reshape((b, n_head, seq, head_dim))?
            .transpose(1, 2)?
            .reshape((b, seq, hidden))?;
        linear(&block.wo, &out, path)
    }
}

/// Hands the heap memory freed while loading (each tensor's raw bytes, and the Q5_0
/// originals of converted matrices) back to the OS: glibc keeps freed blocks below its
/// mmap threshold in the process, which would count a few hundred MB of garbage in the
/// server's resident memory for its whole life.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The additive causal mask for `seq` new tokens at positions `pos..pos + seq` over
/// `pos + seq` keys: new token `i` sees every cached key and new keys `0..=i`.
/// `None` for a single token, which may see everything.
fn causal_mask(seq: usize, pos: usize, device: &Device) -> candle_core::Result<Option<Tensor>> {
    if seq <= 1 {
        return Ok(None);
    }
    let kv_len = pos + seq;
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| (0..kv_len).map(move |j| if j <= pos + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(data, (seq, kv_len), device).map(Some)
}

/// `cos` and `sin` of every position's rotation angles, `(positions, head_dim / 2)`.
fn rope_tables(
    head_dim: usize,
    theta: f64,
    positions: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    let mut angles = Vec::with_capacity(positions * half);
    for p in 0..positions {
        angles.extend(inv_freq.iter().map(|f| p as f32 * f));
    }
    let angles = Tensor::from_vec(angles, (positions, half), device)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Granularity of KV buffer growth, in tokens, so a decode step rarely reallocates.
const KV_GROW_STEP: usize = 512;

/// Keys and values of one block: preallocated buffers `(1, n_kv_head, capacity, dim)`
/// of which the first `KvCache::len` positions are valid.
#[derive(Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl LayerKv {
    /// Attention of the new tokens' queries `q` (`(1, n_head, seq, dim)`, after the
    /// new keys and values were appended at `pos`) with [`crate::attention`], reading
    /// the buffers in place: `(1, seq, hidden)`. `None` off the CPU (or for buffers not
    /// in f32), where candle's ops run.
    fn attend_on_cpu(&self, q: &Tensor, config: &Qwen2Config, pos: usize, seq: usize) -> candle_core::Result<Option<Tensor>> {
        let (Some(kb), Some(vb)) = (&self.k, &self.v) else { return Ok(None) };
        if !q.device().is_cpu() || kb.dtype() != DType::F32 || q.dtype() != DType::F32 {
            return Ok(None);
        }
        let (_, _, capacity, _) = kb.dims4()?;
        let shape = crate::attention::Shape {
            n_head: config.n_head,
            n_kv_head: config.n_kv_head,
            head_dim: config.head_dim,
            seq,
            pos,
            capacity,
        };
        let queries: Vec<f32> = q.flatten_all()?.to_vec1()?;
        let (k_storage, k_layout) = kb.storage_and_layout();
        let (v_storage, v_layout) = vb.storage_and_layout();
        let (candle_core::Storage::Cpu(k_cpu), candle_core::Storage::Cpu(v_cpu)) = (&*k_storage, &*v_storage) else {
            return Ok(None);
        };
        if !k_layout.is_contiguous() || !v_layout.is_contiguous() {
            return Ok(None);
        }
        let keys = &k_cpu.as_slice::<f32>()?[k_layout.start_offset()..];
        let values = &v_cpu.as_slice::<f32>()?[v_layout.start_offset()..];
        let mut out = vec![0f32; seq * config.n_head * config.head_dim];
        let scale = 1.0 / (config.head_dim as f32).sqrt();
        crate::attention::attend(&queries, keys, values, shape, scale, &mut out);
        Tensor::from_vec(out, (1, seq, config.n_head * config.head_dim), q.device()).map(Some)
    }

    /// Writes `k`, `v` (`(1, n_kv_head, seq, dim)`) at `pos` and returns views of
    /// positions `0..pos + seq`.
    fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
        max_context: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let seq = k.dim(2)?;
        let needed = pos + seq;
        let capacity = self.k.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if needed > capacity {
            let new_capacity = needed
                .div_ceil(KV_GROW_STEP)
                .saturating_mul(KV_GROW_STEP)
                .max(capacity.saturating_mul(2))
                .min(max_context)
                .max(needed);
            self.k = Some(grow(self.k.take(), k, pos, new_capacity)?);
            self.v = Some(grow(self.v.take(), v, pos, new_capacity)?);
        }
        let (Some(kb), Some(vb)) = (&self.k, &self.v) else {
            candle_core::bail!("KV buffer missing after allocation");
        };
        kb.slice_set(k, 2, pos)?;
        vb.slice_set(v, 2, pos)?;
        Ok((kb.narrow(2, 0, needed)?, vb.narrow(2, 0, needed)?))
    }
}

/// A zeroed buffer of `capacity` positions shaped like `like`, holding the first `keep`
/// positions of `old`.
fn grow(
    old: Option<Tensor>,
    like: &Tensor,
    keep: usize,
    capacity: usize,
) -> candle_core::Result<Tensor> {
    let (b, heads, _, dim) = like.dims4()?;
    let buf = Tensor::zeros((b, heads, capacity, dim), like.dtype(), like.device())?;
    if let Some(old) = old
        && keep > 0
    {
        buf.slice_set(&old.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
    }
    Ok(buf)
}

/// One session's attention state: the keys and values of every token it has run,
/// position by position. Owned by the session, so sessions never share or lock it.
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    /// Number of token positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position from `len` on, keeping the prefix, so the next forward
    /// continues at `len`. Cheap: the buffers stay allocated and are overwritten.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes the key and value buffers hold, allocated capacity included (the buffers
    /// grow ahead of `len` and are kept on truncate), so a memory budget counts what
    /// the process really holds.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Forgets everything and frees the buffers (for a session that goes idle).
    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            *layer = LayerKv::default();
        }
        self.len = 0;
    }

    /// An independent copy of the first `len` positions (fewer if the cache holds
    /// fewer), so a prefix computed by one session can seed another: a new call with
    /// the same system prompt then skips prefilling it.
    pub fn copy_prefix(&self, len: usize) -> Result<KvCache, LlmError> {
        let len = len.min(self.len);
        let capacity = len.div_ceil(KV_GROW_STEP).max(1) * KV_GROW_STEP;
        let copy = |t: &Option<Tensor>| -> candle_core::Result<Option<Tensor>> {
            match t {
                Some(t) if len > 0 => grow(Some(t.clone()), t, len, capacity).map(Some),
                _ => Ok(None),
            }
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerKv {
                    k: copy(&l.k)?,
                    v: copy(&l.v)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .context("copying a KV cache prefix")?;
        Ok(KvCache { layers, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_lets_new_tokens_see_the_cache_and_earlier_new_tokens() -> candle_core::Result<()> {
        let mask = causal_mask(3, 2, &Device::Cpu)?;
        let Some(mask) = mask else {
            panic!("a 3-token step needs a mask")
        };
        let rows: Vec<Vec<f32>> = mask.to_vec2()?;
        let ninf = f32::NEG_INFINITY;
        assert_eq!(
            rows,
            vec![
                vec![0.0, 0.0, 0.0, ninf, ninf],
                vec![0.0, 0.0, 0.0, 0.0, ninf],
                vec![0.0, 0.0, 0.0, 0.0, 0.0],
            ]
        );
        assert!(causal_mask(1, 7, &Device::Cpu)?.is_none());
        Ok(())
    }

    #[test]
    fn kv_buffers_grow_keep_the_prefix_and_truncate() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut layer = LayerKv::default();
        let step = |from: f32, n: usize| {
            Tensor::arange(from, from + n as f32, &dev)?.reshape((1, 1, n, 1))
        };
        let a = step(0.0, 3)?;
        layer.append(&a, &a, 0, 10_000)?;
        // Force a reallocation past the first growth step.
        let b = step(3.0, KV_GROW_STEP)?;
        let (k, _) = layer.append(&b, &b, 3, 10_000)?;
        let got: Vec<f32> = k.flatten_all()?.to_vec1()?;
        let want: Vec<f32> = (0..KV_GROW_STEP + 3).map(|x| x as f32).collect();
        assert_eq!(got, want);
        // Truncate to 2 and overwrite from there.
        let c = step(100.0, 2)?;
        let (k, _) = layer.append(&c, &c, 2, 10_000)?;
        assert_eq!(
            k.flatten_all()?.to_vec1::<f32>()?,
            vec![0.0, 1.0, 100.0, 101.0]
        );
        Ok(())
    }

    #[test]
    fn copied_prefix_is_independent_of_the_original() -> Result<(), LlmError> {
        let dev = Device::Cpu;
        let mut cache = KvCache {
            layers: vec![LayerKv::default()],
            len: 0,
        };
        let t = Tensor::arange(0f32, 6.0, &dev)
            .and_then(|t| t.reshape((1, 1, 6, 1)))
            .context("t")?;
        cache.layers[0].append(&t, &t, 0, 100).context("append")?;
        cache.len = 6;
        // One layer, keys and values, 100 f32 positions of one head of width 1.
        assert_eq!(cache.bytes(), 2 * 100 * 4);
        let mut copy = cache.copy_prefix(4)?;
        assert_eq!(copy.len(), 4);
        assert_eq!(copy.bytes(), 2 * KV_GROW_STEP * 4, "a copy holds one growth step");
        // Writing into the copy past its prefix leaves the original alone.
        let x = Tensor::new(&[[[[9f32]]]], &dev).context("x")?;
        let (k, _) = copy.layers[0].append(&x, &x, 4, 100).context("append")?;
        copy.len = 5;
        let got: Vec<f32> = k.flatten_all().and_then(|k| k.to_vec1()).context("k")?;
        assert_eq!(got, vec![0.0, 1.0, 2.0, 3.0, 9.0]);
        let orig = cache.layers[0]
            .k
            .as_ref()
            .map(|k| k.narrow(2, 0, 6))
            .transpose()
            .context("n")?;
        let orig: Vec<f32> = orig
            .map(|k| k.flatten_all().and_then(|k| k.to_vec1()))
            .transpose()
            .context("v")?
            .unwrap_or_default();
        assert_eq!(orig, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        Ok(())
    }

    #[test]
    fn prefills_go_dense_only_past_the_threshold() {
        let min = 96;
        assert_eq!(MatmulPath::for_tokens(1, min), MatmulPath::Quantized);
        assert_eq!(MatmulPath::for_tokens(min - 1, min), MatmulPath::Quantized);
        assert_eq!(MatmulPath::for_tokens(min, min), MatmulPath::Dense);
        assert_eq!(MatmulPath::for_tokens(4000, 0), MatmulPath::Quantized, "0 = never");
        assert_eq!(MatmulPath::for_tokens(4000, DEFAULT_DENSE_PREFILL_MIN_TOKENS), MatmulPath::Quantized);
    }

    #[test]
    fn both_paths_compute_the_same_product() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..64 * 256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let w = Tensor::from_vec(w, (64, 256), &dev)?;
        let x: Vec<f32> = (0..40 * 256).map(|i| ((i * 13 % 97) as f32 - 48.0) / 48.0).collect();
        let x = Tensor::from_vec(x, (1, 40, 256), &dev)?;
        let candle = Linear::Candle(QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?);
        let ours = Linear::Q8(Arc::new(Q8Matrix::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?, false).map_err(candle_core::Error::wrap)?));
        let dense = linear(&candle, &x, MatmulPath::Dense)?;
        let scale = dense.abs()?.max_all()?.to_scalar::<f32>()?;
        for (name, w) in [("candle", &candle), ("q8", &ours)] {
            for path in [MatmulPath::Quantized, MatmulPath::Dense] {
                let got = linear(w, &x, path)?;
                assert_eq!(got.dims(), dense.dims());
                let err = (got - &dense)?.abs()?.max_all()?.to_scalar::<f32>()?;
                // Only the quantized path's 8-bit activations differ.
                assert!(err <= 0.02 * scale, "{name} {path:?}: error {err} against {scale}");
            }
        }
        Ok(())
    }

    #[test]
    fn rope_tables_start_at_identity() -> candle_core::Result<()> {
        let (cos, sin) = rope_tables(4, 10_000.0, 3, &Device::Cpu)?;
        assert_eq!(cos.to_vec2::<f32>()?[0], vec![1.0, 1.0]);
        assert_eq!(sin.to_vec2::<f32>()?[0], vec![0.0, 0.0]);
        let s1 = sin.to_vec2::<f32>()?[1][0];
        assert!((s1 - 1f32.sin()).abs() < 1e-6);
        Ok(())
    }
}
