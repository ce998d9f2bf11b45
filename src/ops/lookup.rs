//! Lookup: `out[i] = table[indices[i]]`, as `torch.nn.functional.embedding` without renorm.

use rayon::prelude::*;

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::index::{self, Index};
use crate::kernels::gather::GatherKernels;
use crate::kernels::{prefetch_distance, MAX_PREFETCH_DISTANCE};
use crate::parallel;
use crate::table::Table;

/// Positions converted to row numbers at a time: small enough to sit in L1 on the stack.
const BLOCK: usize = 256;

/// Outputs at least this large are written with streaming (non-temporal) stores. Measured
/// with `emb bench` (BENCHMARKS.md): below it, cached stores win because the output still fits
/// in the last-level cache.
const STREAM_MIN_BYTES: usize = 16 << 20;

/// The shape of a lookup's output: the indices' shape with `dim` appended.
///
/// ```
/// assert_eq!(embedding_lookup::output_shape(&[2, 4], 8), vec![2, 4, 8]);
/// ```
pub fn output_shape(indices_shape: &[usize], dim: usize) -> Vec<usize> {
    let mut s = indices_shape.to_vec();
    s.push(dim);
    s
}

/// What a gather does to each element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Conversion {
    /// Output dtype = table dtype: copy bytes.
    Copy,
    /// f16 table, f32 output.
    F16ToF32,
    /// bf16 table, f32 output.
    Bf16ToF32,
}

impl Conversion {
    /// The conversion from a table dtype to an output dtype: the same dtype, or f32.
    pub(crate) fn new(table: DType, out: DType) -> Result<Conversion> {
        match (table, out) {
            (a, b) if a == b => Ok(Conversion::Copy),
            (DType::F16, DType::F32) => Ok(Conversion::F16ToF32),
            (DType::BF16, DType::F32) => Ok(Conversion::Bf16ToF32),
            (expected, actual) => Err(Error::DTypeMismatch { expected, actual }),
        }
    }
}

impl Table<'_> {
    /// Look up `indices` (any integer type, any shape flattened) into `out`, which must hold
    /// `indices.len() * dim` elements of f32 or of the table's own dtype. Allocates nothing.
    ///
    /// Every index is checked before any output element is written: on error `out` is
    /// untouched and the error names the first bad index, its position and the row count.
    ///
    /// ```
    /// use embedding_lookup::Table;
    /// use half::f16;
    ///
    /// let data: Vec<f16> = (0..6).map(|v| f16::from_f32(v as f32)).collect();
    /// let table = Table::borrowed(&data, 3, 2)?;
    /// let mut out = [0.0f32; 4];
    /// table.lookup_into(&[1u32, 1], &mut out)?; // f16 widened to f32, exactly
    /// assert_eq!(out, [2.0, 3.0, 2.0, 3.0]);
    /// assert!(table.lookup_into(&[3u32, 0], &mut out).is_err()); // out untouched
    /// # Ok::<(), embedding_lookup::Error>(())
    /// ```
    pub fn lookup_into<I: Index, O: Element>(&self, indices: &[I], out: &mut [O]) -> Result<()> {
        let conversion = Conversion::new(self.dtype(), O::DTYPE)?;
        check_output_len(indices.len(), self.dim(), out.len())?;
        index::validate(indices, self.rows())?;
        gather_validated(
            &GatherKernels::detect(),
            conversion,
            self,
            indices,
            bytemuck::cast_slice_mut(out),
        );
        Ok(())
    }

    /// Look up `indices` into a new vector of `indices.len() * dim` elements (f32 or the
    /// table's dtype).
    pub fn lookup<I: Index, O: Element>(&self, indices: &[I]) -> Result<Vec<O>> {
        let len = indices
            .len()
            .checked_mul(self.dim())
            .ok_or_else(|| Error::InvalidArgument("output size overflows".into()))?;
        let mut out = vec![O::default(); len];
        self.lookup_into(indices, &mut out)?;
        Ok(out)
    }
}

/// The output must hold exactly `n * dim` elements.
pub(crate) fn check_output_len(n: usize, dim: usize, actual: usize) -> Result<()> {
    let expected = n
        .checked_mul(dim)
        .ok_or_else(|| Error::InvalidArgument("output size overflows".into()))?;
    if expected != actual {
        return Err(Error::OutputLength { expected, actual });
    }
    Ok(())
}

/// Gather rows of `table` for already-validated `indices` into `out` (bytes of the output
/// dtype), in parallel when the work is large enough.
pub(crate) fn gather_validated<I: Index>(
    kernels: &GatherKernels,
    conversion: Conversion,
    table: &Table<'_>,
    indices: &[I],
    out: &mut [u8],
) {
    let dim = table.dim();
    let out_row_bytes = match conversion {
        Conversion::Copy => table.row_bytes(),
        Conversion::F16ToF32 | Conversion::Bf16ToF32 => dim * 4,
    };
    if out_row_bytes == 0 || indices.is_empty() {
        return;
    }
    let table_bytes = table.as_bytes();
    // An output larger than the last-level cache will not be read back from cache: stream it.
    let stream = indices.len() * out_row_bytes >= STREAM_MIN_BYTES;
    let run = |indices: &[I], out: &mut [u8]| {
        gather_serial(
            kernels,
            conversion,
            stream,
            table_bytes,
            dim,
            indices,
            out,
            out_row_bytes,
        )
    };
    match parallel::chunk_items(indices.len(), table.row_bytes() + out_row_bytes) {
        None => run(indices, out),
        Some(chunk) => out
            .par_chunks_mut(chunk * out_row_bytes)
            .zip(indices.par_chunks(chunk))
            .for_each(|(out, indices)| run(indices, out)),
    }
}

/// The block loop on one thread: convert a block of indices (plus the prefetch lookahead) to
/// row numbers on the stack, then hand the block to the kernel.
#[allow(clippy::too_many_arguments)]
fn gather_serial<I: Index>(
    kernels: &GatherKernels,
    conversion: Conversion,
    stream: bool,
    table: &[u8],
    dim: usize,
    indices: &[I],
    out: &mut [u8],
    out_row_bytes: usize,
) {
    // Table row bytes: the output's for a copy, two per element for a widening.
    let row_bytes = match conversion {
        Conversion::Copy => out_row_bytes,
        Conversion::F16ToF32 | Conversion::Bf16ToF32 => dim * 2,
    };
    let prefetch = prefetch_distance();
    let mut rows = [0usize; BLOCK + MAX_PREFETCH_DISTANCE];
    let n = indices.len();
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let ahead_end = (end + prefetch).min(n);
        for (r, &i) in rows.iter_mut().zip(&indices[start..ahead_end]) {
            // Validated: 0 <= i < rows, so the wrapped value is the row number.
            *r = i.as_wrapped_u64() as usize;
        }
        let block_rows = &rows[..ahead_end - start];
        let count = end - start;
        let block_out = &mut out[start * out_row_bytes..end * out_row_bytes];
        // SAFETY: every index was validated against the table's rows, so every row in
        // `block_rows` lies inside `table`; `block_out` holds exactly `count` output rows; the
        // kernels were built for an ISA this CPU has.
        unsafe {
            match conversion {
                Conversion::Copy => kernels.copy.pick(stream)(
                    table, row_bytes, block_rows, count, block_out, prefetch,
                ),
                Conversion::F16ToF32 => kernels.f16_to_f32.pick(stream)(
                    bytemuck::cast_slice(table),
                    dim,
                    block_rows,
                    count,
                    bytemuck::cast_slice_mut(block_out),
                    prefetch,
                ),
                Conversion::Bf16ToF32 => kernels.bf16_to_f32.pick(stream)(
                    bytemuck::cast_slice(table),
                    dim,
                    block_rows,
                    count,
                    bytemuck::cast_slice_mut(block_out),
                    prefetch,
                ),
            }
        }
        start = end;
    }
}
