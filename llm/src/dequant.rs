//! Dequantizes a weight matrix to f32 on all the model's threads.
//!
//! A long prefill multiplies by dense f32 copies of the quantized matrices
//! ([`crate::qwen2::MatmulPath::Dense`]), made one matrix at a time and dropped at once.
//! candle's own `QTensor::dequantize` runs on one thread; for the 0.5B model's 356 M
//! weight values that took about 0.75 s per prefill on the 2-core machine, which
//! decided whether a prefill paid for going dense at all. Rows are independent, so
//! the blocks are split across rayon's pool (sized by `RAYON_NUM_THREADS`, see
//! [`crate::cpu`]) and each chunk is converted by candle's own per-format code.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

/// Values converted per task: large enough that scheduling is noise, small enough
/// that two threads share a matrix evenly.
const CHUNK_VALUES: usize = 64 * 1024;

/// `q` as a dense f32 tensor of the same shape, converted in parallel on the CPU.
/// Formats without a parallel path, and tensors not on the CPU, go through candle.
pub fn dequantize(q: &QTensor, device: &Device) -> Result<Tensor> {
    if !device.is_cpu() {
        return q.dequantize(device);
    }
    let shape = q.shape().clone();
    let values = match q.dtype() {
        GgmlDType::Q8_0 => blocks_to_f32::<BlockQ8_0>(q)?,
        GgmlDType::Q4K => blocks_to_f32::<BlockQ4K>(q)?,
        GgmlDType::Q6K => blocks_to_f32::<BlockQ6K>(q)?,
        _ => return q.dequantize(device),
    };
    Tensor::from_vec(values, shape, device)
}

fn blocks_to_f32<T: GgmlType + Sync>(q: &QTensor) -> Result<Vec<f32>> {
    let data = q.data()?;
    let block_bytes = std::mem::size_of::<T>();
    let n = q.shape().elem_count();
    if data.len() % block_bytes != 0
        || n != data.len() / block_bytes * T::BLCK_SIZE
        || data.as_ptr().align_offset(std::mem::align_of::<T>()) != 0
    {
        // Not laid out as whole, aligned blocks: let candle do it.
        return q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1();
    }
    // SAFETY: `data` is the tensor's storage, a `Vec<T>` of plain-old-data blocks
    // (candle's `QuantizedType` for `T`), checked above to be whole and aligned; it
    // lives as long as `q`, which outlives this function.
    let blocks: &[T] =
        unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<T>(), data.len() / block_bytes) };
    let mut out = vec![0f32; n];
    let per_chunk = (CHUNK_VALUES / T::BLCK_SIZE).max(1);
    out.par_chunks_mut(per_chunk * T::BLCK_SIZE)
        .zip(blocks.par_chunks(per_chunk))
        .for_each(|(ys, xs)| T::to_float(xs, ys));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_dequantization_matches_candles() -> Result<()> {
        let dev = Device::Cpu;
        let n = 96 * 512;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0).collect();
        let x = Tensor::from_vec(x, (96, 512), &dev)?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q5_0] {
            let q = QTensor::quantize(&x, dtype)?;
            let want: Vec<f32> = q.dequantize(&dev)?.flatten_all()?.to_vec1()?;
            let got = dequantize(&q, &dev)?;
            assert_eq!(got.dims(), &[96, 512]);
            assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, want, "{dtype:?}");
        }
        Ok(())
    }
}
