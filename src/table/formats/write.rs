//! Writing files safely: through a temporary name in the same directory, renamed into place
//! only after every byte is written and synced, so a failure never leaves a partial file.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{checked_bytes, npy, safetensors, Format, TensorDType};
use crate::error::{Error, Result};

/// A file being written under a temporary name; [`AtomicFile::commit`] renames it into place.
/// Dropping it without committing, or a commit that fails (flush, sync or rename), removes the
/// temporary file and leaves the destination as it was.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    writer: Option<BufWriter<File>>,
    /// Set once the rename succeeded: the temporary name no longer exists.
    renamed: bool,
}

impl AtomicFile {
    /// Create the temporary file beside `dest`.
    pub fn create(dest: &Path) -> Result<AtomicFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = dest
            .file_name()
            .ok_or_else(|| Error::format(Some(dest), "not a file path"))?;
        // A name taken by a file an earlier, killed process left (process ids repeat, in
        // containers especially) is skipped, not an error; the stale file is left alone.
        const ATTEMPTS: usize = 1000;
        let mut attempt = 0;
        let (tmp, file) = loop {
            let tmp = dir.join(format!(
                ".{}.tmp-{}-{}",
                file_name.to_string_lossy(),
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            match File::options().write(true).create_new(true).open(&tmp) {
                Ok(file) => break (tmp, file),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < ATTEMPTS => {
                    attempt += 1;
                }
                Err(e) => return Err(Error::io(dest, e)),
            }
        };
        Ok(AtomicFile {
            tmp,
            dest: dest.to_path_buf(),
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            renamed: false,
        })
    }

    /// Write bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let w = self.writer.as_mut().expect("not yet committed");
        w.write_all(bytes).map_err(|e| Error::io(&self.dest, e))
    }

    /// Flush, sync and rename into place. On error the temporary file is removed (when `self`
    /// drops) and the destination is untouched.
    pub fn commit(mut self) -> Result<()> {
        let w = self.writer.take().expect("committed once");
        let file = w
            .into_inner()
            .map_err(|e| Error::io(&self.dest, e.into_error()))?;
        // A file being replaced keeps its permissions (a private output stays private).
        if let Ok(meta) = fs::metadata(&self.dest) {
            file.set_permissions(meta.permissions())
                .map_err(|e| Error::io(&self.dest, e))?;
        }
        file.sync_all().map_err(|e| Error::io(&self.dest, e))?;
        drop(file);
        fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.renamed {
            // Close before removing (the writer's own flush error, if any, is moot now).
            drop(self.writer.take());
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// One tensor to write: name (ignored for `.npy`), dtype, shape and its little-endian bytes.
pub struct TensorToWrite<'a> {
    /// The tensor's name in a safetensors file.
    pub name: &'a str,
    /// Its element type.
    pub dtype: TensorDType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its data, `product(shape) * dtype.size()` bytes.
    pub data: &'a [u8],
}

/// Write tensors to `path` (format from the extension) atomically. `.npy` takes exactly one
/// tensor and no metadata.
pub fn write_tensors(
    path: &Path,
    tensors: &[TensorToWrite<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let format = Format::from_path(path)?;
    for t in tensors {
        let size = t.dtype.size().ok_or_else(|| {
            Error::InvalidArgument(format!("cannot write dtype {} to a file", t.dtype))
        })?;
        if checked_bytes(&t.shape, size) != Some(t.data.len()) {
            return Err(Error::ShapeMismatch(format!(
                "tensor {:?}: {} bytes do not fill shape {:?} of {}",
                t.name,
                t.data.len(),
                t.shape,
                t.dtype
            )));
        }
    }
    let header = match format {
        Format::Npy => {
            let [t] = tensors else {
                return Err(Error::InvalidArgument(format!(
                    "a .npy file holds exactly one tensor, {} given",
                    tensors.len()
                )));
            };
            npy::header(&t.dtype, &t.shape)?
        }
        Format::SafeTensors => {
            let list: Vec<_> = tensors
                .iter()
                .map(|t| (t.name, &t.dtype, t.shape.as_slice(), t.data.len()))
                .collect();
            safetensors::header(&list, metadata)?
        }
    };
    let mut file = AtomicFile::create(path)?;
    file.write_all(&header)?;
    for t in tensors {
        file.write_all(t.data)?;
    }
    file.commit()
}

/// Start a file holding one tensor whose data the caller streams in: returns the open file
/// with the header written. The caller writes exactly `product(shape) * size` bytes, then
/// commits.
pub fn begin_single_tensor(
    path: &Path,
    name: &str,
    dtype: &TensorDType,
    shape: &[usize],
) -> Result<AtomicFile> {
    let size = dtype
        .size()
        .ok_or_else(|| Error::InvalidArgument(format!("cannot write dtype {dtype}")))?;
    let len = checked_bytes(shape, size)
        .ok_or_else(|| Error::InvalidArgument(format!("shape {shape:?} overflows")))?;
    let header = match Format::from_path(path)? {
        Format::Npy => npy::header(dtype, shape)?,
        Format::SafeTensors => safetensors::header(&[(name, dtype, shape, len)], &BTreeMap::new())?,
    };
    let mut file = AtomicFile::create(path)?;
    file.write_all(&header)?;
    Ok(file)
}
