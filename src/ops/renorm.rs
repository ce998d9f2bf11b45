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
use crate::kernels::renorm::{NormKind, RenormJob, RenormKernels, RenormRowsFn, COPY_SLOT};
use crate::kernels::PREFETCH_DISTANCE;
use crate::ops::lookup::{check_output_len, Conversion};
use crate::parallel;
use crate::table::Table;

/// Positions handed to a kernel at a time.
const BLOCK: usize = 256;

/// Outputs at least this large are written with non-temporal stores (where the kernels have
/// them): larger than the last-level caches of most CPUs, such an output would not stay in
/// cache anyway, and streaming saves reading every output line before writing it.
const STREAM_OUTPUT_BYTES: usize = 32 << 20;

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
            stream: out.len() >= STREAM_OUTPUT_BYTES,
        };
        let run = |indices: &[I], out: &mut [u8]| {
            let job = job.with_out(out.as_mut_ptr());
            // SAFETY: indices validated; `out` holds a row per index; nothing writes the table
            // (it is borrowed shared and `write_back` is false).
            unsafe { renorm_serial(kernel, &job, out_row_bytes, indices) }
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

/// Which thread's part a row belongs to: a hash of the row's 64-row group (so that each
/// word of the seen-bitset belongs to one part), mapped onto `0..parts` by a multiply.
#[inline(always)]
fn part_of(row: usize, parts: usize) -> usize {
    let h = ((row >> 6) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    ((h * parts as u64) >> 32) as usize
}

/// The rows already renormed in this call.
enum Seen {
    /// One bit per table row. Each 64-row word belongs to one part, so its thread alone reads
    /// and writes it: relaxed loads and stores (plain moves), no read-modify-write.
    Bits(Vec<AtomicU64>),
    /// The rows seen, for one thread and few indices over many rows.
    Set(std::collections::HashSet<usize>),
}

impl Seen {
    fn new(rows: usize, indices: usize, parts: usize) -> Seen {
        if parts == 1 && rows / 64 > 4 * indices + 4096 {
            Seen::Set(std::collections::HashSet::with_capacity(indices))
        } else {
            Seen::Bits((0..rows.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
        }
    }
}

/// A thread's view of [`Seen`]: marks a row and tells whether it was the first time.
struct SeenPart<'s>(SeenRef<'s>);

enum SeenRef<'s> {
    Bits(&'s [AtomicU64]),
    Set(&'s mut std::collections::HashSet<usize>),
}

impl SeenPart<'_> {
    #[inline(always)]
    fn first(&mut self, row: usize) -> bool {
        match &mut self.0 {
            SeenRef::Bits(words) => {
                let word = &words[row / 64];
                let bit = 1u64 << (row % 64);
                // Only this thread touches this word (see `Seen::Bits`).
                let w = word.load(Ordering::Relaxed);
                word.store(w | bit, Ordering::Relaxed);
                w & bit == 0
            }
            SeenRef::Set(set) => set.insert(row),
        }
    }
}

/// The in-place renorm (and lookup, when `out` is given) for validated indices on a writable
/// table.
///
/// The rows are split into parts, one per thread, by [`part_of`]. Each thread walks all the
/// positions (from its own starting point, wrapping around) and takes those whose row is in
/// its part: the first position of a row
/// renorms it (table and output slot), later positions copy the renormed row from the table,
/// which the same thread wrote before. So each row is read and written by one thread only,
/// with no atomic read-modify-write, no waiting and no second pass.
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
    let (out, out_row_bytes, conversion) = match out {
        Some((o, c)) => {
            let orb = o.len() / indices.len();
            (o.as_mut_ptr(), orb, c)
        }
        None => (std::ptr::null_mut(), 0, Conversion::Copy),
    };
    let job = RenormJob {
        table: table
            .bytes_mut()
            .expect("checked writable by the caller")
            .as_mut_ptr(),
        dim,
        write_back: true,
        out,
        out_f32: conversion != Conversion::Copy,
        norm: NormKind::new(max_norm.norm_type),
        max_norm: max_norm.max_norm,
        stream: out_row_bytes * indices.len() >= STREAM_OUTPUT_BYTES,
    };
    let parts = match parallel::chunk_items(indices.len(), row_bytes + out_row_bytes) {
        None => 1,
        Some(_) => rayon::current_num_threads(),
    };
    let mut seen = Seen::new(rows, indices.len(), parts);
    let run = |part: usize, seen: SeenRef<'_>| {
        // SAFETY: indices validated; `job.out` (if any) holds a row per index; the part
        // gives this thread every position of its rows and no other, so no row is touched
        // by two threads, and within the thread each row's first entry renorms it before
        // the later ones copy it.
        unsafe { renorm_part(kernel, &job, indices, part, parts, SeenPart(seen)) }
    };
    match &mut seen {
        Seen::Set(set) => run(0, SeenRef::Set(set)),
        Seen::Bits(words) if parts == 1 => run(0, SeenRef::Bits(words)),
        Seen::Bits(words) => {
            let words: &[AtomicU64] = words;
            (0..parts)
                .into_par_iter()
                .for_each(|part| run(part, SeenRef::Bits(words)));
        }
    }
}

/// Positions gathered per part before the kernel runs over them.
const WINDOW: usize = 4096;

/// One thread's share of an in-place renorm: the positions whose row is in `part`.
///
/// # Safety
/// `indices` are validated against the table of `job`; `job.out` is null or holds a row per
/// index; no other thread works on `part` of the same call, and every other thread's part
/// differs.
unsafe fn renorm_part<I: Index>(
    kernel: RenormRowsFn,
    job: &RenormJob,
    indices: &[I],
    part: usize,
    parts: usize,
    mut seen: SeenPart<'_>,
) {
    let mut rows = vec![0usize; WINDOW];
    let mut slots = vec![0usize; WINDOW];
    let with_out = !job.out.is_null();
    // Each part starts at its own offset and wraps around, so that two threads do not write
    // neighbouring output rows (which may share a cache line) at the same moment.
    let n = indices.len();
    let start = part * (n / parts);
    let mut positions = (start..n).chain(0..start).peekable();
    while positions.peek().is_some() {
        // Collect up to WINDOW positions of this part.
        let mut m = 0;
        for p in positions.by_ref() {
            // Validated: 0 <= i < rows, so the wrapped value is the row number.
            let r = indices[p].as_wrapped_u64() as usize;
            if parts == 1 || part_of(r, parts) == part {
                if seen.first(r) {
                    rows[m] = r;
                    slots[m] = p;
                    m += 1;
                } else if with_out {
                    rows[m] = r;
                    slots[m] = p | COPY_SLOT;
                    m += 1;
                }
                if m == WINDOW {
                    break;
                }
            }
        }
        // Run the kernel over them in blocks, prefetching across block boundaries.
        let mut b = 0;
        while b < m {
            let count = BLOCK.min(m - b);
            let ahead = (b + count + PREFETCH_DISTANCE).min(m);
            // SAFETY: the caller's contract; entries without COPY_SLOT are each row's first
            // in this call, and copies follow their row's first entry in this thread.
            unsafe { kernel(job, &rows[b..ahead], &slots[b..b + count], count) };
            b += count;
        }
    }
}

/// The output-only block loop on one thread: every position renorms its own row into its
/// output slot, with the next positions' rows prefetched across block boundaries.
///
/// # Safety
/// `indices` are validated against the table of `job`; `job.out` holds a row of
/// `out_row_bytes` per index; `job.write_back` is false.
unsafe fn renorm_serial<I: Index>(
    kernel: RenormRowsFn,
    job: &RenormJob,
    out_row_bytes: usize,
    indices: &[I],
) {
    let mut rows = [0usize; BLOCK + PREFETCH_DISTANCE];
    let slots: [usize; BLOCK] = std::array::from_fn(|i| i);
    let n = indices.len();
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let ahead_end = (end + PREFETCH_DISTANCE).min(n);
        for (r, &i) in rows.iter_mut().zip(&indices[start..ahead_end]) {
            // Validated: 0 <= i < rows, so the wrapped value is the row number.
            *r = i.as_wrapped_u64() as usize;
        }
        let block_job = job.with_out(job.out.wrapping_add(start * out_row_bytes));
        // SAFETY: the caller's contract: rows validated, `end - start` slots inside this
        // block's output rows, nothing writes the table.
        unsafe {
            kernel(
                &block_job,
                &rows[..ahead_end - start],
                &slots[..end - start],
                end - start,
            )
        };
        start = end;
    }
}
