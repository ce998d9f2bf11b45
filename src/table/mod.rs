//! The embedding table: `rows × dim` elements of f32, f16 or bf16, row-major, over owned,
//! borrowed or memory-mapped storage.

pub(crate) mod disk;
pub mod formats;
mod residency;
mod storage;

use std::fs::File;
use std::path::Path;

use half::{bf16, f16};
use memmap2::MmapOptions;

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::index::{normalize_padding_idx, Index};
pub use disk::drop_cached_pages;
use formats::{Format, TensorDType, TensorEntry, TensorToWrite};
pub use residency::{available_memory, Residency};
pub use storage::StorageKind;
use storage::{AlignedBuf, Storage};

/// An embedding table: `rows × dim` elements, row-major, of one [`DType`].
///
/// One type serves every storage. The lifetime `'a` is that of a borrowed slice (`'static` for
/// owned and mapped tables); whether the table may be written (in-place renorm, optimizer steps)
/// is [`StorageKind::is_writable`], and writing needs `&mut Table`, so a table shared between
/// threads is only ever read.
///
/// ```
/// use embedding_lookup::{DType, Table};
///
/// let table = Table::from_slice(&[0.0f32, 1.0, 10.0, 11.0, 20.0, 21.0], 3, 2)?;
/// assert_eq!((table.rows(), table.dim(), table.dtype()), (3, 2, DType::F32));
/// let out: Vec<f32> = table.lookup(&[2i64, 0])?;
/// assert_eq!(out, [20.0, 21.0, 0.0, 1.0]);
/// # Ok::<(), embedding_lookup::Error>(())
/// ```
///
/// # Threads
///
/// A table is `Send + Sync`: any number of threads may look up the same `&Table` at once, and
/// get the same results as one thread. Everything that writes a table takes `&mut Table`, so
/// the borrow checker refuses a write while any thread still holds the table:
///
/// ```compile_fail,E0502
/// use embedding_lookup::{DType, Table};
///
/// let mut table = Table::zeros(4, 2, DType::F32)?;
/// std::thread::scope(|s| {
///     s.spawn(|| table.lookup::<i64, f32>(&[0, 3]));
///     table.as_mut_slice::<f32>()?[0] = 1.0; // error: `table` is borrowed by the thread
///     Ok::<(), embedding_lookup::Error>(())
/// })?;
/// # Ok::<(), embedding_lookup::Error>(())
/// ```
///
/// The same write after the threads are done compiles:
///
/// ```
/// use embedding_lookup::{DType, Table};
///
/// let mut table = Table::zeros(4, 2, DType::F32)?;
/// std::thread::scope(|s| {
///     s.spawn(|| table.lookup::<i64, f32>(&[0, 3]));
/// });
/// table.as_mut_slice::<f32>()?[0] = 1.0;
/// # Ok::<(), embedding_lookup::Error>(())
/// ```
///
/// A shared reference never writes:
///
/// ```compile_fail,E0596
/// fn scale(table: &embedding_lookup::Table<'_>) {
///     table.as_mut_slice::<f32>().unwrap()[0] *= 2.0; // error: behind a `&` reference
/// }
/// ```
///
/// and a table over the caller's slice holds it exclusively while it lives:
///
/// ```compile_fail,E0502
/// let mut data = vec![0.0f32; 8];
/// let table = embedding_lookup::Table::borrowed_mut(&mut data, 4, 2)?;
/// println!("{}", data[0]); // error: `data` is mutably borrowed by `table`
/// drop(table);
/// # Ok::<(), embedding_lookup::Error>(())
/// ```
pub struct Table<'a> {
    storage: Storage<'a>,
    dtype: DType,
    rows: usize,
    dim: usize,
    padding_idx: Option<usize>,
    zero_copy: bool,
    /// The policy in force: [`Residency::Resident`] for every storage but an out-of-core map.
    residency: Residency,
    /// The file an out-of-core table's pages are read from ahead of each operation.
    disk: Option<Box<disk::DiskSource>>,
    /// The file a mapped table views.
    source_path: Option<std::path::PathBuf>,
}

// Sharing a table between threads is sound: its storage is read through `&self` only, and
// written only through `&mut self` (owned buffers, `&mut [u8]` and writable maps are all
// `Send + Sync`). This fails to compile if a storage ever stops being so.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Table<'static>>();
};

/// How [`Table::open_with`] brings a file's table into memory.
///
/// # Files changed after opening
///
/// A mapped table ([`Map`](OpenMode::Map), [`MapWritable`](OpenMode::MapWritable)) views the
/// file's pages, so what happens to the file later reaches the table:
///
/// - **Truncated in place** (or rewritten shorter, `open(O_TRUNC)` then `write`): reading a
///   row beyond the file's new end raises SIGBUS, which kills the process. No check can
///   prevent this once the map exists; use [`Copy`](OpenMode::Copy) when another program
///   may shorten the file.
/// - **Rewritten in place**: the table's values change under it (and two writable maps of the
///   same file see each other's writes).
/// - **Replaced by renaming** a new file over it, as [`Table::save`] and every `emb` output
///   do: safe. The map keeps the old file's pages until the table is dropped.
///
/// An out-of-core table ([`Residency::OutOfCore`]) reads each batch's missing pages ahead
/// with ordinary reads: a read that fails or comes back short because the file shrank is an
/// [`Error::DiskRead`] naming the file and offset, before any row of
/// that window is copied. A truncation between that read and the copy still raises SIGBUS.
///
/// What is guarded: every size in the header is checked, with overflow-checked arithmetic,
/// against the file's length when it is mapped, before any tensor byte is read; a writable
/// map is re-checked after remapping. `Copy` reads the data once while opening and owns it
/// afterwards: the file may then be truncated, rewritten or deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OpenMode {
    /// Map the file read-only and view the data in place when it is aligned for its dtype
    /// (copy once otherwise). The default.
    #[default]
    Map,
    /// Map the file writable and shared: in-place renorm and optimizer steps reach the file.
    /// The data must be aligned for its dtype.
    MapWritable,
    /// Read the tensor into owned memory: immune to the file being truncated or replaced later.
    Copy,
}

/// Options of [`Table::open_with`].
#[derive(Clone, Debug, Default)]
pub struct OpenOptions<'n> {
    /// The tensor to take from a safetensors file; `None` takes the only 2-D tensor.
    pub tensor: Option<&'n str>,
    /// How to bring the data in.
    pub mode: OpenMode,
    /// Whether a mapped table is kept in memory or served from disk; [`Residency::Auto`]
    /// (the default) decides from its size. Ignored by [`OpenMode::Copy`].
    pub residency: Residency,
    /// Read a resident map's pages in full while opening (at the disk's sequential speed),
    /// so that the first lookups do not fault them in one by one. Ignored out of core.
    pub populate: bool,
}

impl Table<'static> {
    /// A table of zeros.
    pub fn zeros(rows: usize, dim: usize, dtype: DType) -> Result<Self> {
        let len = table_bytes(rows, dim, dtype)?;
        Ok(Table {
            storage: Storage::Owned(AlignedBuf::zeroed(len)?),
            dtype,
            rows,
            dim,
            padding_idx: None,
            zero_copy: false,
            residency: Residency::Resident,
            disk: None,
            source_path: None,
        })
    }

    /// A table holding a copy of `data` (`rows * dim` elements, row-major).
    pub fn from_slice<T: Element>(data: &[T], rows: usize, dim: usize) -> Result<Self> {
        check_len(data.len(), rows, dim, T::DTYPE)?;
        let mut t = Table::zeros(rows, dim, T::DTYPE)?;
        t.bytes_mut_unchecked()
            .copy_from_slice(bytemuck::cast_slice(data));
        Ok(t)
    }

    /// A table of standard normal values from a seeded generator (deterministic for a seed), as
    /// `nn.Embedding` initialises its weight.
    pub fn randn(rows: usize, dim: usize, dtype: DType, seed: u64) -> Result<Self> {
        let mut t = Table::zeros(rows, dim, dtype)?;
        let mut rng = crate::util::Rng::new(seed);
        match dtype {
            DType::F32 => fill(t.as_mut_slice::<f32>()?, &mut rng),
            DType::F16 => fill(t.as_mut_slice::<f16>()?, &mut rng),
            DType::BF16 => fill(t.as_mut_slice::<bf16>()?, &mut rng),
        }
        Ok(t)
    }

    /// A fresh table as `nn.Embedding(rows, dim, padding_idx=p)` makes it: standard normal
    /// values, the padding row zeroed, the padding index recorded.
    pub fn new_embedding(
        rows: usize,
        dim: usize,
        dtype: DType,
        padding_idx: Option<i64>,
        seed: u64,
    ) -> Result<Self> {
        if let Some(p) = padding_idx {
            normalize_padding_idx(p, rows)?;
        }
        let mut t = Table::randn(rows, dim, dtype, seed)?;
        if let Some(p) = padding_idx {
            t = t.with_padding_idx(p)?;
            let row = t.padding_idx.expect("just set");
            let rb = t.row_bytes();
            t.bytes_mut_unchecked()[row * rb..(row + 1) * rb].fill(0);
        }
        Ok(t)
    }

    /// Open a table file (`.safetensors` or `.npy`) read-only, mapped and viewed in place when
    /// aligned. With no tensor name, a safetensors file must hold exactly one 2-D tensor.
    ///
    /// A mapped file must not be truncated or rewritten in place while the table is alive: the
    /// operating system would then fault (SIGBUS) on access. Replacing it by a rename is safe.
    /// Use [`OpenMode::Copy`] where another process may change the file; see [`OpenMode`].
    ///
    /// ```
    /// use embedding_lookup::{DType, Table};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("model.safetensors");
    /// let made = Table::new_embedding(100, 8, DType::BF16, Some(0), 7)?;
    /// made.save_as(&path, "embed_tokens.weight")?;
    ///
    /// let table = Table::open(&path, Some("embed_tokens.weight"))?;
    /// assert_eq!((table.rows(), table.dim(), table.dtype()), (100, 8, DType::BF16));
    /// assert!(table.is_zero_copy()); // the file's pages, viewed in place
    /// let out: Vec<f32> = table.lookup(&[5i64, 0])?;
    /// assert_eq!(out, made.lookup::<i64, f32>(&[5, 0])?);
    /// assert!(out[8..].iter().all(|&v| v == 0.0)); // row 0 is the zeroed padding row
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(path: impl AsRef<Path>, tensor: Option<&str>) -> Result<Self> {
        Table::open_with(
            path,
            &OpenOptions {
                tensor,
                ..OpenOptions::default()
            },
        )
    }

    /// Open a table file with explicit options.
    pub fn open_with(path: impl AsRef<Path>, options: &OpenOptions<'_>) -> Result<Self> {
        let path = path.as_ref();
        let format = Format::from_path(path)?;
        let writable = options.mode == OpenMode::MapWritable;
        let file = File::options()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        // The map's length is taken from the file now; parsing then checks every header size
        // against it, so nothing is read beyond what the file held when it was opened.
        let map = {
            // SAFETY: mapping a file is sound as long as nobody truncates or rewrites it while
            // mapped; that hazard is documented on `open` and avoided with OpenMode::Copy.
            unsafe { MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?
        };
        let parsed = formats::parse(&map, format).map_err(|e| e.with_path(path))?;
        let entry = parsed.select(options.tensor, Some(2), path)?.clone();
        let dtype = table_dtype(&entry, path)?;
        let [rows, dim] = entry.shape[..] else {
            return Err(Error::format(
                Some(path),
                format!("tensor {} is not 2-D (rows × dim)", entry.describe()),
            ));
        };
        table_bytes(rows, dim, dtype)
            .map_err(|e| Error::format(Some(path), format!("tensor {}: {e}", entry.describe())))?;
        let aligned = entry.data.start % dtype.size() == 0;
        let residency = match options.mode {
            OpenMode::Copy => Residency::Resident,
            OpenMode::Map | OpenMode::MapWritable => options
                .residency
                .resolve(entry.data.len() as u64, available_memory()),
        };
        if options.mode == OpenMode::Map {
            advise(&map, residency);
        }
        let storage = match options.mode {
            OpenMode::Map if aligned => Storage::Map(map, entry.data.clone()),
            OpenMode::Map | OpenMode::Copy => {
                let mut buf = AlignedBuf::zeroed(entry.data.len())?;
                buf.as_mut_slice().copy_from_slice(&map[entry.data.clone()]);
                Storage::Owned(buf)
            }
            OpenMode::MapWritable => {
                if !aligned {
                    return Err(Error::format(
                        Some(path),
                        format!(
                            "tensor data starts at byte {}, not aligned for {dtype}: it cannot \
                             be updated in place (rewrite the file with `emb convert`)",
                            entry.data.start
                        ),
                    ));
                }
                drop(map);
                // SAFETY: as for the read-only map above; the writable map is shared, so
                // writes reach the file.
                let map =
                    unsafe { MmapOptions::new().map_mut(&file) }.map_err(|e| Error::io(path, e))?;
                if map.len() < entry.data.end {
                    return Err(Error::format(Some(path), "file shrank while being opened"));
                }
                advise(&map, residency);
                Storage::MapMut(map, entry.data.clone())
            }
        };
        let zero_copy = matches!(storage, Storage::Map(..) | Storage::MapMut(..));
        let residency = if zero_copy {
            residency
        } else {
            Residency::Resident
        };
        let disk = match residency {
            Residency::OutOfCore => Some(Box::new(disk::DiskSource::open(
                path,
                entry.data.start as u64,
                entry.data.len() as u64,
            )?)),
            _ => None,
        };
        let table = Table {
            storage,
            dtype,
            rows,
            dim,
            padding_idx: None,
            zero_copy,
            residency,
            disk,
            source_path: zero_copy.then(|| path.to_path_buf()),
        };
        if options.populate && residency == Residency::Resident && zero_copy {
            storage::populate(table.storage.bytes()).map_err(|e| Error::io(path, e))?;
        }
        Ok(table)
    }
}

impl<'a> Table<'a> {
    /// A read-only table over the caller's slice (`rows * dim` elements), without copying.
    pub fn borrowed<T: Element>(data: &'a [T], rows: usize, dim: usize) -> Result<Self> {
        check_len(data.len(), rows, dim, T::DTYPE)?;
        Ok(Table {
            storage: Storage::Borrowed(bytemuck::cast_slice(data)),
            dtype: T::DTYPE,
            rows,
            dim,
            padding_idx: None,
            zero_copy: true,
            residency: Residency::Resident,
            disk: None,
            source_path: None,
        })
    }

    /// A writable table over the caller's slice, without copying.
    pub fn borrowed_mut<T: Element>(data: &'a mut [T], rows: usize, dim: usize) -> Result<Self> {
        check_len(data.len(), rows, dim, T::DTYPE)?;
        Ok(Table {
            storage: Storage::BorrowedMut(bytemuck::cast_slice_mut(data)),
            dtype: T::DTYPE,
            rows,
            dim,
            padding_idx: None,
            zero_copy: true,
            residency: Residency::Resident,
            disk: None,
            source_path: None,
        })
    }

    /// Record a PyTorch `padding_idx` (`-rows <= p < rows`; negative counts from the end).
    /// The row's values are left as they are: lookups return what it holds, as PyTorch does;
    /// gradients and bags skip it.
    pub fn with_padding_idx(mut self, padding_idx: i64) -> Result<Self> {
        self.padding_idx = Some(normalize_padding_idx(padding_idx, self.rows)?);
        Ok(self)
    }

    /// The padding row, normalised to `0..rows`, if one is set.
    pub fn padding_idx(&self) -> Option<usize> {
        self.padding_idx
    }

    /// Number of rows (the vocabulary size).
    #[inline]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row (the hidden size).
    #[inline]
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `[rows, dim]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.dim]
    }

    /// The element type.
    #[inline]
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes per row.
    #[inline]
    pub fn row_bytes(&self) -> usize {
        self.dim * self.dtype.size()
    }

    /// What the storage is.
    pub fn storage_kind(&self) -> StorageKind {
        self.storage.kind()
    }

    /// Whether the data is viewed in place (a file map or the caller's slice) rather than
    /// copied. A file whose data is not aligned for its dtype is copied once when opened.
    pub fn is_zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// Whether the table is kept in memory or served from disk ([`Residency::Resident`] or
    /// [`Residency::OutOfCore`]; never `Auto`, which is resolved when the file is opened).
    pub fn residency(&self) -> Residency {
        self.residency
    }

    /// The fraction of the rows of `indices` (out-of-range ones count as not resident) whose
    /// pages are all in memory now (`mincore`), for any storage; 1 where that cannot be known.
    pub fn resident_fraction<I: Index>(&self, indices: &[I]) -> f64 {
        if indices.is_empty() || !cfg!(unix) {
            return 1.0;
        }
        let rows = self.rows;
        let valid = indices
            .iter()
            .map(|&i| i.as_wrapped_u64())
            .filter(move |&r| r < rows as u64)
            .map(|r| r as usize);
        disk::resident_rows(self.as_bytes(), self.row_bytes(), valid) as f64 / indices.len() as f64
    }

    /// Drop a mapped table's pages from memory, so that the next lookups read them from the
    /// device: unmapped from this process (`MADV_DONTNEED`: a file map's contents stay in the
    /// file, and a writable map's changes in the page cache) and then dropped from the page cache
    /// (`POSIX_FADV_DONTNEED`; clean pages only, and not those another process maps). For
    /// cold-cache benchmarks; a no-op for tables in memory.
    pub fn drop_cached_pages(&self) -> Result<()> {
        let map: &[u8] = match &self.storage {
            Storage::Map(m, _) => m,
            Storage::MapMut(m, _) => m,
            _ => return Ok(()),
        };
        #[cfg(target_os = "linux")]
        {
            // SAFETY: DONTNEED on a shared file map only removes this process's page-table
            // entries; the next access faults the same file bytes back in, so no value any
            // reference sees changes.
            unsafe {
                libc::madvise(
                    map.as_ptr() as *mut libc::c_void,
                    map.len(),
                    libc::MADV_DONTNEED,
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = map;
        match &self.source_path {
            Some(p) => drop_cached_pages(p),
            None => Ok(()),
        }
    }

    /// The way an out-of-core table reads its pages (`io_uring` or `pread threads`), `None`
    /// for a resident one.
    pub fn page_reader(&self) -> Option<&'static str> {
        self.disk.as_ref().map(|d| d.reader_name())
    }

    /// For an out-of-core table, read the pages of the rows of validated `indices` that are not
    /// resident (every request in flight at once), so that the operation about to touch them
    /// neither faults one page at a time nor meets a read error as a signal. A no-op otherwise.
    pub(crate) fn read_ahead<I: Index>(&self, indices: &[I]) -> Result<()> {
        match &self.disk {
            None => Ok(()),
            Some(disk) => disk.read_rows(
                self.as_bytes(),
                self.row_bytes(),
                indices.iter().map(|&i| i.as_wrapped_u64() as usize),
            ),
        }
    }

    /// The same for rows given by number (validated).
    pub(crate) fn read_ahead_rows(&self, rows: impl Iterator<Item = usize>) -> Result<()> {
        match &self.disk {
            None => Ok(()),
            Some(disk) => disk.read_rows(self.as_bytes(), self.row_bytes(), rows),
        }
    }

    /// The file behind an out-of-core table.
    pub(crate) fn disk(&self) -> Option<&disk::DiskSource> {
        self.disk.as_deref()
    }

    /// The same, to change in tests.
    #[cfg(test)]
    pub(crate) fn disk_mut(&mut self) -> Option<&mut disk::DiskSource> {
        self.disk.as_deref_mut()
    }

    /// The raw bytes, little-endian, row-major.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// The elements as a typed slice; an error if `T` is not the table's dtype.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_dtype::<T>()?;
        // Every storage is aligned for its dtype: owned buffers to 64, files checked on open,
        // borrowed slices came from `&[T]`.
        Ok(bytemuck::cast_slice(self.storage.bytes()))
    }

    /// The elements, writable; errors if `T` is not the dtype or the storage is read-only.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_dtype::<T>()?;
        let bytes = self.storage.bytes_mut().ok_or(Error::ReadOnlyTable)?;
        Ok(bytemuck::cast_slice_mut(bytes))
    }

    /// One row, or `None` past the end.
    pub fn row<T: Element>(&self, row: usize) -> Result<Option<&[T]>> {
        let data = self.as_slice::<T>()?;
        if row >= self.rows {
            return Ok(None);
        }
        // row < rows, so neither product overflows: (row + 1) * dim <= rows * dim elements.
        Ok(data.get(row * self.dim..(row + 1) * self.dim))
    }

    /// Flush a writable file map to disk (a no-op for other storage).
    pub fn flush(&self) -> Result<()> {
        if let Storage::MapMut(m, r) = &self.storage {
            m.flush_range(r.start, r.len())?;
        }
        Ok(())
    }

    /// A copy in owned memory, converted to `dtype` (f32 → f16/bf16 rounds to nearest even).
    pub fn to_dtype(&self, dtype: DType) -> Result<Table<'static>> {
        let mut out = Table::zeros(self.rows, self.dim, dtype)?;
        out.padding_idx = self.padding_idx;
        convert_bytes(
            self.dtype,
            self.as_bytes(),
            dtype,
            out.bytes_mut_unchecked(),
        );
        Ok(out)
    }

    /// Save to `.safetensors` (tensor named `weight`) or `.npy`, by extension, atomically.
    /// bf16 cannot be saved as `.npy`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.save_as(path, "weight")
    }

    /// Save with a tensor name (used by safetensors only).
    pub fn save_as(&self, path: impl AsRef<Path>, tensor_name: &str) -> Result<()> {
        formats::write_tensors(
            path.as_ref(),
            &[TensorToWrite {
                name: tensor_name,
                dtype: TensorDType::Float(self.dtype),
                shape: vec![self.rows, self.dim],
                data: self.as_bytes(),
            }],
            &Default::default(),
        )
    }

    fn check_dtype<T: Element>(&self) -> Result<()> {
        if T::DTYPE != self.dtype {
            return Err(Error::DTypeMismatch {
                expected: self.dtype,
                actual: T::DTYPE,
            });
        }
        Ok(())
    }

    /// Writable bytes of storage known to be owned.
    fn bytes_mut_unchecked(&mut self) -> &mut [u8] {
        self.storage
            .bytes_mut()
            .expect("called only on owned storage")
    }

    /// The writable bytes, or the read-only error.
    #[allow(dead_code)] // used by the renorm, bag and gradient operations
    pub(crate) fn bytes_mut(&mut self) -> Result<&mut [u8]> {
        self.storage.bytes_mut().ok_or(Error::ReadOnlyTable)
    }
}

impl std::fmt::Debug for Table<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("rows", &self.rows)
            .field("dim", &self.dim)
            .field("dtype", &self.dtype)
            .field("storage", &self.storage_kind())
            .field("zero_copy", &self.zero_copy)
            .field("padding_idx", &self.padding_idx)
            .field("residency", &self.residency)
            .finish()
    }
}

/// Convert elements between dtypes, `src` and `dst` holding the same number of elements.
/// Widening is exact; narrowing rounds to nearest, ties to even.
pub fn convert_bytes(from: DType, src: &[u8], to: DType, dst: &mut [u8]) {
    use half::slice::HalfFloatSliceExt;
    debug_assert_eq!(src.len() / from.size(), dst.len() / to.size());
    // Bytes from files may be unaligned; copy through an aligned buffer when they are.
    fn typed<T: Element>(b: &[u8]) -> std::borrow::Cow<'_, [T]> {
        match bytemuck::try_cast_slice(b) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(b)),
        }
    }
    match (from, to) {
        (a, b) if a == b => dst.copy_from_slice(src),
        (DType::F32, DType::F16) => {
            bytemuck::cast_slice_mut::<u8, f16>(dst).convert_from_f32_slice(&typed::<f32>(src))
        }
        (DType::F32, DType::BF16) => {
            bytemuck::cast_slice_mut::<u8, bf16>(dst).convert_from_f32_slice(&typed::<f32>(src))
        }
        (DType::F16, DType::F32) => {
            typed::<f16>(src).convert_to_f32_slice(bytemuck::cast_slice_mut(dst))
        }
        // Bit for bit, signalling NaNs included (`half`'s slice conversion quiets them).
        (DType::BF16, DType::F32) => {
            let dst: &mut [f32] = bytemuck::cast_slice_mut(dst);
            for (d, &x) in dst.iter_mut().zip(typed::<bf16>(src).iter()) {
                *d = Element::to_f32(x);
            }
        }
        // f16 <-> bf16 through f32: widening is exact, so one rounding.
        (a, b) => {
            let mut mid = vec![0u8; src.len() / a.size() * 4];
            convert_bytes(a, src, DType::F32, &mut mid);
            convert_bytes(DType::F32, &mid, b, dst);
        }
    }
}

/// Advise a file map for its residency. Resident: huge pages; where the file system caches
/// files in large folios (ext4 from Linux 6.16), the kernel then fills and maps a cold file in
/// 2 MiB pieces, one TLB entry per 2 MiB of random rows (a 1 GiB file was first touched 3.8×
/// faster on the reference machine). Out of core: random access, so that a fault reads its own
/// page and nothing around it (with huge pages, a cold 36 GiB table read 1.4 MiB per 256-byte
/// row). Hints, ignored where unsupported.
fn advise(map: &[u8], residency: Residency) {
    #[cfg(target_os = "linux")]
    {
        let advice = match residency {
            Residency::OutOfCore => libc::MADV_RANDOM,
            _ => libc::MADV_HUGEPAGE,
        };
        // SAFETY: madvise with these advices only changes how the kernel pages the range in;
        // `map` is a whole live mapping, so the range is mapped and page-aligned.
        unsafe {
            libc::madvise(map.as_ptr() as *mut libc::c_void, map.len(), advice);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (map, residency);
}

fn table_dtype(entry: &TensorEntry, path: &Path) -> Result<DType> {
    let what = match &entry.dtype {
        TensorDType::Float(d) => return Ok(*d),
        TensorDType::F64 => format!(
            "float64 tables are not supported; convert it with \
             `emb convert {}{} OUT.safetensors --dtype f32` (or f16, bf16)",
            path.display(),
            if entry.name.is_empty() {
                String::new()
            } else {
                format!(":{}", entry.name)
            }
        ),
        d if d.is_integer() => format!("it has dtype {d}: integers are indices, not a table"),
        d => format!("it has dtype {d}, which is not supported"),
    };
    Err(Error::format(
        Some(path),
        format!(
            "tensor {} cannot be a table: {what}; a table must be f32, f16 or bf16",
            entry.describe()
        ),
    ))
}

/// The byte size of a `rows × dim` table of `dtype`. Every size a table is used with must fit
/// an isize: the row count, one row's bytes and all rows' bytes. Empty tables are no exception
/// (a `(0, 2^62)` or `(2^62, 0)` table holds no bytes but would overflow `row_bytes` or row
/// arithmetic).
fn table_bytes(rows: usize, dim: usize, dtype: DType) -> Result<usize> {
    let row_fits = formats::checked_bytes(&[dim], dtype.size()).is_some();
    formats::checked_bytes(&[rows, dim], dtype.size())
        .filter(|_| row_fits)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "a table of {rows} × {dim} {dtype} does not fit in the address space"
            ))
        })
}

fn check_len(len: usize, rows: usize, dim: usize, dtype: DType) -> Result<()> {
    // The same limits as tables made or read from files: an empty slice must not make a table
    // of more rows, or wider rows, than that.
    table_bytes(rows, dim, dtype)?;
    if rows.checked_mul(dim) != Some(len) {
        return Err(Error::ShapeMismatch(format!(
            "{len} elements cannot form a {rows} × {dim} table"
        )));
    }
    Ok(())
}

fn fill<T: Element>(out: &mut [T], rng: &mut crate::util::Rng) {
    for v in out {
        *v = T::from_f32(rng.normal());
    }
}
