//! Times candle's one-thread dequantization against `parley_llm::dequant` on a matrix
//! of the 0.5B model's FFN shape (4864 x 896, Q8_0), 72 times each (one prefill's worth).
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (4864, 896), &dev)?;
    let q = QTensor::quantize(&x, GgmlDType::Q8_0)?;
    for round in 0..2 {
        let t = Instant::now();
        for _ in 0..72 {
            let _ = q.dequantize(&dev)?;
        }
        let candle = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        for _ in 0..72 {
            let _ = parley_llm::dequant::dequantize(&q, &dev)?;
        }
        let ours = t.elapsed().as_secs_f64() * 1e3;
        // The same conversion into one reused buffer: no fresh pages to fault in.
        use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
        let data = q.data()?;
        let blocks: &[BlockQ8_0] = unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), data.len() / 34) };
        let mut buf = vec![0f32; 4864 * 896];
        let t = Instant::now();
        for _ in 0..72 {
            BlockQ8_0::to_float(blocks, &mut buf);
        }
        let reused = t.elapsed().as_secs_f64() * 1e3;
        println!("round {round}: candle {candle:.0} ms, parallel {ours:.0} ms, one thread into a reused buffer {reused:.0} ms for 72 matrices");
    }
    Ok(())
}
