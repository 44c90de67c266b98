//! Q8_0 weight matrices with our own matrix product, for the short prefills of a
//! turn (a dozen to a few dozen tokens) and for decoding.
//!
//! Why not candle's quantized matmul: for Q8_0 on x86 without VNNI-sized shapes
//! (candle 0.11's repacked kernels need `k` to be a multiple of 256; this model's
//! width is 896), every output element is one `vec_dot` call over a whole row, which
//! converts both f16 scales and reduces horizontally per element. A 17-token turn
//! prefill ran at 55–72 tok/s, barely faster than decoding the tokens one by one
//! (about 50 tok/s; profile: `BlockQ8_0::vec_dot` about half of all cycles). Here the weights are
//! stored as plain `i8` rows with their block scales already widened to f32, and the
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
    /// `n * k` values, row-major; scales row-major (`n * k / 32`). For the tile
    /// kernels (CPUs without AVX-VNNI).
    Rows(Vec<i8>),
    /// Panels of [`PANEL`] rows (the last padded with zero rows): for panel `p`,
    /// block `b` and 4-value group `g`, 32 bytes at `((p · kb + b) · 8 + g) · 32` hold
    /// that group of each of the eight rows in turn, each value stored as `q + 128`;
    /// scales at `(p · kb + b) · 8 + row`. For the AVX-VNNI kernel.
    Panels(Vec<u8>),
}

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

/// Whether matrices loaded now are stored as panels.
fn panels_by_default() -> bool {
    #[cfg(target_arch = "x86_64")]
    return PANELS_WANTED.load(std::sync::atomic::Ordering::Relaxed) && vnni::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Builds a matrix block by block in row-major order, packing each completed group
/// of [`PANEL`] rows into a panel when the layout wants it (so a large matrix never
/// sits in memory twice).
struct Builder {
    m: Q8Matrix,
    /// Rows waiting for their panel: values and scales, row-major.
    pending: (Vec<i8>, Vec<f32>),
}

impl Builder {
    fn new(n: usize, k: usize, panels: bool) -> Self {
        let blocks = n * k / BLOCK;
        let layout = match panels {
            false => Layout::Rows(Vec::with_capacity(n * k)),
            true => Layout::Panels(Vec::with_capacity(n.div_ceil(PANEL) * PANEL * k)),
        };
        let pending = match panels {
            false => (Vec::new(), Vec::new()),
            true => (Vec::with_capacity(PANEL * k), Vec::with_capacity(PANEL * k / BLOCK)),
        };
        Self { m: Q8Matrix { n, k, layout, d: Vec::with_capacity(blocks.div_ceil(PANEL) * PANEL) }, pending }
    }

    /// Appends the next block (row-major order over the matrix).
    fn push(&mut self, d: f32, values: impl IntoIterator<Item = i8>) {
        match &mut self.m.layout {
            Layout::Rows(qs) => {
                qs.extend(values);
                self.m.d.push(d);
            }
            Layout::Panels(_) => {
                self.pending.0.extend(values);
                self.pending.1.push(d);
                if self.pending.1.len() == PANEL * self.m.k / BLOCK {
                    self.flush();
                }
            }
        }
    }

    /// Packs the pending rows (fewer than [`PANEL`] only at the end) into a panel.
    fn flush(&mut self) {
        let Layout::Panels(qs) = &mut self.m.layout else { return };
        let (k, kb) = (self.m.k, self.m.k / BLOCK);
        let (values, scales) = &mut self.pending;
        let rows = scales.len() / kb;
        if rows == 0 {
            return;
        }
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
    /// Takes a 2-D Q8_0 tensor's weights (consumed: its storage is freed when this
    /// returns, so a model holds one copy).
    pub fn from_qtensor(q: QTensor) -> Result<Self, Q8Error> {
        if q.dtype() != GgmlDType::Q8_0 {
            return Err(Q8Error::Shape(format!("dtype {:?}", q.dtype())));
        }
        let (n, k) = q
            .shape()
            .dims2()
            .map_err(|e| Q8Error::Shape(e.to_string()))?;
        let bytes: Cow<'_, [u8]> = q.data()?;
        Self::from_gguf_bytes(n, k, &bytes)
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
                let mut out = [0i8; BLOCK];
                out.copy_from_slice(&qs[row * self.k + b * BLOCK..][..BLOCK]);
                (out, self.d[row * kb + b])
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
            Layout::Rows(qs) => qs.len(),
            Layout::Panels(qs) => qs.len(),
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
        let qs = match &self.layout {
            Layout::Rows(qs) => qs,
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

        // Work items: (row tile, group of output columns); a group is wide enough that
        // a worker's item amortizes the pool's hand-off, narrow enough to balance.
        let row_tiles = m.div_ceil(TILE_M);
        let groups = self.n.div_ceil(GROUP_N);
        let kernel = Kernel::detect();
        crate::pool::model_pool().run(row_tiles * groups, |items| {
            let out_ptr = &out_ptr;
            for item in items {
                let (rt, g) = (item / groups, item % groups);
                let r0 = rt * TILE_M;
                let rows = (m - r0).min(TILE_M);
                let c0 = g * GROUP_N;
                let c1 = (c0 + GROUP_N).min(self.n);
                // SAFETY: every (row, column) of `out` belongs to exactly one item, so
                // no two workers write the same element; `out` outlives the pool call.
                unsafe { self.group(qs, kernel, &acts, r0, rows, c0, c1, out_ptr.0) };
            }
        });
    }

    /// Rows `r0..r0 + rows` of the output, columns `c0..c1`, for the row layout's
    /// values `qs`.
    ///
    /// # Safety
    /// `out` must point to an `(m, n)` buffer that no other thread writes in this
    /// range of rows and columns.
    #[allow(clippy::too_many_arguments)]
    unsafe fn group(&self, qs: &[i8], kernel: Kernel, acts: &Acts<'_>, r0: usize, rows: usize, c0: usize, c1: usize, out: *mut f32) {
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx2 && rows == 1 {
            // SAFETY: AVX2 and FMA are present (`Kernel::Avx2`); the caller owns
            // row `r0`, columns `c0..c1` of `out`.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.add(r0 * self.n + c0), c1 - c0) };
            // SAFETY: as above.
            unsafe { avx2::one_row(self, qs, acts, r0, c0, dst) };
            return;
        }
        let mut c = c0;
        while c < c1 {
            let cols = (c1 - c).min(TILE_N);
            let mut tile = [[0f32; TILE_N]; TILE_M];
            match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Kernel::Avx2` is only chosen when the CPU has AVX2 and FMA.
                Kernel::Avx2 => unsafe { avx2::tile(self, qs, acts, r0, rows, c, cols, &mut tile) },
                Kernel::Scalar => scalar_tile(self, qs, acts, r0, rows, c, cols, &mut tile),
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

/// Appends whole GGUF Q8_0 blocks (f16 scale, then 32 `i8`).
fn push_blocks(m: &mut Builder, bytes: &[u8]) {
    for block in bytes.chunks_exact(GGUF_BLOCK_BYTES) {
        m.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32(), block[2..].iter().map(|&b| b as i8));
    }
}

/// The portable tile: same arithmetic as the SIMD one.
#[allow(clippy::too_many_arguments)]
fn scalar_tile(w: &Q8Matrix, qs: &[i8], a: &Acts<'_>, r0: usize, rows: usize, c0: usize, cols: usize, tile: &mut [[f32; TILE_N]; TILE_M]) {
    let kb = w.k / BLOCK;
    for r in 0..rows {
        for j in 0..cols {
            let mut sum = 0f32;
            for b in 0..kb {
                let wq = &qs[(c0 + j) * w.k + b * BLOCK..][..BLOCK];
                let aq = &a.qs[(r0 + r) * a.k + b * BLOCK..][..BLOCK];
                let dot: i32 = wq.iter().zip(aq).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum();
                sum += dot as f32 * (w.d[(c0 + j) * kb + b] * a.d[(r0 + r) * kb + b]);
            }
            tile[r][j] = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Acts, BLOCK, Q8Matrix, TILE_M, TILE_N};

    /// Integer dot products of 32 `i8` pairs, as 8 lanes of partial sums in f32.
    /// `maddubs` needs one unsigned operand: |w| with the sign moved onto `a`
    /// (|w|·sign(a, w) = w·a); pair sums stay within i16 (2·127·127 < 32768).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot(w_abs: __m256i, w: __m256i, a: __m256i, ones: __m256i) -> __m256 {
        let signed = _mm256_sign_epi8(a, w);
        let pairs = _mm256_maddubs_epi16(w_abs, signed);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones))
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

    /// One activation row (decoding) against weight rows `c0..c0 + dst.len()`, four
    /// at a time: the activation block's absolute value is taken once and the signs
    /// moved onto each weight block, so a product costs one load and five operations.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; the row and columns must be in range.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn one_row(w: &Q8Matrix, qs: &[i8], a: &Acts<'_>, r: usize, c0: usize, dst: &mut [f32]) {
        let kb = w.k / BLOCK;
        let ones = _mm256_set1_epi16(1);
        let a_row = a.qs[r * a.k..(r + 1) * a.k].as_ptr();
        let a_d = &a.d[r * kb..(r + 1) * kb];
        let mut j = 0;
        while j < dst.len() {
            let cols = (dst.len() - j).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            for b in 0..kb {
                let off = b * BLOCK;
                // SAFETY: `off + 32 <= k` within row `r`.
                let av = unsafe { _mm256_loadu_si256(a_row.add(off).cast()) };
                let a_abs = _mm256_sign_epi8(av, av);
                for (c, acc) in acc.iter_mut().enumerate().take(cols) {
                    let col = c0 + j + c;
                    // SAFETY: `col < n`, `off + 32 <= k`.
                    let wv = unsafe { _mm256_loadu_si256(qs.as_ptr().add(col * w.k + off).cast()) };
                    let pairs = _mm256_maddubs_epi16(a_abs, _mm256_sign_epi8(wv, av));
                    let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    *acc = _mm256_fmadd_ps(p, _mm256_set1_ps(w.d[col * kb + b] * a_d[b]), *acc);
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
    /// The CPU must support AVX2 and FMA; the rows and columns must be in range.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(w: &Q8Matrix, qs: &[i8], a: &Acts<'_>, r0: usize, rows: usize, c0: usize, cols: usize, tile: &mut [[f32; TILE_N]; TILE_M]) {
        match (rows, cols) {
            (4, 2) => unsafe { tile_mn::<4, 2>(w, qs, a, r0, c0, tile) },
            (3, 2) => unsafe { tile_mn::<3, 2>(w, qs, a, r0, c0, tile) },
            (2, 2) => unsafe { tile_mn::<2, 2>(w, qs, a, r0, c0, tile) },
            (1, 2) => unsafe { tile_mn::<1, 2>(w, qs, a, r0, c0, tile) },
            (4, 1) => unsafe { tile_mn::<4, 1>(w, qs, a, r0, c0, tile) },
            (3, 1) => unsafe { tile_mn::<3, 1>(w, qs, a, r0, c0, tile) },
            (2, 1) => unsafe { tile_mn::<2, 1>(w, qs, a, r0, c0, tile) },
            _ => unsafe { tile_mn::<1, 1>(w, qs, a, r0, c0, tile) },
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_mn<const M: usize, const N: usize>(w: &Q8Matrix, qs: &[i8], a: &Acts<'_>, r0: usize, c0: usize, tile: &mut [[f32; TILE_N]; TILE_M]) {
        let kb = w.k / BLOCK;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        let w_rows: [*const i8; N] = std::array::from_fn(|j| qs[(c0 + j) * w.k..].as_ptr());
        let w_d: [&[f32]; N] = std::array::from_fn(|j| &w.d[(c0 + j) * kb..(c0 + j + 1) * kb]);
        let a_rows: [*const i8; M] = std::array::from_fn(|r| a.qs[(r0 + r) * a.k..].as_ptr());
        let a_d: [&[f32]; M] = std::array::from_fn(|r| &a.d[(r0 + r) * kb..(r0 + r + 1) * kb]);
        for b in 0..kb {
            let off = b * BLOCK;
            // SAFETY: `off + 32 <= k` and every row pointer starts a row of `k` values.
            let wv: [__m256i; N] = std::array::from_fn(|j| unsafe { _mm256_loadu_si256(w_rows[j].add(off).cast()) });
            let wa: [__m256i; N] = std::array::from_fn(|j| _mm256_sign_epi8(wv[j], wv[j]));
            let wd: [__m256; N] = std::array::from_fn(|j| _mm256_set1_ps(w_d[j][b]));
            for r in 0..M {
                // SAFETY: as above.
                let av = unsafe { _mm256_loadu_si256(a_rows[r].add(off).cast()) };
                let ad = _mm256_set1_ps(a_d[r][b]);
                for j in 0..N {
                    let p = dot(wa[j], wv[j], av, ones);
                    acc[r][j] = _mm256_fmadd_ps(_mm256_mul_ps(p, ad), wd[j], acc[r][j]);
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

    #[test]
    fn every_tile_shape_computes_the_q8_product() {
        // Odd row and column counts exercise every tile variant and the group edges.
        for &(m, n, k) in &[(1, 1, 32), (1, 67, 64), (3, 5, 96), (5, 130, 128), (17, 71, 896), (4, 2, 32), (8, 8, 32), (9, 13, 64), (30, 20, 4864)] {
            let stored = Q8Matrix::quantize(n, k, &values(n * k, 1)).expect("matrix");
            let w = stored.relayout(false);
            let Layout::Rows(qs) = &w.layout else { unreachable!("relayout(false)") };
            let x = values(m * k, 2);
            let want = reference(&w, &x, m);
            for kernel in [Kernel::detect(), Kernel::Scalar] {
                let mut got = vec![0f32; m * n];
                let kb = k / BLOCK;
                let mut aq = vec![0i8; m * k];
                let mut ad = vec![0f32; m * kb];
                quantize_into(&x, &mut aq, &mut ad);
                let acts = Acts { qs: &aq, d: &ad, k };
                for r0 in (0..m).step_by(TILE_M) {
                    let rows = (m - r0).min(TILE_M);
                    // SAFETY: one thread writes all of `got`.
                    unsafe { w.group(qs, kernel, &acts, r0, rows, 0, n, got.as_mut_ptr()) };
                }
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
        let ours = Q8Matrix::from_qtensor(q).map_err(candle_core::Error::wrap)?;
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
