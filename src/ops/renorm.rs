//! Lookup with `max_norm`: `F.embedding(indices, weight, max_norm=m, norm_type=p)`.
//!
//! PyTorch first renormalises, in the table itself, every row the indices reference: for each
//! distinct referenced row, `norm = ||row||_p`; if `norm > m` (strictly) the row is multiplied
//! by `m / (norm + 1e-7)`. Then it looks the rows up. This module fuses the two: a row's norm is
//! computed while it is read for the gather, and the (rescaled) row written to its output slot;
//! in place, the rows that were rescaled are then written back to the table.
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
//! In place with a lookup, two steps: the output exactly as output only computes it, noting
//! the rows it rescaled; then the in-place renorm of those rows. Every output value and every
//! written row is computed from the original row, as a single pass would, and rows within
//! `max_norm` (all of them once a table has been renormed, as in training after the first
//! steps) cost nothing in the second step. The in-place renorm renorms each distinct row
//! exactly once, by one thread: every thread owns a share of the table's rows (by a hash of
//! the row number) and walks all positions. Results are the same bits whatever the thread
//! count.
//!
//! # Arithmetic, as PyTorch's `embedding_renorm_`
//! The norm accumulates in f32 (PyTorch's accumulator type for f32, f16 and bf16) and is
//! rounded to the table's dtype, as PyTorch's `row.norm(p)` returns a tensor of that dtype; the
//! comparison and `m / (norm + 1e-7)` are in f64 (`.item<double>()`); the multiply is in f32
//! and f16/bf16 results are rounded to nearest even. The summation order differs from
//! PyTorch's, so f32 rows can differ by an ulp or so; see [`crate::kernels::renorm`].

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::index::{self, Index};
use crate::kernels::renorm::{NormKind, RenormJob, RenormKernels, RenormRowsFn};
use crate::kernels::{prefetch_distance, use_streaming_stores, MAX_PREFETCH_DISTANCE};
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
        self.read_ahead(indices)?;
        // Two steps, the same bits as one pass (every value comes from the original rows):
        // the output as output-only computes it, noting the rows it rescaled, then the
        // in-place renorm of those rows alone. Rows within max_norm, which is all of them once
        // a table has been renormed, cost nothing in the second step.
        let rescaled = output_pass(
            self,
            indices,
            bytemuck::cast_slice_mut(out),
            conversion,
            max_norm,
            true,
        );
        if !rescaled.is_empty() {
            renorm_in_place_validated(self, &rescaled, max_norm);
        }
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
        self.read_ahead(indices)?;
        output_pass(
            self,
            indices,
            bytemuck::cast_slice_mut(out),
            conversion,
            max_norm,
            false,
        );
        Ok(())
    }

    /// Renorm the rows `indices` reference, in place, without a lookup: PyTorch's
    /// `torch.embedding_renorm_(weight, indices, max_norm, norm_type)`. Each distinct row is
    /// rescaled at most once. Refuses read-only tables; on error nothing is written.
    pub fn renorm_in_place<I: Index>(&mut self, indices: &[I], max_norm: MaxNorm) -> Result<()> {
        self.bytes_mut()?;
        index::validate(indices, self.rows())?;
        self.read_ahead(indices)?;
        renorm_in_place_validated(self, indices, max_norm);
        Ok(())
    }
}

/// The output-only lookup with renorm of validated `indices` into `out` (a row per index, of
/// the dtype `conversion` gives): each output row is its table row, rescaled if its norm
/// exceeds `max_norm`; the table is not written. With `record`, returns the rows it rescaled
/// (one entry per position, so repeated rows repeat).
fn output_pass<I: Index>(
    table: &Table<'_>,
    indices: &[I],
    out: &mut [u8],
    conversion: Conversion,
    max_norm: MaxNorm,
    record: bool,
) -> Vec<usize> {
    let row_bytes = table.row_bytes();
    if row_bytes == 0 || indices.is_empty() {
        return Vec::new();
    }
    let out_row_bytes = out.len() / indices.len();
    let kernel = kernel_for(&RenormKernels::detect(), table.dtype());
    let job = RenormJob {
        // Never written: `write_back` is false.
        table: table.as_bytes().as_ptr() as *mut u8,
        dim: table.dim(),
        write_back: false,
        out: std::ptr::null_mut(),
        out_f32: conversion != Conversion::Copy,
        // Slots are consecutive (every position is selected), as joined lines need.
        stream_out: use_streaming_stores(
            out.as_ptr(),
            indices.len(),
            out_row_bytes,
            RenormKernels::detect().isa() == crate::kernels::Isa::Avx512,
        ),
        norm: NormKind::new(max_norm.norm_type),
        max_norm: max_norm.max_norm,
        prefetch: prefetch_distance(),
        rescaled: std::ptr::null_mut(),
    };
    let run = |indices: &[I], out: &mut [u8], found: &mut Vec<usize>| {
        let job = job.with_out(out.as_mut_ptr());
        // SAFETY: indices validated; `out` holds a row per index; nothing writes the table
        // (it is borrowed shared and `write_back` is false).
        unsafe {
            run_blocks(
                kernel,
                &job,
                out_row_bytes,
                indices,
                |_, _| true,
                record.then_some(found),
            )
        }
    };
    let tasks = parallel::task_count(indices.len(), row_bytes + out_row_bytes);
    let chunk = indices.len().div_ceil(tasks);
    let mut found: Vec<Vec<usize>> = (0..tasks).map(|_| Vec::new()).collect();
    let run = &run;
    parallel::run_tasks(
        out.chunks_mut(chunk * out_row_bytes)
            .zip(indices.chunks(chunk))
            .zip(found.iter_mut())
            .map(|((out, indices), found)| move || run(indices, out, found)),
    );
    found.concat()
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

/// Which of `owners` threads renorms `row` in place: a multiplicative hash, so that the hot
/// rows of a skewed distribution (which tend to be neighbours) spread over the threads, mapped
/// to `0..owners` by a multiply and a shift rather than a division per position.
#[inline(always)]
fn owner(row: usize, owners: usize) -> usize {
    let hash = (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    ((hash * owners as u64) >> 32) as usize
}

/// The in-place renorm of the rows validated `indices` reference (no output): each distinct
/// row rescaled once if its norm exceeds `max_norm`.
///
/// Each of T tasks owns the table rows [`owner`] gives it and walks every position, renorming
/// the first position of each row it owns, so every row is read and written by one thread,
/// no thread waits for another and nothing is shared but the read-only indices. Each task
/// reads all the indices, a small fraction of the bytes of the rows. On one thread this is
/// the plain single pass.
pub(crate) fn renorm_in_place_validated<I: Index>(
    table: &mut Table<'_>,
    indices: &[I],
    max_norm: MaxNorm,
) {
    let dim = table.dim();
    let row_bytes = table.row_bytes();
    let rows = table.rows();
    if row_bytes == 0 || indices.is_empty() {
        return;
    }
    let kernel = kernel_for(&RenormKernels::detect(), table.dtype());
    let job = RenormJob {
        table: table
            .bytes_mut()
            .expect("checked writable by the caller")
            .as_mut_ptr(),
        dim,
        write_back: true,
        out: std::ptr::null_mut(),
        out_f32: false,
        stream_out: false,
        norm: NormKind::new(max_norm.norm_type),
        max_norm: max_norm.max_norm,
        prefetch: prefetch_distance(),
        rescaled: std::ptr::null_mut(),
    };
    // Each row is read and, if rescaled, written: twice its bytes.
    let owners = match parallel::task_count(indices.len(), 2 * row_bytes) {
        1 => 1, // decided without asking rayon, which would start its pool
        tasks => tasks.min(rayon::current_num_threads()),
    };
    let run = |me: usize| {
        let mut seen = Seen::new(rows, indices.len() / owners);
        // SAFETY: indices validated; no output; this task selects only the first position
        // of each row it owns, so every row is renormed once and touched by one task.
        unsafe {
            run_blocks(
                kernel,
                &job,
                0,
                indices,
                |_, r| (owners == 1 || owner(r, owners) == me) && seen.first(r),
                None,
            )
        };
    };
    let run = &run;
    parallel::run_tasks((0..owners).map(|me| move || run(me)));
}

/// The block loop on one thread: `select(position, row)` picks the positions handed to the
/// kernel; the rows of the next positions go along for prefetching. `job.out` is the output
/// row of position 0.
///
/// # Safety
/// `indices` are validated against the table of `job`; `job.out` is null or holds a row of
/// `out_row_bytes` per index; the selected entries satisfy [`RenormRowsFn`]'s contract: in
/// place, a selected row is selected once and touched by no other thread during the call.
unsafe fn run_blocks<I: Index>(
    kernel: RenormRowsFn,
    job: &RenormJob,
    out_row_bytes: usize,
    indices: &[I],
    mut select: impl FnMut(usize, usize) -> bool,
    mut rescaled: Option<&mut Vec<usize>>,
) {
    let mut rows = [0usize; BLOCK + MAX_PREFETCH_DISTANCE];
    let mut bits = [0u64; BLOCK / 64];
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
        let ahead_end = (end + job.prefetch).min(n);
        for (k, &i) in indices[end..ahead_end].iter().enumerate() {
            rows[m + k] = i.as_wrapped_u64() as usize;
        }
        let mut block_job = job.with_out(if job.out.is_null() {
            job.out
        } else {
            job.out.wrapping_add(start * out_row_bytes)
        });
        if rescaled.is_some() {
            bits = [0; BLOCK / 64];
            block_job.rescaled = bits.as_mut_ptr();
        }
        // SAFETY: the caller's contract; `m` slots inside this block's output rows, distinct;
        // `bits` has a bit for each of the block's positions.
        unsafe { kernel(&block_job, &rows[..m + ahead_end - end], &slots[..m], m) };
        if let Some(found) = rescaled.as_deref_mut() {
            for (w, &word) in bits.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let p = w * 64 + word.trailing_zeros() as usize;
                    found.push(indices[start + p].as_wrapped_u64() as usize);
                    word &= word - 1;
                }
            }
        }
        start = end;
    }
}
