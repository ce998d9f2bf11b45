//! Reading `FILE[:TENSOR]` arguments: tables and index tensors.

use std::path::{Path, PathBuf};

use embedding_lookup::table::formats::{self, Format, TensorDType};
use embedding_lookup::table::Residency;
use embedding_lookup::{Error, OpenMode, OpenOptions, Table};
use memmap2::Mmap;

/// Open a table from `FILE[:TENSOR]`.
pub fn open_table(
    spec: &str,
    mode: OpenMode,
    residency: Residency,
) -> Result<(Table<'static>, PathBuf), Error> {
    let (path, tensor) = formats::split_tensor_spec(spec);
    let table = Table::open_with(
        &path,
        &OpenOptions {
            tensor: tensor.as_deref(),
            mode,
            residency,
            populate: false,
        },
    )?;
    Ok((table, path))
}

/// Indices read from a file, in the type the file holds.
pub enum IndexData {
    I32(Vec<i32>),
    I64(Vec<i64>),
    U32(Vec<u32>),
    U64(Vec<u64>),
}

/// An index tensor: shape and values.
pub struct Indices {
    pub shape: Vec<usize>,
    pub data: IndexData,
}

impl Indices {
    pub fn len(&self) -> usize {
        match &self.data {
            IndexData::I32(v) => v.len(),
            IndexData::I64(v) => v.len(),
            IndexData::U32(v) => v.len(),
            IndexData::U64(v) => v.len(),
        }
    }
}

/// Read an index tensor from `FILE[:TENSOR]` (`.npy` or safetensors integers of 1 to 8 bytes,
/// the narrow ones widened; with no name, the file must hold one tensor).
pub fn read_indices(spec: &str) -> Result<Indices, Error> {
    let (path, name) = formats::split_tensor_spec(spec);
    let (entry, map) = open_entry(&path, name.as_deref())?;
    let bytes = &map[entry.data.clone()];
    // Narrow integer types (numpy's int8/int16/uint8/uint16) are widened, exactly.
    fn widen<T: bytemuck::Pod, W: From<T>>(bytes: &[u8]) -> Vec<W> {
        bytemuck::pod_collect_to_vec::<u8, T>(bytes)
            .into_iter()
            .map(W::from)
            .collect()
    }
    let data = match entry.dtype {
        TensorDType::I32 => IndexData::I32(bytemuck::pod_collect_to_vec(bytes)),
        TensorDType::I64 => IndexData::I64(bytemuck::pod_collect_to_vec(bytes)),
        TensorDType::U32 => IndexData::U32(bytemuck::pod_collect_to_vec(bytes)),
        TensorDType::U64 => IndexData::U64(bytemuck::pod_collect_to_vec(bytes)),
        TensorDType::I8 => IndexData::I32(widen::<i8, i32>(bytes)),
        TensorDType::I16 => IndexData::I32(widen::<i16, i32>(bytes)),
        TensorDType::U8 => IndexData::U32(widen::<u8, u32>(bytes)),
        TensorDType::U16 => IndexData::U32(widen::<u16, u32>(bytes)),
        ref other => {
            return Err(bad(
                &path,
                format!(
                    "indices {} have dtype {other}, which is not an index type: indices must be \
                     integers (int8, int16, int32, int64, uint8, uint16, uint32 or uint64); \
                     in NumPy, `ids.astype(np.int64)`",
                    entry.describe()
                ),
            ))
        }
    };
    Ok(Indices {
        shape: entry.shape,
        data,
    })
}

/// Read a float tensor (per-sample weights and the like) from `FILE[:TENSOR]`, widened to f32.
#[allow(dead_code)]
pub fn read_f32(spec: &str) -> Result<(Vec<usize>, Vec<f32>), Error> {
    let (path, name) = formats::split_tensor_spec(spec);
    let (entry, map) = open_entry(&path, name.as_deref())?;
    let TensorDType::Float(d) = entry.dtype else {
        return Err(bad(
            &path,
            format!("{} is not a float tensor", entry.describe()),
        ));
    };
    let n: usize = entry.shape.iter().product();
    let mut out = vec![0.0f32; n];
    embedding_lookup::table::convert_bytes(
        d,
        &map[entry.data.clone()],
        embedding_lookup::DType::F32,
        bytemuck::cast_slice_mut(&mut out),
    );
    Ok((entry.shape, out))
}

/// Map a file and pick one tensor (by name, or the only one).
fn open_entry(path: &Path, name: Option<&str>) -> Result<(formats::TensorEntry, Mmap), Error> {
    open_entry_of_rank(path, name, None)
}

/// Map a file and pick one tensor: by name, or the only one of `rank` dimensions.
pub fn open_entry_of_rank(
    path: &Path,
    name: Option<&str>,
    rank: Option<usize>,
) -> Result<(formats::TensorEntry, Mmap), Error> {
    let format = Format::from_path(path)?;
    let file = std::fs::File::open(path).map_err(|e| Error::Io {
        path: Some(path.to_path_buf()),
        source: e,
    })?;
    // SAFETY: the map is read once, right away, into owned vectors; the file is not expected to
    // change during that read (the same hazard as any mapped read, documented on Table::open).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::Io {
        path: Some(path.to_path_buf()),
        source: e,
    })?;
    let parsed = formats::parse(&map, format).map_err(|e| match e {
        Error::Format { path: None, reason } => bad(path, reason),
        other => other,
    })?;
    let entry = parsed.select(name, rank, path)?.clone();
    Ok((entry, map))
}

/// Refuse to write `output` when it is the same file as `input` (by device and inode, so a
/// symlink, hard link or another spelling of the path is caught too): renaming the result over
/// it would destroy the input. A missing output is never the input.
pub fn refuse_overwriting_input(output: &Path, input: &Path, what: &str) -> Result<(), Error> {
    if same_file(output, input) {
        return Err(Error::InvalidArgument(format!(
            "the output {} is the input {what} {} (the same file): writing it would replace \
             the input; choose another output path",
            output.display(),
            input.display()
        )));
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (ma.dev(), ma.ino()) == (mb.dev(), mb.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = (ma, mb);
        matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    }
}

fn bad(path: &Path, reason: String) -> Error {
    Error::Format {
        path: Some(path.to_path_buf()),
        reason,
    }
}
