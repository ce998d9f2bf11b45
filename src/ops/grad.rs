//! Gradients of lookups and bags with respect to the table, as PyTorch's backward computes
//! them: dense (`rows × dim`), sparse (one `(row, gradient row)` pair per lookup, PyTorch's
//! uncoalesced COO) and coalesced (distinct rows, ascending, summed: what an optimizer takes).
//!
//! # Semantics
//! - **Lookup** ([`EmbeddingBackward`]): `grad_weight[indices[i]] += grad_output[i]` for every
//!   position `i` whose index is not `padding_idx`; the padding row gets no gradient. With
//!   `scale_grad_by_freq` each contribution is multiplied by `1 / count`, `count` being how
//!   often its index occurs in the whole batch (the factor computed in f64 and rounded to f32,
//!   as PyTorch does).
//! - **Bags** ([`EmbeddingBagBackward`]): `sum` gives each non-padding entry its bag's
//!   gradient times its per-sample weight; `mean` divides by the bag's non-padding count;
//!   `max` sends each column's gradient to the row that won it (`max_indices`, as PyTorch's
//!   forward returns it).
//! - **Sparse** output keeps duplicates, in lookup order. As in PyTorch, `scale_grad_by_freq`
//!   is refused for it ([`Error::InvalidArgument`]); it *is* supported for the
//!   coalesced form, where it means exactly what it means for the dense gradient.
//! - Gradients are f32 (whatever the table's dtype), row-major.
//!
//! # How it runs
//! Validate everything first; then
//! - **grouped** (coalesced gradients, and dense ones large enough to split across threads):
//!   group the positions by row (a counting sort split by row range across threads, or a
//!   radix sort of `(row, position)` keys when the table is much larger than the batch), then
//!   reduce each row's contributions in registers and write the row once (SIMD
//!   `reduce_segments`; for a dense gradient every row is a segment, empty ones written as
//!   zeros), rows split across threads. Max bags group their `(bag, column)` entries by
//!   winning row the same way.
//! - **scatter** (dense gradients on one thread, lookups and sum/mean bags): zero the
//!   gradient, then add each position's contribution to its row in position order (SIMD
//!   `scatter_add`): the gradient rows are read in order, nothing is sorted. On one thread this
//!   is the faster of the two; split across threads (every thread would have to walk every
//!   position) it is the slower, so it is used only serially.
//!
//! No atomics and no float races: every row is written by one thread and sees its
//! contributions in position order, as `fma(w₁, g₁, fma(w₀, g₀, 0)) …` — which is how PyTorch's
//! CPU backward accumulates (its `add_(grad, alpha=scale)` is a fused multiply-add). So the
//! result is the same bit for bit whatever the thread count or instruction set, dense and
//! coalesced agree bit for bit, and the PyTorch cases match bit for bit, frequency-scaled ones
//! included.
//!
//! ```
//! use embedding_lookup::ops::grad::EmbeddingBackward;
//!
//! // 4 lookups into a 5 × 2 table; row 1 is looked up twice, row 0 is padding.
//! let indices = [1i64, 3, 1, 0];
//! let grad_output = [1.0f32, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]; // (4, 2)
//! let bw = EmbeddingBackward::new(&indices).padding_idx(Some(0));
//!
//! let dense = bw.dense(&grad_output, 5, 2)?;
//! assert_eq!(dense, [0.0, 0.0, 4.0, 4.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0]);
//!
//! let sparse = bw.sparse(&grad_output, 5, 2)?; // lookup order, duplicates kept
//! assert_eq!(sparse.indices(), [1, 3, 1]);
//!
//! let coalesced = bw.coalesced(&grad_output, 5, 2)?; // distinct rows, ascending, summed
//! assert_eq!(coalesced.rows(), [1, 3]);
//! assert_eq!(coalesced.values(), [4.0, 4.0, 2.0, 2.0]);
//! # Ok::<(), embedding_lookup::Error>(())
//! ```

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::index::{self, Index};
use crate::kernels::grad::GradKernels;
use crate::kernels::{prefetch_distance, MAX_PREFETCH_DISTANCE};
use crate::ops::bag::{BagMode, Bags};
use crate::parallel;
use crate::table::Table;

/// Segments handed to the kernel per call.
const BATCH: usize = 256;

/// Radix digit width of the row sort: 2048 buckets, an 8 KiB histogram that stays in L1.
const DIGIT_BITS: u32 = 11;

/// Below this many keys a comparison sort beats the radix passes.
const RADIX_MIN: usize = 4096;

/// Items from which the counting sort is split across threads (each thread scans all items,
/// so small inputs stay on one).
const PARALLEL_SORT_MIN: usize = 1 << 16;

// ---------------------------------------------------------------------------------------------
// Sparse results

/// A sparse gradient as PyTorch's `sparse=True` backward returns it (uncoalesced COO): one
/// `(row, gradient row)` pair per non-padding lookup, in lookup order, duplicates kept.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseGrad {
    indices: Vec<i64>,
    values: Vec<f32>,
    num_rows: usize,
    dim: usize,
}

impl SparseGrad {
    /// An empty gradient (of a 0 × 0 table): a buffer for [`EmbeddingBackward::sparse_into`].
    pub fn empty() -> Self {
        SparseGrad {
            indices: Vec::new(),
            values: Vec::new(),
            num_rows: 0,
            dim: 0,
        }
    }

    /// A sparse gradient from parts: `indices` in `0..num_rows` (any order, repeats allowed),
    /// `values` holding `indices.len() * dim` elements.
    pub fn new(num_rows: usize, dim: usize, indices: Vec<i64>, values: Vec<f32>) -> Result<Self> {
        if indices.len().checked_mul(dim) != Some(values.len()) {
            return Err(Error::ShapeMismatch(format!(
                "{} values cannot hold {} gradient rows of {dim}",
                values.len(),
                indices.len()
            )));
        }
        if indices.len() > (u32::MAX - 1) as usize {
            return Err(too_many(indices.len()));
        }
        index::validate(&indices, num_rows)?;
        Ok(SparseGrad {
            indices,
            values,
            num_rows,
            dim,
        })
    }

    /// The table row of each pair, in lookup order.
    pub fn indices(&self) -> &[i64] {
        &self.indices
    }

    /// The gradient rows, `len() × dim`, row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether there are no pairs (every lookup was padding, or there were none).
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Elements per gradient row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows of the table the gradient belongs to.
    pub fn num_rows(&self) -> usize {
        self.num_rows
    }

    /// Sum duplicate rows (in pair order) and sort by row.
    pub fn coalesce(&self) -> CoalescedGrad {
        let groups = Groups::build(self.indices.len(), self.num_rows, Form::Compact, |i| {
            Some(self.indices[i] as usize)
        })
        .expect("the pairs' count and rows were checked when they were made");
        let weights = vec![1.0f32; groups.order.len()];
        let source = Source::Rows {
            src: &self.values,
            items: &groups.order,
            weights: &weights,
        };
        let mut out = CoalescedGrad::empty();
        write_coalesced(
            &GradKernels::detect(),
            &groups,
            &source,
            self.num_rows,
            self.dim,
            &mut out,
        );
        out
    }

    /// The dense `num_rows × dim` gradient (duplicates summed in pair order).
    pub fn to_dense(&self) -> Vec<f32> {
        self.coalesce().to_dense()
    }
}

/// A coalesced sparse gradient: distinct table rows in ascending order, each with the sum of
/// its gradient rows. This is what the optimizers in [`crate::ops::optim`] take.
#[derive(Clone, Debug, PartialEq)]
pub struct CoalescedGrad {
    rows: Vec<usize>,
    values: Vec<f32>,
    num_rows: usize,
    dim: usize,
}

impl CoalescedGrad {
    /// A coalesced gradient from parts: `rows` strictly ascending and below `num_rows`,
    /// `values` holding `rows.len() * dim` elements.
    pub fn new(num_rows: usize, dim: usize, rows: Vec<usize>, values: Vec<f32>) -> Result<Self> {
        if rows.len().checked_mul(dim) != Some(values.len()) {
            return Err(Error::ShapeMismatch(format!(
                "{} values cannot hold {} gradient rows of {dim}",
                values.len(),
                rows.len()
            )));
        }
        if let Some(k) = rows.windows(2).position(|w| w[0] >= w[1]) {
            return Err(Error::InvalidArgument(format!(
                "coalesced gradient rows must be strictly ascending: rows[{k}] = {} is followed \
                 by {}",
                rows[k],
                rows[k + 1]
            )));
        }
        if let Some((k, &r)) = rows.iter().enumerate().find(|(_, &r)| r >= num_rows) {
            return Err(Error::IndexOutOfRange {
                index: r as i128,
                position: k,
                rows: num_rows,
            });
        }
        Ok(CoalescedGrad {
            rows,
            values,
            num_rows,
            dim,
        })
    }

    /// An empty gradient (of a 0 × 0 table): a buffer for the `coalesced_into` methods.
    pub fn empty() -> Self {
        CoalescedGrad {
            rows: Vec::new(),
            values: Vec::new(),
            num_rows: 0,
            dim: 0,
        }
    }

    /// The distinct table rows, ascending.
    pub fn rows(&self) -> &[usize] {
        &self.rows
    }

    /// The summed gradient rows, `len() × dim`, row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Gradient row `k` (of table row `rows()[k]`).
    pub fn row(&self, k: usize) -> &[f32] {
        &self.values[k * self.dim..(k + 1) * self.dim]
    }

    /// Number of distinct rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row has a gradient.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Elements per gradient row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows of the table the gradient belongs to.
    pub fn num_rows(&self) -> usize {
        self.num_rows
    }

    /// The dense `num_rows × dim` gradient: zeros except the listed rows.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.num_rows * self.dim];
        for (k, &r) in self.rows.iter().enumerate() {
            out[r * self.dim..(r + 1) * self.dim].copy_from_slice(self.row(k));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Lookup backward

/// The backward pass of a lookup (`F.embedding`): which indices were looked up, and the
/// options that shape the gradient.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingBackward<'a, I> {
    /// The looked-up indices (any shape, flattened).
    pub indices: &'a [I],
    /// Positions with this index contribute nothing (`-rows <= p < rows`).
    pub padding_idx: Option<i64>,
    /// Divide each contribution by its index's count in the batch.
    pub scale_grad_by_freq: bool,
}

impl<'a, I: Index> EmbeddingBackward<'a, I> {
    /// No padding, no frequency scaling.
    pub fn new(indices: &'a [I]) -> Self {
        EmbeddingBackward {
            indices,
            padding_idx: None,
            scale_grad_by_freq: false,
        }
    }

    /// The same, with the table's `padding_idx`.
    pub fn for_table(table: &Table<'_>, indices: &'a [I]) -> Self {
        Self::new(indices).padding_idx(table.padding_idx().map(|p| p as i64))
    }

    /// Set `padding_idx`.
    pub fn padding_idx(mut self, padding_idx: Option<i64>) -> Self {
        self.padding_idx = padding_idx;
        self
    }

    /// Set `scale_grad_by_freq`.
    pub fn scale_grad_by_freq(mut self, on: bool) -> Self {
        self.scale_grad_by_freq = on;
        self
    }

    /// The dense gradient of a `rows × dim` table for `grad_output` (`indices.len() × dim`).
    pub fn dense(&self, grad_output: &[f32], rows: usize, dim: usize) -> Result<Vec<f32>> {
        let len = checked_len(rows, dim)?;
        let mut out = vec![0.0f32; len];
        self.dense_into(grad_output, rows, dim, &mut out)?;
        Ok(out)
    }

    /// The dense gradient into `grad_weight` (`rows × dim`, overwritten: rows without a
    /// gradient are set to zero). On error `grad_weight` is untouched.
    pub fn dense_into(
        &self,
        grad_output: &[f32],
        rows: usize,
        dim: usize,
        grad_weight: &mut [f32],
    ) -> Result<()> {
        let padding = self.check(grad_output, rows, dim)?;
        check_grad_weight(rows, dim, grad_weight.len())?;
        let k = GradKernels::detect();
        let indices = self.indices;
        let row_of = |p: usize| {
            let r = indices[p].as_wrapped_u64() as usize;
            (Some(r) != padding).then_some(r)
        };
        if runs_in_parallel(rows, indices.len(), dim) {
            let groups = Groups::build(indices.len(), rows, Form::PerRow, row_of)?;
            let weights = groups.weights(self.scale_grad_by_freq);
            let source = Source::Rows {
                src: grad_output,
                items: &groups.order,
                weights: &weights,
            };
            write_dense(&k, &groups, &source, rows, dim, grad_weight);
            return Ok(());
        }
        let counts = self
            .scale_grad_by_freq
            .then(|| row_counts(indices.len(), rows, row_of));
        scatter_dense(
            &k,
            indices.len(),
            |p| {
                let r = row_of(p)?;
                let w = counts.as_ref().map_or(1.0, |c| (1.0 / c[r] as f64) as f32);
                Some((r, p as u32, w))
            },
            grad_output,
            dim,
            grad_weight,
        );
        Ok(())
    }

    /// The coalesced sparse gradient: the rows that were looked up (padding excepted),
    /// ascending, each with its summed gradient (scaled by frequency when asked: the same
    /// numbers as the dense gradient's rows).
    pub fn coalesced(&self, grad_output: &[f32], rows: usize, dim: usize) -> Result<CoalescedGrad> {
        let mut out = CoalescedGrad::empty();
        self.coalesced_into(grad_output, rows, dim, &mut out)?;
        Ok(out)
    }

    /// [`Self::coalesced`] into an existing gradient, reusing its memory (a training loop
    /// then allocates nothing per step once the buffers have grown). On error `out` is
    /// untouched.
    pub fn coalesced_into(
        &self,
        grad_output: &[f32],
        rows: usize,
        dim: usize,
        out: &mut CoalescedGrad,
    ) -> Result<()> {
        let prepared = self.prepare(grad_output, rows, dim, Form::Compact)?;
        let weights = prepared.weights(self.scale_grad_by_freq);
        let source = Source::Rows {
            src: grad_output,
            items: &prepared.order,
            weights: &weights,
        };
        write_coalesced(&GradKernels::detect(), &prepared, &source, rows, dim, out);
        Ok(())
    }

    /// The sparse gradient as PyTorch returns it: one pair per non-padding lookup, in lookup
    /// order. `scale_grad_by_freq` is refused, as in PyTorch; use [`Self::coalesced`].
    pub fn sparse(&self, grad_output: &[f32], rows: usize, dim: usize) -> Result<SparseGrad> {
        let mut out = SparseGrad::empty();
        self.sparse_into(grad_output, rows, dim, &mut out)?;
        Ok(out)
    }

    /// [`Self::sparse`] into an existing gradient, reusing its memory. On error `out` is
    /// untouched.
    pub fn sparse_into(
        &self,
        grad_output: &[f32],
        rows: usize,
        dim: usize,
        out: &mut SparseGrad,
    ) -> Result<()> {
        if self.scale_grad_by_freq {
            return Err(Error::InvalidArgument(
                "scale_grad_by_freq is not supported for uncoalesced sparse gradients (as in \
                 PyTorch); use the coalesced gradient"
                    .into(),
            ));
        }
        let padding = self.check(grad_output, rows, dim)?;
        out.indices.clear();
        out.values.clear();
        out.num_rows = rows;
        out.dim = dim;
        for (p, i) in self.indices.iter().enumerate() {
            let r = i.as_wrapped_u64() as usize;
            if Some(r) != padding {
                out.indices.push(r as i64);
                out.values
                    .extend_from_slice(&grad_output[p * dim..(p + 1) * dim]);
            }
        }
        Ok(())
    }

    /// Validate; returns the normalised padding row.
    fn check(&self, grad_output: &[f32], rows: usize, dim: usize) -> Result<Option<usize>> {
        if self.indices.len() > (u32::MAX - 1) as usize {
            return Err(too_many(self.indices.len()));
        }
        check_grad_output("grad_output", grad_output.len(), self.indices.len(), dim)?;
        let padding = self
            .padding_idx
            .map(|p| index::normalize_padding_idx(p, rows))
            .transpose()?;
        index::validate(self.indices, rows)?;
        Ok(padding)
    }

    /// Validate and group positions by row.
    fn prepare(&self, grad_output: &[f32], rows: usize, dim: usize, form: Form) -> Result<Groups> {
        let padding = self.check(grad_output, rows, dim)?;
        let indices = self.indices;
        Groups::build(indices.len(), rows, form, |p| {
            let r = indices[p].as_wrapped_u64() as usize;
            (Some(r) != padding).then_some(r)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Bag backward

/// The backward pass of a bag reduction (`F.embedding_bag`, [`Table::bag`]), with the bag
/// structure given explicitly: the same [`Bags`] and [`BagMode`] as the forward, and for max
/// mode the forward's `max_indices`.
///
/// `grad_output` is the gradient of the bag outputs, `bags × dim`. Entries after the last bag
/// (with `include_last_offset`) belong to no bag and get no gradient, as they get no output.
/// `scale_grad_by_freq` divides each contribution by its index's count in the whole batch
/// (ignored in max mode, as PyTorch ignores it there). PyTorch's CPU kernel for sum/mean bags
/// divides by the count of a *neighbouring* index in sorted order (`counts[indices_data[i]]`,
/// `i` counting distinct indices); this crate divides by the index's own count, as the CUDA
/// kernel and the documentation do.
///
/// ```
/// use embedding_lookup::ops::grad::EmbeddingBagBackward;
/// use embedding_lookup::{BagMode, Bags};
///
/// // Two bags of a 4 × 1 table: [0, 2] and [2, 3, 3]; mean mode.
/// let indices = [0i64, 2, 2, 3, 3];
/// let offsets = [0i64, 2];
/// let bw = EmbeddingBagBackward::new(&indices, Bags::offsets(&offsets), BagMode::Mean);
/// let g = bw.dense(&[6.0, 3.0], 4, 1)?; // bag 0 gets 6, bag 1 gets 3
/// assert_eq!(g, [3.0, 0.0, 3.0 + 1.0, 2.0]);
/// # Ok::<(), embedding_lookup::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingBagBackward<'a, I, F: Index = i64> {
    /// The flat indices of all bags.
    pub indices: &'a [I],
    /// How they are cut into bags.
    pub bags: Bags<'a, F>,
    /// The forward's reduction.
    pub mode: BagMode,
    /// Max mode: for each bag and column (`bags × dim`, row-major), the table row whose value
    /// won, as PyTorch's forward returns it. Entries of bags without non-padding entries are
    /// ignored (PyTorch leaves them 0). Required in max mode, refused in the others.
    pub max_indices: Option<&'a [i64]>,
    /// One weight per index (sum mode only).
    pub per_sample_weights: Option<&'a [f32]>,
    /// Entries with this index contribute nothing and do not count towards a bag's size.
    pub padding_idx: Option<i64>,
    /// Divide each contribution by its index's count in the batch.
    pub scale_grad_by_freq: bool,
}

/// The validated bag structure.
struct BagPlan<'a> {
    /// Bag of each entry (`u32::MAX` for entries in no bag).
    bag_of: Vec<u32>,
    /// Non-padding entries per bag.
    sizes: Vec<u32>,
    /// The forward's winners, checked (max mode only).
    max_indices: Option<&'a [i64]>,
    /// The normalised padding row.
    padding: Option<usize>,
}

const NO_BAG: u32 = u32::MAX;

impl<'a, I: Index, F: Index> EmbeddingBagBackward<'a, I, F> {
    /// No max indices, no per-sample weights, no padding, no frequency scaling.
    pub fn new(indices: &'a [I], bags: Bags<'a, F>, mode: BagMode) -> Self {
        EmbeddingBagBackward {
            indices,
            bags,
            mode,
            max_indices: None,
            per_sample_weights: None,
            padding_idx: None,
            scale_grad_by_freq: false,
        }
    }

    /// Set the forward's `max_indices` (max mode).
    pub fn max_indices(mut self, max_indices: Option<&'a [i64]>) -> Self {
        self.max_indices = max_indices;
        self
    }

    /// Set the per-sample weights.
    pub fn per_sample_weights(mut self, weights: Option<&'a [f32]>) -> Self {
        self.per_sample_weights = weights;
        self
    }

    /// Set `padding_idx`.
    pub fn padding_idx(mut self, padding_idx: Option<i64>) -> Self {
        self.padding_idx = padding_idx;
        self
    }

    /// Set `scale_grad_by_freq`.
    pub fn scale_grad_by_freq(mut self, on: bool) -> Self {
        self.scale_grad_by_freq = on;
        self
    }

    /// The dense gradient of a `rows × dim` table.
    pub fn dense(&self, grad_output: &[f32], rows: usize, dim: usize) -> Result<Vec<f32>> {
        let len = checked_len(rows, dim)?;
        let mut out = vec![0.0f32; len];
        self.dense_into(grad_output, rows, dim, &mut out)?;
        Ok(out)
    }

    /// The dense gradient into `grad_weight` (`rows × dim`, overwritten). On error
    /// `grad_weight` is untouched.
    pub fn dense_into(
        &self,
        grad_output: &[f32],
        rows: usize,
        dim: usize,
        grad_weight: &mut [f32],
    ) -> Result<()> {
        let bags = self.check(grad_output, rows, dim)?;
        check_grad_weight(rows, dim, grad_weight.len())?;
        let k = GradKernels::detect();
        if self.mode == BagMode::Max || runs_in_parallel(rows, self.indices.len(), dim) {
            return self.with_plan(
                &bags,
                grad_output,
                rows,
                dim,
                Form::PerRow,
                |groups, source| write_dense(&k, groups, source, rows, dim, grad_weight),
            );
        }
        // Sum and mean on one thread: every entry adds its bag's gradient row, weighted.
        let indices = self.indices;
        let row_of = |p: usize| {
            let r = indices[p].as_wrapped_u64() as usize;
            (Some(r) != bags.padding && bags.bag_of[p] != NO_BAG).then_some(r)
        };
        let counts = self
            .scale_grad_by_freq
            .then(|| row_counts(indices.len(), rows, row_of));
        scatter_dense(
            &k,
            indices.len(),
            |p| {
                let r = row_of(p)?;
                let bag = bags.bag_of[p];
                Some((
                    r,
                    bag,
                    self.weight(&bags, p, bag, counts.as_ref().map(|c| c[r])),
                ))
            },
            grad_output,
            dim,
            grad_weight,
        );
        Ok(())
    }

    /// An entry's weight, computed in f64 and rounded once, as PyTorch does: per-sample
    /// weight, / its index's count (when scaling by frequency), / its bag's size (mean).
    fn weight(&self, bags: &BagPlan<'_>, p: usize, bag: u32, count: Option<u32>) -> f32 {
        let mut w = self.per_sample_weights.map_or(1.0, |w| w[p] as f64);
        if let Some(c) = count {
            w /= c as f64;
        }
        if self.mode == BagMode::Mean {
            w /= bags.sizes[bag as usize] as f64;
        }
        w as f32
    }

    /// The coalesced gradient: distinct rows with a gradient, ascending, summed (the same
    /// numbers as the dense gradient's rows). In max mode the rows are those that won a
    /// column of a non-empty bag.
    pub fn coalesced(&self, grad_output: &[f32], rows: usize, dim: usize) -> Result<CoalescedGrad> {
        let mut out = CoalescedGrad::empty();
        self.coalesced_into(grad_output, rows, dim, &mut out)?;
        Ok(out)
    }

    /// [`Self::coalesced`] into an existing gradient, reusing its memory. On error `out` is
    /// untouched.
    pub fn coalesced_into(
        &self,
        grad_output: &[f32],
        rows: usize,
        dim: usize,
        out: &mut CoalescedGrad,
    ) -> Result<()> {
        let bags = self.check(grad_output, rows, dim)?;
        let k = GradKernels::detect();
        self.with_plan(
            &bags,
            grad_output,
            rows,
            dim,
            Form::Compact,
            |groups, source| write_coalesced(&k, groups, source, rows, dim, out),
        )
    }

    /// The sparse gradient as PyTorch's `sparse=True` bag backward returns it: one pair per
    /// non-padding entry, in entry order, the value being the bag's gradient times the
    /// per-sample weight (sum) or times `1 / bag size` (mean). Max mode and
    /// `scale_grad_by_freq` are refused, as in PyTorch.
    pub fn sparse(&self, grad_output: &[f32], rows: usize, dim: usize) -> Result<SparseGrad> {
        if self.mode == BagMode::Max {
            return Err(Error::InvalidArgument(
                "max mode does not support sparse gradients (as in PyTorch); use the dense or \
                 coalesced gradient"
                    .into(),
            ));
        }
        if self.scale_grad_by_freq {
            return Err(Error::InvalidArgument(
                "scale_grad_by_freq is not supported for uncoalesced sparse gradients (as in \
                 PyTorch); use the coalesced gradient"
                    .into(),
            ));
        }
        let bags = self.check(grad_output, rows, dim)?;
        let mut indices = Vec::new();
        let mut values = Vec::new();
        for (p, i) in self.indices.iter().enumerate() {
            let r = i.as_wrapped_u64() as usize;
            let b = bags.bag_of[p];
            if Some(r) == bags.padding || b == NO_BAG {
                continue;
            }
            let g = &grad_output[b as usize * dim..(b as usize + 1) * dim];
            // PyTorch: grad[offset2bag] * (1 / bag_size) for mean, * per_sample_weights for sum.
            let factor = match (self.mode, self.per_sample_weights) {
                (BagMode::Mean, _) => Some(1.0f32 / bags.sizes[b as usize] as f32),
                (_, Some(w)) => Some(w[p]),
                _ => None,
            };
            indices.push(r as i64);
            match factor {
                Some(f) => values.extend(g.iter().map(|v| v * f)),
                None => values.extend_from_slice(g),
            }
        }
        Ok(SparseGrad {
            indices,
            values,
            num_rows: rows,
            dim,
        })
    }

    /// Group the contributions by row and hand them to `write`.
    fn with_plan<T>(
        &self,
        bags: &BagPlan<'_>,
        grad_output: &[f32],
        rows: usize,
        dim: usize,
        form: Form,
        write: impl FnOnce(&Groups, &Source<'_>) -> T,
    ) -> Result<T> {
        let indices = self.indices;
        if let Some(max_indices) = bags.max_indices {
            // Contributions are single elements: (bag, column) -> the winning row.
            let n = bags.sizes.len() * dim;
            let groups = Groups::build(n, rows, form, |f| {
                (bags.sizes[f / dim] > 0).then(|| max_indices[f] as usize)
            })?;
            return Ok(write(
                &groups,
                &Source::Elements {
                    src: grad_output,
                    items: &groups.order,
                    dim,
                },
            ));
        }
        let groups = Groups::build(indices.len(), rows, form, |p| {
            let r = indices[p].as_wrapped_u64() as usize;
            (Some(r) != bags.padding && bags.bag_of[p] != NO_BAG).then_some(r)
        })?;
        // Source rows are bags; a row's contributions all share its count.
        let mut items = Vec::with_capacity(groups.order.len());
        let mut weights = Vec::with_capacity(groups.order.len());
        for b in groups.bounds.windows(2) {
            let count = self.scale_grad_by_freq.then_some(b[1] - b[0]);
            for &p in &groups.order[b[0] as usize..b[1] as usize] {
                let bag = bags.bag_of[p as usize];
                items.push(bag);
                weights.push(self.weight(bags, p as usize, bag, count));
            }
        }
        Ok(write(
            &groups,
            &Source::Rows {
                src: grad_output,
                items: &items,
                weights: &weights,
            },
        ))
    }

    /// Validate everything; work out each entry's bag and each bag's non-padding size.
    fn check(&self, grad_output: &[f32], rows: usize, dim: usize) -> Result<BagPlan<'a>> {
        let n = self.indices.len();
        if n > u32::MAX as usize {
            return Err(too_many(n));
        }
        let padding = self
            .padding_idx
            .map(|p| index::normalize_padding_idx(p, rows))
            .transpose()?;
        index::validate(self.indices, rows)?;
        if let Some(w) = self.per_sample_weights {
            if self.mode != BagMode::Sum {
                return Err(Error::PerSampleWeights(
                    "per_sample_weights are only supported with mode='sum'".into(),
                ));
            }
            if w.len() != n {
                return Err(Error::PerSampleWeights(format!(
                    "{} weights given for {n} indices",
                    w.len()
                )));
            }
        }
        // The forward's rules (offsets, 2-D shape), then each entry's bag.
        let num_bags = self.bags.count(n)?;
        let start = |b: usize| match self.bags {
            Bags::Fixed(per_bag) => b * per_bag,
            // Checked by count(): 0 <= offset <= n.
            Bags::Offsets { offsets, .. } => {
                offsets.get(b).map_or(n, |o| o.as_wrapped_u64() as usize)
            }
        };
        let mut bag_of = vec![NO_BAG; n];
        for b in 0..num_bags {
            bag_of[start(b)..start(b + 1)].fill(b as u32);
        }
        if num_bags >= u32::MAX as usize {
            return Err(too_many(num_bags));
        }
        check_grad_output("grad_output (bags × dim)", grad_output.len(), num_bags, dim)?;
        let mut sizes = vec![0u32; num_bags];
        for (p, i) in self.indices.iter().enumerate() {
            let b = bag_of[p];
            if b != NO_BAG && Some(i.as_wrapped_u64() as usize) != padding {
                sizes[b as usize] += 1;
            }
        }
        let max_indices = match (self.mode, self.max_indices) {
            (BagMode::Max, None) => {
                return Err(Error::InvalidArgument(
                    "max mode needs the forward's max_indices".into(),
                ))
            }
            (BagMode::Max, Some(m)) => Some(m),
            (_, Some(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "max_indices are for max mode, not {}",
                    self.mode
                )))
            }
            (_, None) => None,
        };
        if let Some(max_indices) = max_indices {
            check_grad_output("max_indices (bags × dim)", max_indices.len(), num_bags, dim)?;
            if num_bags.saturating_mul(dim) > u32::MAX as usize {
                return Err(too_many(num_bags * dim));
            }
            for (f, &m) in max_indices.iter().enumerate() {
                if sizes[f / dim] > 0 && (m < 0 || m as u64 >= rows as u64) {
                    return Err(Error::InvalidArgument(format!(
                        "max_indices[{}, {}] = {m} is out of range for a table of {rows} rows",
                        f / dim,
                        f % dim
                    )));
                }
            }
        }
        Ok(BagPlan {
            bag_of,
            sizes,
            max_indices,
            padding,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Shared checks

fn checked_len(rows: usize, dim: usize) -> Result<usize> {
    rows.checked_mul(dim)
        .ok_or_else(|| Error::InvalidArgument("gradient size overflows".into()))
}

fn check_grad_output(what: &str, len: usize, n: usize, dim: usize) -> Result<()> {
    match n.checked_mul(dim) {
        Some(expected) if expected == len => Ok(()),
        _ => Err(Error::ShapeMismatch(format!(
            "{what} holds {len} elements, expected {n} × {dim}"
        ))),
    }
}

fn check_grad_weight(rows: usize, dim: usize, actual: usize) -> Result<()> {
    let expected = checked_len(rows, dim)?;
    if expected != actual {
        return Err(Error::OutputLength { expected, actual });
    }
    Ok(())
}

fn too_many(n: usize) -> Error {
    Error::InvalidArgument(format!(
        "{n} contributions exceed the gradient engine's limit of {} per call",
        u32::MAX - 1
    ))
}

// ---------------------------------------------------------------------------------------------
// Grouping by row

/// How grouped contributions are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// One segment per table row, empty ones included: segment `s` is row `s`. What a dense
    /// gradient wants (the kernel writes the zero rows itself).
    PerRow,
    /// Only rows with contributions, ascending, listed in `seg_rows`.
    Compact,
}

/// Contributions grouped by table row: `order[bounds[s]..bounds[s + 1]]` are the items of
/// segment `s`, in ascending item order, all for table row [`Groups::seg_row`]`(s)`, rows
/// ascending.
pub(crate) struct Groups {
    order: Vec<u32>,
    bounds: Vec<u32>,
    /// The row of each segment ([`Form::Compact`]), or `None` when segment `s` is row `s`.
    seg_rows: Option<Vec<usize>>,
}

impl Groups {
    /// Group items `0..n` by `row_of(item)` (`None`: skipped; rows below `num_rows`).
    ///
    /// A counting sort (one pass to count, one to place) when a per-row count array is no
    /// larger than the work (always for [`Form::PerRow`], whose output has a row per row
    /// anyway); otherwise a radix sort of `(row, item)` keys, whose cost follows `n` only.
    fn build(
        n: usize,
        num_rows: usize,
        form: Form,
        row_of: impl Fn(usize) -> Option<usize> + Sync,
    ) -> Result<Groups> {
        if n > (u32::MAX - 1) as usize {
            return Err(too_many(n));
        }
        if form == Form::PerRow || num_rows <= n.saturating_mul(4) {
            let (order, bounds) = counting_sort(n, num_rows, &row_of);
            if form == Form::PerRow {
                return Ok(Groups {
                    order,
                    bounds,
                    seg_rows: None,
                });
            }
            // Keep the rows with contributions.
            let mut seg_rows = Vec::with_capacity(order.len().min(num_rows));
            let mut compact = Vec::with_capacity(order.len().min(num_rows) + 1);
            compact.push(0u32);
            for (r, b) in bounds.windows(2).enumerate() {
                if b[1] > b[0] {
                    seg_rows.push(r);
                    compact.push(b[1]);
                }
            }
            return Ok(Groups {
                order,
                bounds: compact,
                seg_rows: Some(seg_rows),
            });
        }
        let mut order = Vec::with_capacity(n);
        let mut bounds = vec![0u32];
        let mut seg_rows: Vec<usize> = Vec::new();
        let mut push = |row: usize, item: u32| {
            if seg_rows.last() != Some(&row) {
                if !seg_rows.is_empty() {
                    bounds.push(order.len() as u32);
                }
                seg_rows.push(row);
            }
            order.push(item);
        };
        if num_rows as u64 <= 1u64 << 32 {
            // Keys (row << 32 | item): a stable sort by the row bits keeps items ascending.
            let mut keys: Vec<u64> = (0..n)
                .filter_map(|i| row_of(i).map(|r| (r as u64) << 32 | i as u64))
                .collect();
            let row_bits = u64::BITS - (num_rows.saturating_sub(1) as u64).leading_zeros();
            sort_by_high_bits(&mut keys, row_bits);
            for k in keys {
                push((k >> 32) as usize, k as u32);
            }
        } else {
            let mut keys: Vec<(usize, u32)> = (0..n)
                .filter_map(|i| row_of(i).map(|r| (r, i as u32)))
                .collect();
            keys.sort_unstable();
            for (r, i) in keys {
                push(r, i);
            }
        }
        if !seg_rows.is_empty() {
            bounds.push(order.len() as u32);
        }
        Ok(Groups {
            order,
            bounds,
            seg_rows: Some(seg_rows),
        })
    }

    /// Number of segments.
    fn segments(&self) -> usize {
        self.bounds.len() - 1
    }

    /// The table row of segment `s`.
    fn seg_row(&self, s: usize) -> usize {
        self.seg_rows.as_ref().map_or(s, |r| r[s])
    }

    /// Per-item weights: one, or `1 / count` of the item's segment (f64, rounded once).
    fn weights(&self, scale_grad_by_freq: bool) -> Vec<f32> {
        if !scale_grad_by_freq {
            return vec![1.0; self.order.len()];
        }
        let mut w = Vec::with_capacity(self.order.len());
        for b in self.bounds.windows(2) {
            let n = b[1] - b[0];
            w.extend(std::iter::repeat_n((1.0 / n as f64) as f32, n as usize));
        }
        w
    }
}

/// Counting sort of items by row: `bounds` (`num_rows + 1` entries) delimits each row's items
/// in `order`, items ascending within a row.
///
/// Large inputs are split by row range across threads: every thread scans all items but
/// counts and places only those of its rows, into its own part of `bounds` and `order`. The
/// result does not depend on the split.
fn counting_sort(
    n: usize,
    num_rows: usize,
    row_of: &(impl Fn(usize) -> Option<usize> + Sync),
) -> (Vec<u32>, Vec<u32>) {
    let mut bounds = vec![0u32; num_rows + 1];
    // Small inputs are decided before asking rayon anything (its first question starts the
    // global pool).
    let threads = if n < PARALLEL_SORT_MIN {
        1
    } else {
        rayon::current_num_threads()
    };
    if threads <= 1 || num_rows < threads {
        // Count row r at bounds[r + 1]; the prefix sum makes bounds[r] the start of row r;
        // placing items advances bounds[r] to the start of row r + 1, and one shift restores
        // the starts.
        for i in 0..n {
            if let Some(r) = row_of(i) {
                bounds[r + 1] += 1;
            }
        }
        for r in 0..num_rows {
            bounds[r + 1] += bounds[r];
        }
        let mut order = vec![0u32; bounds[num_rows] as usize];
        for i in 0..n {
            if let Some(r) = row_of(i) {
                order[bounds[r] as usize] = i as u32;
                bounds[r] += 1;
            }
        }
        bounds.copy_within(0..num_rows, 1);
        bounds[0] = 0;
        return (order, bounds);
    }
    let chunk = num_rows.div_ceil(threads);
    // Counts, then a prefix sum within each row range: bounds[r + 1] = end of row r, relative
    // to the range's first row.
    bounds[1..]
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(c, ends)| {
            let r0 = c * chunk;
            for i in 0..n {
                if let Some(r) = row_of(i) {
                    if let Some(e) = r.checked_sub(r0).and_then(|k| ends.get_mut(k)) {
                        *e += 1;
                    }
                }
            }
            for k in 1..ends.len() {
                ends[k] += ends[k - 1];
            }
        });
    // Each range starts where the previous one ends.
    let mut bases = Vec::with_capacity(num_rows.div_ceil(chunk));
    let mut base = 0u32;
    for ends in bounds[1..].chunks(chunk) {
        bases.push(base);
        base += ends[ends.len() - 1];
    }
    bounds[1..]
        .par_chunks_mut(chunk)
        .zip(bases.par_iter())
        .for_each(|(ends, &base)| ends.iter_mut().for_each(|e| *e += base));
    // Place: each range fills its own part of `order`.
    let mut order = vec![0u32; base as usize];
    let mut parts = Vec::with_capacity(bases.len());
    let mut rest = &mut order[..];
    for (c, &start) in bases.iter().enumerate() {
        let end = bounds[((c + 1) * chunk).min(num_rows)];
        let (part, tail) = std::mem::take(&mut rest).split_at_mut((end - start) as usize);
        rest = tail;
        parts.push((c * chunk, start, part));
    }
    let bounds_ref = &bounds;
    parts.into_par_iter().for_each(|(r0, start, part)| {
        let r1 = (r0 + chunk).min(num_rows);
        let mut cursor: Vec<u32> = bounds_ref[r0..r1].iter().map(|b| b - start).collect();
        for i in 0..n {
            if let Some(r) = row_of(i) {
                if let Some(c) = r.checked_sub(r0).and_then(|k| cursor.get_mut(k)) {
                    part[*c as usize] = i as u32;
                    *c += 1;
                }
            }
        }
    });
    (order, bounds)
}

/// Sort `keys` by bits `32 .. 32 + row_bits`, stably: LSD radix passes of [`DIGIT_BITS`], a
/// pass skipped when every key has the same digit. Small inputs are sorted by comparison
/// (the whole key, which is the same order because the low bits ascend within a row).
fn sort_by_high_bits(keys: &mut Vec<u64>, row_bits: u32) {
    if keys.len() < RADIX_MIN {
        keys.sort_unstable();
        return;
    }
    let radix = 1usize << DIGIT_BITS;
    let mask = (radix - 1) as u64;
    let mut tmp = vec![0u64; keys.len()];
    let mut shift = 32;
    while shift < 32 + row_bits {
        let mut counts = vec![0usize; radix];
        for &k in keys.iter() {
            counts[((k >> shift) & mask) as usize] += 1;
        }
        if counts.contains(&keys.len()) {
            shift += DIGIT_BITS;
            continue;
        }
        let mut sum = 0;
        for c in counts.iter_mut() {
            let here = *c;
            *c = sum;
            sum += here;
        }
        for &k in keys.iter() {
            let d = ((k >> shift) & mask) as usize;
            tmp[counts[d]] = k;
            counts[d] += 1;
        }
        std::mem::swap(keys, &mut tmp);
        shift += DIGIT_BITS;
    }
}

// ---------------------------------------------------------------------------------------------
// Reduction

/// Where a segment's contributions come from.
pub(crate) enum Source<'s> {
    /// Whole rows of `src` (`dim` wide): item `a` of a segment is row `items[a]` times
    /// `weights[a]`, reduced by the SIMD kernel.
    Rows {
        src: &'s [f32],
        items: &'s [u32],
        weights: &'s [f32],
    },
    /// Single elements (max mode): item `a` adds `src[items[a]]` to column `items[a] % dim`.
    Elements {
        src: &'s [f32],
        items: &'s [u32],
        dim: usize,
    },
}

/// Reduce segments `segs` into `dst`, segment `s` going to row `dst_row(s)`.
fn reduce(
    k: &GradKernels,
    groups: &Groups,
    source: &Source<'_>,
    dim: usize,
    segs: Range<usize>,
    dst_row: impl Fn(usize) -> usize,
    dst: &mut [f32],
) {
    match *source {
        Source::Rows {
            src,
            items,
            weights,
        } => {
            let mut rows_buf = [0usize; BATCH];
            let prefetch = prefetch_distance();
            let mut s = segs.start;
            while s < segs.end {
                let e = (s + BATCH).min(segs.end);
                for (slot, seg) in rows_buf.iter_mut().zip(s..e) {
                    *slot = dst_row(seg);
                }
                let a0 = groups.bounds[s] as usize;
                let a1 = groups.bounds[e] as usize;
                let ahead = (a1 + prefetch).min(items.len());
                // SAFETY: items are positions (or bags) below src.len() / dim, as built from
                // validated input; bounds ascend and index `items`/`weights` within their
                // lengths; the segments' destination rows are distinct table rows (or output
                // slots) inside `dst`; the kernels were built for an ISA this CPU has.
                unsafe {
                    (k.reduce_segments)(
                        src,
                        dim,
                        &items[a0..ahead],
                        &weights[a0..a1],
                        &groups.bounds[s..=e],
                        &rows_buf[..e - s],
                        dst,
                        prefetch,
                    )
                };
                s = e;
            }
        }
        Source::Elements { src, items, dim } => {
            for s in segs {
                let out = &mut dst[dst_row(s) * dim..(dst_row(s) + 1) * dim];
                out.fill(0.0);
                let (a0, a1) = (groups.bounds[s] as usize, groups.bounds[s + 1] as usize);
                for &f in &items[a0..a1] {
                    out[f as usize % dim] += src[f as usize];
                }
            }
        }
    }
}

/// How often each row occurs among the contributions.
fn row_counts(n: usize, rows: usize, row_of: impl Fn(usize) -> Option<usize>) -> Vec<u32> {
    let mut counts = vec![0u32; rows];
    for p in 0..n {
        if let Some(r) = row_of(p) {
            counts[r] += 1;
        }
    }
    counts
}

/// Whether a dense gradient of `rows × dim` from `n` contributions is split across threads.
/// Split, it is computed by grouping (a counting sort by row, then one `reduce_segments` per
/// row, rows split across threads); on one thread, by scatter-adding in position order, which
/// needs no sort. Both add each row's contributions in position order: the same bits.
fn runs_in_parallel(rows: usize, n: usize, dim: usize) -> bool {
    dim > 0 && parallel::chunk_items(rows, bytes_per_unit(rows, n, dim)).is_some()
}

/// The dense gradient on one thread, by scatter-adding: zero the gradient, then add every
/// position's contribution to its row, in position order (SIMD `scatter_add`). The gradient
/// rows are read in order and nothing is sorted. `contribution(p)` is `(table row, source
/// row of src, weight)`, or `None` for a skipped position.
fn scatter_dense(
    k: &GradKernels,
    n: usize,
    contribution: impl Fn(usize) -> Option<(usize, u32, f32)>,
    src: &[f32],
    dim: usize,
    out: &mut [f32],
) {
    if dim == 0 {
        return;
    }
    out.fill(0.0);
    scatter_positions(k, 0..n, contribution, src, dim, 0, out);
}

/// Add the contributions of `positions` (ascending) whose rows lie in
/// `first..first + out.len() / dim` into `out`, in order, in batches through the kernel.
fn scatter_positions(
    k: &GradKernels,
    positions: impl Iterator<Item = usize>,
    contribution: impl Fn(usize) -> Option<(usize, u32, f32)>,
    src: &[f32],
    dim: usize,
    first: usize,
    out: &mut [f32],
) {
    const CAP: usize = BATCH + MAX_PREFETCH_DISTANCE;
    let prefetch = prefetch_distance();
    let full = BATCH + prefetch;
    let end = first + out.len() / dim;
    let mut items = [0u32; CAP];
    let mut dst = [0usize; CAP];
    let mut weights = [0f32; CAP];
    let mut len = 0;
    let mut flush = |count: usize, len: usize, items: &[u32], dst: &[usize], weights: &[f32]| {
        // SAFETY: source rows are positions or bags below src.len() / dim (validated input),
        // destination rows are below this range's row count, `count <= len` entries of each
        // array are filled, and the kernels were built for an ISA this CPU has.
        unsafe {
            (k.scatter_add)(
                src,
                dim,
                &items[..len],
                &weights[..len],
                &dst[..len],
                count,
                out,
                prefetch,
            )
        }
    };
    for p in positions {
        let Some((r, s, w)) = contribution(p) else {
            continue;
        };
        if r < first || r >= end {
            continue;
        }
        items[len] = s;
        dst[len] = r - first;
        weights[len] = w;
        len += 1;
        if len == full {
            // Add the first BATCH; the rest were the lookahead and move to the front.
            flush(BATCH, full, &items, &dst, &weights);
            items.copy_within(BATCH..full, 0);
            dst.copy_within(BATCH..full, 0);
            weights.copy_within(BATCH..full, 0);
            len = prefetch;
        }
    }
    flush(len, len, &items, &dst, &weights);
}

/// Bytes of work per unit when `units` share `n` contributions of `dim` f32 each.
fn bytes_per_unit(units: usize, n: usize, dim: usize) -> usize {
    dim.saturating_mul(4)
        .saturating_mul(1 + n.div_ceil(units.max(1)))
}

/// The dense gradient from [`Form::PerRow`] groups: rows split across threads, each row
/// written once, by one thread (rows without contributions get zeros from the kernel).
fn write_dense(
    k: &GradKernels,
    groups: &Groups,
    source: &Source<'_>,
    rows: usize,
    dim: usize,
    out: &mut [f32],
) {
    debug_assert!(groups.seg_rows.is_none() && groups.segments() == rows);
    if dim == 0 || rows == 0 {
        return;
    }
    let run = |first: usize, out: &mut [f32]| {
        let count = out.len() / dim;
        reduce(
            k,
            groups,
            source,
            dim,
            first..first + count,
            |s| s - first,
            out,
        );
    };
    match parallel::chunk_items(rows, bytes_per_unit(rows, groups.order.len(), dim)) {
        None => run(0, out),
        Some(chunk) => out
            .par_chunks_mut(chunk * dim)
            .enumerate()
            .for_each(|(c, out)| run(c * chunk, out)),
    }
}

/// The coalesced gradient: segments split across threads. `out`'s buffers are reused.
fn write_coalesced(
    k: &GradKernels,
    groups: &Groups,
    source: &Source<'_>,
    rows: usize,
    dim: usize,
    out: &mut CoalescedGrad,
) {
    let segs = groups.segments();
    out.rows.clear();
    out.rows.extend((0..segs).map(|s| groups.seg_row(s)));
    out.values.clear();
    out.values.resize(segs * dim, 0.0);
    out.num_rows = rows;
    out.dim = dim;
    if dim > 0 && segs > 0 {
        let run = |first: usize, out: &mut [f32]| {
            let count = out.len() / dim;
            reduce(
                k,
                groups,
                source,
                dim,
                first..first + count,
                |s| s - first,
                out,
            );
        };
        match parallel::chunk_items(segs, bytes_per_unit(segs, groups.order.len(), dim)) {
            None => run(0, &mut out.values),
            Some(chunk) => out
                .values
                .par_chunks_mut(chunk * dim)
                .enumerate()
                .for_each(|(c, out)| run(c * chunk, out)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    #[test]
    fn grouping_is_a_stable_sort_by_row() {
        let mut rng = Rng::new(3);
        // Counting sort (rows <= 4n), radix sort (rows > 4n, >= 4096 keys), comparison sort.
        for (n, rows) in [
            (0usize, 1usize),
            (10, 3),
            (5000, 7),
            (20000, 100_000),
            (9000, 1 << 23),
            (100, 1 << 20),
            (200_000, 3),
            (300_000, 100_003),
        ] {
            let idx: Vec<usize> = (0..n).map(|_| rng.below(rows as u64) as usize).collect();
            let mut want: Vec<(usize, u32)> = (0..n)
                .filter(|&i| idx[i] % 5 != 1)
                .map(|i| (idx[i], i as u32))
                .collect();
            want.sort();
            for (form, threads) in [
                (Form::PerRow, 1),
                (Form::PerRow, 2),
                (Form::PerRow, 7),
                (Form::Compact, 1),
                (Form::Compact, 8),
            ] {
                let g = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| {
                        Groups::build(n, rows, form, |i| (idx[i] % 5 != 1).then_some(idx[i]))
                    })
                    .unwrap();
                let got: Vec<(usize, u32)> = g
                    .bounds
                    .windows(2)
                    .enumerate()
                    .flat_map(|(s, b)| {
                        let r = g.seg_row(s);
                        g.order[b[0] as usize..b[1] as usize]
                            .iter()
                            .map(move |&i| (r, i))
                    })
                    .collect();
                assert_eq!(got, want, "n {n} rows {rows} {form:?} {threads} threads");
                let seg_rows: Vec<usize> = (0..g.segments()).map(|s| g.seg_row(s)).collect();
                assert!(seg_rows.windows(2).all(|w| w[0] < w[1]));
                match form {
                    Form::PerRow => assert_eq!(g.segments(), rows),
                    Form::Compact => {
                        assert!((0..g.segments()).all(|s| g.bounds[s] < g.bounds[s + 1]))
                    }
                }
            }
        }
    }
}
