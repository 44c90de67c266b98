//! WAV files as clients upload them (`parley call`, the evaluation set, a future
//! upload endpoint): hound's parser through `read_wav_bytes`, which must answer
//! samples or an error for any bytes, never panic or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((samples, _rate)) = parley_audio::wav::read_wav_bytes(data) {
        // Mono: never more samples than the file has bytes.
        assert!(samples.len() <= data.len());
    }
});
