//! WAV files: reading any PCM/float layout as mono, writing 16-bit mono.
//!
//! The `parley call` client streams WAV files and saves what the agent said;
//! tests load fixtures the same way.

use std::io::{Cursor, Read};
use std::path::Path;

use hound::{SampleFormat, WavReader};

use crate::{AudioError, pcm};

/// Reads a WAV file, mixing all channels to mono `f32`; returns the samples
/// and the file's sample rate (not resampled).
pub fn read_wav(path: &Path) -> Result<(Vec<f32>, u32), AudioError> {
    let wrap = |source| AudioError::WavRead {
        path: path.to_owned(),
        source,
    };
    let reader = WavReader::open(path).map_err(wrap)?;
    decode(reader, path)
}

/// Parses an in-memory WAV file like [`read_wav`], for uploads and embedded fixtures.
pub fn read_wav_bytes(bytes: &[u8]) -> Result<(Vec<f32>, u32), AudioError> {
    let path = Path::new("<memory>");
    let reader = WavReader::new(Cursor::new(bytes)).map_err(|source| AudioError::WavRead {
        path: path.to_owned(),
        source,
    })?;
    decode(reader, path)
}

fn decode<R: Read>(reader: WavReader<R>, path: &Path) -> Result<(Vec<f32>, u32), AudioError> {
    let spec = reader.spec();
    let channels = usize::from(spec.channels);
    if channels == 0 {
        return Err(AudioError::NoChannels {
            path: path.to_owned(),
        });
    }
    let wrap = |source| AudioError::WavRead {
        path: path.to_owned(),
        source,
    };
    let interleaved: Vec<f32> = match spec.sample_format {
        SampleFormat::Float => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(wrap)?,
        SampleFormat::Int => {
            let scale = 1.0 / (1u64 << spec.bits_per_sample.clamp(1, 32).saturating_sub(1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(wrap)?
        }
    };
    let mono = interleaved
        .chunks_exact(channels)
        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
        .collect();
    Ok((mono, spec.sample_rate))
}

/// Writes mono samples as a 16-bit PCM WAV file.
pub fn write_wav(path: &Path, samples: &[f32], rate: u32) -> Result<(), AudioError> {
    std::fs::write(path, wav_bytes(samples, rate)).map_err(|source| AudioError::WavWrite {
        path: path.to_owned(),
        source,
    })
}

/// Builds an in-memory 16-bit mono WAV file, e.g. for an HTTP response or an ASR engine that wants files.
pub fn wav_bytes(samples: &[f32], rate: u32) -> Vec<u8> {
    const HEADER_LEN: u32 = 44;
    // A RIFF size field is 32 bits; longer audio is cut rather than written with a wrong header.
    let max_samples = ((u32::MAX - HEADER_LEN) / 2) as usize;
    let samples = &samples[..samples.len().min(max_samples)];
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(HEADER_LEN as usize + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(HEADER_LEN - 8 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk length
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&rate.saturating_mul(2).to_le_bytes()); // byte rate
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(&pcm::encode_pcm16le(samples));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("parley-audio-{}-{name}", std::process::id()))
    }

    #[test]
    fn write_then_read_round_trips() {
        let samples: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.05).sin() * 0.8).collect();
        let path = temp_path("roundtrip.wav");
        write_wav(&path, &samples, 16_000).unwrap();
        let (back, rate) = read_wav(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(rate, 16_000);
        assert_eq!(back.len(), samples.len());
        for (a, b) in samples.iter().zip(&back) {
            assert!((a - b).abs() < 1.0 / 32768.0);
        }
        assert_eq!(
            read_wav_bytes(&wav_bytes(&samples, 16_000)).unwrap().0,
            back
        );
    }

    #[test]
    fn stereo_float_is_mixed_to_mono() {
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 48_000,
            bits_per_sample: 32,
            sample_format: SampleFormat::Float,
        };
        let mut cursor = Cursor::new(Vec::new());
        let mut writer = hound::WavWriter::new(&mut cursor, spec).unwrap();
        for (l, r) in [(0.5f32, -0.5f32), (1.0, 0.0), (0.25, 0.75)] {
            writer.write_sample(l).unwrap();
            writer.write_sample(r).unwrap();
        }
        writer.finalize().unwrap();
        let (mono, rate) = read_wav_bytes(cursor.get_ref()).unwrap();
        assert_eq!(rate, 48_000);
        assert_eq!(mono, vec![0.0, 0.5, 0.5]);
    }

    #[test]
    fn eight_and_twenty_four_bit_ints_are_normalized() {
        for bits in [8u16, 24] {
            let spec = hound::WavSpec {
                channels: 1,
                sample_rate: 8_000,
                bits_per_sample: bits,
                sample_format: SampleFormat::Int,
            };
            let full = (1i32 << (bits - 1)) - 1;
            let mut cursor = Cursor::new(Vec::new());
            let mut writer = hound::WavWriter::new(&mut cursor, spec).unwrap();
            for v in [-full - 1, 0, full] {
                writer.write_sample(v).unwrap();
            }
            writer.finalize().unwrap();
            let (mono, _) = read_wav_bytes(cursor.get_ref()).unwrap();
            assert_eq!(mono[0], -1.0, "{bits} bits");
            assert_eq!(mono[1], 0.0);
            assert!((mono[2] - 1.0).abs() < 0.01);
        }
    }

    #[test]
    fn missing_file_and_garbage_are_errors() {
        let err = read_wav(Path::new("/nonexistent/parley.wav")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/parley.wav"));
        assert!(read_wav_bytes(b"definitely not a wav file").is_err());
    }
}
