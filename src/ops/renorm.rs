//! Lookup with `max_norm`: `F.embedding(indices, weight, max_norm=m, norm_type=p)`.
//!
//! PyTorch first renormalises, in the table itself, every row the indices reference: for each
//! distinct referenced row, `norm = ||row||_p`; if `norm > m` (strictly) the row is multiplied
//! by `m / (norm + 1e-7)`. Then it looks the rows up. This module does both in one pass: a row
//! is read once, its norm computed while it is in cache, and the (rescaled) row written to its
//! output slot and, in place, back to the table.
//!
//! Two modes, chosen explicitly:
//! - **in place** ([`Table::lookup_renorm_in_place`]), PyTorch's behaviour: the referenced rows
//!   of the table are rescaled. Needs a writable table (owned, `borrowed_mut`, or a file opened
//!   with [`OpenMode::MapWritable`](crate::OpenMode::MapWritable), where the change reaches the
//!   file).
//! - **output only** ([`Table::lookup_renorm_output_only`]): the table is untouched and the
//!   output holds what PyTorch would have returned. Works on read-only maps.
//!
//! # Exact and parallel
//! In place, each distinct row is renormed exactly once, by one thread. On one thread the
//! positions are walked once: the first position of a row renorms it (table and output
//! slot), later ones copy the renormed row. On several threads each takes a contiguous chunk
//! of positions (so threads never write near each other in the output): a position renorms
//! its row if it wins the row's claim in a per-call atomic bitset, and after the join the
//! positions that lost copy the renormed row from the table (a second, prefetched pass over
//! the duplicates only). Every rescaled value is computed from the original row, so results
//! are the same bits whatever the thread count or which position won. Output only needs no
//! claims: each position computes the scale from the row it reads.
//!
//! # Arithmetic, as PyTorch's `embedding_renorm_`
//! The norm accumulates in f32 (PyTorch's accumulator type for f32, f16 and bf16) and is
//! rounded to the table's dtype, as PyTorch's `row.norm(p)` returns a tensor of that dtype; the
//! comparison and `m / (norm + 1e-7)` are in f64 (`.item<double>()`); the multiply is in f32
//! and f16/bf16 results are rounded to nearest even. The summation order differs from
//! PyTorch's, so f32 rows can differ by an ulp or so; see [`crate::kernels::renorm`].

use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::index::{self, Index};
use crate::kernels::renorm::{NormKind, RenormJob, RenormKernels, RenormRowsFn, COPY_SLOT};
use crate::kernels::{prefetch_distance, MAX_PREFETCH_DISTANCE};
use crate::ops::lookup::{check_output_len, Conversion};
use crate::parallel;
use crate::table::Table;

/// Positions handed to a kernel at a time.
const BLOCK: usize = 256;

/// The `max_norm` and `norm_type` of a renorm, validated: `max_norm > 0` (not NaN; `inf`
/// allowed and never rescales), `norm_type > 0` (not NaN; `inf` allowed).
///
/// ```
/// use embedding_lookup::ops::renorm::MaxNorm;
///
/// let m = MaxNorm::new(1.0)?.with_norm_type(f64::INFINITY)?;
/// assert_eq!((m.max_norm(), m.norm_type()), (1.0, f64::INFINITY));
/// assert!(MaxNorm::new(0.0).is_err());
/// assert!(MaxNorm::new(1.0)?.with_norm_type(-2.0).is_err());
/// # Ok::<(), embedding_lookup::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxNorm {
    max_norm: f64,
    norm_type: f64,
}

impl MaxNorm {
    /// A renorm to `max_norm` in the 2-norm (PyTorch's default `norm_type`).
    pub fn new(max_norm: f64) -> Result<MaxNorm> {
        if max_norm.is_nan() || max_norm <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "max_norm must be greater than 0, got {max_norm}"
            )));
        }
        Ok(MaxNorm {
            max_norm,
            norm_type: 2.0,
        })
    }

    /// The same renorm in the `norm_type`-norm (`p > 0`, `f64::INFINITY` for the max norm).
    pub fn with_norm_type(self, norm_type: f64) -> Result<MaxNorm> {
        if norm_type.is_nan() || norm_type <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "norm_type must be greater than 0 (or inf), got {norm_type}"
            )));
        }
        Ok(MaxNorm { norm_type, ..self })
    }

    /// Rows whose norm exceeds this are rescaled to it.
    pub fn max_norm(&self) -> f64 {
        self.max_norm
    }

    /// The p of the p-norm.
    pub fn norm_type(&self) -> f64 {
        self.norm_type
    }
}

impl Table<'_> {
    /// Look up `indices` into `out` with PyTorch's `max_norm`, renorming the referenced rows
    /// of the table in place first, as `F.embedding(indices, weight, max_norm, norm_type)`
    /// does. `out` holds `indices.len() * dim` elements of f32 or of the table's dtype.
    ///
    /// Each distinct referenced row whose norm exceeds `max_norm` is rescaled once, however
    /// often it is referenced; `out` holds the rows as they are afterwards. Everything is
    /// checked first: on error neither `out` nor the table has been written. A read-only table
    /// (a read-only map, a borrowed slice) is refused with [`Error::ReadOnlyTable`]; use
    /// [`Table::lookup_renorm_output_only`] there.
    ///
    /// ```
    /// use embedding_lookup::{ops::renorm::MaxNorm, Table};
    ///
    /// let mut table = Table::from_slice(&[3.0f32, 4.0, 0.3, 0.4], 2, 2)?; // norms 5 and 0.5
    /// let mut out = [0.0f32; 6];
    /// table.lookup_renorm_in_place(&[0i64, 1, 0], &mut out, MaxNorm::new(1.0)?)?;
    /// let s = (1.0 / (5.0 + 1e-7)) as f32; // row 0 is rescaled once, row 1 is left alone
    /// assert_eq!(out, [3.0 * s, 4.0 * s, 0.3, 0.4, 3.0 * s, 4.0 * s]);
    /// assert_eq!(table.row::<f32>(0)?.unwrap(), [3.0 * s, 4.0 * s]);
    /// # Ok::<(), embedding_lookup::Error>(())
    /// ```
    pub fn lookup_renorm_in_place<I: Index, O: Element>(
        &mut self,
        indices: &[I],
        out: &mut [O],
        max_norm: MaxNorm,
    ) -> Result<()> {
        let conversion = Conversion::new(self.dtype(), O::DTYPE)?;
        check_output_len(indices.len(), self.dim(), out.len())?;
        self.bytes_mut()?;
        index::validate(indices, self.rows())?;
        renorm_in_place_validated(
            self,
            indices,
            Some((bytemuck::cast_slice_mut(out), conversion)),
            max_norm,
        );
        Ok(())
    }

    /// Look up `indices` into `out` as `F.embedding(..., max_norm, norm_type)` would return
    /// them, without changing the table: each output row is the table row, rescaled when its
    /// norm exceeds `max_norm`. Works on read-only tables.
    ///
    /// ```
    /// use embedding_lookup::{ops::renorm::MaxNorm, Table};
    ///
    /// let data = [3.0f32, 4.0, 0.3, 0.4];
    /// let table = Table::borrowed(&data, 2, 2)?;
    /// let mut out = [0.0f32; 4];
    /// table.lookup_renorm_output_only(&[1u32, 0], &mut out, MaxNorm::new(1.0)?)?;
    /// let s = (1.0 / (5.0 + 1e-7)) as f32;
    /// assert_eq!(out, [0.3, 0.4, 3.0 * s, 4.0 * s]);
    /// assert_eq!(data, [3.0, 4.0, 0.3, 0.4]);
    /// # Ok::<(), embedding_lookup::Error>(())
    /// ```
    pub fn lookup_renorm_output_only<I: Index, O: Element>(
        &self,
        indices: &[I],
        out: &mut [O],
        max_norm: MaxNorm,
    ) -> Result<()> {
        let conversion = Conversion::new(self.dtype(), O::DTYPE)?;
        check_output_len(indices.len(), self.dim(), out.len())?;
        index::validate(indices, self.rows())?;
        let out: &mut [u8] = bytemuck::cast_slice_mut(out);
        let dim = self.dim();
        let row_bytes = self.row_bytes();
        if row_bytes == 0 || indices.is_empty() {
            return Ok(());
        }
        let out_row_bytes = out.len() / indices.len();
        let kernel = kernel_for(&RenormKernels::detect(), self.dtype());
        let job = RenormJob {
            // Never written: `write_back` is false.
            table: self.as_bytes().as_ptr() as *mut u8,
            dim,
            write_back: false,
            out: std::ptr::null_mut(),
            out_f32: conversion != Conversion::Copy,
            norm: NormKind::new(max_norm.norm_type),
            max_norm: max_norm.max_norm,
            prefetch: prefetch_distance(),
        };
        let run = |indices: &[I], out: &mut [u8]| {
            let job = job.with_out(out.as_mut_ptr());
            // SAFETY: indices validated; `out` holds a row per index; nothing writes the table
            // (it is borrowed shared and `write_back` is false); no copies.
            unsafe { run_blocks(kernel, &job, out_row_bytes, indices, |_, _| Some(0)) }
        };
        let tasks = parallel::task_count(indices.len(), row_bytes + out_row_bytes);
        let chunk = indices.len().div_ceil(tasks);
        let run = &run;
        parallel::run_tasks(
            out.chunks_mut(chunk * out_row_bytes)
                .zip(indices.chunks(chunk))
                .map(|(out, indices)| move || run(indices, out)),
        );
        Ok(())
    }

    /// Renorm the rows `indices` reference, in place, without a lookup: PyTorch's
    /// `torch.embedding_renorm_(weight, indices, max_norm, norm_type)`. Each distinct row is
    /// rescaled at most once. Refuses read-only tables; on error nothing is written.
    pub fn renorm_in_place<I: Index>(&mut self, indices: &[I], max_norm: MaxNorm) -> Result<()> {
        self.bytes_mut()?;
        index::validate(indices, self.rows())?;
        renorm_in_place_validated(self, indices, None, max_norm);
        Ok(())
    }
}

/// The kernel for a table dtype.
fn kernel_for(kernels: &RenormKernels, dtype: DType) -> RenormRowsFn {
    match dtype {
        DType::F32 => kernels.f32,
        DType::F16 => kernels.f16,
        DType::BF16 => kernels.bf16,
    }
}

/// The rows already renormed by a one-thread call.
enum Seen {
    /// One bit per table row.
    Bits(Vec<u64>),
    /// The rows seen, for few indices over many rows.
    Set(std::collections::HashSet<usize>),
}

impl Seen {
    fn new(rows: usize, indices: usize) -> Seen {
        if rows / 64 > 4 * indices + 4096 {
            Seen::Set(std::collections::HashSet::with_capacity(indices))
        } else {
            Seen::Bits(vec![0; rows.div_ceil(64)])
        }
    }

    /// Mark `row`; whether it was the first time.
    #[inline(always)]
    fn first(&mut self, row: usize) -> bool {
        match self {
            Seen::Bits(words) => {
                let bit = 1u64 << (row % 64);
                let w = words[row / 64];
                words[row / 64] = w | bit;
                w & bit == 0
            }
            Seen::Set(set) => set.insert(row),
        }
    }
}

/// One bit per table row, set by the first position to claim the row (several threads).
struct RowClaims(Vec<AtomicU64>);

impl RowClaims {
    fn new(rows: usize) -> RowClaims {
        RowClaims((0..rows.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// Whether this call is the first to claim `row`. Relaxed suffices: the bit only decides
    /// who renorms the row; the renormed rows reach the other positions through the join that
    /// ends the first phase.
    #[inline(always)]
    fn claim(&self, row: usize) -> bool {
        let word = &self.0[row / 64];
        let bit = 1u64 << (row % 64);
        // A plain load first: duplicates skip the read-modify-write.
        word.load(Ordering::Relaxed) & bit == 0 && word.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }
}

/// The in-place renorm (and lookup, when `out` is given) for validated indices on a writable
/// table.
///
/// On one thread, a single pass: the first position of a row renorms it (table and output
/// slot), later positions copy the renormed row from the table.
///
/// On several threads, each takes a contiguous chunk of positions (and so of the output, which
/// threads then never share). Phase 1: a position renorms its row if it wins the row's claim
/// in a shared bitset, so each row is read and written by one thread only. Phase 2, after the
/// join: the positions that lost their claim copy the renormed row from the table.
pub(crate) fn renorm_in_place_validated<I: Index>(
    table: &mut Table<'_>,
    indices: &[I],
    out: Option<(&mut [u8], Conversion)>,
    max_norm: MaxNorm,
) {
    let dim = table.dim();
    let row_bytes = table.row_bytes();
    let rows = table.rows();
    if row_bytes == 0 || indices.is_empty() {
        return;
    }
    let kernel = kernel_for(&RenormKernels::detect(), table.dtype());
    let (mut out, conversion) = match out {
        Some((o, c)) => (Some(o), c),
        None => (None, Conversion::Copy),
    };
    let out_row_bytes = out.as_ref().map_or(0, |o| o.len() / indices.len());
    let job = RenormJob {
        table: table
            .bytes_mut()
            .expect("checked writable by the caller")
            .as_mut_ptr(),
        dim,
        write_back: true,
        out: out
            .as_mut()
            .map_or(std::ptr::null_mut(), |o| o.as_mut_ptr()),
        out_f32: conversion != Conversion::Copy,
        norm: NormKind::new(max_norm.norm_type),
        max_norm: max_norm.max_norm,
        prefetch: prefetch_distance(),
    };
    let with_out = out.is_some();
    let Some(chunk) = parallel::chunk_items(indices.len(), row_bytes + out_row_bytes) else {
        let mut seen = Seen::new(rows, indices.len());
        // SAFETY: indices validated; `job.out` (if any) holds a row per index; one thread; a
        // row's first entry renorms it and its later entries (copies) follow it.
        unsafe {
            run_blocks(kernel, &job, out_row_bytes, indices, |_, r| {
                if seen.first(r) {
                    Some(0)
                } else {
                    with_out.then_some(COPY_SLOT)
                }
            })
        };
        return;
    };

    // Phase 1: each distinct row renormed once, by the position that claims it.
    let claims = RowClaims::new(rows);
    let phase1 = |indices: &[I], out: *mut u8| {
        let mut owned = vec![0u64; indices.len().div_ceil(64)];
        let job = job.with_out(out);
        // SAFETY: indices validated; `out` (if any) holds a row per index of this chunk; the
        // claims give each row to one position of one thread, so no row is touched by two
        // threads.
        unsafe {
            run_blocks(kernel, &job, out_row_bytes, indices, |p, r| {
                claims.claim(r).then(|| {
                    owned[p / 64] |= 1 << (p % 64);
                    0
                })
            })
        };
        owned
    };
    let owned: Vec<Vec<u64>> = match out {
        Some(ref mut o) => o
            .par_chunks_mut(chunk * out_row_bytes)
            .zip(indices.par_chunks(chunk))
            .map(|(o, idx)| phase1(idx, o.as_mut_ptr()))
            .collect(),
        None => indices
            .par_chunks(chunk)
            .map(|idx| phase1(idx, std::ptr::null_mut()))
            .collect(),
    };

    // Phase 2: the other positions copy their (renormed) row from the table.
    let Some(out) = out else { return };
    out.par_chunks_mut(chunk * out_row_bytes)
        .zip(indices.par_chunks(chunk))
        .zip(owned.par_iter())
        .for_each(|((o, idx), owned)| {
            let job = job.with_out(o.as_mut_ptr());
            // SAFETY: indices validated; `o` holds a row per index of this chunk; copy entries
            // only read the table, which nothing writes any more.
            unsafe {
                run_blocks(kernel, &job, out_row_bytes, idx, |p, _| {
                    (owned[p / 64] >> (p % 64) & 1 == 0).then_some(COPY_SLOT)
                })
            };
        });
}

/// The block loop on one thread: `select(position, row)` picks the positions handed to the
/// kernel, with their slot flag (`0` to renorm, [`COPY_SLOT`] to copy); the rows of the next
/// positions go along for prefetching. `job.out` is the output row of position 0.
///
/// # Safety
/// `indices` are validated against the table of `job`; `job.out` is null or holds a row of
/// `out_row_bytes` per index (and then [`COPY_SLOT`] may be selected); the selected entries
/// satisfy [`RenormRowsFn`]'s contract: in place, a renorm entry's row is touched by no other
/// thread during the call, and a copy entry's row was renormed before (or is not renormed in
/// this call).
unsafe fn run_blocks<I: Index>(
    kernel: RenormRowsFn,
    job: &RenormJob,
    out_row_bytes: usize,
    indices: &[I],
    mut select: impl FnMut(usize, usize) -> Option<usize>,
) {
    let mut rows = [0usize; BLOCK + MAX_PREFETCH_DISTANCE];
    let mut slots = [0usize; BLOCK];
    let n = indices.len();
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let mut m = 0;
        for (p, &i) in indices[start..end].iter().enumerate() {
            // Validated: 0 <= i < rows, so the wrapped value is the row number.
            let r = i.as_wrapped_u64() as usize;
            if let Some(flag) = select(start + p, r) {
                rows[m] = r;
                slots[m] = p | flag;
                m += 1;
            }
        }
        let ahead_end = (end + job.prefetch).min(n);
        for (k, &i) in indices[end..ahead_end].iter().enumerate() {
            rows[m + k] = i.as_wrapped_u64() as usize;
        }
        let block_job = job.with_out(if job.out.is_null() {
            job.out
        } else {
            job.out.wrapping_add(start * out_row_bytes)
        });
        // SAFETY: the caller's contract; `m` slots inside this block's output rows, distinct.
        unsafe { kernel(&block_job, &rows[..m + ahead_end - end], &slots[..m], m) };
        start = end;
    }
}
