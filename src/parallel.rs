//! When and how to split work across rayon's threads, in one place.
//!
//! Work below [`MIN_PARALLEL_BYTES`] stays on the calling thread with no pool involvement, so
//! small batches pay nothing for parallelism. Larger work is cut into chunks of at least
//! [`MIN_TASK_BYTES`], a few per thread so that an unlucky slow chunk does not leave a thread
//! idle. Rayon's `current_num_threads` is that of the pool the caller is in, so calling from
//! inside a user's own pool uses that pool.

/// Total bytes moved below which an operation runs on the calling thread.
pub(crate) const MIN_PARALLEL_BYTES: usize = 1 << 20;

/// Smallest piece of work (bytes moved) handed to a rayon task.
pub(crate) const MIN_TASK_BYTES: usize = 256 << 10;

/// Chunks per thread, for load balance.
const CHUNKS_PER_THREAD: usize = 4;

/// How many items each parallel task takes, or `None` to run serially. `bytes_per_item` is the
/// bytes an item moves (a row read plus a row written, for a gather).
#[inline]
pub(crate) fn chunk_items(items: usize, bytes_per_item: usize) -> Option<usize> {
    let total = items.saturating_mul(bytes_per_item.max(1));
    if total < MIN_PARALLEL_BYTES {
        // Decided before asking rayon anything: its first question starts the global pool.
        return None;
    }
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        return None;
    }
    let min_items = (MIN_TASK_BYTES / bytes_per_item.max(1)).max(1);
    let even = items.div_ceil(threads * CHUNKS_PER_THREAD);
    Some(even.max(min_items))
}
