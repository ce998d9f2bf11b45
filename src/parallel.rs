//! When and how to split work across rayon's threads, in one place.
//!
//! Work below [`MIN_PARALLEL_BYTES`] stays on the calling thread with no pool involvement, so
//! small batches pay nothing for parallelism. Larger work is cut into chunks of at least
//! [`MIN_TASK_BYTES`], a few per thread so that an unlucky slow chunk does not leave a thread
//! idle. Rayon's `current_num_threads` is that of the pool the caller is in, so calling from
//! inside a user's own pool uses that pool.

/// Total bytes moved below which an operation runs on the calling thread. Measured with
/// `cargo bench --bench lookup -- lookup_cache` (BENCHMARKS.md): a 4096-row f32 lookup of dim
/// 64 (2 MiB moved) is faster on one thread than split over two.
pub(crate) const MIN_PARALLEL_BYTES: usize = 4 << 20;

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

/// Cut `items` of uneven work (bags of different lengths) into contiguous ranges of about
/// equal work, or `None` to run serially. `work_before(i)` is the bytes moved by items `0..i`:
/// zero at 0 and non-decreasing, so each cut is a binary search. Returns the cut points,
/// starting at 0 and ending at `items`. Items are never split, so one huge item is one task.
pub(crate) fn split_weighted(
    items: usize,
    work_before: impl Fn(usize) -> usize,
) -> Option<Vec<usize>> {
    let threads = rayon::current_num_threads();
    let total = work_before(items);
    if threads <= 1 || items < 2 || total < MIN_PARALLEL_BYTES {
        return None;
    }
    let chunks = (total / MIN_TASK_BYTES).clamp(2, threads * CHUNKS_PER_THREAD);
    let mut cuts = Vec::with_capacity(chunks + 1);
    cuts.push(0);
    for k in 1..chunks {
        let target = (total as u128 * k as u128 / chunks as u128) as usize;
        // The first item boundary whose work before it reaches the target.
        let (mut lo, mut hi) = (*cuts.last().expect("starts with 0"), items);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if work_before(mid) < target {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo > *cuts.last().expect("starts with 0") && lo < items {
            cuts.push(lo);
        }
    }
    cuts.push(items);
    Some(cuts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_split_balances_uneven_items() {
        // Item i moves (i % 10 == 0 ? 1 MiB : 1 KiB).
        let sizes: Vec<usize> = (0..1000)
            .map(|i| if i % 10 == 0 { 1 << 20 } else { 1 << 10 })
            .collect();
        let mut before = vec![0usize];
        for s in &sizes {
            before.push(before.last().unwrap() + s);
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let cuts = pool
            .install(|| split_weighted(sizes.len(), |i| before[i]))
            .unwrap();
        assert_eq!((cuts[0], *cuts.last().unwrap()), (0, 1000));
        assert!(cuts.windows(2).all(|w| w[0] < w[1]), "{cuts:?}");
        assert_eq!(cuts.len(), 4 * CHUNKS_PER_THREAD + 1);
        let total = before[1000];
        for w in cuts.windows(2) {
            let work = before[w[1]] - before[w[0]];
            // Within one big item of the even share.
            assert!(work.abs_diff(total / 16) <= 1 << 20, "{work} of {total}");
        }
        // Small work, or one thread: serial.
        assert!(pool.install(|| split_weighted(10, |i| i)).is_none());
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        assert!(one
            .install(|| split_weighted(1000, |i| before[i]))
            .is_none());
    }
}
