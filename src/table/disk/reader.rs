//! Reading pages into the page cache, many requests in flight: io_uring where the kernel
//! allows it, a small pool of `pread` threads otherwise.
//!
//! Each page is read one byte at a time through a descriptor advised `POSIX_FADV_RANDOM`: the
//! kernel then reads exactly that page from the device (no read-ahead) and keeps it cached, and
//! the caller's map finds it there. On the reference machine both readers reach the device's
//! random-read limit (BENCHMARKS.md, "Tables larger than memory"); io_uring does it from one
//! thread that sleeps while the device works, leaving both cores to the gather.

use std::fs::File;
use std::io;

/// Requests a reader keeps in flight: past the device's own queue (32 is its best on the
/// reference machine) so that it never waits for the next submission.
pub(crate) const DEPTH: usize = 128;

/// A failed page: its file offset and the error.
pub(crate) type PageError = (u64, io::Error);

/// Something that reads a list of pages of a file into the page cache.
pub(crate) trait PageReader: Send {
    /// Read one byte at each of `offsets` (page-aligned file offsets), many at once, and return
    /// when all are done. After a failure no new request starts; of the failures seen, the one
    /// at the lowest offset is returned (a read past the end of the file is `UnexpectedEof`).
    fn read_pages(&mut self, file: &File, offsets: &[u64]) -> Result<(), PageError>;

    /// The name `emb --verbose` and the benchmarks print.
    fn name(&self) -> &'static str;

    /// False once the reader may still have requests in flight into its own buffers (its
    /// ring failed): it must then be leaked, never reused or freed.
    fn reusable(&self) -> bool {
        true
    }
}

/// The first failure by offset, of two.
fn first_error(a: Option<PageError>, b: PageError) -> Option<PageError> {
    match a {
        Some(a) if a.0 <= b.0 => Some(a),
        _ => Some(b),
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the file ends before this page: it was truncated after the table was opened",
    )
}

/// The reader for this machine: io_uring when it can be set up, threads otherwise, or the one
/// named by `EMBEDDING_LOOKUP_IO` (`uring`, `threads`).
pub(crate) fn best() -> Box<dyn PageReader> {
    let forced = std::env::var("EMBEDDING_LOOKUP_IO").ok();
    #[cfg(target_os = "linux")]
    if forced.as_deref() != Some("threads") {
        if let Ok(r) = uring::UringReader::new(DEPTH) {
            return Box::new(r);
        }
    }
    let _ = forced;
    Box::new(ThreadReader::new(DEPTH.min(32)))
}

/// `pread` from a pool of scoped threads, one request each at a time.
pub(crate) struct ThreadReader {
    threads: usize,
}

impl ThreadReader {
    pub(crate) fn new(threads: usize) -> ThreadReader {
        ThreadReader {
            threads: threads.max(1),
        }
    }
}

impl PageReader for ThreadReader {
    fn read_pages(&mut self, file: &File, offsets: &[u64]) -> Result<(), PageError> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Mutex;
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let error: Mutex<Option<PageError>> = Mutex::new(None);
        let work = || {
            let mut byte = [0u8; 1];
            while !failed.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&offset) = offsets.get(i) else { break };
                let result = match read_at(file, &mut byte, offset) {
                    Ok(1) => continue,
                    Ok(_) => eof(),
                    Err(e) => e,
                };
                failed.store(true, Ordering::Relaxed);
                let mut slot = error.lock().unwrap_or_else(|p| p.into_inner());
                *slot = first_error(slot.take(), (offset, result));
            }
        };
        let threads = self.threads.min(offsets.len());
        if threads <= 1 {
            work();
        } else {
            std::thread::scope(|s| {
                for _ in 1..threads {
                    s.spawn(work);
                }
                work();
            });
        }
        match error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn name(&self) -> &'static str {
        "pread threads"
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

#[cfg(target_os = "linux")]
pub(crate) mod uring {
    use super::*;
    use io_uring::{opcode, types, IoUring};
    use std::os::fd::AsRawFd;

    /// One ring, `depth` one-byte reads in flight, each into its own byte of `landing`.
    pub(crate) struct UringReader {
        ring: IoUring,
        landing: Box<[u8]>,
        /// The file offset each in-flight slot reads (for error reports).
        slot_offset: Vec<u64>,
        free: Vec<u32>,
        /// The ring failed with requests in flight.
        broken: bool,
    }

    impl UringReader {
        pub(crate) fn new(depth: usize) -> io::Result<UringReader> {
            let depth = depth.clamp(1, 4096);
            Ok(UringReader {
                ring: IoUring::new(depth as u32)?,
                landing: vec![0u8; depth].into_boxed_slice(),
                slot_offset: vec![0; depth],
                free: (0..depth as u32).rev().collect(),
                broken: false,
            })
        }
    }

    impl PageReader for UringReader {
        fn read_pages(&mut self, file: &File, offsets: &[u64]) -> Result<(), PageError> {
            let fd = types::Fd(file.as_raw_fd());
            let mut next = 0;
            let mut in_flight = 0usize;
            let mut error: Option<PageError> = None;
            while (next < offsets.len() && error.is_none()) || in_flight > 0 {
                // Fill every free slot, unless a read has failed (then only drain).
                while error.is_none() && next < offsets.len() {
                    let Some(slot) = self.free.pop() else { break };
                    let offset = offsets[next];
                    let dest = self.landing[slot as usize..].as_mut_ptr();
                    let sqe = opcode::Read::new(fd, dest, 1)
                        .offset(offset)
                        .build()
                        .user_data(slot as u64);
                    self.slot_offset[slot as usize] = offset;
                    // SAFETY: the read writes one byte into `landing[slot]`, which lives as long
                    // as `self` and is handed to no other request until this one's completion
                    // returns the slot to `free`; `file` outlives the call, which does not
                    // return before every submitted request has completed (the loop drains).
                    if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                        self.free.push(slot);
                        break;
                    }
                    next += 1;
                    in_flight += 1;
                }
                if let Err(e) = self.ring.submit_and_wait(1) {
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // The ring itself failed: requests may still be in flight into
                    // `landing`, so this reader is never reused or freed (`reusable`).
                    self.broken = in_flight > 0;
                    let offset = offsets.get(next).copied().unwrap_or(0);
                    return Err(first_error(error, (offset, e)).expect("just set"));
                }
                for cqe in self.ring.completion() {
                    let slot = cqe.user_data() as u32;
                    in_flight -= 1;
                    let offset = self.slot_offset[slot as usize];
                    self.free.push(slot);
                    match cqe.result() {
                        1 => {}
                        0 => error = first_error(error, (offset, eof())),
                        r if r < 0 => {
                            error = first_error(error, (offset, io::Error::from_raw_os_error(-r)))
                        }
                        _ => {}
                    }
                }
            }
            match error {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }

        fn name(&self) -> &'static str {
            "io_uring"
        }

        fn reusable(&self) -> bool {
            !self.broken
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(pages: usize) -> (tempfile::NamedTempFile, Vec<u64>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; pages * 4096]).unwrap();
        f.flush().unwrap();
        (f, (0..pages as u64).map(|p| p * 4096).collect())
    }

    fn readers() -> Vec<Box<dyn PageReader>> {
        let mut r: Vec<Box<dyn PageReader>> = vec![Box::new(ThreadReader::new(4))];
        #[cfg(target_os = "linux")]
        match uring::UringReader::new(8) {
            Ok(u) => r.push(Box::new(u)),
            Err(e) => eprintln!("io_uring unavailable here, not tested: {e}"),
        }
        r
    }

    #[test]
    fn every_reader_reads_every_page_and_reports_the_first_past_the_end() {
        let (f, mut offsets) = file_of(40);
        for mut r in readers() {
            assert!(r.read_pages(f.as_file(), &offsets).is_ok(), "{}", r.name());
            assert!(r.read_pages(f.as_file(), &[]).is_ok());
            // Pages past the end, out of order among good ones: the lowest is reported.
            let mut bad = offsets.clone();
            bad.insert(3, 90 * 4096);
            bad.push(50 * 4096);
            let (offset, e) = r.read_pages(f.as_file(), &bad).unwrap_err();
            assert!(offset == 50 * 4096 || offset == 90 * 4096, "{offset}");
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{}", r.name());
            // The reader is reusable after a failure.
            offsets.reverse();
            assert!(r.read_pages(f.as_file(), &offsets).is_ok(), "{}", r.name());
        }
    }
}
