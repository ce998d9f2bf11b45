//! Out-of-core tables: before an operation touches its rows, read the distinct pages those
//! rows need that are not resident, many requests in flight, and check every read's result, so
//! that a failed read is an error naming the file and offset, not a signal on first touch.
//!
//! A lookup is cut into windows of positions; a reader thread reads window k+1's pages while
//! the caller gathers window k ([`DiskSource::pipelined`]), so the device is never idle waiting
//! for the gather and the gather rarely waits for the device.

pub(crate) mod reader;

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::index::Index;
use reader::{PageError, PageReader};

/// Positions per window of a pipelined operation: enough pages (up to one or two per row) to
/// keep the device's queue full for tens of milliseconds, few enough that a window's pages
/// (64 MiB at most for one-page rows) stay cached until the gather reaches them.
pub(crate) const WINDOW: usize = 16 << 10;

/// The file behind an out-of-core table, and the readers that fill its pages.
pub(crate) struct DiskSource {
    /// A descriptor of its own, advised for random access: a read brings in its page only.
    file: File,
    path: PathBuf,
    /// The file offset of the table's first byte (the map starts at offset 0).
    data_offset: u64,
    /// The table's length in bytes.
    table_len: u64,
    page: u64,
    /// Idle readers, so that concurrent operations each get their own.
    readers: Mutex<Vec<Box<dyn PageReader>>>,
    make_reader: fn() -> Box<dyn PageReader>,
    /// Skip pages `mincore` reports resident (off in tests that must see every read).
    skip_resident: bool,
}

impl DiskSource {
    /// Open `path` again for reading the table at `data_offset..data_offset + table_len`.
    pub(crate) fn open(path: &Path, data_offset: u64, table_len: u64) -> Result<DiskSource> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        advise_random(&file);
        Ok(DiskSource {
            file,
            path: path.to_path_buf(),
            data_offset,
            table_len,
            page: page_size(),
            readers: Mutex::new(Vec::new()),
            make_reader: reader::best,
            skip_resident: true,
        })
    }

    /// Replace how readers are made (tests inject failing ones).
    #[cfg(test)]
    pub(crate) fn set_reader(&mut self, make: fn() -> Box<dyn PageReader>) {
        self.make_reader = make;
        self.skip_resident = false;
        self.readers.lock().unwrap().clear();
    }

    /// The name of the reader this table uses (`io_uring`, `pread threads`).
    pub(crate) fn reader_name(&self) -> &'static str {
        self.with_reader(|r| r.name())
    }

    fn with_reader<T>(&self, f: impl FnOnce(&mut dyn PageReader) -> T) -> T {
        let idle = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut reader = idle.unwrap_or_else(self.make_reader);
        let out = f(reader.as_mut());
        if reader.reusable() {
            self.readers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(reader);
        } else {
            // Its buffers may still receive data: leaked, never freed.
            Box::leak(reader);
        }
        out
    }

    /// Make the pages of `rows` resident (`table` is the mapped table, `row_bytes` its row
    /// size): an error names the first page that could not be read.
    pub(crate) fn read_rows(
        &self,
        table: &[u8],
        row_bytes: usize,
        rows: impl Iterator<Item = usize>,
    ) -> Result<()> {
        self.check_length()?;
        let mut plan = PagePlan::default();
        plan.missing_pages(self, table, row_bytes, rows);
        self.read(&plan.pages)
    }

    /// Run `per_window` on consecutive windows of positions of `indices` (validated), each
    /// once the pages its rows need are resident; window k+1's pages are read while `per_window`
    /// runs on window k. On a read error, `per_window` has run on the windows before the failed
    /// one only, and the error is returned.
    pub(crate) fn pipelined<I: Index>(
        &self,
        table: &[u8],
        row_bytes: usize,
        indices: &[I],
        mut per_window: impl FnMut(Range<usize>),
    ) -> Result<()> {
        let rows_of = |r: Range<usize>| indices[r].iter().map(|&i| i.as_wrapped_u64() as usize);
        let windows: Vec<Range<usize>> = (0..indices.len())
            .step_by(WINDOW)
            .map(|s| s..(s + WINDOW).min(indices.len()))
            .collect();
        if windows.len() <= 1 {
            self.read_rows(table, row_bytes, rows_of(0..indices.len()))?;
            per_window(0..indices.len());
            return Ok(());
        }
        self.check_length()?;
        std::thread::scope(|s| {
            // One window read ahead and one waiting in the channel, at most.
            let (ready, ready_rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
            let windows_ref = &windows;
            s.spawn(move || {
                let mut plan = PagePlan::default();
                for w in windows_ref {
                    plan.missing_pages(self, table, row_bytes, rows_of(w.clone()));
                    let result = self.read(&plan.pages);
                    let failed = result.is_err();
                    // A closed channel: the caller stopped (an error, or a panic in per_window).
                    if ready.send(result).is_err() || failed {
                        break;
                    }
                }
            });
            for w in &windows {
                match ready_rx.recv() {
                    Ok(Ok(())) => per_window(w.clone()),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => unreachable!("the reader sends once per window until an error"),
                }
            }
            Ok(())
        })
    }

    /// The file must still hold the whole table: a file truncated under its map would raise
    /// SIGBUS on the first touch past its new end.
    fn check_length(&self) -> Result<()> {
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, e))?
            .len();
        let needed = self.data_offset + self.table_len;
        if len < needed {
            return Err(Error::DiskRead {
                path: self.path.clone(),
                offset: len,
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "the file was truncated to {len} bytes after the table was opened; \
                         the table needs {needed}"
                    ),
                ),
            });
        }
        Ok(())
    }

    fn read(&self, pages: &[u64]) -> Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        let offsets: Vec<u64> = pages.iter().map(|p| p * self.page).collect();
        self.with_reader(|r| r.read_pages(&self.file, &offsets))
            .map_err(|(offset, source): PageError| Error::DiskRead {
                path: self.path.clone(),
                offset,
                source,
            })
    }

    /// The first and last file page of table row `row`.
    #[inline]
    fn page_span(&self, row: usize, row_bytes: usize) -> (u64, u64) {
        let start = self.data_offset + (row * row_bytes) as u64;
        let end = start + row_bytes.max(1) as u64 - 1;
        (start / self.page, end / self.page)
    }

    /// The address of file page `page` in the map that holds `table`.
    fn page_addr(&self, table: &[u8], page: u64) -> usize {
        table.as_ptr() as usize - self.data_offset as usize + (page * self.page) as usize
    }
}

/// The distinct non-resident pages of a set of rows, reused across windows.
#[derive(Default)]
struct PagePlan {
    pages: Vec<u64>,
    resident: Vec<u8>,
}

impl PagePlan {
    fn missing_pages(
        &mut self,
        disk: &DiskSource,
        table: &[u8],
        row_bytes: usize,
        rows: impl Iterator<Item = usize>,
    ) {
        self.pages.clear();
        for r in rows {
            let (first, last) = disk.page_span(r, row_bytes);
            self.pages.extend(first..=last);
        }
        self.pages.sort_unstable();
        self.pages.dedup();
        if !disk.skip_resident {
            return;
        }
        // One mincore call per run of consecutive pages.
        let mut kept = 0;
        let mut i = 0;
        while i < self.pages.len() {
            let mut j = i + 1;
            while j < self.pages.len() && self.pages[j] == self.pages[j - 1] + 1 {
                j += 1;
            }
            let n = j - i;
            self.resident.resize(n, 0);
            let known = mincore(
                disk.page_addr(table, self.pages[i]),
                n * disk.page as usize,
                &mut self.resident,
            );
            for k in i..j {
                if !known || self.resident[k - i] & 1 == 0 {
                    self.pages[kept] = self.pages[k];
                    kept += 1;
                }
            }
            i = j;
        }
        self.pages.truncate(kept);
    }
}

/// How many of `rows` (of `row_bytes` each, in `table`) have every page in memory now.
pub(crate) fn resident_rows(
    table: &[u8],
    row_bytes: usize,
    rows: impl Iterator<Item = usize>,
) -> usize {
    let page = page_size() as usize;
    let base = table.as_ptr() as usize;
    let mut vec = Vec::new();
    rows.filter(|&r| {
        let first = (base + r * row_bytes) / page;
        let last = (base + (r + 1) * row_bytes.max(1) - 1) / page;
        vec.resize(last - first + 1, 0);
        mincore(first * page, vec.len() * page, &mut vec) && vec.iter().all(|&v| v & 1 == 1)
    })
    .count()
}

/// Which pages of `addr..addr + len` (page-aligned, inside a live map) are resident, one byte
/// each in `vec` (bit 0); false if the kernel could not say.
fn mincore(addr: usize, len: usize, vec: &mut [u8]) -> bool {
    #[cfg(unix)]
    {
        debug_assert!(vec.len() >= len.div_ceil(page_size() as usize));
        // SAFETY: mincore only reads the page tables of `addr..addr + len` and writes one byte
        // per page into `vec`, which holds that many; an address outside a mapping is an
        // error (ENOMEM), not undefined behaviour.
        unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr().cast()) == 0 }
    }
    #[cfg(not(unix))]
    {
        let _ = (addr, len, vec);
        false
    }
}

pub(crate) fn page_size() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 {
            return p as u64;
        }
    }
    4096
}

/// Tell the kernel this descriptor reads at random: a read brings in its own page only.
fn advise_random(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise only records advice for a descriptor we own.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

#[cfg(test)]
mod tests;

/// Drop the file's cached pages (`posix_fadvise(DONTNEED)`): dirty pages are kept, clean ones
/// go, so the next read of them comes from the device. What `emb bench --cold` does.
pub fn drop_cached_pages(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise only drops clean cached pages of a descriptor we own.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(Error::io(path, std::io::Error::from_raw_os_error(rc)));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
    Ok(())
}
