//! Embedding bags: `torch.nn.EmbeddingBag` / `F.embedding_bag`, one pooled row per bag.
//!
//! ```text
//!  indices [2, 0, 1, 2, 2]   offsets [0, 2, 2]      out (3 bags, dim)
//!  bags    {2, 0} {} {1, 2, 2}               sum:   [c + a, 0, b + c + c]
//!                                            mean:  [(c + a) / 2, 0, (b + 2c) / 3]
//!                                            max:   [max(c, a), 0, max(b, c)]
//! ```
//!
//! The semantics are PyTorch's:
//! - Bags are 1-D indices with `offsets` (`offsets[0] == 0`, non-decreasing, none past the
//!   end of the indices); bag `b` runs from `offsets[b]` to `offsets[b + 1]`, the last one to
//!   the end of the indices. With `include_last_offset` (CSR style) the last offset is the end
//!   of the last bag, so there are `len(offsets) - 1` bags and entries after it belong to no
//!   bag, in every mode. (PyTorch's sum path reads it so; when the last offset stops short of
//!   the end, its mean divides by a count that runs to the end and its max path takes the
//!   trailing entries into the last bag: that inconsistency is not reproduced.) Or bags are
//!   the rows of 2-D indices `(B, N)`: [`Bags::Fixed`]`(N)`.
//! - An empty bag gives zeros in every mode. Mean divides by the number of non-padding
//!   entries (by 1 if there are none). Max takes the first entry, then every value greater
//!   than the current one, so a NaN is kept only when it comes first, as PyTorch compares.
//! - `per_sample_weights` (sum only, one per index): `out[b] = sum_i w[i] * table[indices[i]]`.
//! - The table's [`padding_idx`](Table::padding_idx) entries are left out of their bag
//!   entirely: not summed, not counted by mean, not compared by max; a bag of padding only
//!   gives zeros.
//! - `max_norm` ([`BagOptions::max_norm`]): as `F.embedding_bag(..., max_norm=m,
//!   norm_type=p)`, every row the indices reference is renormed first (a row whose p-norm
//!   exceeds `m` is scaled by `m / (norm + 1e-7)`, once however often it is referenced; see
//!   [`crate::ops::renorm`]), then the renormed rows are pooled. PyTorch renorms, in the table
//!   itself, the rows of *all* the indices it is given, padding entries and entries after a
//!   CSR last offset included (its Python wrapper calls `embedding_renorm_(weight, input)`
//!   before `_embedding_bag`, which alone knows about padding). Two modes, as for lookups:
//!   - **in place** ([`Table::bag_renorm_in_place`], PyTorch's behaviour): the referenced
//!     rows of the table are rescaled, then pooled. Needs a writable table.
//!   - **output only** ([`Table::bag_into`] / [`Table::bag`] with `max_norm` set): the table
//!     is untouched and the output is what PyTorch returns. The distinct rows the bags pool
//!     are gathered, renormed, into a small table (one fused pass) and pooled from it: the
//!     cost follows the batch, not the table. The output is bit for bit the in-place one.
//!
//! Every input is checked before any output element is written: offsets, weights, the output
//! length and every index (all of them, including any after the last bag). Results are the
//! same bits whatever the thread count: each bag is computed by one kernel call, entries in
//! order.

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::index::{self, Index};
use crate::kernels::bag::{BagBlock, BagKernels, Pool};
use crate::kernels::{prefetch_distance, MAX_PREFETCH_DISTANCE};
use crate::ops::lookup::{check_output_len, Conversion};
use crate::ops::renorm::{renorm_in_place_validated, MaxNorm};
use crate::parallel;
use crate::table::Table;

/// Entries gathered per kernel call (whole bags; a longer bag is one call on its own).
const BLOCK: usize = 256;

/// How a bag's rows are pooled: PyTorch's `mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BagMode {
    /// Sum of the rows (weighted by `per_sample_weights` when given).
    Sum,
    /// Sum divided by the number of non-padding entries (1 if none). PyTorch's default.
    #[default]
    Mean,
    /// Element-wise maximum.
    Max,
}

impl BagMode {
    /// `sum`, `mean` or `max`, as PyTorch spells it.
    pub const fn name(self) -> &'static str {
        match self {
            BagMode::Sum => "sum",
            BagMode::Mean => "mean",
            BagMode::Max => "max",
        }
    }

    fn pool(self) -> Pool {
        match self {
            BagMode::Sum => Pool::Sum,
            BagMode::Mean => Pool::Mean,
            BagMode::Max => Pool::Max,
        }
    }
}

impl std::fmt::Display for BagMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BagMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sum" => Ok(BagMode::Sum),
            "mean" => Ok(BagMode::Mean),
            "max" => Ok(BagMode::Max),
            _ => Err(Error::InvalidArgument(format!(
                "unknown bag mode {s:?} (expected sum, mean or max)"
            ))),
        }
    }
}

/// How the indices are cut into bags.
#[derive(Clone, Copy, Debug)]
pub enum Bags<'a, F: Index = i64> {
    /// 1-D indices with PyTorch's `offsets` (any index type, typically i32 or i64).
    Offsets {
        /// Where each bag starts: `offsets[0] == 0`, non-decreasing, none past the end.
        offsets: &'a [F],
        /// The last offset is the end of the last bag (CSR style), not the start of one more.
        include_last_offset: bool,
    },
    /// 2-D indices `(B, N)`: B bags of N entries each (`N >= 1`).
    Fixed(usize),
}

impl Bags<'static, i64> {
    /// Bags of `per_bag` consecutive entries, as PyTorch reads 2-D indices `(B, per_bag)`.
    pub fn fixed(per_bag: usize) -> Self {
        Bags::Fixed(per_bag)
    }
}

impl<'a, F: Index> Bags<'a, F> {
    /// Bags starting at `offsets` (`include_last_offset = false`).
    pub fn offsets(offsets: &'a [F]) -> Self {
        Bags::Offsets {
            offsets,
            include_last_offset: false,
        }
    }

    /// CSR bags: `offsets` holds every bag's start and then the end of the last one
    /// (`include_last_offset = true`).
    pub fn csr(offsets: &'a [F]) -> Self {
        Bags::Offsets {
            offsets,
            include_last_offset: true,
        }
    }

    /// The number of bags over `num_indices` indices, after checking the offsets (or the
    /// 2-D shape) as PyTorch does.
    ///
    /// ```
    /// use embedding_lookup::Bags;
    /// assert_eq!(Bags::offsets(&[0i64, 2, 2]).count(5)?, 3);
    /// assert_eq!(Bags::csr(&[0i32, 2, 5]).count(5)?, 2);
    /// assert_eq!(Bags::fixed(4).count(8)?, 2);
    /// assert!(Bags::offsets(&[1i64, 2]).count(5).is_err()); // offsets[0] must be 0
    /// # Ok::<(), embedding_lookup::Error>(())
    /// ```
    pub fn count(&self, num_indices: usize) -> Result<usize> {
        Ok(Bounds::new(self, num_indices)?.bags)
    }
}

/// Options of [`Table::bag_into`], PyTorch's keyword arguments. The padding index is the
/// table's own ([`Table::with_padding_idx`]), as `nn.EmbeddingBag` holds it.
#[derive(Clone, Copy, Debug, Default)]
pub struct BagOptions<'w> {
    /// `sum`, `mean` (the default, as in PyTorch) or `max`.
    pub mode: BagMode,
    /// One weight per index, `sum` mode only.
    pub per_sample_weights: Option<&'w [f32]>,
    /// PyTorch's `max_norm` and `norm_type`: renorm the referenced rows before pooling.
    /// [`Table::bag_into`] then leaves the table untouched (output only);
    /// [`Table::bag_renorm_in_place`] renorms the table itself, as PyTorch does.
    pub max_norm: Option<MaxNorm>,
}

impl BagOptions<'_> {
    /// Options with one mode and nothing else.
    pub fn mode(mode: BagMode) -> BagOptions<'static> {
        BagOptions {
            mode,
            ..BagOptions::default()
        }
    }
}

impl Table<'_> {
    /// Pool the rows of `indices` bag by bag into `out`, which must hold `bags * dim`
    /// elements of f32 or of the table's own dtype (accumulated in f32, rounded once).
    /// Allocates nothing beyond a small block buffer per task.
    ///
    /// With [`BagOptions::max_norm`] set, this is the **output only** renorm: `out` holds
    /// what `F.embedding_bag(..., max_norm)` returns, but the table is not changed (it is
    /// borrowed shared, so read-only maps work). The distinct pooled rows are gathered,
    /// renormed, into a small owned table in one parallel pass (memory and time proportional
    /// to the batch, not the table), then pooled from it. Use [`Table::bag_renorm_in_place`] for PyTorch's in-place behaviour.
    ///
    /// Everything is checked before any output element is written: on error `out` is
    /// untouched and the error names the bad offset, weight count or index (with its
    /// position).
    ///
    /// ```
    /// use embedding_lookup::{BagMode, BagOptions, Bags, Table};
    ///
    /// // Rows a = [1, 1], b = [2, 4], c = [10, 0]; padding row 1 (b) is left out of bags.
    /// let table = Table::from_slice(&[1.0f32, 1.0, 2.0, 4.0, 10.0, 0.0], 3, 2)?
    ///     .with_padding_idx(1)?;
    /// let indices = [2i64, 0, 1, 1, 2, 0, 0];
    /// let offsets = [0i64, 2, 4]; // bags {2, 0}, {1, 1}, {2, 0, 0}
    /// let mut out = [0.0f32; 6];
    /// table.bag_into(&indices, Bags::offsets(&offsets), &BagOptions::mode(BagMode::Mean), &mut out)?;
    /// assert_eq!(out, [5.5, 0.5, 0.0, 0.0, 4.0, 2.0 / 3.0]);
    ///
    /// let weights = [1.0f32, -1.0, 5.0, 5.0, 0.5, 2.0, 2.0];
    /// let sum = BagOptions { mode: BagMode::Sum, per_sample_weights: Some(&weights), ..Default::default() };
    /// let out: Vec<f32> = table.bag(&indices, Bags::offsets(&offsets), &sum)?;
    /// assert_eq!(out, [9.0, -1.0, 0.0, 0.0, 9.0, 4.0]);
    ///
    /// // 2-D indices (2, 3): two bags of three.
    /// let out: Vec<f32> = table.bag(&[0u32, 2, 2, 0, 0, 0], Bags::fixed(3), &BagOptions::mode(BagMode::Max))?;
    /// assert_eq!(out, [10.0, 1.0, 1.0, 1.0]);
    /// # Ok::<(), embedding_lookup::Error>(())
    /// ```
    pub fn bag_into<I: Index, F: Index, O: Element>(
        &self,
        indices: &[I],
        bags: Bags<'_, F>,
        options: &BagOptions<'_>,
        out: &mut [O],
    ) -> Result<()> {
        let conversion = Conversion::new(self.dtype(), O::DTYPE)?;
        let bounds = Bounds::new(&bags, indices.len())?;
        check_weights(options, indices.len())?;
        check_output_len(bounds.bags, self.dim(), out.len())?;
        index::validate(indices, self.rows())?;
        self.read_ahead(indices)?;
        if let Some(m) = options.max_norm {
            return self.bag_output_only_validated(conversion, indices, &bounds, options, m, out);
        }
        bag_validated(
            &BagKernels::detect(),
            conversion,
            self,
            indices,
            &bounds,
            options,
            out,
        );
        Ok(())
    }

    /// Renorm the rows `indices` reference in the table itself, then pool them into `out`:
    /// `F.embedding_bag(indices, weight, offsets, max_norm=m, norm_type=p, ...)` with its
    /// effect on `weight`. `options.max_norm` must be set.
    ///
    /// As PyTorch does, every index is renormed, padding entries and entries after a CSR last
    /// offset included; each distinct row at most once. Everything (offsets, weights, the
    /// output length, writability, every index) is checked before the table or `out` is
    /// touched. A read-only table is refused with [`Error::ReadOnlyTable`]; [`Table::bag_into`]
    /// gives the same output without changing the table. Results are the same bits whatever
    /// the thread count.
    ///
    /// ```
    /// use embedding_lookup::{ops::renorm::MaxNorm, BagMode, BagOptions, Bags, Table};
    ///
    /// let mut table = Table::from_slice(&[3.0f32, 4.0, 0.3, 0.4], 2, 2)?; // norms 5 and 0.5
    /// let options = BagOptions { mode: BagMode::Sum, max_norm: Some(MaxNorm::new(1.0)?), ..Default::default() };
    /// let mut out = [0.0f32; 2];
    /// table.bag_renorm_in_place(&[0i64, 1, 0], Bags::fixed(3), &options, &mut out)?;
    /// let s = (1.0 / (5.0 + 1e-7)) as f32; // row 0 is rescaled once, row 1 is left alone
    /// assert_eq!(table.row::<f32>(0)?.unwrap(), [3.0 * s, 4.0 * s]);
    /// assert_eq!(out, [3.0 * s + 0.3 + 3.0 * s, 4.0 * s + 0.4 + 4.0 * s]);
    /// # Ok::<(), embedding_lookup::Error>(())
    /// ```
    pub fn bag_renorm_in_place<I: Index, F: Index, O: Element>(
        &mut self,
        indices: &[I],
        bags: Bags<'_, F>,
        options: &BagOptions<'_>,
        out: &mut [O],
    ) -> Result<()> {
        let Some(m) = options.max_norm else {
            return Err(Error::InvalidArgument(
                "bag_renorm_in_place needs max_norm (without it, use bag_into)".into(),
            ));
        };
        let conversion = Conversion::new(self.dtype(), O::DTYPE)?;
        let bounds = Bounds::new(&bags, indices.len())?;
        check_weights(options, indices.len())?;
        check_output_len(bounds.bags, self.dim(), out.len())?;
        self.bytes_mut()?;
        index::validate(indices, self.rows())?;
        self.read_ahead(indices)?;
        renorm_in_place_validated(self, indices, m);
        bag_validated(
            &BagKernels::detect(),
            conversion,
            self,
            indices,
            &bounds,
            options,
            out,
        );
        Ok(())
    }

    /// Output-only renorm and pooling of validated inputs: the distinct rows pooled (padding
    /// and entries after the last bag left out) are gathered, renormed, into a small table
    /// and pooled from it through remapped indices.
    fn bag_output_only_validated<I: Index, F: Index, O: Element>(
        &self,
        conversion: Conversion,
        indices: &[I],
        bounds: &Bounds<'_, F>,
        options: &BagOptions<'_>,
        max_norm: MaxNorm,
        out: &mut [O],
    ) -> Result<()> {
        if bounds.bags == 0 || self.dim() == 0 {
            return Ok(());
        }
        // Entries after the end of the last bag are pooled by no bag.
        let pooled = &indices[..bounds.start(bounds.bags)];
        if self.rows() <= u32::MAX as usize {
            self.bag_compact::<I, F, O, u32>(conversion, pooled, bounds, options, max_norm, out)
        } else {
            self.bag_compact::<I, F, O, usize>(conversion, pooled, bounds, options, max_norm, out)
        }
    }

    /// [`Self::bag_output_only_validated`] with compact indices of type `R` (which holds
    /// every row number of the table).
    fn bag_compact<I: Index, F: Index, O: Element, R: Index + TryFrom<usize>>(
        &self,
        conversion: Conversion,
        pooled: &[I],
        bounds: &Bounds<'_, F>,
        options: &BagOptions<'_>,
        max_norm: MaxNorm,
        out: &mut [O],
    ) -> Result<()> {
        let compact_of = |slot: usize| R::try_from(slot).ok().expect("slots fit the row type");
        let padding = self.padding_idx();
        // The distinct rows in order of first use; the padding row (if any) takes slot 0 and
        // is the small table's padding row, so the pooling still leaves it out.
        let mut distinct: Vec<usize> = padding.into_iter().collect();
        let mut remapped: Vec<R> = Vec::with_capacity(pooled.len());
        let rows = self.rows();
        if rows <= u32::MAX as usize && rows <= 4 * pooled.len() + 65_536 {
            // A dense slot per table row (u32::MAX: not seen yet).
            let mut slot = vec![u32::MAX; rows];
            if let Some(p) = padding {
                slot[p] = 0;
            }
            for i in pooled {
                let r = i.as_wrapped_u64() as usize; // validated: 0 <= i < rows
                if slot[r] == u32::MAX {
                    slot[r] = distinct.len() as u32; // < rows <= u32::MAX
                    distinct.push(r);
                }
                remapped.push(compact_of(slot[r] as usize));
            }
        } else {
            let mut slot: std::collections::HashMap<usize, usize> =
                std::collections::HashMap::with_capacity(pooled.len().min(rows));
            if let Some(p) = padding {
                slot.insert(p, 0);
            }
            for i in pooled {
                let r = i.as_wrapped_u64() as usize; // validated: 0 <= i < rows
                let s = *slot.entry(r).or_insert_with(|| {
                    distinct.push(r);
                    distinct.len() - 1
                });
                remapped.push(compact_of(s));
            }
        }
        // Gather and renorm the distinct rows in one (parallel) pass: the renormed rows are
        // the bits an in-place renorm would leave in the table.
        let mut small = Table::zeros(distinct.len(), self.dim(), self.dtype())?;
        match self.dtype() {
            DType::F32 => {
                self.lookup_renorm_output_only(&distinct, small.as_mut_slice::<f32>()?, max_norm)?
            }
            DType::F16 => self.lookup_renorm_output_only(
                &distinct,
                small.as_mut_slice::<half::f16>()?,
                max_norm,
            )?,
            DType::BF16 => self.lookup_renorm_output_only(
                &distinct,
                small.as_mut_slice::<half::bf16>()?,
                max_norm,
            )?,
        }
        if padding.is_some() {
            small = small.with_padding_idx(0)?;
        }
        bag_validated(
            &BagKernels::detect(),
            conversion,
            &small,
            &remapped,
            bounds,
            options,
            out,
        );
        Ok(())
    }

    /// Pool into a new vector of `bags * dim` elements (f32 or the table's dtype).
    pub fn bag<I: Index, F: Index, O: Element>(
        &self,
        indices: &[I],
        bags: Bags<'_, F>,
        options: &BagOptions<'_>,
    ) -> Result<Vec<O>> {
        let len = bags
            .count(indices.len())?
            .checked_mul(self.dim())
            .ok_or_else(|| Error::InvalidArgument("output size overflows".into()))?;
        let mut out = vec![O::default(); len];
        self.bag_into(indices, bags, options, &mut out)?;
        Ok(out)
    }
}

fn check_weights(options: &BagOptions<'_>, num_indices: usize) -> Result<()> {
    let Some(w) = options.per_sample_weights else {
        return Ok(());
    };
    if options.mode != BagMode::Sum {
        return Err(Error::PerSampleWeights(format!(
            "only supported with mode sum, not {}",
            options.mode
        )));
    }
    if w.len() != num_indices {
        return Err(Error::PerSampleWeights(format!(
            "{} weights for {num_indices} indices: one weight per index is required",
            w.len()
        )));
    }
    Ok(())
}

/// Validated bag boundaries: bag `b` is `start(b)..start(b + 1)`.
struct Bounds<'a, F> {
    bags: usize,
    kind: BoundsKind<'a, F>,
}

enum BoundsKind<'a, F> {
    Fixed(usize),
    /// Offsets (including the last bag's end when `include_last_offset`), then `end`.
    Offsets(&'a [F], usize),
}

impl<'a, F: Index> Bounds<'a, F> {
    fn new(bags: &Bags<'a, F>, n: usize) -> Result<Self> {
        match *bags {
            Bags::Fixed(0) => Err(Error::InvalidArgument(
                "bags of 0 entries: 2-D indices need at least one column".into(),
            )),
            Bags::Fixed(per_bag) => {
                if !n.is_multiple_of(per_bag) {
                    return Err(Error::ShapeMismatch(format!(
                        "{n} indices do not split into bags of {per_bag}"
                    )));
                }
                Ok(Bounds {
                    bags: n / per_bag,
                    kind: BoundsKind::Fixed(per_bag),
                })
            }
            Bags::Offsets {
                offsets,
                include_last_offset,
            } => {
                if include_last_offset && offsets.is_empty() {
                    return Err(Error::BadOffsets(
                        "include_last_offset needs at least one offset (the end of the last bag)"
                            .into(),
                    ));
                }
                check_offsets(offsets, n)?;
                Ok(Bounds {
                    bags: offsets.len() - usize::from(include_last_offset),
                    kind: BoundsKind::Offsets(offsets, n),
                })
            }
        }
    }

    /// Where bag `b` starts (`b <= bags`; `start(bags)` is the end of the last bag).
    #[inline]
    fn start(&self, b: usize) -> usize {
        match self.kind {
            BoundsKind::Fixed(per_bag) => b * per_bag,
            // Validated: 0 <= offset <= n, so the wrapped value is the offset.
            BoundsKind::Offsets(offsets, end) => {
                offsets.get(b).map_or(end, |&o| o.as_wrapped_u64() as usize)
            }
        }
    }
}

/// PyTorch's offset rules, each violation named with the offending offset.
fn check_offsets<F: Index>(offsets: &[F], n: usize) -> Result<()> {
    let Some(first) = offsets.first() else {
        return Ok(());
    };
    if first.as_i128() != 0 {
        return Err(Error::BadOffsets(format!(
            "offsets[0] is {}, but the first bag must start at position 0",
            first.as_i128()
        )));
    }
    let mut prev = 0i128;
    for (i, o) in offsets.iter().enumerate().skip(1) {
        let v = o.as_i128();
        if v < prev {
            return Err(Error::BadOffsets(format!(
                "offsets[{i}] = {v} is less than offsets[{}] = {prev}: offsets must be \
                 non-decreasing",
                i - 1
            )));
        }
        if v > n as i128 {
            return Err(Error::BadOffsets(format!(
                "offsets[{i}] = {v} is past the end of the {n} indices"
            )));
        }
        prev = v;
    }
    Ok(())
}

/// Everything a task needs, borrowed.
struct Job<'a, I, F> {
    kernels: &'a BagKernels,
    conversion: Conversion,
    table: &'a Table<'a>,
    indices: &'a [I],
    bounds: &'a Bounds<'a, F>,
    weights: Option<&'a [f32]>,
    pool: Pool,
    padding: Option<usize>,
}

/// Pool validated bags into `out`, in parallel over balanced ranges of bags when large.
fn bag_validated<I: Index, F: Index, O: Element>(
    kernels: &BagKernels,
    conversion: Conversion,
    table: &Table<'_>,
    indices: &[I],
    bounds: &Bounds<'_, F>,
    options: &BagOptions<'_>,
    out: &mut [O],
) {
    let dim = table.dim();
    if bounds.bags == 0 || dim == 0 {
        return;
    }
    let job = Job {
        kernels,
        conversion,
        table,
        indices,
        bounds,
        weights: options.per_sample_weights,
        pool: options.mode.pool(),
        padding: table.padding_idx(),
    };
    let (row_bytes, out_row_bytes) = (table.row_bytes(), dim * O::DTYPE.size());
    let cuts = parallel::split_weighted(bounds.bags, |b| {
        bounds
            .start(b)
            .saturating_mul(row_bytes)
            .saturating_add(b.saturating_mul(out_row_bytes))
    });
    match cuts {
        None => job.run(0..bounds.bags, out),
        Some(cuts) => {
            let mut tasks = Vec::with_capacity(cuts.len() - 1);
            let mut rest = out;
            for w in cuts.windows(2) {
                let (head, tail) = rest.split_at_mut((w[1] - w[0]) * dim);
                tasks.push((w[0]..w[1], head));
                rest = tail;
            }
            let job = &job;
            parallel::run_tasks(
                tasks
                    .into_iter()
                    .map(|(range, out)| move || job.run(range, out)),
            );
        }
    }
}

impl<I: Index, F: Index> Job<'_, I, F> {
    /// Pool bags `range` into `out` (their rows only) on this thread: blocks of whole bags
    /// reduced to row numbers (padding dropped, weights kept alongside), then one kernel
    /// call per block.
    fn run<O: Element>(&self, range: std::ops::Range<usize>, out: &mut [O]) {
        let dim = self.table.dim();
        let row_of = |i: &I| i.as_wrapped_u64() as usize; // validated: 0 <= i < rows
        let prefetch = prefetch_distance();
        let mut rows: Vec<usize> = Vec::with_capacity(BLOCK + MAX_PREFETCH_DISTANCE);
        let mut bag_bounds: Vec<usize> = Vec::with_capacity(BLOCK + 1);
        let mut kept_weights: Vec<f32> = Vec::new();
        let mut b = range.start;
        while b < range.end {
            rows.clear();
            bag_bounds.clear();
            bag_bounds.push(0);
            kept_weights.clear();
            let first = b;
            let first_pos = self.bounds.start(b);
            let mut end_pos;
            loop {
                let (s, e) = (self.bounds.start(b), self.bounds.start(b + 1));
                let entries = &self.indices[s..e];
                match self.padding {
                    None => rows.extend(entries.iter().map(row_of)),
                    Some(p) => {
                        for (k, i) in entries.iter().enumerate() {
                            let r = row_of(i);
                            if r != p {
                                rows.push(r);
                                if let Some(w) = self.weights {
                                    kept_weights.push(w[s + k]);
                                }
                            }
                        }
                    }
                }
                bag_bounds.push(rows.len());
                b += 1;
                end_pos = e;
                if b == range.end
                    || rows.len() + (self.bounds.start(b + 1) - self.bounds.start(b)) > BLOCK
                {
                    break;
                }
            }
            // Rows after the block, only prefetched (they may belong to no bag: harmless).
            let ahead = (end_pos + prefetch).min(self.indices.len());
            rows.extend(self.indices[end_pos..ahead].iter().map(row_of));
            let weights = match (self.weights, self.padding) {
                (None, _) => None,
                (Some(w), None) => Some(&w[first_pos..end_pos]),
                (Some(_), Some(_)) => Some(&kept_weights[..]),
            };
            let block = BagBlock {
                rows: &rows,
                bounds: &bag_bounds,
                weights,
                prefetch,
            };
            let out = &mut out[(first - range.start) * dim..(b - range.start) * dim];
            self.call(&block, out);
        }
    }

    /// One kernel call for the block's table/output types.
    fn call<O: Element>(&self, block: &BagBlock<'_>, out: &mut [O]) {
        let (k, dim, pool) = (self.kernels, self.table.dim(), self.pool);
        let table = self.table.as_bytes();
        // SAFETY: every index was validated against the table's rows and padding rows were
        // dropped, so every row in `block.rows` lies in the table; `bounds` starts at 0 and
        // is non-decreasing up to the entries pushed; weights (sum only) cover them; `out`
        // holds exactly the block's bags; the table bytes are aligned for its dtype (as
        // `Table::as_slice` relies on) and `O` is the output type the conversion names; the
        // kernels were built for an ISA this CPU has.
        unsafe {
            match (self.conversion, self.table.dtype()) {
                (Conversion::Copy, DType::F32) => (k.f32)(
                    bytemuck::cast_slice(table),
                    dim,
                    block,
                    pool,
                    bytemuck::cast_slice_mut(out),
                ),
                (Conversion::Copy, DType::F16) => (k.f16)(
                    bytemuck::cast_slice(table),
                    dim,
                    block,
                    pool,
                    bytemuck::cast_slice_mut(out),
                ),
                (Conversion::Copy, DType::BF16) => (k.bf16)(
                    bytemuck::cast_slice(table),
                    dim,
                    block,
                    pool,
                    bytemuck::cast_slice_mut(out),
                ),
                (Conversion::F16ToF32, _) => (k.f16_to_f32)(
                    bytemuck::cast_slice(table),
                    dim,
                    block,
                    pool,
                    bytemuck::cast_slice_mut(out),
                ),
                (Conversion::Bf16ToF32, _) => (k.bf16_to_f32)(
                    bytemuck::cast_slice(table),
                    dim,
                    block,
                    pool,
                    bytemuck::cast_slice_mut(out),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_checked_like_pytorch() {
        let kind = |r: Result<usize>| r.map_err(|e| (e.kind(), e.to_string()));
        assert_eq!(kind(Bags::offsets(&[0i64, 2, 2]).count(3)), Ok(3));
        assert_eq!(kind(Bags::<i64>::offsets(&[]).count(3)), Ok(0));
        assert_eq!(kind(Bags::csr(&[0i32]).count(3)), Ok(0));
        assert_eq!(kind(Bags::csr(&[0i32, 3]).count(3)), Ok(1));
        assert_eq!(kind(Bags::csr(&[0i32, 1]).count(3)), Ok(1));
        let e = kind(Bags::offsets(&[1i64, 2]).count(3)).unwrap_err();
        assert_eq!(e.0, "bad_offsets");
        assert!(e.1.contains("offsets[0] is 1"), "{}", e.1);
        let e = kind(Bags::offsets(&[0i64, 2, 1]).count(3)).unwrap_err();
        assert!(
            e.1.contains("offsets[2] = 1 is less than offsets[1] = 2"),
            "{}",
            e.1
        );
        let e = kind(Bags::offsets(&[0i64, 4]).count(3)).unwrap_err();
        assert!(
            e.1.contains("offsets[1] = 4 is past the end of the 3 indices"),
            "{}",
            e.1
        );
        let e = kind(Bags::offsets(&[0i64, -1]).count(3)).unwrap_err();
        assert!(e.1.contains("offsets[1] = -1 is less than"), "{}", e.1);
        let e = kind(Bags::<i64>::csr(&[]).count(3)).unwrap_err();
        assert!(e.1.contains("include_last_offset"), "{}", e.1);
        assert_eq!(kind(Bags::fixed(2).count(6)), Ok(3));
        assert_eq!(
            kind(Bags::fixed(2).count(5)).unwrap_err().0,
            "shape_mismatch"
        );
        assert_eq!(
            kind(Bags::fixed(0).count(0)).unwrap_err().0,
            "invalid_argument"
        );
    }
}
