//! Q8_0 weight matrices with our own matrix product, for the short prefills of a
//! turn (a dozen to a few dozen tokens) and for decoding.
//!
//! Why not candle's quantized matmul: for Q8_0 on x86 without VNNI-sized shapes
//! (candle 0.11's repacked kernels need `k` to be a multiple of 256; this model's
//! width is 896), every output element is one `vec_dot` call over a whole row, which
//! converts both f16 scales and reduces horizontally per element. A 17-token turn
//! prefill ran at 55–72 tok/s, barely faster than decoding the tokens one by one
//! (about 50 tok/s; profile: `BlockQ8_0::vec_dot` about half of all cycles). Here the weights are
//! stored as plain `i8` blocks with their scales already widened to f32, four rows'
//! blocks and scales side by side ([`Layout::Rows`]: one stream of memory per decode
//! work item; decode went 20 → 25.5 tok/s on a 2-core EPYC), and the
//! kernel computes a tile of up to 4 activation rows × 2 weight rows per pass over
//! the blocks, so each loaded block serves several products and the horizontal sums
//! happen once per tile. Measured with `llm_speed` (0.5B model, 2 cores, this kernel
//! against `--candle-q8`): a 30-token prefill at 224–262 tok/s against 65–107, a
//! 650-token one at 213–217 (candle's dense f32 GEMM: 189–198); decoding the same
//! (47–51 tok/s both).
//!
//! On CPUs with AVX-VNNI the weights are stored differently ([`Layout::Panels`]):
//! eight rows interleaved four bytes at a time, each byte offset by 128, so that one
//! `vpdpbusd` accumulates eight outputs' integer dot products at once from one
//! broadcast activation word, with no sign juggling and no horizontal sums; every
//! product, decoding included, takes that kernel. The offset's contribution,
//! `128 · Σa` per activation block, is taken off once per block for all outputs.
//! Stored that way at load, a decode step reads one contiguous stream per work item
//! (the row layout read eight: four weight rows and their four scale rows, and its
//! time went to waiting on them; `perf annotate`). Measured with `llm_speed` (0.5B
//! model, 2 threads, alternated with the build that repacked panels per prefill
//! product and decoded on the tile kernel): decode 72–76 tok/s against 53–56 after a
//! 17-token prompt, 60.5 against 46–47 after 650; a 17-token prefill 56 ms against
//! 81–92; 150 and 650 tokens about even (325–338 ms, 1.63–1.65 s).
//!
//! Numerics are those of ggml's Q8_0 × Q8_0 product: activations are quantized to 8
//! bits per block of 32 with an absmax scale, each block's integer dot product is
//! exact, then scaled by both block scales and summed in f32.

// Kernels index several arrays with the same block and row numbers; index loops
// say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Values per Q8_0 block.
pub const BLOCK: usize = 32;
/// Bytes of one GGUF Q8_0 block: an f16 scale then 32 `i8`.
const GGUF_BLOCK_BYTES: usize = 2 + BLOCK;

/// A `(n, k)` weight matrix in Q8_0 (the layout of a `y = x · Wᵀ` linear layer):
/// row `j` holds the weights of output `j`.
pub struct Q8Matrix {
    n: usize,
    k: usize,
    /// The quantized values.
    layout: Layout,
    /// The block scales, in the order of [`Layout`].
    d: Vec<f32>,
}

/// How a [`Q8Matrix`] holds its values (chosen at load for the CPU: see the module doc).
enum Layout {
    /// Groups of [`ROWS`] rows (the last padded with zero rows), block by block: for
    /// group `p` and block `b`, [`ROWS_BLOCK_BYTES`] bytes at `(p · kb + b) · 144` hold
    /// the block's 32 values of each of the four rows in turn, then their four
    /// scales (f32, little-endian). `d` is empty. For the AVX2 kernels (CPUs without
    /// AVX-VNNI): a decode step's work item (four outputs) reads one contiguous
    /// stream, where rows and scales stored apart made it eight, and its time went to
    /// waiting on them (`perf annotate`: the loads' users were the hot instructions).
    Rows(Vec<u8>),
    /// Panels of [`PANEL`] rows (the last padded with zero rows): for panel `p`,
    /// block `b` and 4-value group `g`, 32 bytes at `((p · kb + b) · 8 + g) · 32` hold
    /// that group of each of the eight rows in turn, each value stored as `q + 128`;
    /// scales at `(p · kb + b) · 8 + row`. For the AVX-VNNI kernel.
    Panels(Vec<u8>),
    /// Q5_0 as stored in the file, for the AVX2 kernels on CPUs without AVX-VNNI, in
    /// groups of [`ROWS`] rows as [`Layout::Rows`]: for group `p` and block `b`,
    /// [`Q5_ROWS_BLOCK_BYTES`] bytes at `(p · kb + b) · 96` hold each row's packed
    /// block of [`Q5_BLOCK_BYTES`] (the 32 fifth bits as a little-endian `u32`, then 16
    /// bytes of nibbles: low nibble value `i`, high nibble value `i + 16`), then the
    /// four f32 scales. `d` is empty. The kernels unpack a block
    /// to 32 `i8` in registers, so a decode step reads 20 bytes of values per block
    /// where the Q8_0 rows read 32 (see [`Q8Matrix::from_qtensor`]).
    Q5Rows(Vec<u8>),
}

/// Bytes of one packed Q5_0 block of [`Layout::Q5Rows`], without its scale.
const Q5_BLOCK_BYTES: usize = 20;
/// Bytes of one block of one group of [`Layout::Q5Rows`]: four packed blocks, then
/// their four f32 scales.
const Q5_ROWS_BLOCK_BYTES: usize = ROWS * (Q5_BLOCK_BYTES + 4);
/// Bytes of one GGUF Q5_0 block: an f16 scale, the fifth bits, the nibbles.
const GGUF_Q5_BLOCK_BYTES: usize = 2 + Q5_BLOCK_BYTES;

/// Rows per group of [`Layout::Rows`]: the outputs one decode work item computes.
const ROWS: usize = 4;
/// Bytes of one block of one group of [`Layout::Rows`]: four rows' 32 values, then
/// their four f32 scales.
const ROWS_BLOCK_BYTES: usize = ROWS * (BLOCK + 4);

/// Bytes of one block of one panel: [`PANEL`] rows of 32 values.
const PANEL_BLOCK_BYTES: usize = PANEL * BLOCK;

/// Whether new matrices use [`Layout::Panels`] on a CPU that can (on by default;
/// `llm_speed --row-layout` turns it off to compare).
static PANELS_WANTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Makes matrices loaded from now on use the row layout and the tile kernels even
/// on CPUs with AVX-VNNI (for side-by-side measurements).
pub fn use_row_layout(rows: bool) {
    PANELS_WANTED.store(!rows, std::sync::atomic::Ordering::Relaxed);
}

/// Whether this CPU's kernels can multiply a Q5_0 matrix as stored
/// ([`Layout::Q5Rows`]): the AVX2 kernels can; on CPUs with AVX-VNNI every matrix is
/// stored as Q8_0 panels instead.
pub fn can_keep_q5_0() -> bool {
    !panels_by_default() && Kernel::detect() == Kernel::Avx2
}

/// Whether matrices loaded now are stored as panels.
fn panels_by_default() -> bool {
    #[cfg(target_arch = "x86_64")]
    return PANELS_WANTED.load(std::sync::atomic::Ordering::Relaxed) && vnni::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Builds a matrix block by block in row-major order, packing each completed group
/// of rows ([`ROWS`] or [`PANEL`]) into its layout (so a large matrix never sits in
/// memory twice).
struct Builder {
    m: Q8Matrix,
    /// Rows waiting for their panel: values and scales, row-major.
    pending: (Vec<i8>, Vec<f32>),
}

impl Builder {
    fn new(n: usize, k: usize, panels: bool) -> Self {
        let blocks = n * k / BLOCK;
        let (layout, group, d) = match panels {
            false => (Layout::Rows(Vec::with_capacity(n.div_ceil(ROWS) * k / BLOCK * ROWS_BLOCK_BYTES)), ROWS, Vec::new()),
            true => (Layout::Panels(Vec::with_capacity(n.div_ceil(PANEL) * PANEL * k)), PANEL, Vec::with_capacity(blocks.div_ceil(PANEL) * PANEL)),
        };
        let pending = (Vec::with_capacity(group * k), Vec::with_capacity(group * k / BLOCK));
        Self { m: Q8Matrix { n, k, layout, d }, pending }
    }

    /// Rows packed together by the layout.
    fn group(&self) -> usize {
        match self.m.layout {
            Layout::Panels(_) => PANEL,
            Layout::Rows(_) | Layout::Q5Rows(_) => ROWS,
        }
    }

    /// Appends the next block (row-major order over the matrix).
    fn push(&mut self, d: f32, values: impl IntoIterator<Item = i8>) {
        assert!(!matches!(self.m.layout, Layout::Q5Rows(_)), "Q5_0 matrices are built from their blocks, not values");
        self.pending.0.extend(values);
        self.pending.1.push(d);
        if self.pending.1.len() == self.group() * self.m.k / BLOCK {
            self.flush();
        }
    }

    /// Packs the pending rows (fewer than a group only at the end) into the layout.
    fn flush(&mut self) {
        let (k, kb) = (self.m.k, self.m.k / BLOCK);
        let (values, scales) = &mut self.pending;
        let rows = scales.len() / kb;
        if rows == 0 {
            return;
        }
        if let Layout::Rows(qs) = &mut self.m.layout {
            for b in 0..kb {
                for row in 0..ROWS {
                    match row < rows {
                        true => qs.extend(values[row * k + b * BLOCK..][..BLOCK].iter().map(|&q| q as u8)),
                        false => qs.extend([0u8; BLOCK]),
                    }
                }
                for row in 0..ROWS {
                    qs.extend(if row < rows { scales[row * kb + b] } else { 0.0 }.to_le_bytes());
                }
            }
            values.clear();
            scales.clear();
            return;
        }
        let Layout::Panels(qs) = &mut self.m.layout else { return };
        for b in 0..kb {
            for g in 0..BLOCK / 4 {
                for row in 0..PANEL {
                    for i in 0..4 {
                        let q = if row < rows { values[row * k + b * BLOCK + g * 4 + i] } else { 0 };
                        qs.push((q as u8) ^ 0x80);
                    }
                }
            }
            for row in 0..PANEL {
                self.m.d.push(if row < rows { scales[row * kb + b] } else { 0.0 });
            }
        }
        values.clear();
        scales.clear();
    }

    fn finish(mut self) -> Q8Matrix {
        self.flush();
        self.m
    }
}

/// Errors of building a [`Q8Matrix`].
#[derive(Debug, thiserror::Error)]
pub enum Q8Error {
    /// Not a 2-D Q8_0 tensor with whole blocks per row.
    #[error("not a Q8_0 matrix with rows of whole 32-value blocks: {0}")]
    Shape(String),
    /// Reading the tensor's bytes failed.
    #[error("reading the Q8_0 tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading the tensor from its file failed.
    #[error("reading the Q8_0 tensor from the file: {0}")]
    Io(#[from] std::io::Error),
}

impl Q8Matrix {
    /// Takes a 2-D Q8_0 or Q5_0 tensor's weights (consumed: its storage is freed when
    /// this returns, so a model holds one copy).
    ///
    /// Q5_0 becomes Q8_0 with the same values, exactly, unless `keep_q5_0` and the
    /// CPU's kernels can unpack it ([`can_keep_q5_0`]): then it stays as stored
    /// ([`Layout::Q5Rows`]), 24 bytes per block with its scale against 36. Most of
    /// the 0.5B model's layer matrices are Q5_0 in its file, so that holds about
    /// 90 MB less, but on a CPU whose decoding is bound by arithmetic rather than
    /// memory the unpacking costs more than the bytes it saves: on a 2-core AMD EPYC
    /// (Zen 1, AVX2), `llm_speed --keep-q5` alternated with the default decoded at
    /// 24–25 tok/s against 27–28 and prefilled at 50–51 against 55–59, in 642 MB
    /// against 727. Hence off by default (`[llm] keep_q5_0`).
    pub fn from_qtensor(q: QTensor, keep_q5_0: bool) -> Result<Self, Q8Error> {
        let (n, k) = q
            .shape()
            .dims2()
            .map_err(|e| Q8Error::Shape(e.to_string()))?;
        let bytes: Cow<'_, [u8]> = q.data()?;
        match q.dtype() {
            GgmlDType::Q8_0 => Self::from_gguf_bytes(n, k, &bytes),
            GgmlDType::Q5_0 => Self::from_gguf_q5_0_bytes(n, k, &bytes, keep_q5_0 && can_keep_q5_0()),
            other => Err(Q8Error::Shape(format!("dtype {other:?}"))),
        }
    }

    /// Reads `n` rows of `k` values from GGUF Q5_0 blocks: kept as Q5_0 with `keep`,
    /// else rewritten as Q8_0 blocks of the same values.
    fn from_gguf_q5_0_bytes(n: usize, k: usize, bytes: &[u8], keep: bool) -> Result<Self, Q8Error> {
        if k == 0 || !k.is_multiple_of(BLOCK) || bytes.len() != n * k / BLOCK * GGUF_Q5_BLOCK_BYTES {
            return Err(Q8Error::Shape(format!("{n}x{k} from {} Q5_0 bytes", bytes.len())));
        }
        if !keep {
            let mut m = Builder::new(n, k, panels_by_default());
            for block in bytes.chunks_exact(GGUF_Q5_BLOCK_BYTES) {
                let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                let packed: &[u8; Q5_BLOCK_BYTES] = block[2..].try_into().expect("a block's 20 bytes");
                m.push(d, unpack_q5(packed));
            }
            return Ok(m.finish());
        }
        let kb = k / BLOCK;
        let mut values = Vec::with_capacity(n.div_ceil(ROWS) * kb * Q5_ROWS_BLOCK_BYTES);
        for p in 0..n.div_ceil(ROWS) {
            for b in 0..kb {
                let block = |row: usize| {
                    let r = p * ROWS + row;
                    (r < n).then(|| &bytes[(r * kb + b) * GGUF_Q5_BLOCK_BYTES..][..GGUF_Q5_BLOCK_BYTES])
                };
                for row in 0..ROWS {
                    match block(row) {
                        Some(block) => values.extend_from_slice(&block[2..]),
                        None => values.extend([0u8; Q5_BLOCK_BYTES]),
                    }
                }
                for row in 0..ROWS {
                    let d = block(row).map_or(0.0, |block| half::f16::from_le_bytes([block[0], block[1]]).to_f32());
                    values.extend(d.to_le_bytes());
                }
            }
        }
        Ok(Self { n, k, layout: Layout::Q5Rows(values), d: Vec::new() })
    }

    /// The format the values are held in, for the startup log's weight summary.
    pub fn stored_format(&self) -> &'static str {
        match self.layout {
            Layout::Q5Rows(_) => "Q5_0",
            Layout::Rows(_) | Layout::Panels(_) => "Q8_0",
        }
    }

    /// Reads `n` rows of `k` values from GGUF Q8_0 blocks.
    pub fn from_gguf_bytes(n: usize, k: usize, bytes: &[u8]) -> Result<Self, Q8Error> {
        if k == 0 || !k.is_multiple_of(BLOCK) || bytes.len() != n * k / BLOCK * GGUF_BLOCK_BYTES {
            return Err(Q8Error::Shape(format!("{n}x{k} from {} bytes", bytes.len())));
        }
        let mut m = Builder::new(n, k, panels_by_default());
        push_blocks(&mut m, bytes);
        Ok(m.finish())
    }

    /// Reads `n` rows of `k` values of GGUF Q8_0 blocks from `reader`, a chunk at a
    /// time: a large matrix (the 0.5B model's 136 MB output head) never has its file
    /// bytes and its converted copy in memory at once, which kept the loading peak
    /// about that much above the resident size.
    pub fn read_gguf<R: std::io::Read>(reader: &mut R, n: usize, k: usize) -> Result<Self, Q8Error> {
        if k == 0 || !k.is_multiple_of(BLOCK) {
            return Err(Q8Error::Shape(format!("{n}x{k}")));
        }
        let mut m = Builder::new(n, k, panels_by_default());
        let mut left = n * k / BLOCK;
        let mut chunk = vec![0u8; 2048 * GGUF_BLOCK_BYTES];
        while left > 0 {
            let blocks = left.min(2048);
            let bytes = &mut chunk[..blocks * GGUF_BLOCK_BYTES];
            reader.read_exact(bytes)?;
            push_blocks(&mut m, bytes);
            left -= blocks;
        }
        Ok(m.finish())
    }

    /// Quantizes an f32 `(n, k)` matrix (tests and benches).
    pub fn quantize(n: usize, k: usize, values: &[f32]) -> Result<Self, Q8Error> {
        if k == 0 || !k.is_multiple_of(BLOCK) || values.len() != n * k {
            return Err(Q8Error::Shape(format!("{n}x{k} from {} values", values.len())));
        }
        let mut qs = vec![0i8; n * k];
        let mut d = vec![0f32; n * k / BLOCK];
        quantize_into(values, &mut qs, &mut d);
        let mut m = Builder::new(n, k, panels_by_default());
        for (block, &d) in qs.chunks_exact(BLOCK).zip(&d) {
            m.push(d, block.iter().copied());
        }
        Ok(m.finish())
    }

    /// The same matrix in the row layout, or in panels (tests compare the two
    /// layouts and their kernels).
    #[cfg(test)]
    fn relayout(&self, panels: bool) -> Self {
        let kb = self.k / BLOCK;
        let mut m = Builder::new(self.n, self.k, panels);
        for row in 0..self.n {
            for b in 0..kb {
                let (values, d) = self.block(row, b);
                m.push(d, values);
            }
        }
        m.finish()
    }

    /// Block `b` of row `row`: its values and scale, whatever the layout.
    fn block(&self, row: usize, b: usize) -> ([i8; BLOCK], f32) {
        let kb = self.k / BLOCK;
        match &self.layout {
            Layout::Rows(qs) => {
                let (values, scale) = grouped_at(row, b, kb, BLOCK);
                (std::array::from_fn(|i| qs[values + i] as i8), read_f32(qs, scale))
            }
            Layout::Panels(qs) => {
                let (p, col) = (row / PANEL, row % PANEL);
                let at = (p * kb + b) * PANEL_BLOCK_BYTES;
                let values = std::array::from_fn(|i| {
                    let (g, j) = (i / 4, i % 4);
                    (qs[at + g * 32 + col * 4 + j] ^ 0x80) as i8
                });
                (values, self.d[(p * kb + b) * PANEL + col])
            }
            Layout::Q5Rows(qs) => {
                let (packed, scale) = grouped_at(row, b, kb, Q5_BLOCK_BYTES);
                let packed: &[u8; Q5_BLOCK_BYTES] = qs[packed..packed + Q5_BLOCK_BYTES].try_into().expect("a block's 20 bytes");
                (unpack_q5(packed), read_f32(qs, scale))
            }
        }
    }

    /// Output width (rows of the matrix).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held (for the startup log's weight summary).
    pub fn size_in_bytes(&self) -> usize {
        let values = match &self.layout {
            Layout::Rows(qs) | Layout::Panels(qs) | Layout::Q5Rows(qs) => qs.len(),
        };
        values + self.d.len() * 4
    }

    /// Appends row `row` in f32 to `out` (an embedding lookup, when the model's
    /// token table is its output head); false when there is no such row.
    pub fn push_row(&self, row: usize, out: &mut Vec<f32>) -> bool {
        if row >= self.n {
            return false;
        }
        for b in 0..self.k / BLOCK {
            let (values, d) = self.block(row, b);
            out.extend(values.iter().map(|&q| f32::from(q) * d));
        }
        true
    }

    /// The matrix in f32, for the dense prefill path.
    pub fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for row in 0..self.n {
            self.push_row(row, &mut out);
        }
        Tensor::from_vec(out, (self.n, self.k), device)
    }

    /// `x · Wᵀ` for `x` of shape `(..., k)`: the result has shape `(..., n)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("q8 matmul on a scalar");
        };
        if k != self.k {
            candle_core::bail!("q8 matmul: input width {k}, matrix {}x{}", self.n, self.k);
        }
        let m: usize = lead.iter().product();
        let xs: Vec<f32> = x.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let mut out = vec![0f32; m * self.n];
        self.matmul(&xs, m, &mut out);
        let mut shape = lead.to_vec();
        shape.push(self.n);
        Tensor::from_vec(out, shape, x.device())
    }

    /// `out (m, n) = x (m, k) · Wᵀ`, on the model's thread pool ([`crate::pool`]).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.k, "q8 matmul: input size");
        assert_eq!(out.len(), m * self.n, "q8 matmul: output size");
        let kb = self.k / BLOCK;
        let mut aq = vec![0i8; m * self.k];
        let mut ad = vec![0f32; m * kb];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let (qs, q5): (&[u8], bool) = match &self.layout {
            Layout::Rows(qs) => (qs.as_slice(), false),
            Layout::Q5Rows(qs) => (qs.as_slice(), true),
            #[cfg(target_arch = "x86_64")]
            Layout::Panels(qs) => {
                let mut sums = vec![0i32; m * kb];
                quantize_rows(x, self.k, &mut aq, &mut ad, Some(&mut sums));
                let acts = vnni::Acts { qs: &aq, d: &ad, sums: &sums, k: self.k, m };
                crate::pool::model_pool().run(self.n.div_ceil(PANEL), |items| {
                    let out_ptr = &out_ptr;
                    for p in items {
                        // SAFETY: panels are only built when `vnni::available()`; this
                        // item alone writes the panel's columns of every row of `out`,
                        // which outlives the pool call.
                        unsafe { vnni::panel(qs, &self.d, p, &acts, self.n, out_ptr.0) };
                    }
                });
                return;
            }
            #[cfg(not(target_arch = "x86_64"))]
            Layout::Panels(_) => unreachable!("panels are only built on x86-64 with AVX-VNNI"),
        };
        quantize_rows(x, self.k, &mut aq, &mut ad, None);
        let acts = Acts { qs: &aq, d: &ad, k: self.k };

        // Work items: (group of output columns, row tile); a group is wide enough that
        // a worker's item amortizes the pool's hand-off, narrow enough to balance.
        // Items run group by group, so a worker's consecutive items (the pool hands
        // out runs of them) take the same group's weight rows from its cache for one
        // row tile after another; the other order read the whole matrix from memory
        // again for every 4 tokens of a prefill.
        let row_tiles = m.div_ceil(TILE_M);
        let groups = self.n.div_ceil(GROUP_N);
        let kernel = Kernel::detect();
        crate::pool::model_pool().run(row_tiles * groups, |items| {
            let out_ptr = &out_ptr;
            for item in items {
                let (g, rt) = (item / row_tiles, item % row_tiles);
                let r0 = rt * TILE_M;
                let rows = (m - r0).min(TILE_M);
                let c0 = g * GROUP_N;
                let c1 = (c0 + GROUP_N).min(self.n);
                // SAFETY: every (row, column) of `out` belongs to exactly one item, so
                // no two workers write the same element; `out` outlives the pool call.
                unsafe { self.group(qs, q5, kernel, &acts, r0, rows, c0, c1, out_ptr.0) };
            }
        });
    }

    /// Rows `r0..r0 + rows` of the output, columns `c0..c1`, for the row layouts'
    /// bytes `qs` ([`Layout::Q5Rows`] when `q5`, else [`Layout::Rows`]).
    ///
    /// # Safety
    /// `out` must point to an `(m, n)` buffer that no other thread writes in this
    /// range of rows and columns; `qs` and `q5` must be this matrix's layout.
    #[allow(clippy::too_many_arguments)]
    unsafe fn group(&self, qs: &[u8], q5: bool, kernel: Kernel, acts: &Acts<'_>, r0: usize, rows: usize, c0: usize, c1: usize, out: *mut f32) {
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx2 && rows == 1 {
            // SAFETY: AVX2 and FMA are present (`Kernel::Avx2`); the caller owns
            // row `r0`, columns `c0..c1` of `out`.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.add(r0 * self.n + c0), c1 - c0) };
            // SAFETY: as above; `qs` is the layout `q5` says.
            unsafe {
                match q5 {
                    true => avx2::one_row::<true>(self, qs, acts, r0, c0, dst),
                    false => avx2::one_row::<false>(self, qs, acts, r0, c0, dst),
                }
            }
            return;
        }
        let mut c = c0;
        while c < c1 {
            let cols = (c1 - c).min(TILE_N);
            let mut tile = [[0f32; TILE_N]; TILE_M];
            match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Kernel::Avx2` is only chosen when the CPU has AVX2 and FMA.
                Kernel::Avx2 => unsafe {
                    match q5 {
                        true => avx2::tile::<true>(self, qs, acts, r0, rows, c, cols, &mut tile),
                        false => avx2::tile::<false>(self, qs, acts, r0, rows, c, cols, &mut tile),
                    }
                },
                Kernel::Scalar => scalar_tile(self, acts, r0, rows, c, cols, &mut tile),
            }
            for (r, row) in tile.iter().enumerate().take(rows) {
                for (j, &v) in row.iter().enumerate().take(cols) {
                    // SAFETY: in bounds (r0 + r < m, c + j < n) and owned by this item.
                    unsafe { *out.add((r0 + r) * self.n + c + j) = v };
                }
            }
            c += cols;
        }
    }
}

/// Activation rows quantized to Q8_0.
struct Acts<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    k: usize,
}

/// Activation rows per tile.
const TILE_M: usize = 4;
/// Weight rows (output columns) per tile.
const TILE_N: usize = 2;
/// Output columns per work item.
const GROUP_N: usize = 64;

/// Rows of a product from which activations are quantized on the pool.
const POOLED_QUANTIZE_ROWS: usize = 8;
/// Outputs per panel: one `i32` lane each of a 256-bit register.
const PANEL: usize = 8;

/// A raw output pointer the pool's workers share (they write disjoint elements).
struct SendPtr<T>(*mut T);
// SAFETY: see `Q8Matrix::matmul`: workers write disjoint elements.
unsafe impl<T> Sync for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}

/// Which kernel the CPU can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX2 + FMA (x86-64-v3).
    Avx2,
    /// Portable fallback.
    Scalar,
}

impl Kernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Self::Avx2;
        }
        Self::Scalar
    }
}

/// Quantizes rows of f32 to Q8_0 (absmax / 127 per block, round to nearest), as
/// ggml does for the activations of a Q8_0 product.
fn quantize_into(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Kernel::detect() == Kernel::Avx2 {
        for ((block, q), scale) in x.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK)).zip(d.iter_mut()) {
            // SAFETY: AVX2 and FMA are present; the block and its output are 32 long.
            *scale = unsafe { avx2::quantize_block(block, q) };
        }
        return;
    }
    quantize_into_scalar(x, qs, d);
}

/// [`quantize_into`] without SIMD: the reference the AVX2 path must equal.
fn quantize_into_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
    for ((block, q), scale) in x.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK)).zip(d.iter_mut()) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = amax / 127.0;
        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
        // The scale is kept as f16 would store it, as ggml and candle do: the same
        // integers and scales, so the same products as the path this replaces.
        *scale = half::f16::from_f32(s).to_f32();
        for (q, v) in q.iter_mut().zip(block) {
            *q = (v * inv).round() as i8;
        }
    }
}

/// [`quantize_into`] for `m = x.len() / k` rows, on the model's pool when there are
/// many (a long prefill's activations are megabytes). With `sums`, each block's sum
/// of quantized values too (the panel kernel's offset correction).
fn quantize_rows(x: &[f32], k: usize, qs: &mut [i8], d: &mut [f32], sums: Option<&mut [i32]>) {
    let m = x.len() / k;
    let kb = k / BLOCK;
    let rows = |range: std::ops::Range<usize>, qs: &mut [i8], d: &mut [f32], sums: Option<&mut [i32]>| {
        quantize_into(&x[range.start * k..range.end * k], qs, d);
        if let Some(sums) = sums {
            for (sum, block) in sums.iter_mut().zip(qs.chunks_exact(BLOCK)) {
                *sum = block.iter().map(|&q| i32::from(q)).sum();
            }
        }
    };
    if m < POOLED_QUANTIZE_ROWS {
        rows(0..m, qs, d, sums);
        return;
    }
    let (qs_ptr, d_ptr) = (SendPtr(qs.as_mut_ptr()), SendPtr(d.as_mut_ptr()));
    let sums_ptr = sums.map(|s| SendPtr(s.as_mut_ptr()));
    crate::pool::model_pool().run(m, |range| {
        let (qs_ptr, d_ptr, sums_ptr) = (&qs_ptr, &d_ptr, &sums_ptr);
        // SAFETY: ranges are disjoint, so each worker has rows `range` of `qs`, `d`
        // and `sums` to itself; all outlive the pool call.
        let (qs, d, sums) = unsafe {
            (
                std::slice::from_raw_parts_mut(qs_ptr.0.add(range.start * k), range.len() * k),
                std::slice::from_raw_parts_mut(d_ptr.0.add(range.start * kb), range.len() * kb),
                sums_ptr.as_ref().map(|s| std::slice::from_raw_parts_mut(s.0.add(range.start * kb), range.len() * kb)),
            )
        };
        rows(range, qs, d, sums);
    });
}

/// Where block `b` of row `row` lies in a grouped row layout ([`Layout::Rows`],
/// [`Layout::Q5Rows`]) whose blocks take `values` bytes: the byte offsets of its values
/// and of its f32 scale. The one place both layouts' readers take their offsets from.
fn grouped_at(row: usize, b: usize, kb: usize, values: usize) -> (usize, usize) {
    let at = ((row / ROWS) * kb + b) * ROWS * (values + 4);
    (at + (row % ROWS) * values, at + ROWS * values + (row % ROWS) * 4)
}

/// The little-endian f32 at `at`.
fn read_f32(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The 32 values of a Q5_0 block's packed bytes (fifth bits, then nibbles): value
/// `i` is `q_i − 16`, where the low four bits of `q_i` are nibble `i mod 16` (low
/// nibbles first) and the fifth is bit `i` of the fifth bits.
pub(crate) fn unpack_q5(packed: &[u8; Q5_BLOCK_BYTES]) -> [i8; BLOCK] {
    let high = u32::from_le_bytes([packed[0], packed[1], packed[2], packed[3]]);
    let nibbles = &packed[4..];
    std::array::from_fn(|i| {
        let low = if i < 16 { nibbles[i] & 0x0f } else { nibbles[i - 16] >> 4 };
        let fifth = ((high >> i) & 1) as u8;
        (low | (fifth << 4)) as i8 - 16
    })
}

/// Appends whole GGUF Q8_0 blocks (f16 scale, then 32 `i8`).
fn push_blocks(m: &mut Builder, bytes: &[u8]) {
    for block in bytes.chunks_exact(GGUF_BLOCK_BYTES) {
        m.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32(), block[2..].iter().map(|&b| b as i8));
    }
}

/// The portable tile: same arithmetic as the SIMD one.
#[allow(clippy::too_many_arguments)]
fn scalar_tile(w: &Q8Matrix, a: &Acts<'_>, r0: usize, rows: usize, c0: usize, cols: usize, tile: &mut [[f32; TILE_N]; TILE_M]) {
    let kb = w.k / BLOCK;
    for r in 0..rows {
        for j in 0..cols {
            let mut sum = 0f32;
            for b in 0..kb {
                let (wq, wd) = w.block(c0 + j, b);
                let aq = &a.qs[(r0 + r) * a.k + b * BLOCK..][..BLOCK];
                let dot: i32 = wq.iter().zip(aq).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum();
                sum += dot as f32 * (wd * a.d[(r0 + r) * kb + b]);
            }
            tile[r][j] = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Acts, BLOCK, Q5_BLOCK_BYTES, Q5_ROWS_BLOCK_BYTES, Q8Matrix, ROWS_BLOCK_BYTES, TILE_M, TILE_N, grouped_at};

    /// One block of [`super::quantize_into`]: the same scale and integers as the
    /// scalar code, bit for bit. Rounding is half away from zero, as `f32::round`:
    /// truncate, then step away from zero where the fraction (exact in f32) is at
    /// least one half; adding ±0.5 before truncating would round 0.49999997 up.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` and `q` hold at least 32 values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
        assert!(x.len() >= BLOCK && q.len() >= BLOCK, "a whole block");
        let sign = _mm256_set1_ps(-0.0);
        // SAFETY: 32 floats.
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(i * 8)) });
        let abs: [__m256; 4] = std::array::from_fn(|i| _mm256_andnot_ps(sign, v[i]));
        let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        let s = amax / 127.0;
        let inv = _mm256_set1_ps(if s == 0.0 { 0.0 } else { 1.0 / s });
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let ints: [__m256i; 4] = std::array::from_fn(|i| {
            let x = _mm256_mul_ps(v[i], inv);
            let t = _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(x, t));
            let away = _mm256_and_ps(_mm256_cmp_ps(frac, half, _CMP_GE_OQ), _mm256_or_ps(_mm256_and_ps(x, sign), one));
            _mm256_cvtps_epi32(_mm256_add_ps(t, away))
        });
        // Packing works within 128-bit lanes; the permutation puts the bytes back in order.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
        let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 bytes.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), ordered) };
        half::f16::from_f32(s).to_f32()
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One weight row of a row layout as the kernels read it: block `b`'s values
    /// at `values + b · STRIDE`, its f32 scale at `scales + b · STRIDE` (bytes), both
    /// inside the row's group of four ([`ROWS_BLOCK_BYTES`] or, for Q5_0,
    /// [`Q5_ROWS_BLOCK_BYTES`] a block).
    #[derive(Clone, Copy)]
    struct Row<const Q5: bool> {
        values: *const u8,
        scales: *const u8,
    }

    impl<const Q5: bool> Row<Q5> {
        const STRIDE: usize = if Q5 { Q5_ROWS_BLOCK_BYTES } else { ROWS_BLOCK_BYTES };
        const VALUES: usize = if Q5 { Q5_BLOCK_BYTES } else { BLOCK };

        /// Row `col` of `w`, whose layout's bytes are `qs`.
        #[inline]
        fn of(w: &Q8Matrix, qs: &[u8], col: usize) -> Self {
            let (values, scales) = grouped_at(col, 0, w.k / BLOCK, Self::VALUES);
            Self { values: qs[values..].as_ptr(), scales: qs[scales..].as_ptr() }
        }

        /// Block `b`'s scale.
        ///
        /// # Safety
        /// The row must hold block `b`.
        #[inline]
        unsafe fn scale(self, b: usize) -> f32 {
            // SAFETY: the caller's; the scale may sit at any byte offset.
            unsafe { self.scales.add(b * Self::STRIDE).cast::<f32>().read_unaligned() }
        }

        /// Block `b` as 32 signed values in one register.
        ///
        /// # Safety
        /// The CPU must support AVX2; the row must hold block `b`.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn block(self, b: usize) -> __m256i {
            // SAFETY: the caller's: 32 values, or the 20 packed bytes of a Q5_0 block.
            unsafe {
                let at = self.values.add(b * Self::STRIDE);
                match Q5 {
                    false => _mm256_loadu_si256(at.cast()),
                    true => unpack_q5(at),
                }
            }
        }
    }

    /// A packed Q5_0 block (fifth bits, then nibbles) as 32 `i8` values `q − 16`.
    /// Byte `i` of the fifth-bit mask is 0xFF when bit `i` is set: each byte takes
    /// the bits' byte `i / 8` (shuffle), is OR-ed with every bit but `i mod 8`, and
    /// compared with all ones. Where the bit is clear, `nibble | 0xF0` is
    /// `nibble − 16` as an `i8`; where it is set, the nibble is already `q − 16`.
    ///
    /// # Safety
    /// The CPU must support AVX2; `p` must point to 20 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn unpack_q5(p: *const u8) -> __m256i {
        // SAFETY: 4 bytes of fifth bits, then 16 of nibbles.
        let (high, nibbles) = unsafe { (p.cast::<i32>().read_unaligned(), _mm_loadu_si128(p.add(4).cast())) };
        let low4 = _mm_set1_epi8(0x0f);
        let values = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(nibbles, 4), low4), _mm_and_si128(nibbles, low4));
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(high),
            _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303),
        );
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
        _mm256_or_si256(values, _mm256_andnot_si256(set, _mm256_set1_epi8(0xf0u8 as i8)))
    }

    /// One activation row (decoding) against weight rows `c0..c0 + dst.len()`, four
    /// at a time: the activation block's absolute value is taken once and the signs
    /// moved onto each weight block, so a product costs one load (or one Q5_0
    /// unpacking) and five operations.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; the row and columns must be in range and
    /// `qs` must be a row layout's bytes (Q5_0 when `Q5`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn one_row<const Q5: bool>(w: &Q8Matrix, qs: &[u8], a: &Acts<'_>, r: usize, c0: usize, dst: &mut [f32]) {
        let kb = w.k / BLOCK;
        let ones = _mm256_set1_epi16(1);
        let a_row = a.qs[r * a.k..(r + 1) * a.k].as_ptr();
        let a_d = &a.d[r * kb..(r + 1) * kb];
        let mut j = 0;
        while j < dst.len() {
            let cols = (dst.len() - j).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let w_rows: [Row<Q5>; 4] = std::array::from_fn(|c| Row::of(w, qs, c0 + j + c.min(cols - 1)));
            for b in 0..kb {
                let off = b * BLOCK;
                // SAFETY: `off + 32 <= k` within row `r`.
                let av = unsafe { _mm256_loadu_si256(a_row.add(off).cast()) };
                let a_abs = _mm256_sign_epi8(av, av);
                for (c, acc) in acc.iter_mut().enumerate().take(cols) {
                    // SAFETY: column `c0 + j + c < n`: its row holds block `b`.
                    let (wv, wd) = unsafe { (w_rows[c].block(b), w_rows[c].scale(b)) };
                    let pairs = _mm256_maddubs_epi16(a_abs, _mm256_sign_epi8(wv, av));
                    let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    *acc = _mm256_fmadd_ps(p, _mm256_set1_ps(wd * a_d[b]), *acc);
                }
            }
            for (c, acc) in acc.iter().enumerate().take(cols) {
                dst[j + c] = hsum(*acc);
            }
            j += cols;
        }
    }

    /// One tile: `rows` ≤ 4 activation rows from `r0` × `cols` ≤ 2 weight rows from `c0`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; the rows and columns must be in range and
    /// `qs` must be a row layout's bytes (Q5_0 when `Q5`).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<const Q5: bool>(w: &Q8Matrix, qs: &[u8], a: &Acts<'_>, r0: usize, rows: usize, c0: usize, cols: usize, tile: &mut [[f32; TILE_N]; TILE_M]) {
        match (rows, cols) {
            (4, 2) => unsafe { tile_mn::<Q5, 4, 2>(w, qs, a, r0, c0, tile) },
            (3, 2) => unsafe { tile_mn::<Q5, 3, 2>(w, qs, a, r0, c0, tile) },
            (2, 2) => unsafe { tile_mn::<Q5, 2, 2>(w, qs, a, r0, c0, tile) },
            (1, 2) => unsafe { tile_mn::<Q5, 1, 2>(w, qs, a, r0, c0, tile) },
            (4, 1) => unsafe { tile_mn::<Q5, 4, 1>(w, qs, a, r0, c0, tile) },
            (3, 1) => unsafe { tile_mn::<Q5, 3, 1>(w, qs, a, r0, c0, tile) },
            (2, 1) => unsafe { tile_mn::<Q5, 2, 1>(w, qs, a, r0, c0, tile) },
            _ => unsafe { tile_mn::<Q5, 1, 1>(w, qs, a, r0, c0, tile) },
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_mn<const Q5: bool, const M: usize, const N: usize>(w: &Q8Matrix, qs: &[u8], a: &Acts<'_>, r0: usize, c0: usize, tile: &mut [[f32; TILE_N]; TILE_M]) {
        let kb = w.k / BLOCK;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        let w_rows: [Row<Q5>; N] = std::array::from_fn(|j| Row::of(w, qs, c0 + j));
        let a_rows: [*const i8; M] = std::array::from_fn(|r| a.qs[(r0 + r) * a.k..].as_ptr());
        let a_d: [&[f32]; M] = std::array::from_fn(|r| &a.d[(r0 + r) * kb..(r0 + r + 1) * kb]);
        // Each weight block is loaded once per tile and each activation block's
        // absolute value taken once per row. The scales are applied as
        // `(p · a_d) · w_d`, the order the kernel has always used: products, and so a
        // model's replies, stay bit for bit what they were (multiplying the two
        // scales first changed a story enough to fail the echo e2e test).
        for b in 0..kb {
            let off = b * BLOCK;
            // SAFETY: every weight row holds block `b`.
            let wv: [__m256i; N] = std::array::from_fn(|j| unsafe { w_rows[j].block(b) });
            // SAFETY: as above.
            let wd: [f32; N] = std::array::from_fn(|j| unsafe { w_rows[j].scale(b) });
            for r in 0..M {
                // SAFETY: `off + 32 <= k` and every row pointer starts a row of `k` values.
                let av = unsafe { _mm256_loadu_si256(a_rows[r].add(off).cast()) };
                let a_abs = _mm256_sign_epi8(av, av);
                let ad = _mm256_set1_ps(a_d[r][b]);
                for j in 0..N {
                    let pairs = _mm256_maddubs_epi16(a_abs, _mm256_sign_epi8(wv[j], av));
                    let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    acc[r][j] = _mm256_fmadd_ps(_mm256_mul_ps(p, ad), _mm256_set1_ps(wd[j]), acc[r][j]);
                }
            }
        }
        for r in 0..M {
            for j in 0..N {
                tile[r][j] = hsum(acc[r][j]);
            }
        }
    }
}

/// The AVX-VNNI kernel over [`Layout::Panels`].
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::{BLOCK, PANEL, PANEL_BLOCK_BYTES};

    /// Whether this CPU has AVX-VNNI (and the AVX2 and FMA around it).
    pub(super) fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::is_x86_feature_detected!("avxvnni") && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }

    /// `m` activation rows quantized to Q8_0 (signed), with each block's sum.
    pub(super) struct Acts<'a> {
        pub qs: &'a [i8],
        pub d: &'a [f32],
        pub sums: &'a [i32],
        pub k: usize,
        pub m: usize,
    }

    /// Every row of the output for panel `p`'s outputs, four activation rows at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and AVX-VNNI; `qs` and `d` are a panel layout of
    /// `k = a.k` columns holding panel `p`; `out` is `(a.m, n)` and no other thread
    /// writes its columns of panel `p`.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn panel(qs: &[u8], d: &[f32], p: usize, a: &Acts<'_>, n: usize, out: *mut f32) {
        let mut r0 = 0;
        while r0 < a.m {
            // SAFETY: as for this function; each call covers rows r0.. of the tile.
            unsafe {
                match a.m - r0 {
                    1 => tile::<1>(qs, d, p, a, r0, n, out),
                    2 => tile::<2>(qs, d, p, a, r0, n, out),
                    3 => tile::<3>(qs, d, p, a, r0, n, out),
                    _ => tile::<4>(qs, d, p, a, r0, n, out),
                }
            }
            r0 += 4;
        }
    }

    /// Rows `r0..r0 + M` of the output for panel `p`. Per block, each group of four
    /// values is one `vpdpbusd` of the eight rows' offset bytes with the activation
    /// word broadcast; two accumulators per row halve the chain of dependent
    /// instructions (the decode step has no other rows to overlap with).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,avxvnni")]
    unsafe fn tile<const M: usize>(qs: &[u8], d: &[f32], p: usize, a: &Acts<'_>, r0: usize, n: usize, out: *mut f32) {
        let (k, kb) = (a.k, a.k / BLOCK);
        let mut acc = [_mm256_setzero_ps(); M];
        let rows: [*const i8; M] = std::array::from_fn(|r| a.qs[(r0 + r) * k..(r0 + r + 1) * k].as_ptr());
        let panel = &qs[p * kb * PANEL_BLOCK_BYTES..(p + 1) * kb * PANEL_BLOCK_BYTES];
        let scales = &d[p * kb * PANEL..(p + 1) * kb * PANEL];
        for b in 0..kb {
            let mut even = [_mm256_setzero_si256(); M];
            let mut odd = [_mm256_setzero_si256(); M];
            let block = panel[b * PANEL_BLOCK_BYTES..(b + 1) * PANEL_BLOCK_BYTES].as_ptr();
            for g in (0..BLOCK / 4).step_by(2) {
                // SAFETY: a panel block holds 8 groups of 32 bytes.
                let (w0, w1) = unsafe { (_mm256_loadu_si256(block.add(g * 32).cast()), _mm256_loadu_si256(block.add((g + 1) * 32).cast())) };
                for r in 0..M {
                    // SAFETY: `b * 32 + g * 4 + 8 <= k`, inside row `r0 + r`.
                    let (x0, x1) = unsafe {
                        let at = rows[r].add(b * BLOCK + g * 4).cast::<i32>();
                        (at.read_unaligned(), at.add(1).read_unaligned())
                    };
                    even[r] = _mm256_dpbusd_avx_epi32(even[r], w0, _mm256_set1_epi32(x0));
                    odd[r] = _mm256_dpbusd_avx_epi32(odd[r], w1, _mm256_set1_epi32(x1));
                }
            }
            // SAFETY: eight scales per block.
            let dw = unsafe { _mm256_loadu_ps(scales.as_ptr().add(b * PANEL)) };
            for r in 0..M {
                let row = (r0 + r) * kb + b;
                // The stored bytes are q + 128: take 128 · Σa off every output.
                let offset = _mm256_set1_epi32(128 * a.sums[row]);
                let dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_add_epi32(even[r], odd[r]), offset));
                acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, _mm256_set1_ps(a.d[row])), acc[r]);
            }
        }
        let c0 = p * PANEL;
        let cols = (n - c0).min(PANEL);
        for r in 0..M {
            let mut lanes = [0f32; PANEL];
            // SAFETY: `lanes` has 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
            for (col, &v) in lanes.iter().enumerate().take(cols) {
                // SAFETY: in bounds and owned by the caller's item (see `panel`).
                unsafe { *out.add((r0 + r) * n + c0 + col) = v };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_values::values;

    /// The reference: both operands dequantized, products in f64.
    fn reference(w: &Q8Matrix, x: &[f32], m: usize) -> Vec<f32> {
        let kb = w.k / BLOCK;
        let mut aq = vec![0i8; m * w.k];
        let mut ad = vec![0f32; m * kb];
        quantize_into(x, &mut aq, &mut ad);
        let mut out = vec![0f32; m * w.n];
        for r in 0..m {
            for j in 0..w.n {
                let mut sum = 0f64;
                for i in 0..w.k {
                    let (values, d) = w.block(j, i / BLOCK);
                    let wv = f64::from(values[i % BLOCK]) * f64::from(d);
                    let av = f64::from(aq[r * w.k + i]) * f64::from(ad[r * kb + i / BLOCK]);
                    sum += wv * av;
                }
                out[r * w.n + j] = sum as f32;
            }
        }
        out
    }

    /// `x · Wᵀ` for a row layout, tile by tile on this thread with `kernel`.
    fn on_one_thread(w: &Q8Matrix, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        let (n, k) = (w.n, w.k);
        let (qs, q5): (Vec<u8>, bool) = match &w.layout {
            Layout::Rows(qs) => (qs.clone(), false),
            Layout::Q5Rows(qs) => (qs.clone(), true),
            Layout::Panels(_) => unreachable!("a row layout"),
        };
        let mut got = vec![0f32; m * n];
        let kb = k / BLOCK;
        let mut aq = vec![0i8; m * k];
        let mut ad = vec![0f32; m * kb];
        quantize_into(x, &mut aq, &mut ad);
        let acts = Acts { qs: &aq, d: &ad, k };
        for r0 in (0..m).step_by(TILE_M) {
            let rows = (m - r0).min(TILE_M);
            // SAFETY: one thread writes all of `got`; `qs` is the layout `q5` says.
            unsafe { w.group(&qs, q5, kernel, &acts, r0, rows, 0, n, got.as_mut_ptr()) };
        }
        got
    }

    /// Q5_0 blocks (as llama.cpp writes them: candle's quantizer uses the same
    /// layout) of an `(n, k)` matrix of test values.
    /// Also the values candle reads from them.
    fn q5_0_bytes(n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let wf = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&wf, GgmlDType::Q5_0).expect("Q5_0");
        let dense = q.dequantize(&Device::Cpu).expect("dense").flatten_all().expect("flat").to_vec1().expect("vec");
        (q.data().expect("bytes").into_owned(), dense)
    }

    /// A Q5_0 matrix kept as stored holds candle's dequantized values, and its
    /// products on every kernel (one row: decoding; tiles: prefills) equal those of
    /// the same values converted to Q8_0.
    #[test]
    fn q5_0_kept_as_stored_multiplies_as_its_q8_0_conversion() {
        for &(m, n, k) in &[(1, 1, 32), (1, 67, 64), (1, 896, 896), (3, 5, 96), (5, 130, 128), (17, 71, 896), (9, 13, 4864)] {
            let (bytes, theirs) = q5_0_bytes(n, k, 21);
            let q5 = Q8Matrix::from_gguf_q5_0_bytes(n, k, &bytes, true).expect("Q5_0");
            let q8 = Q8Matrix::from_gguf_q5_0_bytes(n, k, &bytes, false).expect("as Q8_0").relayout(false);
            assert!(matches!(q5.layout, Layout::Q5Rows(_)));
            assert_eq!((q5.stored_format(), q8.stored_format()), ("Q5_0", "Q8_0"));
            assert_eq!(q5.size_in_bytes(), n.div_ceil(ROWS) * k / BLOCK * Q5_ROWS_BLOCK_BYTES);
            let ours: Vec<f32> = q5.dequantize(&Device::Cpu).expect("dense").flatten_all().expect("flat").to_vec1().expect("vec");
            assert_eq!(ours, theirs, "{n}x{k}: the values candle reads");
            for row in 0..n {
                for blk in 0..k / BLOCK {
                    assert_eq!(q5.block(row, blk), q8.block(row, blk), "row {row} block {blk}");
                }
            }
            // The same integers and scales in the same order: the very same floats,
            // so a model decodes the same tokens either way.
            let x = values(m * k, 22);
            for kernel in [Kernel::detect(), Kernel::Scalar] {
                assert_eq!(on_one_thread(&q5, &x, m, kernel), on_one_thread(&q8, &x, m, kernel), "{kernel:?} {m}x{n}x{k}");
            }
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            q5.matmul(&x, m, &mut a);
            q8.matmul(&x, m, &mut b);
            assert_eq!(a, b, "pooled {m}x{n}x{k}");
            let want = reference(&q8, &x, m);
            for (i, (g, r)) in a.iter().zip(&want).enumerate() {
                assert!((g - r).abs() <= 1e-4 * (1.0 + r.abs()), "{m}x{n}x{k} at {i}: {g} vs {r}");
            }
        }
    }

    /// The AVX2 quantizer gives the scalar one's integers and scales exactly, ties
    /// (x.5, rounded away from zero) and the float just under one half included.
    #[test]
    fn activations_quantize_as_the_scalar_code_does() {
        let mut x = values(64 * BLOCK, 31);
        // A block whose absmax is 127 holds its values as they are: ties and near-ties.
        let ties = [127.0, -2.5, 2.5, -0.5, 0.5, 0.49999997, -0.49999997, 1.5, -1.5, 126.5, -126.5, 3.4999998, 0.0, -0.0];
        x[..ties.len()].copy_from_slice(&ties);
        x[BLOCK..2 * BLOCK].fill(0.0);
        let (mut q1, mut d1) = (vec![0i8; x.len()], vec![0f32; x.len() / BLOCK]);
        let (mut q2, mut d2) = (q1.clone(), d1.clone());
        quantize_into(&x, &mut q1, &mut d1);
        quantize_into_scalar(&x, &mut q2, &mut d2);
        assert_eq!(q1, q2);
        assert_eq!(d1, d2);
        assert_eq!(&q1[..ties.len()], &[127, -3, 3, -1, 1, 0, 0, 2, -2, 127, -127, 3, 0, 0]);
    }

    #[test]
    fn every_tile_shape_computes_the_q8_product() {
        // Odd row and column counts exercise every tile variant and the group edges.
        for &(m, n, k) in &[(1, 1, 32), (1, 67, 64), (3, 5, 96), (5, 130, 128), (17, 71, 896), (4, 2, 32), (8, 8, 32), (9, 13, 64), (30, 20, 4864)] {
            let stored = Q8Matrix::quantize(n, k, &values(n * k, 1)).expect("matrix");
            let w = stored.relayout(false);
            let x = values(m * k, 2);
            let want = reference(&w, &x, m);
            for kernel in [Kernel::detect(), Kernel::Scalar] {
                let got = on_one_thread(&w, &x, m, kernel);
                for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                    assert!((g - r).abs() <= 1e-4 * (1.0 + r.abs()), "{kernel:?} {m}x{n}x{k} at {i}: {g} vs {r}");
                }
            }
            // Both layouts through the pool: the tile kernels, and the panel
            // kernel where this CPU has one.
            for w in [&w, &stored] {
                let mut pooled = vec![0f32; m * n];
                w.matmul(&x, m, &mut pooled);
                for (i, (g, r)) in pooled.iter().zip(&want).enumerate() {
                    assert!((g - r).abs() <= 1e-4 * (1.0 + r.abs()), "pooled {m}x{n}x{k} at {i}: {g} vs {r}");
                }
            }
        }
    }

    /// Panels hold the same values as rows (edges: a last panel of fewer than eight
    /// rows), and the panel kernel computes the row kernels' products.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn panels_hold_and_multiply_the_rows_values() {
        if !vnni::available() {
            return;
        }
        for &(m, n, k) in &[(1, 13, 64), (1, 896, 896), (2, 9, 32), (5, 17, 128), (11, 8, 4864)] {
            let rows = Q8Matrix::quantize(n, k, &values(n * k, 5)).expect("matrix").relayout(false);
            let panels = rows.relayout(true);
            assert!(matches!(panels.layout, Layout::Panels(_)));
            for row in 0..n {
                for blk in 0..k / BLOCK {
                    assert_eq!(panels.block(row, blk), rows.block(row, blk), "row {row} block {blk}");
                }
            }
            let x = values(m * k, 6);
            let (mut a, mut c) = (vec![0f32; m * n], vec![0f32; m * n]);
            panels.matmul(&x, m, &mut a);
            rows.matmul(&x, m, &mut c);
            for (i, (p, q)) in a.iter().zip(&c).enumerate() {
                assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{m}x{n}x{k} at {i}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn gguf_blocks_are_read_as_stored() {
        // Two blocks: scale 0.5 with values 0..32, scale -2 with values -16..16.
        let mut bytes = Vec::new();
        bytes.extend(half::f16::from_f32(0.5).to_le_bytes());
        bytes.extend((0..32).map(|v: i8| v as u8));
        bytes.extend(half::f16::from_f32(-2.0).to_le_bytes());
        bytes.extend((-16..16).map(|v: i8| v as u8));
        let w = Q8Matrix::from_gguf_bytes(1, 64, &bytes).expect("matrix");
        let read = Q8Matrix::read_gguf(&mut &bytes[..], 1, 64).expect("read");
        assert_eq!((read.block(0, 0), read.block(0, 1)), (w.block(0, 0), w.block(0, 1)));
        assert_eq!(w.block(0, 1), (std::array::from_fn(|i| i as i8 - 16), -2.0));
        assert!(Q8Matrix::read_gguf(&mut &bytes[..40], 1, 64).is_err(), "a short file");
        let dense: Vec<f32> = w.dequantize(&Device::Cpu).expect("dense").flatten_all().expect("flat").to_vec1().expect("vec");
        assert_eq!(dense[3], 1.5);
        assert_eq!(dense[32], 32.0);
        assert_eq!(dense[63], -30.0);
        assert!(Q8Matrix::from_gguf_bytes(1, 64, &bytes[1..]).is_err());
        assert!(Q8Matrix::from_gguf_bytes(1, 48, &bytes).is_err());
    }

    #[test]
    fn the_product_matches_candles_q8_0_matmul() -> candle_core::Result<()> {
        use candle_core::Module;
        use candle_core::quantized::QMatMul;
        let (m, n, k) = (7, 40, 256);
        let wf = Tensor::from_vec(values(n * k, 3), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&wf, GgmlDType::Q8_0)?;
        let theirs = QMatMul::from_qtensor(QTensor::quantize(&wf, GgmlDType::Q8_0)?)?;
        let ours = Q8Matrix::from_qtensor(q, false).map_err(candle_core::Error::wrap)?;
        let x = Tensor::from_vec(values(m * k, 4), (1, m, k), &Device::Cpu)?;
        let a: Vec<f32> = ours.forward(&x)?.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = theirs.forward(&x)?.flatten_all()?.to_vec1()?;
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!((p - q).abs() <= 1e-3 * (1.0 + q.abs()), "at {i}: {p} vs {q}");
        }
        Ok(())
    }

    /// A K-quant matrix (as `ffn_down` is stored) requantized to Q8_0 keeps every
    /// value within half a Q8_0 step (its block's absmax / 254) of the K-quant value,
    /// an order of magnitude inside the K-quant's own rounding.
    #[test]
    fn k_quants_requantize_within_half_a_q8_step() -> candle_core::Result<()> {
        let (n, k) = (16, 512);
        let wf = Tensor::from_vec(values(n * k, 9), (n, k), &Device::Cpu)?;
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let kq: Vec<f32> = QTensor::quantize(&wf, dtype)?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            let q8 = Q8Matrix::quantize(n, k, &kq).map_err(candle_core::Error::wrap)?;
            let back: Vec<f32> = q8.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            for (block, (a, b)) in kq.chunks_exact(BLOCK).zip(back.chunks_exact(BLOCK)).enumerate() {
                let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                // Rounding the scale (absmax / 127) to f16 moves a value by at most
                // 127 × scale × 2^-11 = absmax × 2^-11.
                let bound = amax / 254.0 + amax * 2f32.powi(-11) + 1e-7;
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= bound, "{dtype:?} block {block}: {x} -> {y}, bound {bound}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn rows_are_read_back_for_embedding_lookups() {
        let (n, k) = (5, 64);
        let w = Q8Matrix::quantize(n, k, &values(n * k, 11)).expect("matrix");
        let dense: Vec<f32> = w.dequantize(&Device::Cpu).expect("dense").flatten_all().expect("flat").to_vec1().expect("vec");
        let mut row = Vec::new();
        assert!(w.push_row(3, &mut row));
        assert_eq!(row, dense[3 * k..4 * k]);
        assert!(!w.push_row(5, &mut row), "no sixth row");
        assert_eq!(row.len(), k);
    }
}
