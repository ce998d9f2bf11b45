//! When and how to split work across rayon's threads, in one place.
//!
//! Work below [`MIN_SPLIT_BYTES`] stays on the calling thread with no pool involvement, so
//! small batches pay nothing for parallelism. Above it, [`run_tasks`] runs the first task on
//! the calling thread and hands the others to the pool, taking back any that no worker has
//! started by the time its own is done: rayon's parallel iterators, called from outside the
//! pool, block the caller on a lock and wake each sleeping worker, which measured slower than
//! one thread for anything under a few tens of MiB (BENCHMARKS.md, "Splitting work"). Long
//! jobs get a few tasks per thread so that an unlucky slow one does not leave a thread idle.
//! Rayon's `current_num_threads` is that of the pool the caller is in, so calling from inside a
//! user's own pool uses that pool.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Total bytes moved below which [`task_count`] keeps an operation on the calling thread.
/// Measured with a lower threshold (BENCHMARKS.md, "Splitting work"): splitting an f32 lookup
/// of dim 64 over two threads costs about a microsecond and broke even at about 384 KiB moved.
pub(crate) const MIN_SPLIT_BYTES: usize = 512 << 10;

/// Total bytes moved from which [`task_count`] cuts several tasks per thread (below it, one
/// each: a job this short cannot be unbalanced by much, and every task costs a hand-off).
const MIN_BALANCED_BYTES: usize = 16 << 20;

/// Total bytes moved below which [`chunk_items`], for rayon's parallel iterators, keeps work
/// on the calling thread: they block the caller until the pool is done, which costs more than
/// [`run_tasks`]' hand-off. Used by the operations not yet moved to [`run_tasks`] (gradients,
/// optimizers, in-place renorm).
pub(crate) const MIN_PARALLEL_BYTES: usize = 4 << 20;

/// Smallest piece of work (bytes moved) handed to a rayon task.
pub(crate) const MIN_TASK_BYTES: usize = 256 << 10;

/// Chunks per thread, for load balance.
const CHUNKS_PER_THREAD: usize = 4;

/// How many tasks to cut work of `items` items, each moving `bytes_per_item`, into for
/// [`run_tasks`]: 1 (stay on the calling thread, without asking rayon anything) below
/// [`MIN_SPLIT_BYTES`] or on one thread; one per thread for short jobs; a few per thread for
/// long ones. Never more than `items`.
#[inline]
pub(crate) fn task_count(items: usize, bytes_per_item: usize) -> usize {
    let total = items.saturating_mul(bytes_per_item.max(1));
    if total < MIN_SPLIT_BYTES {
        // Decided before asking rayon anything: its first question starts the global pool.
        return 1;
    }
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        return 1;
    }
    let per_thread = if total < MIN_BALANCED_BYTES {
        1
    } else {
        CHUNKS_PER_THREAD
    };
    threads.saturating_mul(per_thread).clamp(1, items.max(1))
}

/// Run every task, the first on the calling thread and the others on rayon's pool (the one
/// the caller is in, or the global one), and return when all have finished. A task no worker
/// has started by the time the caller is done with its own is taken back and run by the
/// caller, so a busy or sleeping pool never makes the caller wait for a wake-up; the caller
/// waits only for tasks already running, spinning briefly (they are as long as its own).
///
/// A panic in any task is resumed on the calling thread once no task is running any more.
pub(crate) fn run_tasks<T: FnOnce() + Send>(tasks: impl IntoIterator<Item = T>) {
    let mut tasks = tasks.into_iter();
    let Some(first) = tasks.next() else { return };
    let handed: Vec<Arc<Handoff>> = tasks.map(Handoff::spawn).collect();
    let mut panicked = panic::catch_unwind(AssertUnwindSafe(first)).err();
    // Newest first: rayon hands the oldest queued jobs to its workers first.
    for handoff in handed.iter().rev() {
        if let Some(task) = handoff.take_back() {
            if panicked.is_none() {
                panicked = panic::catch_unwind(AssertUnwindSafe(task)).err();
            }
        }
    }
    for handoff in &handed {
        if let Some(p) = handoff.wait() {
            panicked.get_or_insert(p);
        }
    }
    if let Some(p) = panicked {
        panic::resume_unwind(p);
    }
}

/// A task handed to a worker, which the caller can take back until a worker starts it.
struct Handoff {
    /// [`Handoff::QUEUED`], then `TAKEN_BACK`, or `RUNNING` and then `DONE`.
    state: AtomicU8,
    /// The task, removed by whichever thread moves `state` out of `QUEUED`.
    task: UnsafeCell<Option<Box<dyn FnOnce() + Send + 'static>>>,
    /// A worker's panic, written before `DONE` is stored.
    panic: UnsafeCell<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `task` is touched only by the one thread that moves `state` out of QUEUED (a
// compare-exchange, so there is one); `panic` is written by the worker before its Release
// store of DONE and read by the caller only after an Acquire load of DONE.
unsafe impl Sync for Handoff {}

impl Handoff {
    const QUEUED: u8 = 0;
    const RUNNING: u8 = 1;
    const TAKEN_BACK: u8 = 2;
    const DONE: u8 = 3;

    /// Queue `task` on rayon's pool.
    ///
    /// The task may borrow from the caller of [`run_tasks`], which does not return (or
    /// unwind) before every handed task has been taken back or has finished: that is what
    /// makes erasing its lifetime sound.
    fn spawn<T: FnOnce() + Send>(task: T) -> Arc<Handoff> {
        let task: Box<dyn FnOnce() + Send + '_> = Box::new(task);
        // SAFETY: only the lifetime changes (same fat-pointer layout). `run_tasks` outlives
        // every use of the task: it either takes it back (and the worker, losing the
        // exchange, never touches it) or waits for DONE, stored after the task has run and
        // been dropped.
        let task: Box<dyn FnOnce() + Send + 'static> = unsafe { std::mem::transmute(task) };
        let handoff = Arc::new(Handoff {
            state: AtomicU8::new(Self::QUEUED),
            task: UnsafeCell::new(Some(task)),
            panic: UnsafeCell::new(None),
        });
        let shared = Arc::clone(&handoff);
        rayon::spawn(move || {
            if !shared.claim(Self::RUNNING) {
                return; // taken back by the caller: the task is not ours to touch
            }
            // SAFETY: this thread won the claim, so it alone touches `task`.
            let task = unsafe { (*shared.task.get()).take() };
            if let Some(task) = task {
                if let Err(p) = panic::catch_unwind(AssertUnwindSafe(task)) {
                    // SAFETY: written before the Release store below; read after it.
                    unsafe { *shared.panic.get() = Some(p) };
                }
            }
            shared.state.store(Self::DONE, Ordering::Release);
        });
        handoff
    }

    /// Move the state from QUEUED to `to`; whether this thread won.
    fn claim(&self, to: u8) -> bool {
        self.state
            .compare_exchange(Self::QUEUED, to, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// The task, if no worker has started it.
    fn take_back(&self) -> Option<Box<dyn FnOnce() + Send + 'static>> {
        if !self.claim(Self::TAKEN_BACK) {
            return None;
        }
        // SAFETY: this thread won the claim, so it alone touches `task`.
        unsafe { (*self.task.get()).take() }
    }

    /// Wait until a worker has finished the task (immediately if it was taken back); the
    /// worker's panic, if any.
    fn wait(&self) -> Option<Box<dyn Any + Send>> {
        let mut spins = 0u32;
        loop {
            match self.state.load(Ordering::Acquire) {
                Self::TAKEN_BACK => return None,
                // SAFETY: the worker wrote `panic` before its Release store of DONE, which
                // this Acquire load saw; nothing writes it any more.
                Self::DONE => return unsafe { (*self.panic.get()).take() },
                _ if spins < 1 << 14 => {
                    spins += 1;
                    std::hint::spin_loop();
                }
                _ => std::thread::yield_now(),
            }
        }
    }
}

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
/// equal work for [`run_tasks`], or `None` to run serially. `work_before(i)` is the bytes moved
/// by items `0..i`: zero at 0 and non-decreasing, so each cut is a binary search. Returns the
/// cut points, starting at 0 and ending at `items`. Items are never split, so one huge item is
/// one task.
pub(crate) fn split_weighted(
    items: usize,
    work_before: impl Fn(usize) -> usize,
) -> Option<Vec<usize>> {
    let total = work_before(items);
    let chunks = task_count(total, 1).min(items);
    if chunks < 2 {
        return None;
    }
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
    use std::sync::atomic::AtomicUsize;

    /// Give task `t` of `pieces` the piece `t` of `out` (3 values each) to add `t + 1` to.
    fn add_task_numbers(out: &mut [usize], calls: &AtomicUsize) {
        run_tasks(out.chunks_mut(3).enumerate().map(|(t, piece)| {
            move || {
                calls.fetch_add(1, Ordering::Relaxed);
                piece.iter_mut().for_each(|v| *v += t + 1);
            }
        }))
    }

    /// Tasks writing disjoint pieces of a buffer on the caller's stack: each runs exactly
    /// once, on pools of every size, called from inside the pool, from outside it, and nested
    /// inside another `run_tasks`.
    #[test]
    fn run_tasks_runs_each_task_once() {
        let repeats = if cfg!(miri) { 2 } else { 100 };
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for _ in 0..repeats {
                for pieces in 1..=9 {
                    let want: Vec<usize> = (0..pieces).flat_map(|t| [t + 1; 3]).collect();
                    let calls = AtomicUsize::new(0);
                    let mut out = vec![0; pieces * 3];
                    pool.install(|| add_task_numbers(&mut out, &calls));
                    assert_eq!(out, want, "{threads} threads");
                    let mut out = vec![0; pieces * 3];
                    add_task_numbers(&mut out, &calls); // outside: the global pool
                    assert_eq!(out, want);
                    let mut a = vec![0; pieces * 3];
                    let mut b = vec![0; pieces * 3];
                    pool.install(|| {
                        run_tasks([&mut a, &mut b].map(|out| {
                            let calls = &calls;
                            move || add_task_numbers(out, calls)
                        }))
                    });
                    assert_eq!((a == want, b == want), (true, true));
                    assert_eq!(calls.load(Ordering::Relaxed), 4 * pieces);
                }
            }
        }
    }

    /// A panic in any task reaches the caller, and only after every other task has finished:
    /// nothing still runs on the caller's borrowed data.
    #[test]
    fn run_tasks_resumes_a_panic_after_every_task_ends() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for bad in 0..4 {
            let finished = AtomicUsize::new(0);
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                pool.install(|| {
                    run_tasks((0..4).map(|t| {
                        let finished = &finished;
                        move || {
                            if t == bad {
                                panic!("task {t}");
                            }
                            std::thread::sleep(std::time::Duration::from_millis(2));
                            finished.fetch_add(1, Ordering::SeqCst);
                        }
                    }))
                })
            }));
            let message = *result.unwrap_err().downcast::<String>().unwrap();
            assert_eq!(message, format!("task {bad}"));
            // Tasks handed out before the panic finished; none runs on after the return.
            let seen = finished.load(Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(
                finished.load(Ordering::SeqCst),
                seen,
                "a task outlived the call"
            );
        }
    }

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
