//! SDP offers as an INVITE (or re-INVITE, or ACK) carries them: the server's own
//! offer/answer code, compiled in from server/src/sip/sdp.rs (parsing with
//! `sdp-types`), then our answer to what parsed, on an IPv4 and an IPv6 address.
//!
//! Beyond "no panic": what parses keeps its codecs distinct and among those we speak,
//! names telephone-event only on a payload type it offered, and has a ptime we can
//! send; an offer with a G.711 codec is answered with its first one (and its
//! telephone-event, unless on that codec's number), and our answer
//! parses back (with `sdp::parse` itself) as exactly the terms we chose: that codec
//! and no other, the same telephone-event payload type, ptime and direction, our
//! address and port.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../../server/src/sip/sdp.rs"]
mod sdp;

use sdp::{Codec, Direction, LocalMedia, SdpError};

fuzz_target!(|data: &[u8]| {
    let offer = match sdp::parse(data) {
        Ok(d) => d,
        Err(SdpError::Parse(_) | SdpError::NoAudio) => return,
        Err(e) => panic!("parse returned {e:?}"),
    };
    let mut seen = Vec::new();
    for &c in &offer.codecs {
        assert!(!seen.contains(&c), "codec listed twice: {:?}", offer.codecs);
        seen.push(c);
    }
    if let Some(pt) = offer.dtmf_pt {
        assert!(offer.payload_types.contains(&pt));
    }
    if let Some(p) = offer.ptime_ms {
        assert!((10..=120).contains(&p) && p % 10 == 0);
    }
    if let Some(remote) = offer.remote {
        assert!(!remote.ip().is_unspecified());
    }

    let terms = match sdp::negotiate(&offer) {
        Ok(n) => n,
        Err(SdpError::NoCommonCodec(_)) => {
            assert!(offer.codecs.is_empty());
            return;
        }
        Err(e) => panic!("negotiate returned {e:?}"),
    };
    assert_eq!(terms.codec, offer.codecs[0], "the answer's codec is the offer's first G.711 one");
    // Telephone-event is kept unless the offer put it on the number we answer the
    // codec with.
    assert_eq!(terms.dtmf_pt, offer.dtmf_pt.filter(|&pt| pt != terms.codec.payload_type()));
    let _ = sdp::accept_answer(&offer).expect("an offer that negotiates is an answer we accept");

    let addrs: [IpAddr; 2] = ["203.0.113.5".parse().expect("v4"), "2001:db8::5".parse().expect("v6")];
    for (version, addr) in addrs.into_iter().enumerate() {
        let local = LocalMedia { addr, port: 40_000, session_id: 7 };
        let answer = sdp::answer(&terms, &local, version as u64 + 1);
        let back = sdp::parse(answer.as_bytes()).unwrap_or_else(|e| panic!("our answer does not parse ({e}):\n{answer}"));
        assert_eq!(back.codecs, vec![terms.codec], "{answer}");
        assert_eq!(back.dtmf_pt, terms.dtmf_pt, "{answer}");
        assert_eq!(back.ptime_ms, Some(terms.ptime_ms), "{answer}");
        assert_eq!(back.direction, terms.direction, "{answer}");
        assert_eq!(back.remote, Some(std::net::SocketAddr::new(addr, 40_000)), "{answer}");
        let mut pts = vec![terms.codec.payload_type()];
        pts.extend(terms.dtmf_pt);
        assert_eq!(back.payload_types, pts, "{answer}");
    }
    if terms.direction != Direction::Inactive {
        assert!(offer.remote.is_some());
    }
    // The silence byte and transcoding of the agreed codec, as the media side uses them.
    let other = if terms.codec == Codec::Pcmu { Codec::Pcma } else { Codec::Pcmu };
    assert_eq!(terms.codec.transcode(other, &[terms.codec.silence()]).len(), 1);
});
