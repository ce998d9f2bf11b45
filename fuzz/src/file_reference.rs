//! Reference readers of `.npy` and `.safetensors`, written from the formats' specifications
//! and sharing no code with the library's parsers (which use the `safetensors` crate and a
//! dict parser of their own).
//!
//! Each gives a verdict: the file's tensors, where it is plainly valid; `Invalid`, where it
//! plainly breaks the format; `Unsure` for what the specifications leave to a reader's policy
//! (size limits, unknown dtypes, dict spellings numpy never writes), where the check asks
//! only that the library does not panic.

use std::ops::Range;

/// A tensor as the reference reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefTensor {
    /// The name (`""` for `.npy`).
    pub name: String,
    /// The dtype as the file names it (`F32`, `BF16`, `I64`, ...; `.npy` descr mapped to these).
    pub dtype: &'static str,
    /// The shape.
    pub shape: Vec<usize>,
    /// Where its bytes are in the file.
    pub data: Range<usize>,
}

/// What a file is, as far as the reference can tell.
#[derive(Debug)]
pub enum Verdict {
    /// Valid, with these tensors (sorted by name).
    Valid(Vec<RefTensor>),
    /// Breaks the format; the string says how.
    Invalid(String),
    /// Neither plainly valid nor plainly invalid.
    Unsure,
}

/// Bytes per element of the dtypes the reference knows.
fn element_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" => 1,
        _ => return None,
    })
}

/// The bytes of a tensor of `shape`: 0 when any dimension is 0, `None` on overflow.
fn tensor_bytes(shape: &[usize], size: usize) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().try_fold(size, |a, &d| a.checked_mul(d))
}

// ---------------------------------------------------------------------------------------------
// .npy: b"\x93NUMPY", major and minor version bytes, the header length (u16 LE for version 1,
// u32 LE for 2 and 3), an ASCII dict literal, then the data to the end of the file.

/// The `.npy` verdict.
pub fn npy(bytes: &[u8]) -> Verdict {
    let invalid = |why: &str| Verdict::Invalid(why.to_string());
    if bytes.len() < 6 || &bytes[..6] != b"\x93NUMPY" {
        return invalid("no magic");
    }
    let Some(&major) = bytes.get(6) else {
        return invalid("no version");
    };
    let (len_bytes, start) = match major {
        1 => (2, 10),
        2 | 3 => (4, 12),
        _ => return invalid("unknown major version"),
    };
    let Some(len) = bytes.get(8..8 + len_bytes) else {
        return invalid("no header length");
    };
    let header_len = len.iter().rev().fold(0usize, |a, &b| (a << 8) | b as usize);
    if bytes[7] != 0 || header_len > 1 << 20 {
        // Minor versions other than 0 and very long headers: a reader's policy.
        return Verdict::Unsure;
    }
    let Some(header) = bytes.get(start..start + header_len) else {
        return invalid("header runs past the end");
    };
    let Some(dict) = NpyDict::read(header) else {
        return Verdict::Unsure;
    };
    if dict.fortran_order {
        return invalid("Fortran order");
    }
    let dtype = match dict.descr.as_str() {
        "<f4" | "=f4" => "F32",
        "<f2" | "=f2" => "F16",
        "<i4" | "=i4" => "I32",
        "<i8" | "=i8" => "I64",
        "<u4" | "=u4" => "U32",
        "<u8" | "=u8" => "U64",
        "<f8" | "=f8" => "F64",
        "<i2" | "=i2" => "I16",
        "<u2" | "=u2" => "U16",
        "|i1" => "I8",
        "|u1" => "U8",
        _ => return Verdict::Unsure,
    };
    if dict.shape.iter().any(|&d| d > isize::MAX as usize) {
        return Verdict::Unsure;
    }
    let Some(n) = tensor_bytes(&dict.shape, element_size(dtype).expect("known")) else {
        return invalid("shape overflows");
    };
    let data_start = start + header_len;
    if data_start.checked_add(n) != Some(bytes.len()) {
        return invalid("data length does not match the shape");
    }
    Verdict::Valid(vec![RefTensor {
        name: String::new(),
        dtype,
        shape: dict.shape,
        data: data_start..bytes.len(),
    }])
}

/// The dict as numpy writes it: `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`,
/// spaces between tokens, each key once, then spaces and one newline. Anything else is `None`.
struct NpyDict {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

impl NpyDict {
    fn read(header: &[u8]) -> Option<NpyDict> {
        let text = std::str::from_utf8(header).ok()?;
        let body = text.strip_suffix('\n')?.trim_end_matches(' ');
        let mut t = Tokens(body.trim_start_matches(' '));
        t.take("{")?;
        let (mut descr, mut fortran_order, mut shape) = (None, None, None);
        loop {
            if t.take("}").is_some() {
                break;
            }
            let key = t.quoted()?;
            t.take(":")?;
            match key {
                "descr" if descr.is_none() => descr = Some(t.quoted()?.to_string()),
                "fortran_order" if fortran_order.is_none() => {
                    fortran_order = Some(if t.take("True").is_some() {
                        true
                    } else {
                        t.take("False")?;
                        false
                    })
                }
                "shape" if shape.is_none() => shape = Some(t.tuple()?),
                _ => return None,
            }
            if t.take(",").is_none() {
                t.take("}")?;
                break;
            }
        }
        if !t.0.is_empty() {
            return None;
        }
        Some(NpyDict {
            descr: descr?,
            fortran_order: fortran_order?,
            shape: shape?,
        })
    }
}

/// The rest of a dict literal.
struct Tokens<'a>(&'a str);

impl<'a> Tokens<'a> {
    /// `word`, after any spaces.
    fn take(&mut self, word: &str) -> Option<()> {
        self.0 = self.0.trim_start_matches(' ').strip_prefix(word)?;
        Some(())
    }

    /// A string in single or double quotes without quotes or backslashes inside.
    fn quoted(&mut self) -> Option<&'a str> {
        let s = self.0.trim_start_matches(' ');
        let quote = s.chars().next().filter(|&c| c == '\'' || c == '"')?;
        let rest = &s[1..];
        let end = rest.find(quote)?;
        let body = &rest[..end];
        if body.contains(['\\', '\'', '"']) {
            return None;
        }
        self.0 = &rest[end + 1..];
        Some(body)
    }

    /// `()`, `(3,)`, `(3, 4)` or `(3, 4,)`: decimal digits, each perhaps with an `L`.
    fn tuple(&mut self) -> Option<Vec<usize>> {
        self.take("(")?;
        let mut dims = Vec::new();
        loop {
            if self.take(")").is_some() {
                return Some(dims);
            }
            let s = self.0.trim_start_matches(' ');
            let digits = s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            dims.push(s[..digits].parse().ok()?);
            // Python 2's numpy wrote long integers: `(3L, 4L)`.
            self.0 = s[digits..].strip_prefix('L').unwrap_or(&s[digits..]);
            if self.take(",").is_none() {
                self.take(")")?;
                return Some(dims);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// .safetensors: the header's length N as a u64 LE, N bytes of a JSON object (tensor name ->
// {dtype, shape, data_offsets: [begin, end]} relative to the data, and an optional
// `__metadata__` of strings), then the data, which the tensors cover exactly, without gaps.

/// The `.safetensors` verdict.
pub fn safetensors(bytes: &[u8]) -> Verdict {
    let invalid = |why: String| Verdict::Invalid(why);
    let Some(len) = bytes.get(..8) else {
        return invalid("shorter than the length prefix".into());
    };
    let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    if n > 1 << 26 {
        // Header size limits are a reader's policy.
        return Verdict::Unsure;
    }
    let n = n as usize;
    let Some(header) = bytes.get(8..8 + n) else {
        return invalid(format!("a header of {n} bytes runs past the end"));
    };
    let Ok(text) = std::str::from_utf8(header) else {
        return invalid("the header is not UTF-8".into());
    };
    if !text.starts_with('{') {
        return Verdict::Unsure;
    }
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else {
        return invalid("the header is not JSON".into());
    };
    let Some(object) = json.as_object() else {
        return invalid("the header is not a JSON object".into());
    };
    let data = 8 + n..bytes.len();
    let mut tensors = Vec::new();
    for (name, info) in object {
        if name == "__metadata__" {
            match info.as_object() {
                Some(m) if m.values().all(|v| v.is_string()) => continue,
                Some(_) => return invalid("metadata values that are not strings".into()),
                None => return Verdict::Unsure,
            }
        }
        let Some(info) = info.as_object() else {
            return invalid(format!("tensor {name:?} is not an object"));
        };
        if info
            .keys()
            .any(|k| !["dtype", "shape", "data_offsets"].contains(&k.as_str()))
        {
            return Verdict::Unsure;
        }
        let (Some(dtype), Some(shape), Some(offsets)) = (
            info.get("dtype").and_then(|d| d.as_str()),
            info.get("shape").and_then(|s| s.as_array()),
            info.get("data_offsets").and_then(|o| o.as_array()),
        ) else {
            return Verdict::Unsure;
        };
        let Some(size) = element_size(dtype) else {
            return Verdict::Unsure;
        };
        let dtype = [
            "F64", "I64", "U64", "F32", "I32", "U32", "F16", "BF16", "I16", "U16", "I8", "U8",
            "BOOL",
        ]
        .into_iter()
        .find(|&d| d == dtype)
        .expect("a known dtype");
        let dims: Option<Vec<usize>> = shape
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect();
        let bounds: Option<Vec<usize>> = offsets
            .iter()
            .map(|o| o.as_u64().and_then(|o| usize::try_from(o).ok()))
            .collect();
        let (Some(shape), Some(bounds)) = (dims, bounds) else {
            return Verdict::Unsure;
        };
        let [begin, end] = bounds[..] else {
            return Verdict::Unsure;
        };
        if shape.iter().any(|&d| d > isize::MAX as usize) {
            return Verdict::Unsure;
        }
        let Some(bytes_needed) = tensor_bytes(&shape, size) else {
            return Verdict::Unsure;
        };
        if end < begin || end - begin != bytes_needed {
            return invalid(format!(
                "tensor {name:?}: offsets do not fit dtype and shape"
            ));
        }
        tensors.push(RefTensor {
            name: name.clone(),
            dtype,
            shape,
            data: begin..end,
        });
    }
    // The tensors, in the order of their bytes, cover the data from 0 to its end.
    let mut by_offset: Vec<&RefTensor> = tensors.iter().collect();
    by_offset.sort_by_key(|t| (t.data.start, t.data.end));
    let mut at = 0;
    for t in by_offset {
        if t.data.start != at {
            return invalid(format!(
                "tensor {:?} does not start where the last ended",
                t.name
            ));
        }
        at = t.data.end;
    }
    if at != data.len() {
        return invalid(format!(
            "the tensors cover {at} of {} data bytes",
            data.len()
        ));
    }
    for t in &mut tensors {
        t.data = data.start + t.data.start..data.start + t.data.end;
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Verdict::Valid(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_headers_read_and_broken_ones_do_not() {
        let file = |dict: &str, data: usize| {
            let mut v = b"\x93NUMPY\x01\x00".to_vec();
            let header = format!("{dict}\n");
            v.extend_from_slice(&(header.len() as u16).to_le_bytes());
            v.extend_from_slice(header.as_bytes());
            v.extend(std::iter::repeat_n(0u8, data));
            v
        };
        let ok = file(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }",
            24,
        );
        match npy(&ok) {
            Verdict::Valid(t) => assert_eq!((t[0].dtype, &t[0].shape[..]), ("F32", &[3, 2][..])),
            other => panic!("{other:?}"),
        }
        let short = file(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }",
            23,
        );
        assert!(matches!(npy(&short), Verdict::Invalid(_)));
        let fortran = file(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 2), }",
            24,
        );
        assert!(matches!(npy(&fortran), Verdict::Invalid(_)));
        let twice = file(
            "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }",
            24,
        );
        assert!(matches!(npy(&twice), Verdict::Unsure));
    }
}
