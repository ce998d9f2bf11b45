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
//! In place, each distinct row is renormed exactly once, by one thread: a per-call bitset over
//! the rows is claimed atomically, and the position that claims a row renorms it (writing the
//! table and its own output slot). Every other position referencing that row is copied from
//! the table after all claimed rows are done (a second, usually small, gather). Every rescaled
//! value is computed from the original row, so results are the same bits whatever the thread
//! count or which position won the claim. Output only needs no claims: each position computes
//! the scale from the row it reads.
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
use crate::kernels::renorm::{NormKind, RenormJob, RenormKernels, RenormRowsFn};
use crate::kernels::PREFETCH_DISTANCE;
use crate::ops::lookup::{check_output_len, Conversion};
use crate::parallel;
use crate::table::Table;

/// Positions claimed and handed to a kernel at a time.
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
        // Written so that NaN fails too.
        if !(max_norm > 0.0) {
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
        if !(norm_type > 0.0) {
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
            copy_only: false,
        };
        let run = |indices: &[I], out: &mut [u8]| {
            let job = job.with_out(out.as_mut_ptr());
            // SAFETY: indices validated; `out` holds a row per index; nothing writes the table
            // (it is borrowed shared and `write_back` is false).
            unsafe { renorm_serial(kernel, &job, out_row_bytes, indices, |_, _| true) }
        };
        match parallel::chunk_items(indices.len(), row_bytes + out_row_bytes) {
            None => run(indices, out),
            Some(chunk) => out
                .par_chunks_mut(chunk * out_row_bytes)
                .zip(indices.par_chunks(chunk))
                .for_each(|(out, indices)| run(indices, out)),
        }
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

/// Who renorms a row in place.
enum Claim<'c> {
    /// The first position to set the row's bit (shared between threads).
    Shared(&'c RowClaims),
    /// The first position seen (one thread, few indices over many rows).
    Local(std::collections::HashSet<usize>),
}

impl Claim<'_> {
    #[inline(always)]
    fn claim(&mut self, row: usize) -> bool {
        match self {
            Claim::Shared(c) => c.claim(row),
            Claim::Local(seen) => seen.insert(row),
        }
    }
}

/// One bit per table row, set by the first position that claims the row.
struct RowClaims {
    words: Vec<AtomicU64>,
}

impl RowClaims {
    fn new(rows: usize) -> RowClaims {
        RowClaims {
            words: (0..rows.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether this call is the first to claim `row`. Relaxed suffices: the bit decides only
    /// who renorms the row; the rows themselves are published to other positions by the join
    /// that ends the renorm phase.
    #[inline(always)]
    fn claim(&self, row: usize) -> bool {
        let word = &self.words[row / 64];
        let bit = 1u64 << (row % 64);
        // A plain load first: rows already claimed (the duplicates) skip the atomic write.
        word.load(Ordering::Relaxed) & bit == 0 && word.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }
}

/// The in-place renorm (and lookup, when `out` is given) for validated indices on a writable
/// table: claim and renorm in parallel, then copy the rows of unclaimed positions.
fn renorm_in_place_validated<I: Index>(
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
        out: std::ptr::null_mut(),
        out_f32: conversion != Conversion::Copy,
        norm: NormKind::new(max_norm.norm_type),
        max_norm: max_norm.max_norm,
        copy_only: false,
    };
    let chunk = parallel::chunk_items(indices.len(), row_bytes + out_row_bytes);

    // Phase 1: renorm each distinct row once, into the table and the claiming position's slot.
    let owned: Vec<Vec<u64>> = match chunk {
        None => {
            // One thread: a bitset over the rows unless the table is much larger than the
            // batch, then a hash set of the rows seen.
            let dense;
            let mut claim = if rows / 64 <= 4 * indices.len() + 4096 {
                dense = RowClaims::new(rows);
                Claim::Shared(&dense)
            } else {
                Claim::Local(std::collections::HashSet::with_capacity(indices.len()))
            };
            let mut owned = vec![0u64; indices.len().div_ceil(64)];
            let job = RenormJob {
                out: out
                    .as_mut()
                    .map_or(std::ptr::null_mut(), |o| o.as_mut_ptr()),
                ..job
            };
            // SAFETY: indices validated; `out` (if any) holds a row per index; one thread, and
            // the claims give each row to one position only.
            unsafe {
                renorm_serial(kernel, &job, out_row_bytes, indices, |p, r| {
                    claim_position(&mut claim, &mut owned, p, r)
                })
            };
            vec![owned]
        }
        Some(chunk) => {
            let claims = RowClaims::new(rows);
            let run = |indices: &[I], out: *mut u8| {
                let mut owned = vec![0u64; indices.len().div_ceil(64)];
                let job = job.with_out(out);
                let mut claim = Claim::Shared(&claims);
                // SAFETY: indices validated; `out` (if any) holds a row per index of this
                // chunk; the shared claims give each row to exactly one position of one
                // thread, so no row is read or written by two threads.
                unsafe {
                    renorm_serial(kernel, &job, out_row_bytes, indices, |p, r| {
                        claim_position(&mut claim, &mut owned, p, r)
                    })
                };
                owned
            };
            match out {
                Some(ref mut o) => o
                    .par_chunks_mut(chunk * out_row_bytes)
                    .zip(indices.par_chunks(chunk))
                    .map(|(o, idx)| run(idx, o.as_mut_ptr()))
                    .collect(),
                None => indices
                    .par_chunks(chunk)
                    .map(|idx| run(idx, std::ptr::null_mut()))
                    .collect(),
            }
        }
    };

    // Phase 2: positions that did not claim their row copy it, renormed, from the table.
    // Every row was written in phase 1, which the join has ended; now the table is only read.
    let Some(out) = out else { return };
    let copy = RenormJob {
        copy_only: true,
        write_back: false,
        ..job
    };
    let copy_unowned = |indices: &[I], out: &mut [u8], owned: &[u64]| {
        let job = copy.with_out(out.as_mut_ptr());
        // SAFETY: indices validated; `out` holds a row per index of this chunk; nothing writes
        // the table any more (`copy_only`).
        unsafe {
            renorm_serial(kernel, &job, out_row_bytes, indices, |p, _| {
                owned[p / 64] >> (p % 64) & 1 == 0
            })
        };
    };
    match chunk {
        None => copy_unowned(indices, out, &owned[0]),
        Some(chunk) => out
            .par_chunks_mut(chunk * out_row_bytes)
            .zip(indices.par_chunks(chunk))
            .zip(owned.par_iter())
            .for_each(|((o, idx), owned)| copy_unowned(idx, o, owned)),
    }
}

/// Claim `row` for position `p`; record the position as the row's owner when it wins.
#[inline(always)]
fn claim_position(claim: &mut Claim<'_>, owned: &mut [u64], p: usize, row: usize) -> bool {
    let won = claim.claim(row);
    if won {
        owned[p / 64] |= 1 << (p % 64);
    }
    won
}

/// The block loop on one thread: `select(position, row)` picks the positions of a block to
/// hand to the kernel (all of them, the claiming ones, or the unclaimed ones), with the next
/// positions' rows for prefetching.
///
/// # Safety
/// `indices` are validated against the table of `job`; `job.out` is null or holds a row of
/// `out_row_bytes` per index; when `job.write_back`, `select` gives no row to two positions
/// running at the same time, and otherwise nothing writes the selected rows.
unsafe fn renorm_serial<I: Index>(
    kernel: RenormRowsFn,
    job: &RenormJob,
    out_row_bytes: usize,
    indices: &[I],
    mut select: impl FnMut(usize, usize) -> bool,
) {
    let mut rows = [0usize; BLOCK + PREFETCH_DISTANCE];
    let mut slots = [0usize; BLOCK];
    let n = indices.len();
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let mut m = 0;
        for (p, &i) in indices[start..end].iter().enumerate() {
            // Validated: 0 <= i < rows, so the wrapped value is the row number.
            let r = i.as_wrapped_u64() as usize;
            if select(start + p, r) {
                rows[m] = r;
                slots[m] = p;
                m += 1;
            }
        }
        let ahead_end = (end + PREFETCH_DISTANCE).min(n);
        for (k, &i) in indices[end..ahead_end].iter().enumerate() {
            rows[m + k] = i.as_wrapped_u64() as usize;
        }
        let block_job = RenormJob {
            out: if job.out.is_null() {
                job.out
            } else {
                job.out.wrapping_add(start * out_row_bytes)
            },
            ..*job
        };
        // SAFETY: the caller's contract: rows validated, `count = m` slots inside this
        // block's output rows and distinct, claimed rows owned by this position alone.
        unsafe { kernel(&block_job, &rows[..m + ahead_end - end], &slots[..m], m) };
        start = end;
    }
}
