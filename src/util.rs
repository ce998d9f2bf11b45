//! Small helpers shared by the crate: a seeded generator for test tables and benchmarks, and
//! bounded thread pools.

/// SplitMix64: tiny, fast, deterministic for a seed. Not for cryptography.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift (bias below 2^-32 for n < 2^32).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal, by Box–Muller.
    pub fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform(); // in (0, 1]
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// The most threads [`thread_pool`] (and `emb --threads`) accepts. A pool of thousands of OS
/// threads on a machine of a few cores only adds start-up and scheduling cost (10 000 threads
/// turned a 10-row lookup into minutes), so larger requests are refused rather than capped.
pub const MAX_THREADS: usize = 1024;

/// A rayon pool of `threads` workers (`1..=MAX_THREADS`), for running operations on a chosen
/// number of threads with `pool.install(|| ...)`.
///
/// ```
/// let pool = embedding_lookup::util::thread_pool(2)?;
/// assert_eq!(pool.install(rayon::current_num_threads), 2);
/// assert!(embedding_lookup::util::thread_pool(100_000).is_err());
/// # Ok::<(), embedding_lookup::Error>(())
/// ```
pub fn thread_pool(threads: usize) -> crate::Result<rayon::ThreadPool> {
    check_threads(threads)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| crate::Error::InvalidArgument(format!("cannot start {threads} threads: {e}")))
}

/// `Ok` for a thread count in `1..=MAX_THREADS`, else an error saying the allowed range.
pub fn check_threads(threads: usize) -> crate::Result<()> {
    if (1..=MAX_THREADS).contains(&threads) {
        return Ok(());
    }
    Err(crate::Error::InvalidArgument(format!(
        "{threads} threads: the thread count must be between 1 and {MAX_THREADS} \
         (this machine has {} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )))
}
