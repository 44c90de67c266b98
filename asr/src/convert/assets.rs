//! The two non-weight inputs of a ggml Whisper file, read from openai-whisper's assets:
//! the mel filterbank (`mel_filters.npz`, a zip of `.npy` arrays) and the BPE
//! vocabulary (`*.tiktoken`, one `base64-token rank` pair per line).

use std::io::Read;
use std::path::Path;

use base64::Engine;

use crate::AsrError;

/// A row-major `f32` matrix.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MelFilters {
    pub n_mel: usize,
    pub n_fft: usize,
    pub data: Vec<f32>,
}

/// Reads the `mel_{n_mel}` array (shape `n_mel × n_fft`) from an `.npz` file.
pub(crate) fn read_mel_filters(npz: &Path, n_mel: usize) -> Result<MelFilters, AsrError> {
    let err = |msg: String| AsrError::Convert(format!("{}: {msg}", npz.display()));
    let file = std::fs::File::open(npz).map_err(|e| err(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| err(e.to_string()))?;
    let key = format!("mel_{n_mel}.npy");
    let mut entry = zip
        .by_name(&key)
        .map_err(|_| err(format!("no array {key}")))?;
    let mut bytes = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    let (shape, data) = parse_npy_f32(&bytes).map_err(|m| err(format!("{key}: {m}")))?;
    match shape[..] {
        [rows, cols] if rows == n_mel => Ok(MelFilters {
            n_mel: rows,
            n_fft: cols,
            data,
        }),
        _ => Err(err(format!(
            "{key} has shape {shape:?}, expected ({n_mel}, n_fft)"
        ))),
    }
}

/// Parses a little-endian, C-ordered `float32` or `float64` `.npy` array into its shape
/// and `f32` values.
pub(crate) fn parse_npy_f32(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), String> {
    let rest = bytes
        .strip_prefix(b"\x93NUMPY")
        .ok_or("not an .npy array")?;
    let (&major, rest) = rest.split_first().ok_or("truncated")?;
    let rest = rest.get(1..).ok_or("truncated")?; // minor version
    let (header_len, rest) = match major {
        1 => {
            let b = rest.get(..2).ok_or("truncated")?;
            (usize::from(u16::from_le_bytes([b[0], b[1]])), &rest[2..])
        }
        2 | 3 => {
            let b = rest.get(..4).ok_or("truncated")?;
            (
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
                &rest[4..],
            )
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = rest.get(..header_len).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let data = &rest[header_len..];

    let field = |key: &str| -> Result<&str, String> {
        let at = header
            .find(&format!("'{key}':"))
            .ok_or(format!("header lacks {key}"))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let descr = field("descr")?;
    let elem = if descr.starts_with("'<f4'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        return Err(format!(
            "unsupported dtype {}",
            descr.split(',').next().unwrap_or("")
        ));
    };
    let shape_text = field("shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("malformed shape")?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("malformed shape ({shape_text})"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let count: usize = shape.iter().product();
    let data = data
        .get(..count * elem)
        .ok_or("data shorter than its shape")?;
    let values = if elem == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect()
    };
    Ok((shape, values))
}

/// Reads a `.tiktoken` vocabulary into token byte strings indexed by rank.
pub(crate) fn read_tiktoken(path: &Path) -> Result<Vec<Vec<u8>>, AsrError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AsrError::Convert(format!("{}: {e}", path.display())))?;
    parse_tiktoken(&text).map_err(|m| AsrError::Convert(format!("{}: {m}", path.display())))
}

/// Parses `base64-token rank` lines; ranks must cover `0..n` exactly once.
pub(crate) fn parse_tiktoken(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut tokens: Vec<Option<Vec<u8>>> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let mut parts = line.split_whitespace();
        let (Some(token), Some(rank), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("line {}: expected `token rank`", i + 1));
        };
        let token = base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|e| format!("line {}: {e}", i + 1))?;
        let rank: usize = rank
            .parse()
            .map_err(|_| format!("line {}: bad rank", i + 1))?;
        if rank >= tokens.len() {
            tokens.resize(rank + 1, None);
        }
        if tokens[rank].replace(token).is_some() {
            return Err(format!("line {}: rank {rank} appears twice", i + 1));
        }
    }
    tokens
        .into_iter()
        .enumerate()
        .map(|(rank, t)| t.ok_or(format!("rank {rank} is missing")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn npy_f32_matrix() {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n",
            &data,
        );
        let (shape, values) = parse_npy_f32(&bytes).expect("parses");
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn npy_rejects_fortran_order_and_short_data() {
        let h = "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 1), }\n";
        assert!(parse_npy_f32(&npy(h, &[0; 4])).is_err());
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }\n";
        assert!(parse_npy_f32(&npy(h, &[0; 8])).is_err());
    }

    #[test]
    fn tiktoken_ranks_index_tokens() {
        let tokens = parse_tiktoken("IQ== 0\nIGE= 2\nIg== 1\n").expect("parses");
        assert_eq!(tokens, vec![b"!".to_vec(), b"\"".to_vec(), b" a".to_vec()]);
    }

    #[test]
    fn tiktoken_gaps_and_duplicates_are_errors() {
        assert!(parse_tiktoken("IQ== 0\nIg== 2\n").is_err());
        assert!(parse_tiktoken("IQ== 0\nIg== 0\n").is_err());
    }
}
