//! ITU-T G.711 companding (μ-law and A-law) on 16-bit linear samples.
//!
//! Phone gateways and SIP trunks carry 8-bit G.711 at 8 kHz; these functions map
//! each byte to and from a 16-bit sample. μ-law works on a 14-bit magnitude and
//! A-law on a 13-bit one; here both are scaled up to the 16-bit range, so μ-law
//! peaks at ±32124 and A-law at ±32256.

/// μ-law bias (33 in the standard's 14-bit domain, times 4).
const ULAW_BIAS: i32 = 0x84;
/// Largest magnitude μ-law can represent before the bias is added.
const ULAW_CLIP: i32 = 32635;

/// Encodes one 16-bit sample as a μ-law byte (PCMU), because telephony peers send and expect μ-law.
pub fn ulaw_encode(sample: i16) -> u8 {
    let sign: u8 = if sample < 0 { 0x80 } else { 0 };
    let magnitude = i32::from(sample).abs().min(ULAW_CLIP) + ULAW_BIAS;
    // `magnitude` lies in 132..=32767, so its top bit is bit 7..=14.
    let exponent = (31 - magnitude.leading_zeros()) as i32 - 7;
    let mantissa = (magnitude >> (exponent + 3)) & 0x0F;
    !(sign | ((exponent as u8) << 4) | mantissa as u8)
}

/// Decodes a μ-law byte to a 16-bit sample, the inverse of [`ulaw_encode`].
pub fn ulaw_decode(code: u8) -> i16 {
    let code = !code;
    let exponent = (code >> 4) & 0x07;
    let mantissa = i32::from(code & 0x0F);
    let magnitude = (((mantissa << 3) + ULAW_BIAS) << exponent) - ULAW_BIAS;
    let value = if code & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    };
    value as i16
}

/// Encodes one 16-bit sample as an A-law byte (PCMA), the G.711 flavour used outside North America.
pub fn alaw_encode(sample: i16) -> u8 {
    // A-law has no zero level: negative samples are folded with one's complement
    // so that -1 and 0 land symmetrically on the smallest negative and positive steps.
    let (sign, folded) = if sample >= 0 {
        (0x80u8, sample)
    } else {
        (0u8, !sample)
    };
    let magnitude = (folded >> 3) as u16; // 13-bit domain: 0..=4095
    let segment_bits = if magnitude < 32 {
        (magnitude >> 1) as u8
    } else {
        let exponent = (15 - magnitude.leading_zeros()) as u16 - 4; // 1..=7
        let mantissa = (magnitude >> exponent) & 0x0F;
        ((exponent << 4) as u8) | mantissa as u8
    };
    (sign | segment_bits) ^ 0x55
}

/// Decodes an A-law byte to a 16-bit sample, the inverse of [`alaw_encode`].
pub fn alaw_decode(code: u8) -> i16 {
    let code = code ^ 0x55;
    let exponent = (code >> 4) & 0x07;
    let mantissa = i16::from(code & 0x0F);
    let magnitude = if exponent == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (exponent - 1)
    };
    if code & 0x80 != 0 {
        magnitude
    } else {
        -magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// μ-law reconstruction level straight from G.711's segment formula, in the
    /// standard's 14-bit domain ((2m + 33) * 2^e - 33), scaled by 4.
    fn ulaw_reference(code: u8) -> i32 {
        let bits = !code;
        let negative = bits & 0x80 != 0;
        let e = i32::from((bits >> 4) & 7);
        let m = i32::from(bits & 0x0F);
        let level = ((2 * m + 33) * (1 << e) - 33) * 4;
        if negative { -level } else { level }
    }

    /// A-law reconstruction level from G.711's segment formula in the 13-bit
    /// domain (2m + 1 in segment 0, (2m + 33) * 2^(e-1) above), scaled by 8.
    fn alaw_reference(code: u8) -> i32 {
        let bits = code ^ 0x55;
        let positive = bits & 0x80 != 0;
        let e = i32::from((bits >> 4) & 7);
        let m = i32::from(bits & 0x0F);
        let level = if e == 0 {
            2 * m + 1
        } else {
            (2 * m + 33) * (1 << (e - 1))
        } * 8;
        if positive { level } else { -level }
    }

    #[test]
    fn ulaw_decode_matches_segment_formula_for_every_code() {
        for code in 0..=255u8 {
            assert_eq!(
                i32::from(ulaw_decode(code)),
                ulaw_reference(code),
                "code {code:#04x}"
            );
        }
    }

    #[test]
    fn alaw_decode_matches_segment_formula_for_every_code() {
        for code in 0..=255u8 {
            assert_eq!(
                i32::from(alaw_decode(code)),
                alaw_reference(code),
                "code {code:#04x}"
            );
        }
    }

    #[test]
    fn known_table_entries() {
        assert_eq!(ulaw_decode(0x00), -32124);
        assert_eq!(ulaw_decode(0x80), 32124);
        assert_eq!(ulaw_decode(0xFF), 0);
        assert_eq!(ulaw_decode(0x7F), 0);
        assert_eq!(ulaw_decode(0xFE), 8);
        assert_eq!(ulaw_decode(0x7E), -8);
        assert_eq!(ulaw_encode(0), 0xFF);
        assert_eq!(ulaw_encode(i16::MAX), 0x80);
        assert_eq!(ulaw_encode(i16::MIN), 0x00);
        assert_eq!(alaw_decode(0xD5), 8);
        assert_eq!(alaw_decode(0x55), -8);
        assert_eq!(alaw_decode(0xAA), 32256);
        assert_eq!(alaw_decode(0x2A), -32256);
        assert_eq!(alaw_encode(0), 0xD5);
        assert_eq!(alaw_encode(-1), 0x55);
        assert_eq!(alaw_encode(i16::MAX), 0xAA);
        assert_eq!(alaw_encode(i16::MIN), 0x2A);
    }

    #[test]
    fn round_trip_every_code() {
        for code in 0..=255u8 {
            // 0x7F is μ-law's "negative zero"; it decodes to 0, which encodes as 0xFF.
            let expected = if code == 0x7F { 0xFF } else { code };
            assert_eq!(ulaw_encode(ulaw_decode(code)), expected, "ulaw {code:#04x}");
            assert_eq!(alaw_encode(alaw_decode(code)), code, "alaw {code:#04x}");
        }
    }

    #[test]
    fn decoded_levels_are_monotonic_in_code_order() {
        // μ-law: 0x00..=0x7F rise from -32124 to 0, 0x80..=0xFF fall from 32124 to 0.
        for c in 0..0x7Fu8 {
            assert!(ulaw_decode(c) < ulaw_decode(c + 1), "ulaw {c:#04x}");
        }
        for c in 0x80..0xFFu8 {
            assert!(ulaw_decode(c) > ulaw_decode(c + 1), "ulaw {c:#04x}");
        }
        // A-law: without the even-bit inversion a code is sign (1 = positive) and magnitude.
        for r in 0..0x7Fu8 {
            let (pos, pos_next) = ((r | 0x80) ^ 0x55, ((r + 1) | 0x80) ^ 0x55);
            assert!(alaw_decode(pos) < alaw_decode(pos_next), "alaw {pos:#04x}");
            let (neg, neg_next) = (r ^ 0x55, (r + 1) ^ 0x55);
            assert!(alaw_decode(neg) > alaw_decode(neg_next), "alaw {neg:#04x}");
        }
    }

    #[test]
    fn quantizing_every_sample_is_monotonic_with_relative_error_bound() {
        let (mut last_u, mut last_a) = (i32::MIN, i32::MIN);
        for s in i16::MIN..=i16::MAX {
            let u = i32::from(ulaw_decode(ulaw_encode(s)));
            let a = i32::from(alaw_decode(alaw_encode(s)));
            assert!(u >= last_u && a >= last_a, "sample {s}");
            (last_u, last_a) = (u, a);
            let x = i32::from(s);
            // Both laws keep the error within about |x|/16 (a 4-bit mantissa), at
            // least one small step near zero; beyond the top level only the clipped
            // excess adds to it.
            let u_err = (u - x).abs() - (x.abs() - 32124).max(0);
            let a_err = (a - x).abs() - (x.abs() - 32256).max(0);
            let step = (x.abs() / 16).max(16);
            assert!(u_err <= step, "ulaw sample {s} -> {u}");
            assert!(a_err <= step, "alaw sample {s} -> {a}");
        }
    }
}
