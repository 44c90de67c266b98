//! Media Streams messages as a gateway sends them (JSON text, base64 μ-law/A-law
//! audio): the server's own parser, compiled in from server/src/twilio/messages.rs,
//! then the audio of each `media` message decoded in the stream's format, as the
//! call does. Any input must give a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parley_audio::format::AudioFormat;

#[allow(dead_code)]
#[path = "../../../server/src/twilio/messages.rs"]
mod messages;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match messages::parse(text) {
        Ok(messages::Inbound::Start(start)) => {
            let _ = start.format.decode(&[0x7f, 0xff, 0x00]);
        }
        Ok(messages::Inbound::Media { payload, .. }) => {
            for format in [AudioFormat::Pcmu, AudioFormat::Pcma] {
                if let Ok(samples) = format.decode(&payload) {
                    assert_eq!(samples.len(), payload.len());
                }
            }
        }
        _ => {}
    }
});
