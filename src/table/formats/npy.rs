//! `.npy`: a magic string, a version, a header length and a Python dict literal
//! (`{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`), then the data.
//!
//! Everything read from the file is checked: the header length against the file, the shape's
//! product (checked arithmetic) against the bytes that follow.

use super::{checked_bytes, TensorDType, TensorEntry};
use crate::dtype::DType;
use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";
/// numpy refuses headers above this size by default; so do we.
const MAX_HEADER_LEN: usize = 1 << 20;

pub(super) fn parse(bytes: &[u8]) -> Result<TensorEntry> {
    let bad = |reason: String| Error::format(None, format!("not a valid .npy file: {reason}"));
    if bytes.get(..MAGIC.len()) != Some(MAGIC) {
        return Err(bad("missing the \\x93NUMPY magic".into()));
    }
    let major = *bytes
        .get(6)
        .ok_or_else(|| bad("truncated before the version".into()))?;
    let (header_len, header_start) = match major {
        1 => {
            let b = bytes
                .get(8..10)
                .ok_or_else(|| bad("truncated before the header length".into()))?;
            (u16::from_le_bytes([b[0], b[1]]) as usize, 10)
        }
        2 | 3 => {
            let b = bytes
                .get(8..12)
                .ok_or_else(|| bad("truncated before the header length".into()))?;
            let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            (len, 12)
        }
        v => return Err(bad(format!("unsupported format version {v}"))),
    };
    if header_len > MAX_HEADER_LEN {
        return Err(bad(format!("header length {header_len} is too large")));
    }
    let data_start = header_start + header_len;
    let header = bytes.get(header_start..data_start).ok_or_else(|| {
        bad(format!(
            "header of {header_len} bytes runs past the end of the file"
        ))
    })?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not UTF-8".into()))?;
    let dict = parse_dict(header).map_err(|e| bad(format!("bad header {header:?}: {e}")))?;

    if dict.fortran_order {
        return Err(bad(
            "Fortran-order arrays are not supported (save in C order)".into(),
        ));
    }
    let dtype = descr_dtype(&dict.descr);
    let Some(size) = dtype.size() else {
        let hint = if dict.descr.contains("V2") || dict.descr.contains("bf") {
            " (bf16 has no .npy dtype: use .safetensors)"
        } else if dict.descr.starts_with('>') {
            " (big-endian: save with `arr.astype(arr.dtype.newbyteorder('<'))`)"
        } else {
            ""
        };
        return Err(Error::format(
            None,
            format!(
                "dtype {:?} is not supported{hint}: tables must be <f4 or <f2 (<f8 through \
                 `emb convert IN OUT --dtype f32`), indices signed or unsigned integers of \
                 1 to 8 bytes (<i1 .. <i8, <u1 .. <u8)",
                dict.descr
            ),
        ));
    };
    let len = checked_bytes(&dict.shape, size)
        .ok_or_else(|| bad(format!("shape {:?} overflows", dict.shape)))?;
    let end = data_start
        .checked_add(len)
        .ok_or_else(|| bad("data size overflows".into()))?;
    if end != bytes.len() {
        return Err(bad(format!(
            "shape {:?} of {} needs {len} data bytes, the file has {}",
            dict.shape,
            dtype,
            bytes.len().saturating_sub(data_start)
        )));
    }
    Ok(TensorEntry {
        name: String::new(),
        dtype,
        shape: dict.shape,
        data: data_start..end,
    })
}

fn descr_dtype(descr: &str) -> TensorDType {
    // '<' little-endian, '|' not applicable, '=' native (little-endian on every supported target).
    let little = |s: &str| ["<", "="].iter().any(|p| descr == format!("{p}{s}"));
    // One byte has no order: numpy writes '|', and accepts the others.
    let one_byte = |s: &str| {
        ["|", "<", "=", ">"]
            .iter()
            .any(|p| descr == format!("{p}{s}"))
    };
    if little("f4") {
        TensorDType::Float(DType::F32)
    } else if little("f2") {
        TensorDType::Float(DType::F16)
    } else if little("i4") {
        TensorDType::I32
    } else if little("i8") {
        TensorDType::I64
    } else if little("u4") {
        TensorDType::U32
    } else if little("u8") {
        TensorDType::U64
    } else if little("f8") {
        TensorDType::F64
    } else if little("i2") {
        TensorDType::I16
    } else if little("u2") {
        TensorDType::U16
    } else if one_byte("i1") {
        TensorDType::I8
    } else if one_byte("u1") {
        TensorDType::U8
    } else {
        TensorDType::Other(descr.to_string())
    }
}

/// The `descr` string npy uses for a dtype, or an error for bf16, which npy cannot hold.
pub(super) fn descr(d: &TensorDType) -> Result<&'static str> {
    Ok(match d {
        TensorDType::Float(DType::F32) => "<f4",
        TensorDType::Float(DType::F16) => "<f2",
        TensorDType::Float(DType::BF16) => {
            return Err(Error::InvalidArgument(
                "bf16 has no .npy dtype: write .safetensors instead, or ask for f32 output".into(),
            ))
        }
        TensorDType::I32 => "<i4",
        TensorDType::I64 => "<i8",
        TensorDType::U32 => "<u4",
        TensorDType::U64 => "<u8",
        TensorDType::I8 => "|i1",
        TensorDType::I16 => "<i2",
        TensorDType::U8 => "|u1",
        TensorDType::U16 => "<u2",
        TensorDType::F64 => "<f8",
        TensorDType::Other(s) => {
            return Err(Error::InvalidArgument(format!(
                "cannot write dtype {s} to .npy"
            )))
        }
    })
}

/// A version 1.0 header (version 2.0 when the dict is too long), padded so the data starts at a
/// multiple of 64 bytes.
pub(super) fn header(dtype: &TensorDType, shape: &[usize]) -> Result<Vec<u8>> {
    let shape_str = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_str}, }}",
        descr(dtype)?
    );
    let v1 = dict.len() + 11 <= u16::MAX as usize;
    let prefix = if v1 { 10 } else { 12 };
    while (prefix + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = Vec::with_capacity(prefix + dict.len());
    out.extend_from_slice(MAGIC);
    if v1 {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    Ok(out)
}

struct NpyDict {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A small parser for the one dict literal npy writes: string keys; values are a string, a
/// boolean or a tuple of integers.
fn parse_dict(s: &str) -> std::result::Result<NpyDict, String> {
    let mut p = Cursor {
        s: s.as_bytes(),
        i: 0,
    };
    p.ws();
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        match key.as_str() {
            "descr" => descr = Some(p.string()?),
            "fortran_order" => fortran = Some(p.boolean()?),
            "shape" => shape = Some(p.tuple()?),
            other => return Err(format!("unexpected key {other:?}")),
        }
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}')?;
            break;
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err("trailing characters after the dict".into());
    }
    Ok(NpyDict {
        descr: descr.ok_or("missing 'descr'")?,
        fortran_order: fortran.ok_or("missing 'fortran_order'")?,
        shape: shape.ok_or("missing 'shape'")?,
    })
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", c as char, self.i))
        }
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let quote = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a string at byte {}", self.i)),
        };
        self.i += 1;
        let start = self.i;
        while self.s.get(self.i).is_some_and(|&c| c != quote) {
            self.i += 1;
        }
        let body = &self.s[start..self.i];
        self.expect(quote)?;
        Ok(String::from_utf8_lossy(body).into_owned())
    }
    fn boolean(&mut self) -> std::result::Result<bool, String> {
        for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Ok(v);
            }
        }
        Err(format!("expected True or False at byte {}", self.i))
    }
    fn tuple(&mut self) -> std::result::Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            let start = self.i;
            while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
                self.i += 1;
            }
            // Python 2 era files may write `3L`.
            let digits = std::str::from_utf8(&self.s[start..self.i]).expect("ascii digits");
            let _ = self.eat(b'L');
            let d: usize = digits
                .parse()
                .map_err(|_| format!("bad dimension at byte {start}"))?;
            dims.push(d);
            self.ws();
            if !self.eat(b',') {
                self.ws();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&[1, 0]);
        v.extend_from_slice(&(header.len() as u16).to_le_bytes());
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_written_header_round_trip() {
        for shape in [vec![], vec![3], vec![2, 5], vec![0, 4], vec![2, 3, 4]] {
            for dt in [
                TensorDType::Float(DType::F32),
                TensorDType::Float(DType::F16),
                TensorDType::I64,
                TensorDType::U32,
            ] {
                let mut bytes = header(&dt, &shape).unwrap();
                assert_eq!(bytes.len() % 64, 0);
                let n = checked_bytes(&shape, dt.size().unwrap()).unwrap();
                bytes.extend(std::iter::repeat_n(0u8, n));
                let e = parse(&bytes).unwrap();
                assert_eq!((e.dtype, e.shape), (dt.clone(), shape.clone()));
            }
        }
    }

    #[test]
    fn numpy_style_headers() {
        let f = file(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1), }   \n",
            &[0; 8],
        );
        let e = parse(&f).unwrap();
        assert_eq!(e.shape, vec![2, 1]);
        let f = file(
            "{'shape': (1,), 'descr': '<i8', 'fortran_order': False}",
            &[0; 8],
        );
        assert_eq!(parse(&f).unwrap().dtype, TensorDType::I64);
    }

    #[test]
    fn refuses_bad_files() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"\x93NUMP".to_vec(), "magic"),
            (file("{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }", &[0; 4]), "Fortran"),
            (file("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", &[0; 4]), "big-endian"),
            (file("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", &[0; 4]), "needs 8 data bytes"),
            (
                file(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4611686018427387904), }",
                    &[],
                ),
                "overflows",
            ),
            (file("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), ", &[0; 4]), "bad header"),
            (file("{'descr': '<f4', 'shape': (1,)}", &[0; 4]), "missing 'fortran_order'"),
        ];
        for (bytes, want) in cases {
            let e = parse(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
        let mut truncated = file(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            &[],
        );
        truncated[8] = 0xff; // header length past the end
        assert!(parse(&truncated)
            .unwrap_err()
            .to_string()
            .contains("past the end"));
    }

    #[test]
    fn bf16_is_refused_with_a_pointer_to_safetensors() {
        let e = header(&TensorDType::Float(DType::BF16), &[1]).unwrap_err();
        assert!(e.to_string().contains("safetensors"));
    }
}
