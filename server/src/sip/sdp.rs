//! SDP offer/answer (RFC 3264) for one audio stream of G.711 with RFC 4733 events:
//! what the caller offered, what we answer, and the offer we make when the INVITE
//! came without one.
//!
//! Offers are parsed with `sdp-types`; our own descriptions are a dozen fixed lines
//! written directly (the writer's builders would spell the same lines at more length).

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use parley_audio::format::AudioFormat;

/// The payload type we offer for telephone-event when we make the offer.
pub const OFFER_DTMF_PT: u8 = 101;
/// Packet duration when the offer names none (RFC 3551's default for G.711).
pub const DEFAULT_PTIME_MS: u32 = 20;

/// Why an offer cannot be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SdpError {
    /// The body is not SDP.
    #[error("the session description does not parse: {0}")]
    Parse(String),
    /// No usable `m=audio` line (none, port 0 only, or not RTP/AVP).
    #[error("the session description offers no RTP/AVP audio stream")]
    NoAudio,
    /// Audio, but neither PCMU nor PCMA.
    #[error("no common codec: the offer has payload types {0} and Parley speaks PCMU (0) and PCMA (8)")]
    NoCommonCodec(String),
}

/// A G.711 codec both sides can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// μ-law, static payload type 0.
    Pcmu,
    /// A-law, static payload type 8.
    Pcma,
}

impl Codec {
    /// The static payload type.
    pub fn payload_type(self) -> u8 {
        match self {
            Codec::Pcmu => 0,
            Codec::Pcma => 8,
        }
    }

    /// The rtpmap encoding name.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Pcmu => "PCMU",
            Codec::Pcma => "PCMA",
        }
    }

    /// The agent's audio format for it.
    pub fn format(self) -> AudioFormat {
        match self {
            Codec::Pcmu => AudioFormat::Pcmu,
            Codec::Pcma => AudioFormat::Pcma,
        }
    }

    /// The byte that decodes to silence (so gaps are filled with true silence).
    pub fn silence(self) -> u8 {
        match self {
            Codec::Pcmu => 0xFF,
            Codec::Pcma => 0xD5,
        }
    }

    /// `bytes` of this codec in `to` (G.711 μ-law ↔ A-law, byte by byte through the
    /// linear sample, as G.711 transcoders do): a call keeps the codec it started
    /// with when a re-INVITE changes the one on the wire.
    pub fn transcode(self, to: Codec, bytes: &[u8]) -> Vec<u8> {
        if self == to {
            return bytes.to_vec();
        }
        let table = transcode_table(self, to);
        bytes.iter().map(|&b| table[usize::from(b)]).collect()
    }
}

/// The 256-entry table from one G.711 law to the other, made once.
fn transcode_table(from: Codec, to: Codec) -> &'static [u8; 256] {
    static ULAW_TO_ALAW: OnceLock<[u8; 256]> = OnceLock::new();
    static ALAW_TO_ULAW: OnceLock<[u8; 256]> = OnceLock::new();
    let cell = if from == Codec::Pcmu { &ULAW_TO_ALAW } else { &ALAW_TO_ULAW };
    cell.get_or_init(|| {
        let mut table = [to.silence(); 256];
        for (b, out) in (0..=255u8).zip(table.iter_mut()) {
            let converted = from.format().decode(&[b]).and_then(|s| to.format().encode(&s));
            if let Ok(Some(&c)) = converted.as_ref().map(|v| v.first()) {
                *out = c;
            }
        }
        table
    })
}

/// Which way media flows, from the point of view of the side that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Both ways.
    SendRecv,
    /// The writer only sends (it put the other side on hold).
    SendOnly,
    /// The writer only receives.
    RecvOnly,
    /// Neither way (hold).
    Inactive,
}

impl Direction {
    /// The answer to an offer with this direction (RFC 3264 section 6.1).
    pub fn answer(self) -> Direction {
        match self {
            Direction::SendRecv => Direction::SendRecv,
            Direction::SendOnly => Direction::RecvOnly,
            Direction::RecvOnly => Direction::SendOnly,
            Direction::Inactive => Direction::Inactive,
        }
    }

    /// Whether the writer sends media.
    pub fn sends(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::SendOnly)
    }

    fn attribute(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    fn parse(name: &str) -> Option<Direction> {
        match name {
            "sendrecv" => Some(Direction::SendRecv),
            "sendonly" => Some(Direction::SendOnly),
            "recvonly" => Some(Direction::RecvOnly),
            "inactive" => Some(Direction::Inactive),
            _ => None,
        }
    }
}

/// The audio stream a peer described (an offer, or the answer to our offer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// Where the peer wants our RTP; `None` when it gave `c=0.0.0.0` (old-style hold).
    pub remote: Option<SocketAddr>,
    /// Its payload types in its order of preference.
    pub payload_types: Vec<u8>,
    /// The G.711 codecs among them, in its order.
    pub codecs: Vec<Codec>,
    /// Its telephone-event payload type at 8 kHz, if any.
    pub dtmf_pt: Option<u8>,
    /// Its `a=ptime`, if any.
    pub ptime_ms: Option<u32>,
    /// Its direction attribute (sendrecv when absent).
    pub direction: Direction,
}

/// What a call uses after offer/answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The codec both ways.
    pub codec: Codec,
    /// The telephone-event payload type (the offer's number), if both sides have it.
    pub dtmf_pt: Option<u8>,
    /// Packet duration we send and ask for.
    pub ptime_ms: u32,
    /// Where to send RTP (until symmetric RTP latches onto the real source).
    pub remote: Option<SocketAddr>,
    /// Our direction.
    pub direction: Direction,
}

/// Our side of the media: where we receive RTP, as written into `c=` and `m=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalMedia {
    /// The address callers reach (`[sip] public_address`, else the bound one).
    pub addr: IpAddr,
    /// The RTP port.
    pub port: u16,
    /// The `o=` session id (fixed for the call).
    pub session_id: u64,
}

/// Parses a peer's session description.
pub fn parse(body: &[u8]) -> Result<Description, SdpError> {
    let session = sdp_types::Session::parse(body).map_err(|e| SdpError::Parse(e.to_string()))?;
    let media = session.medias.iter().find(|m| m.media == "audio" && m.port != 0 && m.proto.eq_ignore_ascii_case("RTP/AVP")).ok_or(SdpError::NoAudio)?;
    let payload_types: Vec<u8> = media.fmt.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    let rtpmap = |pt: u8| -> Option<(String, u32)> {
        media.attributes.iter().filter(|a| a.attribute == "rtpmap").filter_map(|a| a.value.as_deref()).find_map(|v| {
            let (num, rest) = v.trim().split_once(' ')?;
            if num.parse::<u8>().ok()? != pt {
                return None;
            }
            let mut parts = rest.trim().split('/');
            let name = parts.next()?.to_ascii_uppercase();
            let rate = parts.next().and_then(|r| r.parse().ok()).unwrap_or(8000);
            Some((name, rate))
        })
    };
    let mut codecs = Vec::new();
    let mut dtmf_pt = None;
    for &pt in &payload_types {
        let named = rtpmap(pt);
        let codec = match (pt, named.as_ref().map(|(n, r)| (n.as_str(), *r))) {
            (_, Some(("PCMU", 8000))) => Some(Codec::Pcmu),
            (_, Some(("PCMA", 8000))) => Some(Codec::Pcma),
            (0, None) => Some(Codec::Pcmu),
            (8, None) => Some(Codec::Pcma),
            (_, Some(("TELEPHONE-EVENT", 8000))) => {
                dtmf_pt = dtmf_pt.or(Some(pt));
                None
            }
            _ => None,
        };
        if let Some(c) = codec.filter(|c| !codecs.contains(c)) {
            codecs.push(c);
        }
    }
    let ptime_ms = media
        .get_first_attribute_value("ptime")
        .or_else(|| session.get_first_attribute_value("ptime")).flatten().and_then(|v| v.trim().parse::<u32>().ok()).filter(|p| (10..=120).contains(p) && p % 10 == 0);
    let direction = ["sendrecv", "sendonly", "recvonly", "inactive"]
        .iter()
        .find(|d| media.has_attribute(d))
        .or_else(|| ["sendrecv", "sendonly", "recvonly", "inactive"].iter().find(|d| session.has_attribute(d)))
        .and_then(|d| Direction::parse(d))
        .unwrap_or(Direction::SendRecv);
    let connection = media.connections.first().or(session.connection.as_ref());
    let ip = connection.and_then(|c| c.connection_address.split('/').next().and_then(|a| a.parse::<IpAddr>().ok()));
    let remote = ip.filter(|ip| !ip.is_unspecified()).map(|ip| SocketAddr::new(ip, media.port));
    Ok(Description { remote, payload_types, codecs, dtmf_pt, ptime_ms, direction })
}

/// Our answer's terms for an offer: the offer's first G.711 codec, its
/// telephone-event number (unless it is the number we answer the codec with), its
/// ptime (20 ms when it names none), the answering direction.
pub fn negotiate(offer: &Description) -> Result<Negotiated, SdpError> {
    let codec = *offer.codecs.first().ok_or_else(|| SdpError::NoCommonCodec(offer.payload_types.iter().map(u8::to_string).collect::<Vec<_>>().join(" ")))?;
    // We answer the codec with its static number. An offer that maps telephone-event
    // onto that number (and the codec onto a dynamic one) would get an answer giving
    // one number two encodings, and its key presses would be taken for audio: no
    // telephone-event then (the `sdp` fuzz target's round-trip check fails without this).
    let dtmf_pt = offer.dtmf_pt.filter(|&pt| pt != codec.payload_type());
    // c=0.0.0.0 is RFC 2543 hold: nothing to send to.
    let direction = if offer.remote.is_none() { Direction::Inactive } else { offer.direction.answer() };
    Ok(Negotiated { codec, dtmf_pt, ptime_ms: offer.ptime_ms.unwrap_or(DEFAULT_PTIME_MS), remote: offer.remote, direction })
}

/// Our terms from the peer's answer to our offer: its codec, its direction reversed.
pub fn accept_answer(answer: &Description) -> Result<Negotiated, SdpError> {
    let mut n = negotiate(answer)?;
    // The answer's direction is the peer's; ours mirrors it.
    n.direction = if answer.remote.is_none() { Direction::Inactive } else { answer.direction.answer() };
    Ok(n)
}

fn header(local: &LocalMedia, version: u64) -> String {
    let ip = if local.addr.is_ipv4() { "IP4" } else { "IP6" };
    format!("v=0\r\no=parley {} {version} IN {ip} {}\r\ns=parley\r\nc=IN {ip} {}\r\nt=0 0\r\n", local.session_id, local.addr, local.addr)
}

/// Our answer to an offer. `version` is the `o=` version: raise it with every new
/// description in the call.
pub fn answer(n: &Negotiated, local: &LocalMedia, version: u64) -> String {
    let mut s = header(local, version);
    let pt = n.codec.payload_type();
    match n.dtmf_pt {
        Some(te) => s.push_str(&format!("m=audio {} RTP/AVP {pt} {te}\r\n", local.port)),
        None => s.push_str(&format!("m=audio {} RTP/AVP {pt}\r\n", local.port)),
    }
    s.push_str(&format!("a=rtpmap:{pt} {}/8000\r\n", n.codec.name()));
    if let Some(te) = n.dtmf_pt {
        s.push_str(&format!("a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} 0-16\r\n"));
    }
    s.push_str(&format!("a=ptime:{}\r\na={}\r\n", n.ptime_ms, n.direction.attribute()));
    s
}

/// Our offer when the INVITE had none (the answer comes in the ACK).
pub fn offer(local: &LocalMedia, version: u64) -> String {
    let mut s = header(local, version);
    s.push_str(&format!(
        "m=audio {} RTP/AVP 0 8 {OFFER_DTMF_PT}\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:{OFFER_DTMF_PT} telephone-event/8000\r\na=fmtp:{OFFER_DTMF_PT} 0-16\r\na=ptime:{DEFAULT_PTIME_MS}\r\na=sendrecv\r\n",
        local.port
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g711_transcoding_maps_silence_to_silence_and_keeps_the_level() {
        assert_eq!(Codec::Pcmu.transcode(Codec::Pcma, &[0xFF]), vec![0xD5], "silence in both laws");
        // A-law has no zero: its silence is +8 (of 32768), μ-law 0xFE, as in G.711's
        // own A-to-μ table.
        assert_eq!(Codec::Pcma.transcode(Codec::Pcmu, &[0xD5]), vec![0xFE]);
        assert_eq!(Codec::Pcmu.transcode(Codec::Pcmu, &[1, 2, 3]), vec![1, 2, 3]);
        // μ-law → A-law → μ-law stays within a quantization step of the original level.
        for b in 0..=255u8 {
            let back = Codec::Pcma.transcode(Codec::Pcmu, &Codec::Pcmu.transcode(Codec::Pcma, &[b]));
            let (x, y) = (AudioFormat::Pcmu.decode(&[b]).expect("decode")[0], AudioFormat::Pcmu.decode(&back).expect("decode")[0]);
            assert!((x - y).abs() <= x.abs() / 16.0 + 0.002, "{b:#04x}: {x} became {y}");
        }
    }

    fn offer_sdp(m: &str, extra: &str) -> String {
        format!("v=0\r\no=caller 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n{m}\r\n{extra}")
    }

    fn local() -> LocalMedia {
        LocalMedia { addr: "203.0.113.5".parse().expect("ip"), port: 40000, session_id: 7 }
    }

    #[test]
    fn answers_the_first_g711_codec_and_echoes_the_event_payload_type() {
        let sdp = offer_sdp("m=audio 5004 RTP/AVP 9 8 0 96", "a=rtpmap:9 G722/8000\r\na=rtpmap:96 telephone-event/8000\r\na=fmtp:96 0-15\r\n");
        let d = parse(sdp.as_bytes()).expect("parse");
        assert_eq!(d.codecs, vec![Codec::Pcma, Codec::Pcmu]);
        assert_eq!(d.remote, Some("192.0.2.10:5004".parse().expect("addr")));
        let n = negotiate(&d).expect("negotiate");
        assert_eq!((n.codec, n.dtmf_pt, n.ptime_ms, n.direction), (Codec::Pcma, Some(96), 20, Direction::SendRecv));
        let a = answer(&n, &local(), 1);
        assert!(a.contains("m=audio 40000 RTP/AVP 8 96\r\n"), "{a}");
        assert!(a.contains("a=rtpmap:8 PCMA/8000\r\n") && a.contains("a=rtpmap:96 telephone-event/8000\r\n"), "{a}");
        assert!(a.contains("c=IN IP4 203.0.113.5\r\n") && a.contains("a=sendrecv\r\n"), "{a}");
        // Our answer parses back as what it says.
        let back = parse(a.as_bytes()).expect("our answer parses");
        assert_eq!((back.codecs, back.dtmf_pt), (vec![Codec::Pcma], Some(96)));
    }

    #[test]
    fn static_payload_types_need_no_rtpmap_and_dynamic_ones_are_read_by_name() {
        let d = parse(offer_sdp("m=audio 5004 RTP/AVP 0 101", "a=rtpmap:101 telephone-event/8000\r\n").as_bytes()).expect("parse");
        assert_eq!((d.codecs.clone(), d.dtmf_pt), (vec![Codec::Pcmu], Some(101)));
        // PCMU under a dynamic number is still PCMU; telephone-event at 48 kHz is not ours.
        let d = parse(offer_sdp("m=audio 5004 RTP/AVP 110 111", "a=rtpmap:110 pcmu/8000\r\na=rtpmap:111 telephone-event/48000\r\n").as_bytes()).expect("parse");
        assert_eq!((d.codecs.clone(), d.dtmf_pt), (vec![Codec::Pcmu], None));
        let a = answer(&negotiate(&d).expect("negotiate"), &local(), 1);
        assert!(a.contains("m=audio 40000 RTP/AVP 0\r\n") && !a.contains("telephone-event"), "{a}");
    }

    /// The `sdp` fuzz target's round-trip check failed on this offer (seed
    /// `event_on_codec_number`): telephone-event on the static number we answer the
    /// codec with gave an answer with `0` twice on its `m=` line and two rtpmaps for 0.
    #[test]
    fn telephone_event_on_the_number_of_our_codec_is_left_out() {
        let d = parse(offer_sdp("m=audio 5004 RTP/AVP 96 0", "a=rtpmap:96 PCMU/8000\r\na=rtpmap:0 telephone-event/8000\r\n").as_bytes()).expect("parse");
        assert_eq!((d.codecs.clone(), d.dtmf_pt), (vec![Codec::Pcmu], Some(0)));
        let n = negotiate(&d).expect("negotiate");
        assert_eq!((n.codec, n.dtmf_pt), (Codec::Pcmu, None));
        let a = answer(&n, &local(), 1);
        assert!(a.contains("m=audio 40000 RTP/AVP 0\r\n") && !a.contains("telephone-event"), "{a}");
        let back = parse(a.as_bytes()).expect("our answer parses");
        assert_eq!((back.codecs, back.dtmf_pt, back.payload_types), (vec![Codec::Pcmu], None, vec![0]));
        // On the other law's number it is a distinct number, and kept.
        let d = parse(offer_sdp("m=audio 5004 RTP/AVP 96 8", "a=rtpmap:96 PCMU/8000\r\na=rtpmap:8 telephone-event/8000\r\n").as_bytes()).expect("parse");
        assert_eq!(negotiate(&d).expect("negotiate").dtmf_pt, Some(8));
    }

    #[test]
    fn ptime_30_is_honoured() {
        let d = parse(offer_sdp("m=audio 5004 RTP/AVP 8", "a=ptime:30\r\n").as_bytes()).expect("parse");
        let n = negotiate(&d).expect("negotiate");
        assert_eq!(n.ptime_ms, 30);
        assert!(answer(&n, &local(), 1).contains("a=ptime:30\r\n"));
        // Nonsense ptime falls back to 20.
        let d = parse(offer_sdp("m=audio 5004 RTP/AVP 8", "a=ptime:7\r\n").as_bytes()).expect("parse");
        assert_eq!(negotiate(&d).expect("negotiate").ptime_ms, 20);
    }

    #[test]
    fn no_common_codec_and_no_audio_are_errors() {
        let d = parse(offer_sdp("m=audio 5004 RTP/AVP 9 18", "a=rtpmap:9 G722/8000\r\na=rtpmap:18 G729/8000\r\n").as_bytes()).expect("parse");
        assert_eq!(negotiate(&d), Err(SdpError::NoCommonCodec("9 18".into())));
        assert_eq!(parse(offer_sdp("m=video 5004 RTP/AVP 96", "").as_bytes()), Err(SdpError::NoAudio));
        assert_eq!(parse(offer_sdp("m=audio 5004 RTP/SAVP 0", "").as_bytes()), Err(SdpError::NoAudio));
        assert!(matches!(parse(b"not sdp"), Err(SdpError::Parse(_))));
    }

    #[test]
    fn hold_is_answered_with_the_mirrored_direction() {
        for (offered, answered) in [("sendonly", "recvonly"), ("inactive", "inactive"), ("recvonly", "sendonly"), ("sendrecv", "sendrecv")] {
            let d = parse(offer_sdp("m=audio 5004 RTP/AVP 0", &format!("a={offered}\r\n")).as_bytes()).expect("parse");
            let a = answer(&negotiate(&d).expect("negotiate"), &local(), 2);
            assert!(a.contains(&format!("a={answered}\r\n")), "{offered}: {a}");
        }
        // Session-level direction counts too; c=0.0.0.0 is the old way to hold.
        let d = parse("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\na=sendonly\r\nm=audio 5004 RTP/AVP 0\r\n".as_bytes()).expect("parse");
        assert_eq!(d.direction, Direction::SendOnly);
        assert_eq!(negotiate(&d).expect("negotiate").direction, Direction::Inactive);
    }

    #[test]
    fn our_offer_and_the_answer_in_the_ack() {
        let o = offer(&local(), 1);
        let mine = parse(o.as_bytes()).expect("our offer parses");
        assert_eq!((mine.codecs, mine.dtmf_pt, mine.ptime_ms), (vec![Codec::Pcmu, Codec::Pcma], Some(OFFER_DTMF_PT), Some(20)));
        let ans = parse(offer_sdp("m=audio 6000 RTP/AVP 8 101", "a=rtpmap:101 telephone-event/8000\r\na=recvonly\r\n").as_bytes()).expect("parse");
        let n = accept_answer(&ans).expect("accept");
        assert_eq!((n.codec, n.dtmf_pt, n.direction), (Codec::Pcma, Some(101), Direction::SendOnly));
    }
}
