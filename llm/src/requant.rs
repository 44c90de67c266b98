//! Puts every weight matrix in a format that has a SIMD kernel on this CPU.
//!
//! llama.cpp's Q4_K_M files keep many matrices of Qwen2.5's small models in Q5_0 (their
//! width, 896, is not a multiple of the 256-value K-quant super-block), and candle has
//! no SIMD kernel for Q5_0: every product with those matrices runs scalar code. Q5_0
//! converts to Q8_0 *exactly* — a Q5_0 value is `d · (q − 16)` with `q − 16` in
//! `−16..=15`, which is a Q8_0 value with the same scale `d` — and candle's Q8_0 kernel
//! is AVX2 (and NEON). So at load, Q5_0 becomes Q8_0 bit for bit in value; other
//! formats without a fast kernel (Q4_1, Q5_1, …) are requantized to Q8_0 from their
//! f32 values, which is close to lossless (8 bits per value against their 4 or 5).
//! The price is bandwidth: Q8_0 takes 34 bytes per 32 values where Q5_0 takes 22.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Result};

/// Bytes of one Q5_0 block: f16 scale, 32 high bits, 16 bytes of low nibbles.
const Q5_0_BLOCK_BYTES: usize = 22;
/// Bytes of one Q8_0 block: f16 scale, 32 signed bytes.
const Q8_0_BLOCK_BYTES: usize = 34;
/// Values per Q5_0 / Q8_0 block.
const BLOCK_VALUES: usize = 32;

/// Whether candle multiplies `dtype` with a SIMD kernel on the CPU (AVX2 on x86-64,
/// NEON on aarch64). The others run scalar code, an order of magnitude slower.
pub fn has_fast_cpu_kernel(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::BF16
            | GgmlDType::Q4_0
            | GgmlDType::Q8_0
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
            | GgmlDType::Q8K
    )
}

/// What [`to_fast_cpu_format`] did to one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// Already in a fast format; untouched.
    Kept,
    /// Q5_0 rewritten as Q8_0 with identical values.
    Exact,
    /// Requantized to Q8_0 from its f32 values (close to, not exactly, the original).
    Requantized,
}

/// Returns `q` in a format candle has a SIMD CPU kernel for (see the module doc).
/// Tensors on a GPU are returned as they are: the CUDA kernels cover every format.
pub fn to_fast_cpu_format(q: QTensor, device: &Device) -> Result<(QTensor, Conversion)> {
    if !device.is_cpu() || has_fast_cpu_kernel(q.dtype()) {
        return Ok((q, Conversion::Kept));
    }
    if q.dtype() == GgmlDType::Q5_0 {
        let bytes = q5_0_to_q8_0(&q.data()?)?;
        let storage = QStorage::from_data(Cow::Owned(bytes), device, GgmlDType::Q8_0)?;
        let shape = q.shape().clone();
        return Ok((QTensor::new(storage, shape)?, Conversion::Exact));
    }
    let dims = q.shape().dims();
    if dims.last().is_some_and(|k| k % BLOCK_VALUES == 0) {
        let dense = q.dequantize(device)?;
        return Ok((QTensor::quantize(&dense, GgmlDType::Q8_0)?, Conversion::Requantized));
    }
    // A row width Q8_0 cannot hold: keep the slow format rather than fail.
    Ok((q, Conversion::Kept))
}

/// Rewrites raw Q5_0 blocks as Q8_0 blocks holding the same values.
///
/// Q5_0 value `i` of a block is `d · (q_i − 16)`, where the low four bits of `q_i` are
/// nibble `i mod 16` of `qs` (low nibbles for `i < 16`, high for the rest) and the fifth
/// bit is bit `i` of the little-endian `qh`. Q8_0 stores `d` and `q_i − 16` directly.
pub fn q5_0_to_q8_0(src: &[u8]) -> Result<Vec<u8>> {
    if !src.len().is_multiple_of(Q5_0_BLOCK_BYTES) {
        candle_core::bail!(
            "Q5_0 data of {} bytes is not a whole number of {Q5_0_BLOCK_BYTES}-byte blocks",
            src.len()
        );
    }
    let blocks = src.len() / Q5_0_BLOCK_BYTES;
    let mut out = Vec::with_capacity(blocks * Q8_0_BLOCK_BYTES);
    for block in src.chunks_exact(Q5_0_BLOCK_BYTES) {
        let (d, packed) = block.split_at(2);
        out.extend_from_slice(d);
        let packed = packed.try_into().expect("a Q5_0 block's 20 bytes after its scale");
        out.extend(crate::q8::unpack_q5(packed).map(|q| q as u8));
    }
    Ok(out)
}

/// How many matrices and bytes a model holds per storage format, as loaded, for the
/// startup log (so an operator sees which kernels the model runs on).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WeightSummary {
    by_dtype: BTreeMap<String, (usize, usize)>,
    exact: usize,
    requantized: usize,
}

impl WeightSummary {
    /// Counts one loaded tensor of `bytes` in `dtype`, converted as `conversion` says.
    pub fn add(&mut self, dtype: &str, bytes: usize, conversion: Conversion) {
        let entry = self.by_dtype.entry(dtype.to_string()).or_default();
        entry.0 += 1;
        entry.1 += bytes;
        match conversion {
            Conversion::Kept => {}
            Conversion::Exact => self.exact += 1,
            Conversion::Requantized => self.requantized += 1,
        }
    }

    /// Total bytes of all counted tensors.
    pub fn total_bytes(&self) -> usize {
        self.by_dtype.values().map(|(_, b)| b).sum()
    }
}

impl fmt::Display for WeightSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (dtype, (count, bytes)) in &self.by_dtype {
            if !first {
                write!(f, ", ")?;
            }
            first = false;
            write!(f, "{dtype}: {count} ({:.0} MB)", *bytes as f64 / 1e6)?;
        }
        write!(
            f,
            "; {} converted Q5_0→Q8_0 exactly, {} requantized to Q8_0",
            self.exact, self.requantized
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    fn random_values(n: usize, seed: u64) -> Vec<f32> {
        // A small xorshift: deterministic, no dependency.
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    #[test]
    fn q5_0_becomes_q8_0_with_identical_values() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(random_values(64 * 256, 7), (64, 256), &dev)?;
        let q5 = QTensor::quantize(&x, GgmlDType::Q5_0)?;
        let want: Vec<f32> = q5.dequantize(&dev)?.flatten_all()?.to_vec1()?;
        let (q8, conversion) = to_fast_cpu_format(q5, &dev)?;
        assert_eq!(conversion, Conversion::Exact);
        assert_eq!(q8.dtype(), GgmlDType::Q8_0);
        assert_eq!(q8.shape().dims(), &[64, 256]);
        let got: Vec<f32> = q8.dequantize(&dev)?.flatten_all()?.to_vec1()?;
        assert_eq!(got, want, "every value must survive bit for bit");
        Ok(())
    }

    #[test]
    fn products_with_the_converted_matrix_match_the_original() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(random_values(128 * 512, 3), (128, 512), &dev)?;
        let q5 = QTensor::quantize(&w, GgmlDType::Q5_0)?;
        let reference = q5.dequantize(&dev)?;
        let (q8, _) = to_fast_cpu_format(q5, &dev)?;
        let x = Tensor::from_vec(random_values(3 * 512, 11), (3, 512), &dev)?;
        let want = x.matmul(&reference.t()?)?;
        let got = candle_core::quantized::QMatMul::from_qtensor(q8)?;
        let got = candle_core::Module::forward(&got, &x)?;
        // The only difference left is the activations' own 8-bit quantization.
        let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err <= 0.02 * scale, "error {err} against magnitude {scale}");
        Ok(())
    }

    #[test]
    fn other_slow_formats_are_requantized_within_q8_0_error() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(random_values(16 * 256, 5), (16, 256), &dev)?;
        let q = QTensor::quantize(&x, GgmlDType::Q5_1)?;
        let original: Vec<f32> = q.dequantize(&dev)?.flatten_all()?.to_vec1()?;
        let (q8, conversion) = to_fast_cpu_format(q, &dev)?;
        assert_eq!(conversion, Conversion::Requantized);
        assert_eq!(q8.dtype(), GgmlDType::Q8_0);
        let got: Vec<f32> = q8.dequantize(&dev)?.flatten_all()?.to_vec1()?;
        // Q8_0's step is a block's largest magnitude / 127 (values here are within about
        // ±1), so an error is at most half a step, plus the f16 rounding of the scale.
        let worst = got
            .iter()
            .zip(&original)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 0.55 / 127.0, "worst error {worst}");
        Ok(())
    }

    #[test]
    fn fast_formats_are_kept() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(random_values(4 * 256, 9), (4, 256), &dev)?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q4_0] {
            let q = QTensor::quantize(&x, dtype)?;
            let (q, conversion) = to_fast_cpu_format(q, &dev)?;
            assert_eq!((q.dtype(), conversion), (dtype, Conversion::Kept));
        }
        assert!(!has_fast_cpu_kernel(GgmlDType::Q5_0));
        assert!(!has_fast_cpu_kernel(GgmlDType::Q5_1));
        Ok(())
    }

    #[test]
    fn truncated_q5_0_data_is_an_error() {
        assert!(q5_0_to_q8_0(&[0u8; Q5_0_BLOCK_BYTES + 1]).is_err());
        assert_eq!(q5_0_to_q8_0(&[]).map(|v| v.len()).ok(), Some(0));
    }

    #[test]
    fn summary_counts_formats_and_conversions() {
        let mut s = WeightSummary::default();
        s.add("Q8_0", 1_000_000, Conversion::Exact);
        s.add("Q8_0", 2_000_000, Conversion::Kept);
        s.add("Q4K", 500_000, Conversion::Kept);
        assert_eq!(s.total_bytes(), 3_500_000);
        let text = s.to_string();
        assert!(text.contains("Q8_0: 2 (3 MB)"), "{text}");
        assert!(text.contains("1 converted Q5_0→Q8_0 exactly"), "{text}");
    }
}
