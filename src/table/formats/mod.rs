//! Tensor file formats: `.safetensors` (parsed by the `safetensors` crate) and `.npy` (parsed
//! here, every size checked).
//!
//! Parsing yields [`TensorEntry`]s: a name, an element type, a shape and the byte range of the
//! data inside the file, so a table can be viewed in place in a file map.

pub mod npy;
pub mod safetensors;
mod write;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use write::{begin_single_tensor, write_tensors, AtomicFile, TensorToWrite};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// A file format, chosen by the file's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `.safetensors`: many named tensors, little-endian, C order.
    SafeTensors,
    /// `.npy`: one unnamed tensor.
    Npy,
}

impl Format {
    /// The format of a path, from its extension.
    pub fn from_path(path: &Path) -> Result<Format> {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("safetensors") => Ok(Format::SafeTensors),
            Some(e) if e.eq_ignore_ascii_case("npy") => Ok(Format::Npy),
            _ => Err(Error::format(
                Some(path),
                "unknown file extension (expected .safetensors or .npy)",
            )),
        }
    }
}

/// The element type of a tensor in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorDType {
    /// A float type a table can hold.
    Float(DType),
    /// Signed 32-bit integers.
    I32,
    /// Signed 64-bit integers.
    I64,
    /// Unsigned 32-bit integers.
    U32,
    /// Unsigned 64-bit integers.
    U64,
    /// Signed 8-bit integers (indices, widened when read).
    I8,
    /// Signed 16-bit integers (indices, widened when read).
    I16,
    /// Unsigned 8-bit integers (indices, widened when read).
    U8,
    /// Unsigned 16-bit integers (indices, widened when read).
    U16,
    /// IEEE 754 double precision: not a table dtype, but `emb convert` reads it.
    F64,
    /// Anything else, by its name in the file (`BOOL`, `|b1`, ...).
    Other(String),
}

impl TensorDType {
    /// Whether this is an integer type (an index tensor, never a table).
    pub fn is_integer(&self) -> bool {
        matches!(
            self,
            TensorDType::I8
                | TensorDType::I16
                | TensorDType::I32
                | TensorDType::I64
                | TensorDType::U8
                | TensorDType::U16
                | TensorDType::U32
                | TensorDType::U64
        )
    }

    /// Bytes per element, if known.
    pub fn size(&self) -> Option<usize> {
        match self {
            TensorDType::Float(d) => Some(d.size()),
            TensorDType::I32 | TensorDType::U32 => Some(4),
            TensorDType::I64 | TensorDType::U64 | TensorDType::F64 => Some(8),
            TensorDType::I8 | TensorDType::U8 => Some(1),
            TensorDType::I16 | TensorDType::U16 => Some(2),
            TensorDType::Other(_) => None,
        }
    }
}

impl fmt::Display for TensorDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorDType::Float(d) => write!(f, "{d}"),
            TensorDType::I32 => f.write_str("i32"),
            TensorDType::I64 => f.write_str("i64"),
            TensorDType::U32 => f.write_str("u32"),
            TensorDType::U64 => f.write_str("u64"),
            TensorDType::I8 => f.write_str("i8"),
            TensorDType::I16 => f.write_str("i16"),
            TensorDType::U8 => f.write_str("u8"),
            TensorDType::U16 => f.write_str("u16"),
            TensorDType::F64 => f.write_str("f64"),
            TensorDType::Other(s) => f.write_str(s),
        }
    }
}

/// One tensor inside a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Its name (`.npy` files hold one tensor, named `""`).
    pub name: String,
    /// Its element type.
    pub dtype: TensorDType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Where its bytes are in the file; the length matches dtype and shape.
    pub data: Range<usize>,
}

impl TensorEntry {
    /// `name (dtype, [d0, d1])`, for listings and error messages.
    pub fn describe(&self) -> String {
        let name = if self.name.is_empty() {
            "<npy>"
        } else {
            &self.name
        };
        format!("{name} ({}, {:?})", self.dtype, self.shape)
    }
}

/// Parse a whole file's bytes.
pub fn parse(bytes: &[u8], format: Format) -> Result<ParsedFile> {
    match format {
        Format::SafeTensors => safetensors::parse(bytes),
        Format::Npy => npy::parse(bytes).map(|e| ParsedFile {
            entries: vec![e],
            metadata: BTreeMap::new(),
        }),
    }
}

/// The result of parsing a file: its tensors, sorted by name, and its string metadata.
#[derive(Clone, Debug, Default)]
pub struct ParsedFile {
    /// The tensors, sorted by name.
    pub entries: Vec<TensorEntry>,
    /// `__metadata__` of a safetensors file; empty for `.npy`.
    pub metadata: BTreeMap<String, String>,
}

impl ParsedFile {
    /// Pick a tensor: by name, or the only tensor of the wanted rank when no name is given.
    /// A rank of 2 asks for a table, so integer tensors (ids, `position_ids`) are not offered.
    pub fn select(
        &self,
        name: Option<&str>,
        rank: Option<usize>,
        path: &Path,
    ) -> Result<&TensorEntry> {
        if let Some(name) = name {
            return self.entries.iter().find(|e| e.name == name).ok_or_else(|| {
                Error::format(
                    Some(path),
                    format!("no tensor named {name:?}; {}", self.closest(name)),
                )
            });
        }
        let of_rank: Vec<&TensorEntry> = self
            .entries
            .iter()
            .filter(|e| rank.is_none_or(|r| e.shape.len() == r))
            .collect();
        let candidates: Vec<&TensorEntry> = if rank == Some(2) {
            of_rank
                .iter()
                .copied()
                .filter(|e| !e.dtype.is_integer())
                .collect()
        } else {
            of_rank.clone()
        };
        // The only tensor of the rank is picked even when it is no table, so that the caller
        // can say why it is not (integers are indices) rather than that none was found.
        match (candidates.as_slice(), of_rank.as_slice()) {
            ([one], _) | ([], [one]) => Ok(one),
            _ => {
                let what = match rank {
                    Some(2) => "2-D tensors of floats".to_string(),
                    Some(r) => format!("{r}-D tensors"),
                    None => "tensors".to_string(),
                };
                let list: Vec<String> = candidates.iter().map(|e| e.describe()).collect();
                Err(Error::format(
                    Some(path),
                    format!(
                        "the file holds {} {what}, so a tensor name is needed \
                         (FILE:TENSOR); {what}: {}",
                        candidates.len(),
                        if list.is_empty() {
                            "none".to_string()
                        } else {
                            list.join(", ")
                        }
                    ),
                ))
            }
        }
    }

    /// The file's tensors closest to a name that matched none: all of them when there are a
    /// few, else the count and the five nearest by edit distance.
    fn closest(&self, name: &str) -> String {
        const SHOWN: usize = 5;
        if self.entries.len() <= SHOWN {
            return format!("the file holds: {}", self.listing(None));
        }
        let mut ranked: Vec<(usize, &TensorEntry)> = self
            .entries
            .iter()
            .map(|e| (edit_distance(name, &e.name), e))
            .collect();
        ranked.sort_by_key(|&(d, e)| (d, e.name.len()));
        let near: Vec<String> = ranked[..SHOWN].iter().map(|(_, e)| e.describe()).collect();
        format!(
            "did you mean one of: {}? (the file holds {} tensors; `emb info FILE` lists them)",
            near.join(", "),
            self.entries.len()
        )
    }

    fn listing(&self, rank: Option<usize>) -> String {
        let list: Vec<String> = self
            .entries
            .iter()
            .filter(|e| rank.is_none_or(|r| e.shape.len() == r))
            .map(TensorEntry::describe)
            .collect();
        if list.is_empty() {
            "none".to_string()
        } else {
            list.join(", ")
        }
    }
}

/// A `FILE[:TENSOR]` argument split into its parts. A colon counts as a separator only when
/// what precedes it is an existing file or has a known extension, so paths with colons work.
pub fn split_tensor_spec(spec: &str) -> (PathBuf, Option<String>) {
    if let Some((file, name)) = spec.rsplit_once(':') {
        let p = Path::new(file);
        if !name.contains('/') && (p.is_file() || Format::from_path(p).is_ok()) {
            return (p.to_path_buf(), Some(name.to_string()));
        }
    }
    (PathBuf::from(spec), None)
}

/// Checked product of a shape's dimensions and an element size: `None` when a dimension or
/// the byte count exceeds `isize::MAX`. A zero dimension makes the tensor empty whatever the
/// others are (numpy and PyTorch accept shape `(huge, 0)`), so it is no overflow.
pub(crate) fn checked_bytes(shape: &[usize], elem: usize) -> Option<usize> {
    if shape.iter().any(|&d| d > isize::MAX as usize) {
        return None;
    }
    if shape.contains(&0) {
        return Some(0);
    }
    shape
        .iter()
        .try_fold(elem, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize)
}

/// Levenshtein distance between two names, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}
