//! Hugging Face safetensors reader (single file or sharded with `model.safetensors.index.json`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use strata_kernels::DType;

use crate::EngineError;

/// One tensor: which map, where, and its shape (outermost first, as PyTorch writes it).
#[derive(Clone, Debug)]
pub struct StTensor {
    /// Encoding.
    pub dtype: DType,
    /// Shape, outermost first: a linear layer's weight is `[out, in]`.
    pub shape: Vec<usize>,
    /// The memory map holding it.
    pub map: Arc<Mmap>,
    /// Absolute byte offset in the map.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
}

impl StTensor {
    /// The tensor's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len]
    }
}

/// All tensors of a model folder.
pub fn load_dir(dir: &Path) -> Result<HashMap<String, StTensor>, EngineError> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<String> = if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| EngineError::Io(format!("{}: {e}", index.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::Format(format!("{}: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| EngineError::Format(format!("{}: no weight_map", index.display())))?;
        let mut f: Vec<String> = map
            .values()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect();
        f.sort();
        f.dedup();
        f
    } else {
        vec!["model.safetensors".to_owned()]
    };
    let mut out = HashMap::new();
    for f in files {
        if f.contains('/') || f.contains("..") {
            return Err(EngineError::Format(format!(
                "safetensors index names a file outside the folder: {f}"
            )));
        }
        out.extend(load_file(&dir.join(f))?);
    }
    Ok(out)
}

/// The tensors of one `.safetensors` file.
pub fn load_file(path: &Path) -> Result<HashMap<String, StTensor>, EngineError> {
    let file = std::fs::File::open(path)
        .map_err(|e| EngineError::Io(format!("{}: {e}", path.display())))?;
    // SAFETY: opened read-only and treated as immutable input (see GgufFile::open).
    let map = Arc::new(
        unsafe { Mmap::map(&file) }
            .map_err(|e| EngineError::Io(format!("mmap {}: {e}", path.display())))?,
    );
    parse(map, &path.display().to_string())
}

fn parse(map: Arc<Mmap>, what: &str) -> Result<HashMap<String, StTensor>, EngineError> {
    let bad = |m: String| EngineError::Format(format!("{what}: {m}"));
    if map.len() < 8 {
        return Err(bad("shorter than its header".into()));
    }
    let hlen = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
    let data_start = 8u64
        .checked_add(hlen)
        .filter(|e| *e <= map.len() as u64)
        .ok_or_else(|| bad("header length past the end".into()))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&map[8..data_start as usize])
            .map_err(|e| bad(format!("header: {e}")))?;
    let mut out = HashMap::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match v.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::Bf16,
            Some(other) => {
                return Err(EngineError::Unsupported(format!(
                    "{what}: tensor {name} has dtype {other} (supported: F32, F16, BF16)"
                )));
            }
            None => return Err(bad(format!("tensor {name} has no dtype"))),
        };
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().map(|u| u as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad(format!("tensor {name} has no shape")))?;
        let offs: Vec<u64> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect::<Option<Vec<_>>>())
            .filter(|o| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| bad(format!("tensor {name} has bad data_offsets")))?;
        let elems = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
        let want = elems.and_then(|e| e.checked_mul(dtype.block_bytes()));
        let (s, e) = (
            data_start.saturating_add(offs[0]),
            data_start.checked_add(offs[1]),
        );
        if want != Some((offs[1] - offs[0]) as usize) || e.is_none_or(|e| e > map.len() as u64) {
            return Err(bad(format!(
                "tensor {name}: shape {shape:?} does not match its bytes or lies outside the file"
            )));
        }
        out.insert(
            name,
            StTensor {
                dtype,
                shape,
                map: map.clone(),
                offset: s as usize,
                len: (offs[1] - offs[0]) as usize,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(header: &str, data: &[u8]) -> Arc<Mmap> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(data);
        let mut m = memmap2::MmapMut::map_anon(b.len()).unwrap();
        m.copy_from_slice(&b);
        Arc::new(m.make_read_only().unwrap())
    }

    #[test]
    fn reads_tensors_and_refuses_bad_headers() {
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let ok = build(
            r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"__metadata__":{}}"#,
            &data,
        );
        let t = parse(ok, "t").unwrap();
        assert_eq!(t["w"].shape, vec![2, 3]);
        assert_eq!(t["w"].bytes()[20..24], 5f32.to_le_bytes());
        for h in [
            r#"{"w":{"dtype":"F32","shape":[2,4],"data_offsets":[0,24]}}"#,
            r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[8,32]}}"#,
            r#"{"w":{"dtype":"I64","shape":[3],"data_offsets":[0,24]}}"#,
            r#"{"w":{"dtype":"F32","shape":[2,3]}}"#,
            r#"not json"#,
        ] {
            assert!(parse(build(h, &data), "t").is_err(), "{h}");
        }
    }
}
