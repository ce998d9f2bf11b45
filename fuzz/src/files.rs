//! `safetensors_file` and `npy_file`: arbitrary bytes as a file. Parsing and opening in every
//! mode must give an error or a correct table, never a panic; a table must match the bytes it
//! came from, and every row must look up.

use std::path::PathBuf;
use std::sync::OnceLock;

use embedding_lookup::table::formats::{self, Format, TensorDType, TensorEntry};
use embedding_lookup::{DType, Error, OpenMode, OpenOptions, StorageKind, Table};

use crate::file_reference::{self, RefTensor, Verdict};
use crate::reference::{self, Ty};

/// Rows looked up at each end of a table (tables of 10^12 empty rows exist).
const EDGE_ROWS: usize = 64;

/// A file path private to this process and thread, with the given extension.
fn scratch(ext: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("emb-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the scratch directory");
        d
    });
    let thread = format!("{:?}", std::thread::current().id());
    let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
    dir.join(format!("input-{thread}.{ext}"))
}

/// Check one file's bytes; `ext` is `safetensors` or `npy`.
pub fn check(bytes: &[u8], ext: &str) {
    let path = scratch(ext);
    std::fs::write(&path, bytes).expect("write the scratch file");
    let format = Format::from_path(&path).expect("known extension");

    // What the file is, by the reference readers; the library's parser must agree with them
    // wherever they are sure.
    let verdict = match ext {
        "npy" => file_reference::npy(bytes),
        _ => file_reference::safetensors(bytes),
    };
    let parsed = formats::parse(bytes, format);
    match (&verdict, &parsed) {
        (Verdict::Valid(want), Ok(p)) => {
            assert_eq!(
                p.entries.len(),
                want.len(),
                "{:?} against {want:?}",
                p.entries
            );
            for (got, want) in p.entries.iter().zip(want) {
                assert_eq!(
                    (&got.name, &got.shape, &got.data),
                    (&want.name, &want.shape, &want.data),
                    "{got:?} against {want:?}"
                );
                assert_eq!(
                    reference_dtype(want.dtype),
                    got.dtype,
                    "{got:?} against {want:?}"
                );
            }
        }
        (Verdict::Valid(want), Err(e)) => panic!("a valid file refused: {e}; it holds {want:?}"),
        (Verdict::Invalid(why), Ok(p)) => panic!("a file that {why} parsed: {:?}", p.entries),
        (Verdict::Invalid(_), Err(e)) | (Verdict::Unsure, Err(e)) => {
            assert_eq!(e.kind(), "format", "{e}")
        }
        (Verdict::Unsure, Ok(p)) => {
            // Accepted by the library's policy: at least consistent with the bytes.
            for e in &p.entries {
                assert!(
                    e.data.start <= e.data.end && e.data.end <= bytes.len(),
                    "{e:?}"
                );
                if let Some(size) = e.dtype.size() {
                    assert!(e.shape.iter().all(|&d| d <= isize::MAX as usize), "{e:?}");
                    let n = if e.shape.contains(&0) {
                        0
                    } else {
                        e.shape
                            .iter()
                            .try_fold(size, |a, &d| a.checked_mul(d))
                            .expect("an accepted shape does not overflow")
                    };
                    assert_eq!(n, e.data.len(), "{e:?}");
                }
                if format == Format::Npy {
                    assert_eq!(e.data.end, bytes.len(), "npy data runs to the end");
                }
            }
        }
    }
    // The tensors opening is judged against: the reference's where it is sure.
    let entries: Option<Vec<TensorEntry>> = match &verdict {
        Verdict::Valid(tensors) => Some(tensors.iter().map(entry_of).collect()),
        Verdict::Invalid(_) => None,
        Verdict::Unsure => parsed.as_ref().ok().map(|p| p.entries.clone()),
    };

    let mut names: Vec<Option<&str>> = vec![None, Some("weight"), Some("")];
    if let Some(entries) = &entries {
        names.extend(entries.iter().take(4).map(|e| Some(e.name.as_str())));
    }
    for name in names {
        for mode in [OpenMode::Map, OpenMode::MapWritable, OpenMode::Copy] {
            let want = entries
                .as_ref()
                .and_then(|entries| expected_table(entries, name, mode));
            let got = Table::open_with(
                &path,
                &OpenOptions {
                    tensor: name,
                    mode,
                    ..Default::default()
                },
            );
            match (got, want) {
                (Ok(t), Some(entry)) => check_table(&t, &entry, bytes, mode),
                (Err(e), None) => assert_eq!(e.kind(), "format", "{e}"),
                (Ok(t), None) => panic!("{mode:?} {name:?}: opened {t:?}, expected an error"),
                (Err(e), Some(entry)) => {
                    panic!("{mode:?} {name:?}: {e}, expected a table from {entry:?}")
                }
            }
            // Opening writable must not change the file.
            if mode == OpenMode::MapWritable {
                assert_eq!(std::fs::read(&path).expect("read back"), bytes);
            }
        }
    }
    let plain = Table::open(&path, None).map(|t| t.as_bytes().to_vec());
    let mapped = Table::open_with(&path, &OpenOptions::default()).map(|t| t.as_bytes().to_vec());
    assert_eq!(plain.ok(), mapped.ok());
}

/// The library's name for a dtype the reference names as the file does.
fn reference_dtype(name: &str) -> TensorDType {
    match name {
        "F32" => TensorDType::Float(DType::F32),
        "F16" => TensorDType::Float(DType::F16),
        "BF16" => TensorDType::Float(DType::BF16),
        "I32" => TensorDType::I32,
        "I64" => TensorDType::I64,
        "U32" => TensorDType::U32,
        "U64" => TensorDType::U64,
        "I8" => TensorDType::I8,
        "I16" => TensorDType::I16,
        "U8" => TensorDType::U8,
        "U16" => TensorDType::U16,
        "F64" => TensorDType::F64,
        other => TensorDType::Other(other.to_string()),
    }
}

fn entry_of(t: &RefTensor) -> TensorEntry {
    TensorEntry {
        name: t.name.clone(),
        dtype: reference_dtype(t.dtype),
        shape: t.shape.clone(),
        data: t.data.clone(),
    }
}

/// The entry a table must come from, or `None` when opening must fail: named, or the only
/// 2-D tensor; a float dtype; 2-D; aligned data for a writable map.
fn expected_table(
    entries: &[TensorEntry],
    name: Option<&str>,
    mode: OpenMode,
) -> Option<TensorEntry> {
    let entry = match name {
        Some(n) => entries.iter().find(|e| e.name == n)?,
        None => {
            let mut two_d = entries.iter().filter(|e| e.shape.len() == 2);
            let one = two_d.next()?;
            if two_d.next().is_some() {
                return None;
            }
            one
        }
    };
    let TensorDType::Float(d) = entry.dtype else {
        return None;
    };
    if entry.shape.len() != 2 {
        return None;
    }
    // One row's bytes must fit an isize even when there are no rows.
    if entry.shape[1].checked_mul(d.size())? > isize::MAX as usize {
        return None;
    }
    if mode == OpenMode::MapWritable && !entry.data.start.is_multiple_of(d.size()) {
        return None;
    }
    Some(entry.clone())
}

fn check_table(t: &Table<'_>, entry: &TensorEntry, bytes: &[u8], mode: OpenMode) {
    let TensorDType::Float(dtype) = entry.dtype else {
        unreachable!("expected_table accepts float tensors only")
    };
    let (rows, dim) = (entry.shape[0], entry.shape[1]);
    assert_eq!((t.rows(), t.dim(), t.dtype()), (rows, dim, dtype));
    let data = &bytes[entry.data.clone()];
    assert_eq!(t.as_bytes(), data);
    let aligned = entry.data.start.is_multiple_of(dtype.size());
    let (kind, zero_copy) = match mode {
        OpenMode::Map if aligned => (StorageKind::Mapped, true),
        OpenMode::Map | OpenMode::Copy => (StorageKind::Owned, false),
        OpenMode::MapWritable => (StorageKind::MappedWritable, true),
    };
    assert_eq!((t.storage_kind(), t.is_zero_copy()), (kind, zero_copy));

    // Every row at both ends looks up, natively and widened to f32; one past the end fails.
    let mut idx: Vec<u64> = (0..rows.min(EDGE_ROWS) as u64).collect();
    idx.extend((rows.saturating_sub(EDGE_ROWS).max(EDGE_ROWS.min(rows))..rows).map(|r| r as u64));
    let values: Vec<i128> = idx.iter().map(|&i| i as i128).collect();
    let ty = match dtype {
        DType::F32 => Ty::F32,
        DType::F16 => Ty::F16,
        DType::BF16 => Ty::Bf16,
    };
    let native: Result<Vec<u8>, Error> = match dtype {
        DType::F32 => t
            .lookup::<u64, f32>(&idx)
            .map(|v| bytemuck::cast_slice::<_, u8>(&v).to_vec()),
        DType::F16 => t
            .lookup::<u64, half::f16>(&idx)
            .map(|v| bytemuck::cast_slice::<_, u8>(&v).to_vec()),
        DType::BF16 => t
            .lookup::<u64, half::bf16>(&idx)
            .map(|v| bytemuck::cast_slice::<_, u8>(&v).to_vec()),
    };
    assert_eq!(
        native.expect("valid rows look up"),
        reference::gather(data, ty, dim, &values, false)
    );
    let wide: Vec<f32> = t.lookup(&idx).expect("valid rows widen to f32");
    assert_eq!(
        bytemuck::cast_slice::<f32, u8>(&wide),
        &reference::gather(data, ty, dim, &values, dtype != DType::F32)[..]
    );
    match t.lookup::<u64, f32>(&[rows as u64]) {
        Err(Error::IndexOutOfRange { position: 0, .. }) => {}
        other => panic!("row {rows} of {rows}: {:?}", other.map(|v| v.len())),
    }
}
