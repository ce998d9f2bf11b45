//! The device's own random-read limit, measured on the file being benchmarked: 4 KiB reads at
//! random page-aligned offsets with `O_DIRECT` (no page cache), `depth` in flight through
//! io_uring. What `emb bench --table` quotes its figures against.

use std::time::{Duration, Instant};

use embedding_lookup::util::Rng;

use crate::CliResult;

/// Bytes per read, and their alignment (O_DIRECT needs the device's logical block).
const READ: usize = 4096;

/// Reads per second over about `seconds`, in `range` (byte offsets) of the file at `path`.
#[cfg(target_os = "linux")]
pub fn random_read_rate(
    path: &std::path::Path,
    range: std::ops::Range<u64>,
    depth: usize,
    seconds: f64,
) -> CliResult<f64> {
    use io_uring::{opcode, types, IoUring};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("{}: opening with O_DIRECT: {e}", path.display()))?;
    let first = range.start.div_ceil(READ as u64);
    let pages = (range.end / READ as u64).saturating_sub(first);
    if pages == 0 {
        return Err(format!("{}: too small to measure random reads", path.display()).into());
    }
    let layout = std::alloc::Layout::from_size_align(depth * READ, READ)?;
    let buffers = AlignedBytes::new(layout)?;
    let mut ring = IoUring::new(depth.next_power_of_two() as u32)?;
    let mut rng = Rng::new(0x5eed);
    let fd = types::Fd(file.as_raw_fd());
    let mut submit = |ring: &mut IoUring, slot: usize| -> CliResult<()> {
        let offset = (first + rng.below(pages)) * READ as u64;
        // Slots are distinct READ-sized pieces of `buffers`, each used by one read at a time.
        let dest = buffers.ptr.wrapping_add(slot * READ);
        let sqe = opcode::Read::new(fd, dest, READ as u32)
            .offset(offset)
            .build()
            .user_data(slot as u64);
        // SAFETY: `dest` points at READ bytes of `buffers`, which outlives the ring (declared
        // before it), and no other read targets this slot until its completion is reaped.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| "the submission queue is full")?;
        Ok(())
    };
    for slot in 0..depth {
        submit(&mut ring, slot)?;
    }
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let mut done = 0u64;
    let mut in_flight = depth;
    let mut failed: Option<std::io::Error> = None;
    while in_flight > 0 {
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // Reads may still be in flight into `buffers`: never free them.
            std::mem::forget(buffers);
            return Err(format!("{}: io_uring: {e}", path.display()).into());
        }
        let completed: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (slot, result) in completed {
            in_flight -= 1;
            if result < 0 {
                failed.get_or_insert(std::io::Error::from_raw_os_error(-result));
            } else {
                done += 1;
            }
            if failed.is_none() && start.elapsed() < limit {
                submit(&mut ring, slot)?;
                in_flight += 1;
            }
        }
    }
    if let Some(e) = failed {
        return Err(format!("{}: O_DIRECT read: {e}", path.display()).into());
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

#[cfg(not(target_os = "linux"))]
pub fn random_read_rate(
    _path: &std::path::Path,
    _range: std::ops::Range<u64>,
    _depth: usize,
    _seconds: f64,
) -> CliResult<f64> {
    Err("the device's random-read rate is measured on Linux only".into())
}

/// Zeroed bytes of a given alignment, freed on drop.
struct AlignedBytes {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBytes {
    fn new(layout: std::alloc::Layout) -> CliResult<AlignedBytes> {
        assert!(layout.size() > 0);
        // SAFETY: the layout has a non-zero size (asserted).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err("out of memory for the read buffers".into());
        }
        Ok(AlignedBytes { ptr, layout })
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}
