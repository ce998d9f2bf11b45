//! Where a table's bytes live: owned and aligned, borrowed, or mapped from a file.

use memmap2::{Mmap, MmapMut};

/// Owned buffers of at least this size are anonymous maps advised for transparent huge pages:
/// random row access on a large table then misses the TLB far less often.
const HUGE_PAGE_THRESHOLD: usize = 2 << 20;

/// The storage behind a [`Table`](super::Table).
pub(crate) enum Storage<'a> {
    /// Owned by the table, 64-byte aligned.
    Owned(AlignedBuf),
    /// The caller's slice, read-only.
    Borrowed(&'a [u8]),
    /// The caller's slice, writable.
    BorrowedMut(&'a mut [u8]),
    /// A read-only file map; the table is `map[range]`.
    Map(Mmap, std::ops::Range<usize>),
    /// A writable shared file map: changes reach the file.
    MapMut(MmapMut, std::ops::Range<usize>),
}

impl Storage<'_> {
    #[inline]
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(b) => b.as_slice(),
            Storage::Borrowed(s) => s,
            Storage::BorrowedMut(s) => s,
            Storage::Map(m, r) => &m[r.clone()],
            Storage::MapMut(m, r) => &m[r.clone()],
        }
    }

    pub(crate) fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        match self {
            Storage::Owned(b) => Some(b.as_mut_slice()),
            Storage::BorrowedMut(s) => Some(s),
            Storage::MapMut(m, r) => Some(&mut m[r.clone()]),
            Storage::Borrowed(_) | Storage::Map(..) => None,
        }
    }

    pub(crate) fn kind(&self) -> StorageKind {
        match self {
            Storage::Owned(_) => StorageKind::Owned,
            Storage::Borrowed(_) => StorageKind::Borrowed,
            Storage::BorrowedMut(_) => StorageKind::BorrowedMut,
            Storage::Map(..) => StorageKind::Mapped,
            Storage::MapMut(..) => StorageKind::MappedWritable,
        }
    }
}

/// What kind of storage a table has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    /// Owned, 64-byte aligned memory.
    Owned,
    /// A read-only slice borrowed from the caller.
    Borrowed,
    /// A writable slice borrowed from the caller.
    BorrowedMut,
    /// A read-only file map.
    Mapped,
    /// A writable file map; changes reach the file.
    MappedWritable,
}

impl StorageKind {
    /// Whether operations that write the table (in-place renorm, optimizer steps) are allowed.
    pub fn is_writable(self) -> bool {
        matches!(
            self,
            StorageKind::Owned | StorageKind::BorrowedMut | StorageKind::MappedWritable
        )
    }
}

/// Zero-initialised bytes aligned to 64: a `Vec` of cache lines for small sizes, an anonymous
/// map (page-aligned, advised for huge pages) for large ones.
pub(crate) enum AlignedBuf {
    Lines(Vec<CacheLine>, usize),
    Anon(MmapMut),
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct CacheLine([u8; 64]);

impl AlignedBuf {
    pub(crate) fn zeroed(len: usize) -> std::io::Result<AlignedBuf> {
        if len >= HUGE_PAGE_THRESHOLD {
            let map = MmapMut::map_anon(len)?;
            advise_huge_pages(&map);
            Ok(AlignedBuf::Anon(map))
        } else {
            Ok(AlignedBuf::Lines(
                vec![CacheLine([0; 64]); len.div_ceil(64)],
                len,
            ))
        }
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            AlignedBuf::Lines(v, len) => &bytemuck::cast_slice::<CacheLine, u8>(v)[..*len],
            AlignedBuf::Anon(m) => m,
        }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            AlignedBuf::Lines(v, len) => &mut bytemuck::cast_slice_mut::<CacheLine, u8>(v)[..*len],
            AlignedBuf::Anon(m) => m,
        }
    }
}

// SAFETY: CacheLine is a plain byte array with no padding (64 bytes, align 64).
unsafe impl bytemuck::Zeroable for CacheLine {}
// SAFETY: as above; every bit pattern is a valid [u8; 64].
unsafe impl bytemuck::Pod for CacheLine {}

/// Ask the kernel for transparent huge pages on an anonymous map; a no-op where unsupported.
pub(crate) fn advise_huge_pages(map: &MmapMut) {
    #[cfg(target_os = "linux")]
    {
        let _ = map.advise(memmap2::Advice::HugePage);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = map;
}

/// Read every page of a mapped range into memory now, at the disk's sequential speed:
/// `MADV_POPULATE_READ` (Linux 5.14), which reports read errors; elsewhere, or on older
/// kernels, `MADV_WILLNEED` and a read of one byte per page.
pub(crate) fn populate(bytes: &[u8]) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        const MADV_POPULATE_READ: libc::c_int = 22;
        let page = super::disk::page_size() as usize;
        let start = bytes.as_ptr() as usize & !(page - 1);
        let len = bytes.as_ptr() as usize + bytes.len() - start;
        // SAFETY: the range lies inside a live read-only mapping (rounded down to its page);
        // populating only faults its pages in.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, MADV_POPULATE_READ) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
        // SAFETY: as above; WILLNEED starts reading the range and changes nothing else.
        unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_WILLNEED) };
    }
    let mut sum = 0u8;
    for chunk in bytes.chunks(4096) {
        sum ^= chunk[0];
    }
    std::hint::black_box(sum);
    Ok(())
}
