//! Optimizer steps on the rows a sparse gradient touches, applied in place to the table:
//! owned memory, a writable borrowed slice, or a writable file map (the file is updated;
//! [`Table::flush`] makes it durable).
//!
//! - [`Sgd`]: `w ← w − lr·g`.
//! - [`RowwiseAdagrad`]: one f32 accumulator per row, as FBGEMM's row-wise sparse Adagrad:
//!   `G_r ← G_r + mean_j(g_rj²)`, then `w_r ← w_r − lr·g_r / (√G_r + eps)`.
//!
//! Both take a [`CoalescedGrad`] (each row once, so each row is read, updated and written
//! once), and touch no other row. Rows are split across rayon's threads; every row's update is
//! independent of the split, so results do not depend on the thread count.
//!
//! On f16 and bf16 tables the update is computed in f32 from the widened weights and rounded
//! once when stored: to nearest, ties to even, by default ([`Rounding::NearestEven`]), or
//! stochastically ([`Rounding::Stochastic`]: up or down with probability proportional to the
//! distance, so that small updates are not lost on average). Stochastic rounding is seeded:
//! the random bits of a row depend only on the seed, the step number and the row, so it too
//! is deterministic whatever the thread count. f32 tables need no rounding.
//!
//! ```
//! use embedding_lookup::ops::grad::EmbeddingBackward;
//! use embedding_lookup::ops::optim::Sgd;
//! use embedding_lookup::{DType, Table};
//!
//! let mut table = Table::zeros(4, 2, DType::F32)?;
//! let indices = [1i64, 3, 1];
//! let grad_output = [1.0f32, 2.0, 5.0, 5.0, 1.0, 2.0];
//! let grad = EmbeddingBackward::new(&indices).coalesced(&grad_output, 4, 2)?;
//! Sgd::new(0.5)?.step(&mut table, &grad)?;
//! assert_eq!(table.as_slice::<f32>()?, [0.0, 0.0, -1.0, -2.0, 0.0, 0.0, -2.5, -2.5]);
//! # Ok::<(), embedding_lookup::Error>(())
//! ```

use half::{bf16, f16};
use rayon::prelude::*;

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ops::grad::CoalescedGrad;
use crate::parallel;
use crate::table::Table;
use crate::util::Rng;

/// How an f32 result is stored into an f16 or bf16 table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rounding {
    /// Round to nearest, ties to even (the default, and what a cast does).
    #[default]
    NearestEven,
    /// Round up or down at random, with probability proportional to the distance to each
    /// neighbour. Values beyond the largest finite f16/bf16 may round to infinity.
    Stochastic {
        /// Seed of the random bits (combined with the step number and the row).
        seed: u64,
    },
}

/// Sparse stochastic gradient descent: `w ← w − lr·g` on the gradient's rows.
#[derive(Clone, Debug)]
pub struct Sgd {
    lr: f32,
    rounding: Rounding,
    steps: u64,
}

impl Sgd {
    /// SGD with learning rate `lr` (finite), rounding to nearest on f16/bf16 tables.
    pub fn new(lr: f32) -> Result<Sgd> {
        check_finite("lr", lr)?;
        Ok(Sgd {
            lr,
            rounding: Rounding::NearestEven,
            steps: 0,
        })
    }

    /// Choose how f16/bf16 weights are rounded.
    pub fn with_rounding(mut self, rounding: Rounding) -> Sgd {
        self.rounding = rounding;
        self
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        self.lr
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Apply one step. The table must be writable and match the gradient's shape; on error
    /// nothing is written.
    pub fn step(&mut self, table: &mut Table<'_>, grad: &CoalescedGrad) -> Result<()> {
        check_table(table, grad)?;
        let lr = self.lr;
        let step = self.steps;
        update_rows(table, grad, self.rounding, step, &mut [], |_, g, w, _| {
            for (w, g) in w.iter_mut().zip(g) {
                *w -= lr * g;
            }
        })?;
        self.steps += 1;
        Ok(())
    }
}

/// Row-wise Adagrad (FBGEMM's `rowwise_sparse_adagrad`): one f32 accumulator per table row.
///
/// For each row `r` of the gradient: `G_r += mean_j(g_rj²)`, then
/// `w_rj −= lr · g_rj / (√G_r + eps)`. The mean is summed in a fixed order (eight interleaved
/// partial sums, combined left to right), the same on every CPU.
#[derive(Clone, Debug)]
pub struct RowwiseAdagrad {
    lr: f32,
    eps: f32,
    state: Vec<f32>,
    rounding: Rounding,
    steps: u64,
}

impl RowwiseAdagrad {
    /// Row-wise Adagrad for a table of `rows` rows, accumulators starting at 0. `lr` must be
    /// finite and `eps` finite and positive.
    pub fn new(rows: usize, lr: f32, eps: f32) -> Result<RowwiseAdagrad> {
        Self::with_initial_accumulator(rows, lr, eps, 0.0)
    }

    /// The same with accumulators starting at `initial` (finite, not negative).
    pub fn with_initial_accumulator(
        rows: usize,
        lr: f32,
        eps: f32,
        initial: f32,
    ) -> Result<RowwiseAdagrad> {
        check_finite("lr", lr)?;
        check_finite("eps", eps)?;
        check_finite("initial accumulator", initial)?;
        if eps <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "eps must be positive, got {eps}"
            )));
        }
        if initial < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "the initial accumulator must not be negative, got {initial}"
            )));
        }
        Ok(RowwiseAdagrad {
            lr,
            eps,
            state: vec![initial; rows],
            rounding: Rounding::NearestEven,
            steps: 0,
        })
    }

    /// Choose how f16/bf16 weights are rounded.
    pub fn with_rounding(mut self, rounding: Rounding) -> RowwiseAdagrad {
        self.rounding = rounding;
        self
    }

    /// The accumulator of every row.
    pub fn state(&self) -> &[f32] {
        &self.state
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Apply one step. The table must be writable, match the gradient's shape and have as
    /// many rows as the optimizer has accumulators; on error nothing is written.
    pub fn step(&mut self, table: &mut Table<'_>, grad: &CoalescedGrad) -> Result<()> {
        check_table(table, grad)?;
        if self.state.len() != table.rows() {
            return Err(Error::ShapeMismatch(format!(
                "the optimizer has {} row accumulators, the table {} rows",
                self.state.len(),
                table.rows()
            )));
        }
        let (lr, eps) = (self.lr, self.eps);
        let step = self.steps;
        update_rows(
            table,
            grad,
            self.rounding,
            step,
            &mut self.state,
            |_, g, w, acc| {
                let acc = acc.expect("row-wise Adagrad has one accumulator per row");
                *acc += mean_square(g);
                let rate = lr / (acc.sqrt() + eps);
                for (w, g) in w.iter_mut().zip(g) {
                    *w -= rate * g;
                }
            },
        )?;
        self.steps += 1;
        Ok(())
    }
}

/// `mean(g²)` in a fixed order: eight interleaved partial sums (which vectorise), combined left
/// to right, then the tail.
fn mean_square(g: &[f32]) -> f32 {
    if g.is_empty() {
        return 0.0;
    }
    let mut lanes = [0.0f32; 8];
    let mut chunks = g.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    let mut sum = lanes.iter().fold(0.0f32, |s, l| s + l);
    for v in chunks.remainder() {
        sum += v * v;
    }
    sum / g.len() as f32
}

fn check_finite(what: &str, v: f32) -> Result<()> {
    if !v.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "{what} must be finite, got {v}"
        )));
    }
    Ok(())
}

fn check_table(table: &Table<'_>, grad: &CoalescedGrad) -> Result<()> {
    if !table.storage_kind().is_writable() {
        return Err(Error::ReadOnlyTable);
    }
    if grad.num_rows() != table.rows() || grad.dim() != table.dim() {
        return Err(Error::ShapeMismatch(format!(
            "a gradient of a {} × {} table given for a {} × {} table",
            grad.num_rows(),
            grad.dim(),
            table.rows(),
            table.dim()
        )));
    }
    Ok(())
}

/// The per-row update: (gradient row index, gradient row, the weights widened to f32, the
/// row's accumulator if the optimizer keeps one).
trait RowUpdate: Fn(usize, &[f32], &mut [f32], Option<&mut f32>) + Sync {}
impl<F: Fn(usize, &[f32], &mut [f32], Option<&mut f32>) + Sync> RowUpdate for F {}

/// Apply `update` to every row of `grad`, dispatching on the table's dtype. `state` is empty
/// or holds one accumulator per table row.
fn update_rows(
    table: &mut Table<'_>,
    grad: &CoalescedGrad,
    rounding: Rounding,
    step: u64,
    state: &mut [f32],
    update: impl RowUpdate,
) -> Result<()> {
    // An out-of-core table's rows are read in together first (nothing written on error).
    table.read_ahead_rows(grad.rows().iter().copied())?;
    match table.dtype() {
        DType::F32 => update_typed(
            table.as_mut_slice::<f32>()?,
            grad,
            rounding,
            step,
            state,
            &update,
        ),
        DType::F16 => update_typed(
            table.as_mut_slice::<f16>()?,
            grad,
            rounding,
            step,
            state,
            &update,
        ),
        DType::BF16 => update_typed(
            table.as_mut_slice::<bf16>()?,
            grad,
            rounding,
            step,
            state,
            &update,
        ),
    }
    Ok(())
}

/// Split the table (and state) into disjoint regions, one per chunk of gradient rows, and
/// update the chunks in parallel.
fn update_typed<T: Element>(
    data: &mut [T],
    grad: &CoalescedGrad,
    rounding: Rounding,
    step: u64,
    state: &mut [f32],
    update: &impl RowUpdate,
) {
    let dim = grad.dim();
    let n = grad.len();
    if dim == 0 || n == 0 {
        return;
    }
    let rows = grad.rows();
    let chunk = parallel::chunk_items(n, dim * (4 + 2 * std::mem::size_of::<T>())).unwrap_or(n);
    // Chunk c covers gradient rows k0..k1 and table rows rows[k0]..=rows[k1 - 1]; rows ascend
    // strictly, so the regions are disjoint and in order.
    let mut parts = Vec::with_capacity(n.div_ceil(chunk));
    let (mut rest, mut rest_state, mut consumed) = (data, state, 0usize);
    for k0 in (0..n).step_by(chunk) {
        let k1 = (k0 + chunk).min(n);
        let (first, last) = (rows[k0], rows[k1 - 1]);
        let tail = std::mem::take(&mut rest);
        let (_, tail) = tail.split_at_mut((first - consumed) * dim);
        let (region, tail) = tail.split_at_mut((last + 1 - first) * dim);
        rest = tail;
        let st = if rest_state.is_empty() {
            &mut [][..]
        } else {
            let tail = std::mem::take(&mut rest_state);
            let (_, tail) = tail.split_at_mut(first - consumed);
            let (st, tail) = tail.split_at_mut(last + 1 - first);
            rest_state = tail;
            st
        };
        consumed = last + 1;
        parts.push((k0..k1, first, region, st));
    }
    let run = |(ks, first, region, st): (std::ops::Range<usize>, usize, &mut [T], &mut [f32])| {
        let mut buf = vec![0.0f32; dim];
        for k in ks {
            let r = rows[k];
            let row = &mut region[(r - first) * dim..(r - first + 1) * dim];
            for (b, w) in buf.iter_mut().zip(row.iter()) {
                *b = w.to_f32();
            }
            let acc = st.get_mut(r - first);
            update(k, grad.row(k), &mut buf, acc);
            store_row(row, &buf, rounding, step, r);
        }
    };
    if parts.len() == 1 {
        parts.into_iter().for_each(run);
    } else {
        parts.into_par_iter().for_each(run);
    }
}

/// Store f32 results into a row of `T`, rounding as asked.
fn store_row<T: Element>(row: &mut [T], values: &[f32], rounding: Rounding, step: u64, r: usize) {
    match (rounding, T::DTYPE) {
        (Rounding::NearestEven, _) | (_, DType::F32) => {
            for (w, &v) in row.iter_mut().zip(values) {
                *w = T::from_f32(v);
            }
        }
        (Rounding::Stochastic { seed }, dtype) => {
            let mut rng = Rng::new(
                seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (r as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
            );
            for (w, &v) in row.iter_mut().zip(values) {
                let bits = rng.next_u64() as u32;
                let rounded = match dtype {
                    DType::BF16 => stochastic_bf16(v, bits),
                    _ => stochastic_f16(v, bits),
                };
                // `rounded` is exactly representable in T: this conversion is exact.
                *w = T::from_f32(rounded);
            }
        }
    }
}

/// Round `v` to a bf16 value (returned as f32) stochastically with 16 random bits: add them
/// below the kept bits, then truncate. Infinities and NaN round to nearest.
pub(crate) fn stochastic_bf16(v: f32, random: u32) -> f32 {
    if !v.is_finite() {
        return bf16::from_f32(v).to_f32();
    }
    let bits = v.to_bits().wrapping_add(random & 0xffff) & 0xffff_0000;
    f32::from_bits(bits)
}

/// Round `v` to an f16 value (returned as f32) stochastically: pick the neighbour above with
/// probability (v − below) / (above − below), `random / 2³²` being the uniform draw.
pub(crate) fn stochastic_f16(v: f32, random: u32) -> f32 {
    let nearest = f16::from_f32(v);
    let nf = nearest.to_f32();
    if nf == v || !v.is_finite() || !nf.is_finite() {
        return nf;
    }
    // Work on magnitudes: f16 bit patterns of one sign are ordered like their values.
    let a = v.abs();
    let m = f16::from_f32(a);
    let (lo, hi) = if m.to_f32() > a {
        (f16::from_bits(m.to_bits() - 1), m)
    } else {
        (m, f16::from_bits(m.to_bits() + 1))
    };
    let (lo, hi) = (lo.to_f32() as f64, hi.to_f32() as f64);
    let p = (a as f64 - lo) / (hi - lo);
    let u = random as f64 / 4_294_967_296.0;
    let mag = if u < p { hi } else { lo } as f32;
    mag.copysign(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stochastic_rounding_picks_a_neighbour_with_the_right_frequency() {
        let mut rng = Rng::new(5);
        for v in [1.0f32 + 1.0 / 512.0, -3.3, 1e-6, 60000.5, -7.0e-8] {
            type Round = fn(f32, u32) -> f32;
            // The 16-bit values either side of v: among the nearest and its two bit-pattern
            // neighbours, the largest not above v and the smallest not below it.
            let around = |nearest: u16, widen: fn(u16) -> f32| -> (f32, f32) {
                let c = [nearest - 1, nearest, nearest + 1].map(widen);
                let below = c
                    .iter()
                    .copied()
                    .filter(|&x| x <= v)
                    .fold(f32::MIN, f32::max);
                let above = c
                    .iter()
                    .copied()
                    .filter(|&x| x >= v)
                    .fold(f32::MAX, f32::min);
                (below, above)
            };
            let cases: [(&str, Round, f32, (f32, f32)); 2] = [
                (
                    "bf16",
                    stochastic_bf16,
                    bf16::from_f32(v).to_f32(),
                    around(bf16::from_f32(v).to_bits(), |b| bf16::from_bits(b).to_f32()),
                ),
                (
                    "f16",
                    stochastic_f16,
                    f16::from_f32(v).to_f32(),
                    around(f16::from_f32(v).to_bits(), |b| f16::from_bits(b).to_f32()),
                ),
            ];
            for (name, round, nearest, (below, above)) in cases {
                assert!(below <= v && v <= above, "{name} {v}: {below} {above}");
                let draws = 20000;
                let mut sum = 0.0f64;
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..draws {
                    let r = round(v, rng.next_u64() as u32);
                    seen.insert(r.to_bits());
                    sum += r as f64;
                }
                // Only the two neighbours, and the nearest among them (drawn with probability
                // at least 1/2 each time).
                let neighbours = [below.to_bits(), above.to_bits()];
                assert!(
                    seen.iter().all(|b| neighbours.contains(b)),
                    "{name} {v}: {seen:?} beyond {below} and {above}"
                );
                assert!(seen.contains(&nearest.to_bits()), "{name} {v}: {seen:?}");
                // Unbiased: the mean is close to v (within a few percent of the gap).
                let gap = seen
                    .iter()
                    .map(|&b| f32::from_bits(b) as f64)
                    .fold(0.0f64, |g, x| g.max((x - v as f64).abs()));
                let mean = sum / draws as f64;
                assert!(
                    (mean - v as f64).abs() <= 0.05 * gap.max(f64::MIN_POSITIVE),
                    "{name} {v}: mean {mean}"
                );
            }
        }
        // Exact values and specials are kept.
        assert_eq!(stochastic_bf16(1.5, u32::MAX), 1.5);
        assert_eq!(stochastic_f16(1.5, u32::MAX), 1.5);
        assert!(stochastic_f16(f32::NAN, 7).is_nan());
        assert_eq!(stochastic_bf16(f32::INFINITY, 7), f32::INFINITY);
    }

    #[test]
    fn mean_square_is_the_mean_of_squares() {
        let g: Vec<f32> = (0..19).map(|v| v as f32 - 9.0).collect();
        let want: f32 = g.iter().map(|v| v * v).sum::<f32>() / 19.0;
        assert!((mean_square(&g) - want).abs() <= 1e-6 * want);
        assert_eq!(mean_square(&[]), 0.0);
    }
}
