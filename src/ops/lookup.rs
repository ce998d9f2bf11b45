//! Lookup: `out[i] = table[indices[i]]`, as `torch.nn.functional.embedding` without renorm.

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::index::{self, Index};
use crate::kernels::gather::GatherKernels;
use crate::kernels::{prefetch_distance, use_streaming_stores, MAX_PREFETCH_DISTANCE};
use crate::parallel;
use crate::table::Table;

/// Positions converted to row numbers at a time: small enough to sit in L1 on the stack.
const BLOCK: usize = 256;

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
    #[inline]
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
    /// Outputs of 32 MiB and more are written with streaming stores when rows are whole cache
    /// lines and `out` is 64-byte aligned, or, with AVX-512, 16-byte aligned (a large `Vec` is).
    /// A [`Table::zeros`] of `indices.len()` rows is an aligned buffer with huge pages.
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
        self.gather_into(conversion, indices, bytemuck::cast_slice_mut(out))
    }

    /// Gather validated `indices` into `out` (bytes of the output dtype, sized for them). An
    /// out-of-core table's pages are read window by window ahead of the gather; a read error
    /// stops it before the window that needs the page (earlier windows are written).
    fn gather_into<I: Index>(
        &self,
        conversion: Conversion,
        indices: &[I],
        out: &mut [u8],
    ) -> Result<()> {
        if let Some(disk) = self.disk() {
            let out_row_bytes = out.len() / indices.len().max(1);
            return disk.pipelined(self.as_bytes(), self.row_bytes(), indices, |w| {
                let out = &mut out[w.start * out_row_bytes..w.end * out_row_bytes];
                self.gather_resident(conversion, &indices[w], out);
            });
        }
        self.gather_resident(conversion, indices, out);
        Ok(())
    }

    /// Gather validated `indices` whose pages are resident (or faulted in on touch).
    fn gather_resident<I: Index>(&self, conversion: Conversion, indices: &[I], out: &mut [u8]) {
        if conversion == Conversion::Copy && indices.len() <= FEW_ROWS {
            copy_few_rows(self, indices, out);
            return;
        }
        gather_validated(GatherKernels::detect(), conversion, self, indices, out);
    }

    /// Look up `indices` into a new vector of `indices.len() * dim` elements (f32 or the
    /// table's dtype). For repeated large lookups, [`Table::lookup_into`] with a reused buffer
    /// is faster: a fresh buffer's pages are faulted in (and zeroed by the OS) on first write.
    pub fn lookup<I: Index, O: Element>(&self, indices: &[I]) -> Result<Vec<O>> {
        // Everything is checked before the output is allocated: a bad index is reported as
        // such, not as an output too large to allocate (or a panic).
        let conversion = Conversion::new(self.dtype(), O::DTYPE)?;
        index::validate(indices, self.rows())?;
        let len = indices
            .len()
            .checked_mul(self.dim())
            .ok_or_else(|| Error::InvalidArgument("output size overflows".into()))?;
        // Zeroed by the allocator (fresh pages from the OS for large outputs): no extra pass.
        let mut out = bytemuck::try_zeroed_vec::<O>(len).map_err(|()| {
            Error::InvalidArgument(format!(
                "an output of {} × {} {} cannot be allocated",
                indices.len(),
                self.dim(),
                O::DTYPE
            ))
        })?;
        self.gather_into(conversion, indices, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

/// Up to this many rows, a copy per row beats the fixed cost of the block kernels (measured
/// with `cargo bench --bench lookup -- lookup_small_batch`).
const FEW_ROWS: usize = 64;

/// Copy a few validated rows, one `copy_from_slice` each.
#[inline]
fn copy_few_rows<I: Index>(table: &Table<'_>, indices: &[I], out: &mut [u8]) {
    let row_bytes = table.row_bytes();
    if row_bytes == 0 {
        return;
    }
    let t = table.as_bytes();
    for (o, &i) in out.chunks_exact_mut(row_bytes).zip(indices) {
        let r = i.as_wrapped_u64() as usize;
        o.copy_from_slice(&t[r * row_bytes..(r + 1) * row_bytes]);
    }
}

/// The output must hold exactly `n * dim` elements.
#[inline]
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
    let stream = use_streaming_stores(
        out.as_ptr(),
        indices.len(),
        out_row_bytes,
        kernels.realign_streams(),
    );
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
    let tasks = parallel::task_count(indices.len(), table.row_bytes() + out_row_bytes);
    if tasks == 1 {
        return run(indices, out);
    }
    let chunk = indices.len().div_ceil(tasks);
    let run = &run;
    parallel::run_tasks(
        out.chunks_mut(chunk * out_row_bytes)
            .zip(indices.chunks(chunk))
            .map(|(out, indices)| move || run(indices, out)),
    );
}

/// Row numbers of one block plus its lookahead, on the stack. Left uninitialised: zeroing
/// 2.5 KiB per call would cost more than a whole small lookup.
struct RowBuffer([std::mem::MaybeUninit<usize>; BLOCK + MAX_PREFETCH_DISTANCE]);

impl RowBuffer {
    fn new() -> RowBuffer {
        RowBuffer([std::mem::MaybeUninit::uninit(); BLOCK + MAX_PREFETCH_DISTANCE])
    }

    /// Convert validated indices (at most the buffer's length) to row numbers.
    fn fill<I: Index>(&mut self, indices: &[I]) -> &[usize] {
        let n = indices.len().min(self.0.len());
        for (slot, &i) in self.0.iter_mut().zip(&indices[..n]) {
            // Validated: 0 <= i < rows, so the wrapped value is the row number.
            slot.write(i.as_wrapped_u64() as usize);
        }
        // SAFETY: the first `n` slots were just written.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<usize>(), n) }
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
    let mut rows = RowBuffer::new();
    let n = indices.len();
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let ahead_end = (end + prefetch).min(n);
        let block_rows = rows.fill(&indices[start..ahead_end]);
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
