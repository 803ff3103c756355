//! A GGUF (v2/v3) reader: metadata, tensor directory, and tensor bytes from a memory map.
//!
//! Every offset and count read from the file is checked against the file's size before it
//! is used, so a truncated or hostile file gives [`EngineError::Format`], never a panic or
//! an out-of-bounds read.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use strata_kernels::DType;

use crate::EngineError;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<Value>),
}

impl Value {
    /// As an unsigned integer, when it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
    /// As a float, when it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::U64(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// As a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's directory entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Encoding.
    pub dtype: DType,
    /// Dimensions, innermost first (ggml's `ne`): a matrix is `[cols, rows]`.
    pub dims: Vec<u64>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
}

/// An open GGUF file.
pub struct GgufFile {
    map: Arc<Mmap>,
    /// Metadata key → value.
    pub metadata: HashMap<String, Value>,
    /// Tensor name → directory entry.
    pub tensors: HashMap<String, TensorInfo>,
    /// Tensors of encodings the engine cannot compute with: name → ggml type id. A model
    /// that needs one fails to load with its name.
    pub unsupported: HashMap<String, u32>,
}

const MAX_STRING: u64 = 1 << 30;
const MAX_ARRAY: u64 = 1 << 28;

/// Most array elements in one file's metadata (a 256k vocabulary has three arrays of
/// 256k): bounds the memory a hostile file can make the parser allocate.
const MAX_ARRAY_ELEMENTS: u64 = 1 << 23;

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    array_elements: u64,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| {
                EngineError::Format(format!(
                    "GGUF: truncated at byte {} (wanted {n} more)",
                    self.pos
                ))
            })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, EngineError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, EngineError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, EngineError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String, EngineError> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(EngineError::Format(format!("GGUF: string of {n} bytes")));
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| EngineError::Format("GGUF: string is not UTF-8".into()))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, EngineError> {
        Ok(match ty {
            0 => Value::U64(u64::from(self.u8()?)),
            1 => Value::I64(i64::from(self.u8()? as i8)),
            2 => Value::U64(u64::from(u16::from_le_bytes(
                self.take(2)?.try_into().expect("2"),
            ))),
            3 => Value::I64(i64::from(i16::from_le_bytes(
                self.take(2)?.try_into().expect("2"),
            ))),
            4 => Value::U64(u64::from(self.u32()?)),
            5 => Value::I64(i64::from(self.u32()? as i32)),
            6 => Value::F64(f64::from(f32::from_bits(self.u32()?))),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(EngineError::Format("GGUF: arrays nested too deeply".into()));
                }
                let ety = self.u32()?;
                let n = self.u64()?;
                self.array_elements = self.array_elements.saturating_add(n);
                if n > MAX_ARRAY || self.array_elements > MAX_ARRAY_ELEMENTS {
                    return Err(EngineError::Format(format!(
                        "GGUF: metadata arrays too large ({n} items)"
                    )));
                }
                let mut v = Vec::with_capacity((n as usize).min(1 << 16));
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => return Err(EngineError::Format(format!("GGUF: unknown value type {t}"))),
        })
    }
}

pub(crate) fn ggml_type(t: u32) -> Result<DType, EngineError> {
    Ok(match t {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        8 => DType::Q8_0,
        30 => DType::Bf16,
        other => {
            return Err(EngineError::Unsupported(format!(
                "GGUF tensor type {other} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"
            )));
        }
    })
}

impl GgufFile {
    /// Opens and indexes `path`.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let file = std::fs::File::open(path)
            .map_err(|e| EngineError::Io(format!("{}: {e}", path.display())))?;
        // SAFETY: the file is opened read-only and treated as immutable input; a concurrent
        // truncation by another process could fault, as with any mmap-based model loader.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| EngineError::Io(format!("mmap {}: {e}", path.display())))?;
        Self::parse(Arc::new(map))
    }

    fn parse(map: Arc<Mmap>) -> Result<Self, EngineError> {
        let mut c = Cursor {
            b: &map[..],
            pos: 0,
            array_elements: 0,
        };
        if c.take(4)? != b"GGUF" {
            return Err(EngineError::Format("not a GGUF file (bad magic)".into()));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(EngineError::Unsupported(format!(
                "GGUF version {version} (supported: 2, 3)"
            )));
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        if n_tensors > 1 << 20 || n_kv > 1 << 20 {
            return Err(EngineError::Format(format!(
                "GGUF: {n_tensors} tensors, {n_kv} keys"
            )));
        }
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()?;
            if nd == 0 || nd > 4 {
                return Err(EngineError::Format(format!(
                    "GGUF: tensor {name} has {nd} dimensions"
                )));
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
            let ty = c.u32()?;
            let off = c.u64()?;
            raw.push((name, dims, ty, off));
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32);
        if align == 0 || !align.is_power_of_two() || align > 1 << 16 {
            return Err(EngineError::Format(format!("GGUF: alignment {align}")));
        }
        let data_start = (c.pos as u64).div_ceil(align) * align;
        let mut tensors = HashMap::new();
        let mut unsupported = HashMap::new();
        for (name, dims, ty, off) in raw {
            let dtype = match ggml_type(ty) {
                Ok(d) => d,
                // Tensors of unsupported types are only an error when the model needs them.
                Err(_) => {
                    unsupported.insert(name, ty);
                    continue;
                }
            };
            let elems = dims.iter().try_fold(1u64, |a, d| a.checked_mul(*d));
            let cols = dims[0];
            let len = elems
                .filter(|_| cols % dtype.block_elems() as u64 == 0)
                .and_then(|e| e.checked_mul(dtype.block_bytes() as u64))
                .map(|b| b / dtype.block_elems() as u64)
                .ok_or_else(|| {
                    EngineError::Format(format!("GGUF: tensor {name} has a bad shape {dims:?}"))
                })?;
            let start = data_start.checked_add(off);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= map.len() as u64 => {
                    tensors.insert(
                        name,
                        TensorInfo {
                            dtype,
                            dims,
                            offset: s as usize,
                            len: len as usize,
                        },
                    );
                }
                _ => {
                    return Err(EngineError::Format(format!(
                        "GGUF: tensor {name} lies outside the file (truncated download?)"
                    )));
                }
            }
        }
        Ok(GgufFile {
            map,
            metadata,
            tensors,
            unsupported,
        })
    }

    /// The memory map the tensors live in.
    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required unsigned metadata value.
    pub fn u64(&self, key: &str) -> Result<u64, EngineError> {
        self.get(key).and_then(Value::as_u64).ok_or_else(|| {
            EngineError::Format(format!("GGUF: missing or non-integer metadata {key}"))
        })
    }

    /// The bytes of a tensor.
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset..t.offset + t.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }

    fn tiny() -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "llama.block_count");
        b.extend(4u32.to_le_bytes());
        b.extend(2u32.to_le_bytes());
        s(&mut b, "w");
        b.extend(2u32.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        for i in 0..8 {
            b.extend((i as f32).to_le_bytes());
        }
        b
    }

    fn parse(b: Vec<u8>) -> Result<GgufFile, EngineError> {
        let mut m = memmap2::MmapMut::map_anon(b.len()).unwrap();
        m.copy_from_slice(&b);
        GgufFile::parse(Arc::new(m.make_read_only().unwrap()))
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let g = parse(tiny()).unwrap();
        assert_eq!(
            g.get("general.architecture").and_then(Value::as_str),
            Some("llama")
        );
        assert_eq!(g.u64("llama.block_count").unwrap(), 2);
        let t = &g.tensors["w"];
        assert_eq!(t.dims, vec![4, 2]);
        assert_eq!(g.bytes(t)[4..8], 1f32.to_le_bytes());
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = tiny();
        for n in 0..full.len() {
            assert!(
                parse(full[..n.max(1)].to_vec()).is_err(),
                "truncated at {n} parsed"
            );
        }
        let mut bad = full.clone();
        bad[0] = b'X';
        assert!(matches!(parse(bad), Err(EngineError::Format(_))));
        // An absurd string length.
        let mut bad = full;
        bad[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(bad).is_err());
    }
}
