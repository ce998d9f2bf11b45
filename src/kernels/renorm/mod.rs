//! Renorm kernels: the fused max_norm pass of `F.embedding(..., max_norm=m, norm_type=p)`.
//!
//! For each row of a block, a kernel reads the row once, computes its p-norm while the row
//! sits in registers or L1, and writes the row to its output slot: rescaled by
//! `m / (norm + 1e-7)` when `norm > m`, copied otherwise. In place, a rescaled row is also
//! written back to the table.
//!
//! # One summation order on every instruction set
//! The norms accumulate in f32 (as PyTorch does) over 16 virtual lanes: element `j` of a row
//! goes to lane `j % 16`, each lane adds its elements in order, and the lanes are summed by the
//! fixed tree of [`reduce16`]. AVX-512 holds the lanes in one vector, AVX2 and the portable
//! kernels in two, the scalar reference in an array; squares are a multiply then an add (never
//! a fused multiply-add). So every kernel gives the same norm to the bit, the scaled rows are
//! identical whatever the instruction set, and the tests compare them bit for bit.
//!
//! p = 1, 2 and ∞ are vectorised; any other p goes through `scalar::norm_p` (`|x|^p` summed in
//! the same lanes, then `^(1/p)`, in f32 like PyTorch's `NormOps`).

pub(crate) mod portable;
pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use super::{prefetch_read, Isa};
use crate::dtype::Element;

/// Which p-norm, as the kernels dispatch on it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// p = 1: the sum of magnitudes.
    L1,
    /// p = 2: the Euclidean norm.
    L2,
    /// p = ∞: the largest magnitude (NaN if any element is NaN, as PyTorch's `max_propagate_nan`).
    Inf,
    /// Any other p > 0, in f32 as PyTorch's accumulator type is.
    P(f32),
}

impl NormKind {
    /// The kind for a norm type given as f64 (already validated: > 0, not NaN).
    pub fn new(norm_type: f64) -> NormKind {
        if norm_type == 1.0 {
            NormKind::L1
        } else if norm_type == 2.0 {
            NormKind::L2
        } else if norm_type == f64::INFINITY {
            NormKind::Inf
        } else {
            NormKind::P(norm_type as f32)
        }
    }
}

/// One renorm call's fixed parameters, shared by every block.
///
/// Raw pointers because in place the table is written by several threads at once (each a
/// different set of rows) and the output slots of a block need not be consecutive.
#[derive(Clone, Copy, Debug)]
pub struct RenormJob {
    /// The table's first element (elements of the kernel's dtype, row-major).
    pub table: *mut u8,
    /// Elements per row.
    pub dim: usize,
    /// Write rescaled rows back to the table.
    pub write_back: bool,
    /// The first output row of the block; null for no output (a renorm without lookup).
    pub out: *mut u8,
    /// Output rows are f32 (widened); otherwise they have the table's dtype.
    pub out_f32: bool,
    /// Write output rows with streaming stores where a kernel has them (the AVX-512 f32
    /// 2-norm rows); the others ignore it. Only when `out` is 64-byte aligned and output rows
    /// are whole cache lines, or `out` is 16-byte aligned, output rows are whole lines and the
    /// slots are `0..count` (the lookups decide with `kernels::use_streaming_stores`).
    pub stream_out: bool,
    /// The norm.
    pub norm: NormKind,
    /// Rows whose norm exceeds this are rescaled.
    pub max_norm: f64,
    /// How many entries ahead to prefetch (0: none); `rows` holds up to that many after the
    /// block's `count`.
    pub prefetch: usize,
    /// Unless null, a bitset with a bit per output slot: the kernel sets the bit of every
    /// entry whose row it rescaled (in place or not), so that a caller can write back later
    /// exactly the rows that needed it.
    pub rescaled: *mut u64,
}

impl RenormJob {
    /// The same job writing its output rows from `out`.
    pub fn with_out(&self, out: *mut u8) -> RenormJob {
        RenormJob { out, ..*self }
    }
}

// SAFETY: the job is a set of addresses and numbers; what may be done through the pointers,
// and by which thread, is the kernels' `# Safety` contract, which the caller upholds.
unsafe impl Send for RenormJob {}
// SAFETY: as above.
unsafe impl Sync for RenormJob {}

/// Renorm the first `count` rows of `rows` into output slots `slots[..count]`.
///
/// # Safety
/// - Every `rows[i]` (all of them: entries past `count` are only prefetched) is below the
///   table's row count, and `job.table` points to that many rows of `job.dim` elements of
///   the kernel's dtype.
/// - `count <= rows.len()` and `count <= slots.len()`.
/// - Unless `job.out` is null, it is valid for writes of `max(slots[..count]) + 1` output rows
///   (`job.dim` elements of f32 when `job.out_f32`, of the table's dtype otherwise), and the
///   slots are distinct.
/// - If `job.write_back`, the rows of the `count` entries are distinct, the table is
///   writable, and no other thread reads or writes these rows during the call; otherwise no
///   thread writes the rows during the call.
/// - If `job.stream_out`, an output row is a multiple of 64 bytes and `job.out` is 64-byte
///   aligned, or 16-byte aligned with `slots[..count]` equal to `0..count`.
/// - Unless `job.rescaled` is null, it is valid for writes of `max(slots[..count]) / 64 + 1`
///   words.
/// - The CPU supports the kernel's instruction set.
pub type RenormRowsFn = unsafe fn(job: &RenormJob, rows: &[usize], slots: &[usize], count: usize);

/// The renorm kernels of one instruction-set level, one per table dtype.
#[derive(Clone, Copy, Debug)]
pub struct RenormKernels {
    isa: Isa,
    pub(crate) f32: RenormRowsFn,
    pub(crate) f16: RenormRowsFn,
    pub(crate) bf16: RenormRowsFn,
}

impl RenormKernels {
    /// The kernels in use on this CPU ([`Isa::detect`]).
    pub fn detect() -> RenormKernels {
        Self::for_isa(Isa::detect()).expect("the detected ISA is available")
    }

    /// The kernels of one level, or `None` if the CPU cannot run it. NEON uses the portable
    /// kernels.
    pub fn for_isa(isa: Isa) -> Option<RenormKernels> {
        if !isa.is_available() {
            return None;
        }
        Some(match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => RenormKernels {
                isa,
                f32: avx512::renorm_f32,
                f16: avx512::renorm_f16,
                bf16: avx512::renorm_bf16,
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => RenormKernels {
                isa,
                f32: avx2::renorm_f32,
                f16: avx2::renorm_f16,
                bf16: avx2::renorm_bf16,
            },
            Isa::Neon | Isa::Portable => RenormKernels {
                isa,
                f32: portable::renorm_f32,
                f16: portable::renorm_f16,
                bf16: portable::renorm_bf16,
            },
            Isa::Scalar => RenormKernels {
                isa,
                f32: scalar::renorm_rows::<f32>,
                f16: scalar::renorm_rows::<half::f16>,
                bf16: scalar::renorm_rows::<half::bf16>,
            },
            #[allow(unreachable_patterns)]
            _ => return None,
        })
    }

    /// The instruction-set level.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The kernel's name (`avx512`, `avx2+f16c`, `portable`, `scalar`).
    pub fn name(&self) -> &'static str {
        self.isa.name()
    }
}

/// PyTorch's decision for one row: `norm` is rounded to the table's dtype (PyTorch's
/// `row.norm(p)` is a tensor of that dtype), widened to f64 (`.item<double>()`), compared
/// strictly with `max_norm`, and the scale `max_norm / (norm + 1e-7)` is taken in f64. `row *=
/// scale` then converts the scale to the row's dtype (through f32, as `c10::Half` and
/// `c10::BFloat16` are built) and multiplies in f32, so the scale returned is rounded to `T`.
/// `None` leaves the row as it is (NaN norms included).
#[inline(always)]
pub fn row_scale<T: Element>(norm: f32, max_norm: f64) -> Option<f32> {
    let norm = T::from_f32(norm).to_f32() as f64;
    if norm > max_norm {
        let scale = (max_norm / (norm + 1e-7)) as f32;
        Some(T::from_f32(scale).to_f32())
    } else {
        None
    }
}

/// The fixed summation tree over the 16 lanes: lane `l` plus lane `l + 8`, then `+ 4`, `+ 2`,
/// `+ 1`. Every kernel finishes its norm with this function.
#[inline(always)]
pub fn reduce16(mut v: [f32; 16]) -> f32 {
    let mut w = 8;
    while w > 0 {
        for l in 0..w {
            v[l] += v[l + w];
        }
        w /= 2;
    }
    v[0]
}

/// Finish a norm from its 16 lane accumulators: `sum` for p = 1, `sqrt(sum)` for p = 2,
/// the largest lane (or NaN) for p = ∞.
#[inline(always)]
pub(crate) fn finish(kind: NormKind, lanes: [f32; 16], any_nan: bool) -> f32 {
    match kind {
        NormKind::L1 => reduce16(lanes),
        NormKind::L2 => reduce16(lanes).sqrt(),
        NormKind::Inf => {
            if any_nan {
                f32::NAN
            } else {
                lanes.iter().fold(0.0f32, |m, &x| m.max(x))
            }
        }
        NormKind::P(_) => unreachable!("general p is computed by scalar::norm"),
    }
}

/// The per-dtype row operations an instruction set provides to [`drive`].
///
/// # Safety
/// Implementations may use instructions of their level: callers run them only inside a
/// function compiled for (and called on a CPU with) that level.
pub(crate) unsafe trait RowOps<T: Element> {
    /// The 16 lane accumulators of `src[..dim]` for p = 1, 2 or ∞, and whether any element is
    /// NaN (needed for p = ∞ only).
    ///
    /// # Safety
    /// `src` readable for `dim` elements.
    unsafe fn lanes(src: *const T, dim: usize, kind: NormKind) -> ([f32; 16], bool);

    /// `out[j] = round(src[j] * scale)` (and the same into `table` unless null); `out` holds
    /// f32 when `out_f32`, otherwise `T`; `out` may be null.
    ///
    /// # Safety
    /// `src` readable, `table` (unless null) writable, `out` (unless null) writable for `dim`
    /// elements; `table` is either `src` itself or does not overlap it.
    unsafe fn scale(
        src: *const T,
        dim: usize,
        scale: f32,
        table: *mut T,
        out: *mut u8,
        out_f32: bool,
    );

    /// Copy `src[..dim]` to `out` as is (`T`) or widened (f32).
    ///
    /// # Safety
    /// `src` readable, `out` writable for `dim` elements of the output type.
    unsafe fn copy(src: *const T, dim: usize, out: *mut u8, out_f32: bool);
}

/// Set `slot`'s bit in `job.rescaled`, unless that is null.
///
/// # Safety
/// [`RenormRowsFn`]'s contract for `job.rescaled`; `slot` is one of the call's slots.
#[inline(always)]
pub(crate) unsafe fn mark_rescaled(job: &RenormJob, slot: usize) {
    if !job.rescaled.is_null() {
        // SAFETY: the contract makes the word of every slot writable.
        unsafe { *job.rescaled.add(slot / 64) |= 1 << (slot % 64) };
    }
}

/// The block loop shared by every instruction set: prefetch ahead, norm, decide, write.
/// Inlined into each level's `#[target_feature]` function so that the whole loop compiles
/// for that level.
///
/// # Safety
/// [`RenormRowsFn`]'s contract, with `O` the operations of a level the CPU supports.
#[inline(always)]
pub(crate) unsafe fn drive<T: Element, O: RowOps<T>>(
    job: &RenormJob,
    rows: &[usize],
    slots: &[usize],
    count: usize,
) {
    let dim = job.dim;
    let row_bytes = dim * std::mem::size_of::<T>();
    let out_row_bytes = if job.out_f32 { dim * 4 } else { row_bytes };
    let base = job.table;
    for k in 0..count {
        if job.prefetch > 0 {
            if let Some(&ahead) = rows.get(k + job.prefetch) {
                prefetch_read(base.wrapping_add(ahead * row_bytes), row_bytes);
            }
        }
        // SAFETY: the contract puts every row inside the table and every slot inside the
        // output; in place, this thread alone touches this row during the call.
        unsafe {
            let r = *rows.get_unchecked(k);
            let src = base.add(r * row_bytes) as *mut T;
            let slot = *slots.get_unchecked(k);
            let out = if job.out.is_null() {
                std::ptr::null_mut()
            } else {
                job.out.add(slot * out_row_bytes)
            };
            let norm = match job.norm {
                NormKind::P(p) => scalar::norm_p(std::slice::from_raw_parts(src, dim), p),
                kind => {
                    let (lanes, any_nan) = O::lanes(src, dim, kind);
                    finish(kind, lanes, any_nan)
                }
            };
            match row_scale::<T>(norm, job.max_norm) {
                Some(s) => {
                    mark_rescaled(job, slot);
                    let table = if job.write_back {
                        src
                    } else {
                        std::ptr::null_mut()
                    };
                    O::scale(src, dim, s, table, out, job.out_f32);
                }
                None if !out.is_null() => O::copy(src, dim, out, job.out_f32),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
