//! The SIMD kernels, chosen once at run time for the CPU.
//!
//! Each operation has one module (`gather`, ...) holding a scalar reference, a portable
//! implementation on `wide`, and explicit kernels per instruction set (`avx512`, `avx2`, `neon`).
//! [`Isa::detect`] picks the best instruction set once; every kernel table is built for an
//! [`Isa`], so a reader (and `emb --verbose`) can name the kernel that ran.
//!
//! Setting `EMBEDDING_LOOKUP_ISA=scalar|portable|avx2|avx512|neon` forces a lower level, which
//! is how the fallbacks are tested on a machine that has AVX-512. A value that names no level,
//! or one this CPU cannot run, is an error from [`Isa::requested`] (which `emb` refuses to run
//! with); the library itself then keeps the best level and says so once on stderr.

pub mod bag;
pub mod gather;
pub mod grad;
#[cfg(target_arch = "x86_64")]
pub(crate) mod realign;
pub mod renorm;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// How many rows ahead of the one being read the kernels prefetch, unless changed with
/// [`set_prefetch_distance`]. A measured choice (`emb bench --prefetch`, BENCHMARKS.md): with
/// prefetches into L2, lookups are flat from 8 to 64 rows ahead and bags, which read rows
/// without writing any, gain up to 32.
pub const DEFAULT_PREFETCH_DISTANCE: usize = 32;

/// The largest prefetch distance [`set_prefetch_distance`] accepts.
pub const MAX_PREFETCH_DISTANCE: usize = 64;

static PREFETCH_DISTANCE: AtomicUsize = AtomicUsize::new(DEFAULT_PREFETCH_DISTANCE);

/// Set how many rows ahead the kernels prefetch (0 turns prefetching off; clamped to
/// [`MAX_PREFETCH_DISTANCE`]). Process-wide; meant for benchmarks and tuning.
pub fn set_prefetch_distance(rows: usize) {
    PREFETCH_DISTANCE.store(rows.min(MAX_PREFETCH_DISTANCE), Ordering::Relaxed);
}

/// The prefetch distance in use.
#[inline]
pub fn prefetch_distance() -> usize {
    PREFETCH_DISTANCE.load(Ordering::Relaxed)
}

/// Outputs of at least this many bytes are written with streaming (non-temporal) stores,
/// unless changed with [`set_streaming_threshold`]. A measured choice (BENCHMARKS.md): an
/// output that does not fit in the last-level cache is not read back from it, and streaming
/// skips the read-for-ownership of every output line.
pub const DEFAULT_STREAMING_THRESHOLD: usize = 32 << 20;

static STREAMING_THRESHOLD: AtomicUsize = AtomicUsize::new(DEFAULT_STREAMING_THRESHOLD);

/// Set the output size from which gathers use streaming stores (`usize::MAX`: never, `0`:
/// always). Process-wide; meant for benchmarks and tuning.
pub fn set_streaming_threshold(bytes: usize) {
    STREAMING_THRESHOLD.store(bytes, Ordering::Relaxed);
}

/// The streaming-store threshold in use, in output bytes.
#[inline]
pub fn streaming_threshold() -> usize {
    STREAMING_THRESHOLD.load(Ordering::Relaxed)
}

static STREAMED_OUTPUTS: AtomicU64 = AtomicU64::new(0);

/// Ends a kernel's run of streaming stores: orders them (they are weakly ordered) before
/// whatever this thread stores next, and counts the run, so that a test can tell that the
/// streaming path ran and not only that its result was right.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn finish_streaming_stores() {
    // SAFETY: `sfence` is SSE, which every x86_64 CPU has.
    unsafe { std::arch::x86_64::_mm_sfence() };
    STREAMED_OUTPUTS.fetch_add(1, Ordering::Relaxed);
}

/// How many kernel runs in this process have written (part of) an output with streaming
/// stores. For tests and diagnostics; every thread's runs count, so compare two readings only
/// where nothing else runs lookups between them.
#[doc(hidden)]
pub fn streamed_outputs() -> u64 {
    STREAMED_OUTPUTS.load(Ordering::Relaxed)
}

/// Whether to write an output of `out_rows` rows of `out_row_bytes` bytes starting at `out`
/// with streaming stores: it is at least [`streaming_threshold`] bytes (too large to be read
/// back from cache), and its rows are whole cache lines, each aligned (a row's partial lines
/// would otherwise mix streaming and ordinary stores) or, where the kernels can join lines in
/// registers (`realigns`), the output 16-byte aligned, as the system allocator's buffers are.
#[inline]
pub(crate) fn use_streaming_stores(
    out: *const u8,
    out_rows: usize,
    out_row_bytes: usize,
    realigns: bool,
) -> bool {
    let at = out as usize;
    out_rows.saturating_mul(out_row_bytes) >= streaming_threshold()
        && out_row_bytes.is_multiple_of(64)
        && (at.is_multiple_of(64) || (realigns && at.is_multiple_of(16)))
}

/// An instruction-set level the kernels are written for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// x86_64 with AVX-512 F, BW and VL (masked tails, 64-byte vectors, f16 conversion).
    Avx512,
    /// x86_64 with AVX2, FMA and F16C.
    Avx2,
    /// aarch64 Advanced SIMD.
    Neon,
    /// Any CPU: the `wide` crate's portable vectors.
    Portable,
    /// Plain loops: the reference every other kernel is tested against.
    Scalar,
}

impl Isa {
    /// The kernel's name as benchmarks and `emb --verbose` print it.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2+f16c",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
            Isa::Scalar => "scalar",
        }
    }

    /// Whether this CPU can run kernels of this level.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Avx512 => {
                #[cfg(target_arch = "x86_64")]
                {
                    std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                        && std::arch::is_x86_feature_detected!("f16c")
                }
                #[cfg(not(target_arch = "x86_64"))]
                false
            }
            Isa::Avx2 => {
                #[cfg(target_arch = "x86_64")]
                {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                        && std::arch::is_x86_feature_detected!("f16c")
                }
                #[cfg(not(target_arch = "x86_64"))]
                false
            }
            Isa::Neon => {
                #[cfg(target_arch = "aarch64")]
                {
                    std::arch::is_aarch64_feature_detected!("neon")
                }
                #[cfg(not(target_arch = "aarch64"))]
                false
            }
            Isa::Portable | Isa::Scalar => true,
        }
    }

    /// Every level this CPU can run, best first.
    pub fn all_available() -> Vec<Isa> {
        [
            Isa::Avx512,
            Isa::Avx2,
            Isa::Neon,
            Isa::Portable,
            Isa::Scalar,
        ]
        .into_iter()
        .filter(|i| i.is_available())
        .collect()
    }

    /// The level in use: the best available, or a lower one forced by `EMBEDDING_LOOKUP_ISA`.
    /// Decided once per process. A value [`Isa::requested`] refuses leaves the best level in
    /// use, with one line on stderr saying why, so that a typo cannot pass unnoticed.
    pub fn detect() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Isa::all_available()[0];
            match Isa::requested() {
                Ok(forced) => forced.unwrap_or(best),
                Err(e) => {
                    eprintln!("embedding-lookup: {e}; using the {} kernels", best.name());
                    best
                }
            }
        })
    }

    /// The level `EMBEDDING_LOOKUP_ISA` asks for: `None` when it is unset or empty, the level
    /// when this CPU can run it, and an error naming the value and the choices otherwise.
    pub fn requested() -> crate::Result<Option<Isa>> {
        let value = match std::env::var("EMBEDDING_LOOKUP_ISA") {
            Ok(v) if v.trim().is_empty() => return Ok(None),
            Ok(v) => v,
            Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(std::env::VarError::NotUnicode(v)) => {
                return Err(crate::Error::InvalidArgument(format!(
                    "EMBEDDING_LOOKUP_ISA={v:?} is not valid UTF-8"
                )))
            }
        };
        let available = || {
            Isa::all_available()
                .iter()
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match Isa::from_name(&value) {
            Some(isa) if isa.is_available() => Ok(Some(isa)),
            Some(isa) => Err(crate::Error::InvalidArgument(format!(
                "EMBEDDING_LOOKUP_ISA={value}: this CPU cannot run the {} kernels; it runs {}",
                isa.name(),
                available()
            ))),
            None => Err(crate::Error::InvalidArgument(format!(
                "EMBEDDING_LOOKUP_ISA={value} names no kernel level; use one of \
                 avx512, avx2, neon, portable, scalar (this CPU runs {})",
                available()
            ))),
        }
    }

    /// Parse a name as printed by [`Isa::name`] (`avx2` is accepted for `avx2+f16c`).
    pub fn from_name(name: &str) -> Option<Isa> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "avx512" => Isa::Avx512,
            "avx2" | "avx2+f16c" => Isa::Avx2,
            "neon" => Isa::Neon,
            "portable" => Isa::Portable,
            "scalar" => Isa::Scalar,
            _ => return None,
        })
    }
}

/// Hint the CPU to fetch `len` bytes at `ptr` into the L2 cache. A hint only: it never faults,
/// so `ptr` need not be dereferenceable, but callers pass rows inside the table.
///
/// L2, not L1: a prefetch into L1 holds one of L1's few miss buffers until its line arrives,
/// which caps the misses in flight per core; into L2 it holds one of L2's many. On the
/// reference machine (Zen 4) this took random 256-byte row reads on one core from 30 to 48 M
/// rows/s, and a lookup on two from 48 to 60 M rows/s (BENCHMARKS.md, prefetch). The row
/// moves from L2 to L1 on its load, which out-of-order execution overlaps.
#[inline(always)]
pub(crate) fn prefetch_read(ptr: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let mut off = 0;
        while off < len {
            // SAFETY: prefetch is a hint and never faults, whatever the address; SSE is
            // part of the x86_64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(ptr.wrapping_add(off) as *const i8) };
            off += 64;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        let mut off = 0;
        while off < len {
            // SAFETY: PRFM is a hint and never faults, whatever the address.
            unsafe {
                std::arch::asm!("prfm pldl2keep, [{0}]", in(reg) ptr.wrapping_add(off),
                    options(nostack, readonly, preserves_flags))
            };
            off += 64;
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = (ptr, len);
}
