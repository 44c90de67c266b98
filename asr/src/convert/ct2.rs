//! Reader for CTranslate2's `model.bin`.
//!
//! The file is little-endian: a `u32` binary version, then (version 2 and later) the
//! spec name and a `u32` spec revision, a `u32` count of variables, each variable as
//! name, `u8` rank, `u32` dimensions, `u8` data type, `u32` byte count and raw bytes,
//! and (version 3 and later) a `u32` count of aliases, each a pair of names. Strings are
//! a `u16` length followed by that many bytes, the last of which is a NUL.

use std::collections::BTreeMap;

use crate::AsrError;

/// The element types CTranslate2 writes, by their numeric id in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DType {
    F32,
    I8,
    I16,
    I32,
    F16,
    BF16,
}

impl DType {
    fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::I8,
            2 => Self::I16,
            3 => Self::I32,
            4 => Self::F16,
            5 => Self::BF16,
            _ => return None,
        })
    }

    pub(crate) fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::F32 | Self::I32 => 4,
        }
    }
}

/// One named array, borrowing its bytes from the file buffer.
#[derive(Debug, Clone)]
pub(crate) struct Variable<'a> {
    /// Dimensions, outermost first (row-major, like PyTorch).
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub data: &'a [u8],
}

impl Variable<'_> {
    /// The value of a scalar integer variable (such as `encoder/num_heads`).
    pub(crate) fn scalar_int(&self) -> Option<i64> {
        if !self.shape.is_empty() {
            return None;
        }
        let b = self.data;
        match self.dtype {
            DType::I8 => b.first().map(|&v| i64::from(v as i8)),
            DType::I16 => Some(i64::from(i16::from_le_bytes(b.get(..2)?.try_into().ok()?))),
            DType::I32 => Some(i64::from(i32::from_le_bytes(b.get(..4)?.try_into().ok()?))),
            _ => None,
        }
    }
}

/// A parsed `model.bin`: the spec it was written from and its variables by name.
#[derive(Debug)]
pub(crate) struct Ct2Model<'a> {
    pub spec: String,
    pub variables: BTreeMap<String, Variable<'a>>,
}

impl<'a> Ct2Model<'a> {
    /// Parses a whole `model.bin` held in memory; aliases become extra names for the
    /// variables they point at.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, AsrError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u32()?;
        if !(1..=6).contains(&version) {
            return Err(bad(format!(
                "unsupported CTranslate2 binary version {version}"
            )));
        }
        let spec = if version >= 2 {
            let spec = r.string()?;
            let _revision = r.u32()?;
            spec
        } else {
            String::new()
        };
        let count = r.u32()?;
        let mut variables = BTreeMap::new();
        for _ in 0..count {
            let name = r.string()?;
            let rank = usize::from(r.u8()?);
            let shape = (0..rank)
                .map(|_| r.u32().map(|d| d as usize))
                .collect::<Result<Vec<_>, _>>()?;
            let (dtype, len) = if version >= 4 {
                let id = r.u8()?;
                let dtype = DType::from_id(id)
                    .ok_or_else(|| bad(format!("variable {name}: unknown data type {id}")))?;
                (dtype, r.u32()? as usize)
            } else {
                let item = r.u8()?;
                let dtype = match item {
                    1 => DType::I8,
                    2 => DType::F16,
                    4 => DType::F32,
                    _ => return Err(bad(format!("variable {name}: item size {item}"))),
                };
                (dtype, r.u32()? as usize * usize::from(item))
            };
            let elements: usize = shape.iter().product();
            if elements * dtype.size() != len {
                return Err(bad(format!(
                    "variable {name}: {len} bytes do not fit shape {shape:?} of {dtype:?}"
                )));
            }
            let data = r.take(len)?;
            variables.insert(name, Variable { shape, dtype, data });
        }
        if version >= 3 {
            let aliases = r.u32()?;
            for _ in 0..aliases {
                let alias = r.string()?;
                let target = r.string()?;
                if let Some(v) = variables.get(&target).cloned() {
                    variables.insert(alias, v);
                }
            }
        }
        Ok(Self { spec, variables })
    }

    /// The variable called `name`, or an error naming it.
    pub(crate) fn get(&self, name: &str) -> Result<Variable<'a>, AsrError> {
        self.variables
            .get(name)
            .cloned()
            .ok_or_else(|| bad(format!("model.bin has no variable {name}")))
    }

    /// How many `{prefix}/layer_N/...` blocks the model has.
    pub(crate) fn count_layers(&self, prefix: &str) -> usize {
        (0..)
            .take_while(|i| {
                let p = format!("{prefix}/layer_{i}/");
                self.variables
                    .range(p.clone()..)
                    .next()
                    .is_some_and(|(k, _)| k.starts_with(&p))
            })
            .count()
    }
}

fn bad(msg: String) -> AsrError {
    AsrError::Convert(format!("model.bin: {msg}"))
}

/// A bounds-checked cursor over the file bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AsrError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| bad(format!("truncated at byte {}", self.pos)))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, AsrError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, AsrError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, AsrError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<String, AsrError> {
        let len = usize::from(self.u16()?);
        let b = self.take(len)?;
        let b = b.strip_suffix(&[0]).unwrap_or(b);
        String::from_utf8(b.to_vec()).map_err(|_| bad("a name is not UTF-8".into()))
    }
}
