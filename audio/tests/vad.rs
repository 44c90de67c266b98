//! Turn detection against real audio: silence, tones and a spoken fixture.
//!
//! `fixtures/speech16k.wav` is espeak-ng saying "I would like to refill my
//! prescription." at 16 kHz mono 16-bit, trimmed and padded with 1 s of silence
//! at each end, so speech runs from 1.00 s to about 2.97 s.

#![allow(clippy::unwrap_used)]

use std::f32::consts::TAU;

use parley_audio::format::AudioFormat;
use parley_audio::resample::StreamResampler;
use parley_audio::vad::{TurnDetector, TurnEvent, TurnSettings, VoiceDetector};
use parley_audio::wav::read_wav;

const SPEECH_START_MS: u64 = 1000;
const SPEECH_END_MS: u64 = 2970;

fn speech() -> Vec<f32> {
    let path = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("tests/fixtures/speech16k.wav");
    let (samples, rate) = read_wav(&path).unwrap();
    assert_eq!(rate, 16_000);
    samples
}

fn tone(freqs: &[f32], amp: f32, seconds: f32) -> Vec<f32> {
    (0..(seconds * 16_000.0) as usize)
        .map(|i| {
            freqs
                .iter()
                .map(|f| amp * (TAU * f * i as f32 / 16_000.0).sin())
                .sum()
        })
        .collect()
}

/// Pushes `audio` in `chunk`-sized pieces; returns each event with the clock when it came out.
fn run(detector: &mut TurnDetector, audio: &[f32], chunk: usize) -> Vec<(TurnEvent, u64)> {
    let mut events = Vec::new();
    for piece in audio.chunks(chunk) {
        for event in detector.push(piece) {
            events.push((event, detector.elapsed_ms()));
        }
    }
    events
}

fn events_only(events: &[(TurnEvent, u64)]) -> Vec<TurnEvent> {
    events.iter().map(|(e, _)| *e).collect()
}

/// The telephone path: 16 kHz -> 8 kHz μ-law -> back to 16 kHz.
fn through_phone(audio: &[f32]) -> Vec<f32> {
    let mut down = StreamResampler::new(16_000, 8_000).unwrap();
    let mut narrow = down.process(audio);
    narrow.extend(down.flush());
    let wire = AudioFormat::Pcmu.encode(&narrow).unwrap();
    let decoded = AudioFormat::Pcmu.decode(&wire).unwrap();
    let mut up = StreamResampler::new(8_000, 16_000).unwrap();
    let mut wide = up.process(&decoded);
    wide.extend(up.flush());
    wide
}

fn assert_one_turn(events: &[(TurnEvent, u64)], settings: &TurnSettings) {
    let [
        (TurnEvent::SpeechStarted { at_ms: start }, started_when),
        (TurnEvent::SpeechStopped { at_ms: stop }, stopped_when),
    ] = events
    else {
        panic!("expected one start and one stop, got {events:?}");
    };
    assert!(
        start.abs_diff(SPEECH_START_MS) <= 80,
        "started at {start} ms"
    );
    assert!(stop.abs_diff(SPEECH_END_MS) <= 150, "stopped at {stop} ms");
    // Decisions wait for the evidence: min_speech_ms of speech, silence_duration_ms of silence.
    assert!(
        *started_when >= start + u64::from(settings.min_speech_ms),
        "start decided at {started_when} ms"
    );
    assert!(
        *stopped_when >= stop + u64::from(settings.silence_duration_ms),
        "stop decided at {stopped_when} ms"
    );
    assert!(*stopped_when <= stop + u64::from(settings.silence_duration_ms) + 100);
}

#[test]
fn silence_starts_no_turn() {
    let mut detector = TurnDetector::new(TurnSettings::default());
    assert!(detector.push(&vec![0.0; 16_000 * 3]).is_empty());
    assert!(!detector.in_speech());
    assert!(detector.last_probability() < 0.5);
}

#[test]
fn speech_fixture_gives_one_turn() {
    let settings = TurnSettings::default();
    let mut detector = TurnDetector::new(settings.clone());
    let events = run(&mut detector, &speech(), 320);
    assert_one_turn(&events, &settings);
    assert!(!detector.in_speech());
}

#[test]
fn speech_through_a_phone_line_gives_the_same_turn() {
    let settings = TurnSettings::default();
    let mut detector = TurnDetector::new(settings.clone());
    let events = run(&mut detector, &through_phone(&speech()), 320);
    assert_one_turn(&events, &settings);
}

#[test]
fn speech_in_noise_is_still_a_turn() {
    let mut state = 0x1234_5678u32;
    let mut noise = move || {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (state >> 8) as f32 / 16_777_216.0 - 0.5
    };
    // Uniform noise of amplitude 0.1 (rms ~0.03, speech rms ~0.1 while talking).
    let noisy: Vec<f32> = speech().iter().map(|s| s + 0.1 * noise()).collect();
    let mut detector = TurnDetector::new(TurnSettings::default());
    let events = events_only(&run(&mut detector, &noisy, 320));
    assert!(
        matches!(events.first(), Some(TurnEvent::SpeechStarted { at_ms }) if at_ms.abs_diff(SPEECH_START_MS) <= 150),
        "{events:?}"
    );
    assert!(
        matches!(events.last(), Some(TurnEvent::SpeechStopped { .. })),
        "{events:?}"
    );
}

#[test]
fn chunk_size_does_not_change_events() {
    let audio = speech();
    let reference = events_only(&run(
        &mut TurnDetector::new(TurnSettings::default()),
        &audio,
        audio.len(),
    ));
    for chunk in [1, 37, 160, 333, 4096] {
        let events = events_only(&run(
            &mut TurnDetector::new(TurnSettings::default()),
            &audio,
            chunk,
        ));
        assert_eq!(events, reference, "chunk {chunk}");
    }
}

/// earshot on its own scores steady low tones, dial tones and DTMF around or
/// above 0.5; the turn detector must not take them for a caller speaking.
#[test]
fn steady_tones_are_not_speech() {
    let cases: [(&str, &[f32]); 6] = [
        ("200 Hz", &[200.0]),
        ("440 Hz", &[440.0]),
        ("1 kHz", &[1000.0]),
        ("US dial tone", &[350.0, 440.0]),
        ("US ringback", &[440.0, 480.0]),
        ("DTMF 1", &[697.0, 1209.0]),
    ];
    let mut raw_scores_over_threshold = 0;
    for (name, freqs) in cases {
        let audio = tone(freqs, 0.6 / freqs.len() as f32, 3.0);
        let scores = VoiceDetector::new().push(&audio);
        raw_scores_over_threshold += scores.iter().filter(|&&p| p >= 0.5).count();
        for input in [audio.clone(), through_phone(&audio)] {
            let mut detector = TurnDetector::new(TurnSettings::default());
            let events = detector.push(&input);
            assert!(events.is_empty(), "{name}: {events:?}");
        }
    }
    // Documents why the steadiness check exists: the raw VAD does fire on tones.
    assert!(
        raw_scores_over_threshold > 100,
        "earshot scored {raw_scores_over_threshold} tone frames >= 0.5"
    );
}

#[test]
fn a_tone_after_speech_ends_the_turn() {
    let mut audio = speech();
    audio.truncate(16_000 * 3); // speech until 2.97 s, then 30 ms of silence
    audio.extend(tone(&[350.0, 440.0], 0.3, 3.0));
    let mut detector = TurnDetector::new(TurnSettings::default());
    let events = events_only(&run(&mut detector, &audio, 320));
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        matches!(events[1], TurnEvent::SpeechStopped { at_ms } if at_ms < 3200),
        "{events:?}"
    );
}

#[test]
fn blips_shorter_than_min_speech_are_ignored() {
    let settings = TurnSettings {
        min_speech_ms: 5_000,
        ..TurnSettings::default()
    };
    let mut detector = TurnDetector::new(settings);
    assert!(detector.push(&speech()).is_empty());
}

#[test]
fn reset_drops_the_turn_but_keeps_the_clock() {
    let audio = speech();
    let mut detector = TurnDetector::new(TurnSettings::default());
    let first = detector.push(&audio[..16_000 * 2]);
    assert!(
        matches!(first[..], [TurnEvent::SpeechStarted { .. }]),
        "{first:?}"
    );
    assert!(detector.in_speech());
    detector.reset();
    assert!(!detector.in_speech());
    assert_eq!(detector.elapsed_ms(), 2000);
    // The whole fixture again, 2 s later on the clock.
    let events = events_only(&run(&mut detector, &audio, 320));
    let [
        TurnEvent::SpeechStarted { at_ms: start },
        TurnEvent::SpeechStopped { at_ms: stop },
    ] = events[..]
    else {
        panic!("{events:?}");
    };
    assert!(start.abs_diff(2000 + SPEECH_START_MS) <= 80, "{start}");
    assert!(stop.abs_diff(2000 + SPEECH_END_MS) <= 150, "{stop}");
}

#[test]
fn settings_helpers() {
    let settings = TurnSettings::default();
    assert_eq!(
        settings,
        TurnSettings {
            threshold: 0.5,
            prefix_padding_ms: 300,
            silence_duration_ms: 500,
            min_speech_ms: 100
        }
    );
    assert_eq!(settings.audio_start_ms(1000), 700);
    assert_eq!(settings.audio_start_ms(100), 0);
    let mut detector = TurnDetector::new(settings);
    let longer = TurnSettings {
        silence_duration_ms: 800,
        ..TurnSettings::default()
    };
    detector.set_settings(longer.clone());
    assert_eq!(detector.settings(), &longer);
}

#[test]
fn voice_detector_scores_each_full_frame() {
    let mut vad = VoiceDetector::new();
    assert!(vad.push(&[0.0; 255]).is_empty());
    assert_eq!(vad.push(&[0.0; 1]).len(), 1);
    assert_eq!(vad.push(&[0.0; 600]).len(), 2);
    assert_eq!(vad.pending(), 88);
    // Out-of-range and NaN samples are tolerated.
    let scores = vad.push(&[f32::NAN, 3.0, -7.0].repeat(100));
    assert!(scores.iter().all(|p| (0.0..=1.0).contains(p)));
    vad.reset();
    assert_eq!(vad.pending(), 0);
    let speech_scores = VoiceDetector::new().push(&speech());
    let loud = speech_scores.iter().filter(|&&p| p >= 0.5).count();
    // About 2 s of the fixture (125 frames) is speech.
    assert!((100..=135).contains(&loud), "{loud} frames over 0.5");
}

#[test]
fn digital_silence_is_scored_without_the_network_and_speech_after_it_is_heard_afresh() {
    // Exact zeros (and values under half a 16-bit step) score 0.
    let mut vad = VoiceDetector::new();
    let quiet: Vec<f32> = (0..16_000).map(|i| if i % 2 == 0 { 1.0e-5 } else { -1.0e-5 }).collect();
    assert!(vad.push(&quiet).iter().all(|&p| p == 0.0));
    // Speech after a silent stretch is scored as by a fresh detector on the same
    // frames (frame-aligned: the silence is a whole number of frames).
    let mut after = VoiceDetector::new();
    let mut lead = vec![0.0; 256 * 40];
    lead.extend(speech());
    let gated = after.push(&lead);
    let fresh = VoiceDetector::new().push(&speech());
    assert_eq!(&gated[40..], &fresh[..], "speech after silence scored differently");
    // Faint noise just above the floor still goes to the network.
    let mut noisy = VoiceDetector::new();
    let hiss: Vec<f32> = (0..2_560).map(|i| if i % 3 == 0 { 1.0e-3 } else { -1.0e-3 }).collect();
    assert_eq!(noisy.push(&hiss).len(), 10);
}

#[test]
fn a_turn_ended_early_stops_where_the_window_would_and_the_next_speech_is_a_new_turn() {
    let settings = TurnSettings::default();
    let audio = speech();
    let mut detector = TurnDetector::new(settings.clone());
    // Up to 200 ms after the end of speech: mid-window, the turn is still open.
    let cut = (SPEECH_END_MS as usize + 200) * 16;
    let events = events_only(&run(&mut detector, &audio[..cut], 320));
    assert!(matches!(events.as_slice(), [TurnEvent::SpeechStarted { .. }]), "{events:?}");
    assert!(detector.in_speech());
    let at = detector.last_speech_end_ms();
    assert_eq!(detector.end_turn(), Some(TurnEvent::SpeechStopped { at_ms: at }));
    assert!(at.abs_diff(SPEECH_END_MS) <= 150, "stopped at {at} ms");
    assert!(!detector.in_speech());
    assert_eq!(detector.end_turn(), None, "no turn to end twice");
    // The rest of the silence brings no second stop; the same speech again is a new turn.
    assert!(run(&mut detector, &audio[cut..], 320).is_empty());
    let again = events_only(&run(&mut detector, &audio, 320));
    assert!(
        matches!(again.as_slice(), [TurnEvent::SpeechStarted { .. }, TurnEvent::SpeechStopped { .. }]),
        "{again:?}"
    );
}
