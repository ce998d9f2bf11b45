//! `.safetensors`: parsed by the `safetensors` crate, which checks the header size, every
//! offset and that the tensors cover the buffer exactly.

use std::collections::BTreeMap;

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use super::{checked_bytes, ParsedFile, TensorDType, TensorEntry};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Bytes before the JSON header: its length as a little-endian u64.
const LEN_PREFIX: usize = 8;

pub(super) fn parse(bytes: &[u8]) -> Result<ParsedFile> {
    let (header_len, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::format(None, format!("not a valid safetensors file: {e}")))?;
    let data_start = LEN_PREFIX + header_len;
    let mut entries = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = from_safetensors(info.dtype);
        let (begin, end) = info.data_offsets;
        let range = data_start
            .checked_add(begin)
            .zip(data_start.checked_add(end))
            .filter(|(b, e)| b <= e && *e <= bytes.len())
            .ok_or_else(|| {
                Error::format(
                    None,
                    format!("tensor {name:?} has offsets outside the file"),
                )
            })?;
        if let Some(size) = dtype.size() {
            // The crate checks this too; a table must never rely on that silently.
            if checked_bytes(&info.shape, size) != Some(range.1 - range.0) {
                return Err(Error::format(
                    None,
                    format!("tensor {name:?}: byte length does not match dtype and shape"),
                ));
            }
        }
        entries.push(TensorEntry {
            name,
            dtype,
            shape: info.shape.clone(),
            data: range.0..range.1,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let metadata: BTreeMap<String, String> = metadata
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    Ok(ParsedFile { entries, metadata })
}

fn from_safetensors(d: Dtype) -> TensorDType {
    match d {
        Dtype::F32 => TensorDType::Float(DType::F32),
        Dtype::F16 => TensorDType::Float(DType::F16),
        Dtype::BF16 => TensorDType::Float(DType::BF16),
        Dtype::I32 => TensorDType::I32,
        Dtype::I64 => TensorDType::I64,
        Dtype::U32 => TensorDType::U32,
        Dtype::U64 => TensorDType::U64,
        Dtype::I8 => TensorDType::I8,
        Dtype::I16 => TensorDType::I16,
        Dtype::U8 => TensorDType::U8,
        Dtype::U16 => TensorDType::U16,
        Dtype::F64 => TensorDType::F64,
        other => TensorDType::Other(format!("{other:?}")),
    }
}

/// The safetensors name of a dtype (`F32`, `BF16`, `I64`, ...).
pub(super) fn dtype_name(d: &TensorDType) -> Result<&'static str> {
    Ok(match d {
        TensorDType::Float(DType::F32) => "F32",
        TensorDType::Float(DType::F16) => "F16",
        TensorDType::Float(DType::BF16) => "BF16",
        TensorDType::I32 => "I32",
        TensorDType::I64 => "I64",
        TensorDType::U32 => "U32",
        TensorDType::U64 => "U64",
        TensorDType::I8 => "I8",
        TensorDType::I16 => "I16",
        TensorDType::U8 => "U8",
        TensorDType::U16 => "U16",
        TensorDType::F64 => "F64",
        TensorDType::Other(s) => {
            return Err(Error::InvalidArgument(format!(
                "cannot write dtype {s} to safetensors"
            )))
        }
    })
}

/// The header of a safetensors file holding `tensors` (name, dtype, shape, byte length) in
/// order, padded with spaces so that the data starts 8-byte aligned (after the 8-byte prefix).
pub(super) fn header(
    tensors: &[(&str, &TensorDType, &[usize], usize)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings serialise"),
        );
    }
    let mut offset = 0usize;
    for (name, dtype, shape, len) in tensors {
        let end = offset
            .checked_add(*len)
            .ok_or_else(|| Error::InvalidArgument("tensor sizes overflow".into()))?;
        map.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": dtype_name(dtype)?,
                "shape": shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&map).expect("json serialises");
    // Align the data for the widest element (8 bytes), as the reference writer does.
    while !(LEN_PREFIX + json.len()).is_multiple_of(64) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(LEN_PREFIX + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}
