//! Resamples a WAV file with Parley's streaming resampler, in 20 ms chunks as a call
//! would: `resample_wav IN.wav OUT.wav RATE [RATE...]` (several rates chain steps).

use parley_audio::resample::StreamResampler;
use parley_audio::wav::{read_wav, write_wav};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: resample_wav IN.wav OUT.wav RATE [RATE...]".into());
    }
    let (mut samples, mut rate) = read_wav(args[0].as_ref())?;
    for step in &args[2..] {
        let to: u32 = step.parse()?;
        let mut r = StreamResampler::new(rate, to)?;
        let mut out = Vec::new();
        for chunk in samples.chunks((rate / 50) as usize) {
            out.extend(r.process(chunk));
        }
        out.extend(r.flush());
        samples = out;
        rate = to;
    }
    write_wav(args[1].as_ref(), &samples, rate)?;
    Ok(())
}
