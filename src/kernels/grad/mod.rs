//! Gradient kernels: weighted sums of f32 rows into destination rows, in two shapes.
//!
//! - `scatter_add` adds contributions one by one into their destination rows, in the order
//!   given (a dense gradient: each thread owns a range of rows and walks the positions in
//!   order, so every row still sees its contributions in position order).
//! - `reduce_segments` sums a segment of contributions at a time and writes the row once (a
//!   coalesced gradient, where the positions were first grouped by row):
//!
//! ```text
//! dst[dst_rows[k]][j] = fma(w[a+1], src[items[a+1]][j], fma(w[a], src[items[a]][j], 0)) …
//!                       for a = bounds[k] .. bounds[k+1]
//! ```
//!
//! Every kernel evaluates exactly that expression: a fused multiply-add per contribution
//! (one rounding), element by element in item order, starting from +0. That is what
//! PyTorch's CPU backward does (`grad_weight[k].add_(grad[i], scale)` runs as `fmadd`), so
//! scaled gradients match PyTorch bit for bit, and with weight 1 it is a plain sum. Every
//! instruction set produces the same bits as the scalar reference. Items past the last
//! segment (up to `prefetch` of them) are only prefetched, so prefetching runs ahead across
//! segment and batch boundaries: while adding item `a` a kernel prefetches item
//! `a + prefetch` ([`prefetch_distance`](super::prefetch_distance)).

mod portable;
pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use super::Isa;

/// Reduce segments of weighted source rows into destination rows.
///
/// `items` holds the source row numbers of the batch's segments followed by up to
/// `prefetch` lookahead rows; segment `k` is `items[bounds[k] - bounds[0] ..
/// bounds[k + 1] - bounds[0]]` with weights at the same offsets of `weights`, and its sum goes
/// to `dst[dst_rows[k] * dim ..][..dim]` (overwritten, not added to).
///
/// # Safety
/// - `bounds` is non-decreasing, `bounds.len() >= 1`, `dst_rows.len() >= bounds.len() - 1`;
/// - with `n = bounds[last] - bounds[0]`: `n <= items.len()` and `n <= weights.len()`;
/// - every `items[i]` (lookahead included) satisfies `(items[i] + 1) * dim <= src.len()`;
/// - every `dst_rows[k]` satisfies `(dst_rows[k] + 1) * dim <= dst.len()`, and the
///   `dst_rows` of one call are distinct;
/// - the CPU supports the kernel's instruction set.
///
/// `prefetch` is how many items ahead to prefetch (0: none).
pub type ReduceSegmentsFn = unsafe fn(
    src: &[f32],
    dim: usize,
    items: &[u32],
    weights: &[f32],
    bounds: &[u32],
    dst_rows: &[usize],
    dst: &mut [f32],
    prefetch: usize,
);

/// Add weighted source rows into destination rows, one contribution at a time, in order:
/// `dst[dst_rows[a]] = fma(weights[a], src[items[a]], dst[dst_rows[a]])` for `a < count`
/// (element by element). Entries `count..` of `items` and `dst_rows` (up to `prefetch` of
/// them) are only prefetched.
///
/// # Safety
/// - `count <= items.len()`, `count <= dst_rows.len()`, `count <= weights.len()`, and
///   `items.len() == dst_rows.len()`;
/// - every `items[a]` satisfies `(items[a] + 1) * dim <= src.len()` and every `dst_rows[a]`
///   satisfies `(dst_rows[a] + 1) * dim <= dst.len()` (lookahead entries included);
/// - the CPU supports the kernel's instruction set.
///
/// `prefetch` is how many items ahead to prefetch (0: none).
pub type ScatterAddFn = unsafe fn(
    src: &[f32],
    dim: usize,
    items: &[u32],
    weights: &[f32],
    dst_rows: &[usize],
    count: usize,
    dst: &mut [f32],
    prefetch: usize,
);

/// The gradient kernels of one instruction-set level.
#[derive(Clone, Copy, Debug)]
pub struct GradKernels {
    isa: Isa,
    pub(crate) reduce_segments: ReduceSegmentsFn,
    pub(crate) scatter_add: ScatterAddFn,
}

impl GradKernels {
    /// The kernels in use on this CPU ([`Isa::detect`]).
    pub fn detect() -> GradKernels {
        Self::for_isa(Isa::detect()).expect("the detected ISA is available")
    }

    /// The kernels of one level, or `None` if the CPU cannot run it.
    pub fn for_isa(isa: Isa) -> Option<GradKernels> {
        if !isa.is_available() {
            return None;
        }
        let (reduce_segments, scatter_add): (ReduceSegmentsFn, ScatterAddFn) = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => (avx512::reduce_segments, avx512::scatter_add),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => (avx2::reduce_segments, avx2::scatter_add),
            // aarch64: the portable kernels compile to Advanced SIMD there.
            Isa::Neon | Isa::Portable => (portable::reduce_segments, portable::scatter_add),
            Isa::Scalar => (scalar::reduce_segments, scalar::scatter_add),
            #[allow(unreachable_patterns)]
            _ => return None,
        };
        Some(GradKernels {
            isa,
            reduce_segments,
            scatter_add,
        })
    }

    /// The instruction-set level.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The kernel's name (`avx512`, `avx2+f16c`, `neon`, `portable`, `scalar`).
    pub fn name(&self) -> &'static str {
        self.isa.name()
    }
}

#[cfg(test)]
mod tests {
    //! Every kernel against the scalar reference, bit for bit: every width up to twice the
    //! widest column block plus one, empty and long segments, repeated source rows, weights of
    //! one and others, special values, scattered destination rows.
    use super::*;
    use crate::kernels::DEFAULT_PREFETCH_DISTANCE as PREFETCH_DISTANCE;
    use crate::util::Rng;

    /// The AVX-512 kernel reduces 64 columns per block: test up to two blocks plus one.
    const MAX_DIM: usize = 2 * 64 + 1;

    fn value(rng: &mut Rng, i: usize) -> f32 {
        const SPECIAL: [f32; 9] = [
            0.0,
            -0.0,
            1e-40,
            -1e-40,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e30,
        ];
        if i.is_multiple_of(11) {
            SPECIAL[i / 11 % SPECIAL.len()]
        } else {
            rng.normal() * 10f32.powi((rng.below(7) as i32) - 3)
        }
    }

    /// The NaN payload that fills outputs before a kernel runs. No arithmetic produces it
    /// (the special values' NaN has another payload), so finding it means "never written".
    const UNWRITTEN: u32 = 0x7fc0_dead;

    /// Equal bits, or both NaN results; the unwritten sentinel equals only itself, so a row a
    /// kernel forgot is not mistaken for a NaN result.
    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                let written = x.to_bits() != UNWRITTEN && y.to_bits() != UNWRITTEN;
                x.to_bits() == y.to_bits() || (written && x.is_nan() && y.is_nan())
            })
    }

    #[test]
    fn reduce_segments_matches_scalar() {
        let mut rng = Rng::new(7);
        let reference = GradKernels::for_isa(Isa::Scalar).unwrap();
        for isa in Isa::all_available() {
            let k = GradKernels::for_isa(isa).unwrap();
            for dim in 0..=MAX_DIM {
                let src_rows = 9;
                let src: Vec<f32> = (0..src_rows * dim).map(|i| value(&mut rng, i)).collect();
                // Segment lengths 0, 1, 2, 5, 17 in a shuffled order.
                let lens = [2u32, 0, 5, 1, 17, 0, 3];
                let mut bounds = vec![3u32]; // a batch need not start at 0
                for l in lens {
                    bounds.push(bounds.last().unwrap() + l);
                }
                let n = (bounds.last().unwrap() - bounds[0]) as usize;
                let items: Vec<u32> = (0..n + PREFETCH_DISTANCE)
                    .map(|_| rng.below(src_rows as u64) as u32)
                    .collect();
                let weights: Vec<f32> = (0..n)
                    .map(|i| match i % 3 {
                        0 => 1.0,
                        1 => 1.0 / (1 + i) as f32,
                        _ => rng.normal(),
                    })
                    .collect();
                let dst_len = 12;
                let dst_rows = [5usize, 0, 11, 2, 7, 3, 9];
                let mut want = vec![f32::from_bits(UNWRITTEN); dst_len * dim];
                let mut got = want.clone();
                // SAFETY: items drawn below `src_rows`, bounds non-decreasing with
                // n <= items/weights lengths, dst_rows distinct and below `dst_len`.
                unsafe {
                    (reference.reduce_segments)(
                        &src,
                        dim,
                        &items,
                        &weights,
                        &bounds,
                        &dst_rows,
                        &mut want,
                        PREFETCH_DISTANCE,
                    );
                    (k.reduce_segments)(
                        &src,
                        dim,
                        &items,
                        &weights,
                        &bounds,
                        &dst_rows,
                        &mut got,
                        PREFETCH_DISTANCE,
                    );
                }
                assert!(same_bits(&got, &want), "{} dim {dim}", k.name());
                // Rows not named in dst_rows are untouched.
                for r in [1usize, 4, 6, 8, 10] {
                    assert!(got[r * dim..(r + 1) * dim]
                        .iter()
                        .all(|v| v.to_bits() == UNWRITTEN));
                }
            }
        }
    }

    #[test]
    fn scatter_add_matches_scalar() {
        let mut rng = Rng::new(8);
        let reference = GradKernels::for_isa(Isa::Scalar).unwrap();
        for isa in Isa::all_available() {
            let k = GradKernels::for_isa(isa).unwrap();
            for dim in 0..=MAX_DIM {
                let (src_rows, dst_len) = (9, 6);
                let src: Vec<f32> = (0..src_rows * dim).map(|i| value(&mut rng, i)).collect();
                for count in [0usize, 1, 7, 40] {
                    // Destination rows repeat (a row's contributions must land in order).
                    let total = count + PREFETCH_DISTANCE;
                    let items: Vec<u32> = (0..total)
                        .map(|_| rng.below(src_rows as u64) as u32)
                        .collect();
                    let dst_rows: Vec<usize> = (0..total)
                        .map(|_| rng.below(dst_len as u64) as usize)
                        .collect();
                    let weights: Vec<f32> = (0..count)
                        .map(|i| if i % 2 == 0 { 1.0 } else { rng.normal() })
                        .collect();
                    let start: Vec<f32> = (0..dst_len * dim).map(|_| rng.normal()).collect();
                    let mut want = start.clone();
                    let mut got = start.clone();
                    // SAFETY: items below `src_rows`, dst rows below `dst_len`, count entries
                    // of weights, lookahead entries in range.
                    unsafe {
                        (reference.scatter_add)(
                            &src,
                            dim,
                            &items,
                            &weights,
                            &dst_rows,
                            count,
                            &mut want,
                            PREFETCH_DISTANCE,
                        );
                        (k.scatter_add)(
                            &src,
                            dim,
                            &items,
                            &weights,
                            &dst_rows,
                            count,
                            &mut got,
                            PREFETCH_DISTANCE,
                        );
                    }
                    assert!(
                        same_bits(&got, &want),
                        "{} dim {dim} count {count}",
                        k.name()
                    );
                }
            }
        }
    }

    #[test]
    fn contributions_are_fused_multiply_adds() {
        // 1 + 2^-23 squared is 1 + 2^-22 + 2^-46: a separate multiply rounds the 2^-46 away,
        // a fused multiply-add keeps it long enough to round (1 + 2^-22 + 2^-46) - 1 - 2^-22
        // = 2^-46 exactly: [fma(x, x, -1 - 2^-22)].
        let x = 1.0f32 + f32::EPSILON;
        let src = [1.0f32, x];
        for isa in Isa::all_available() {
            let k = GradKernels::for_isa(isa).unwrap();
            let mut dst = [0.0f32; 1];
            // Row 0 (value 1) times -(1 + 2^-22), then row 1 (value x) times x.
            // SAFETY: items below 2 rows of width 1, one segment into one destination row.
            unsafe {
                (k.reduce_segments)(
                    &src,
                    1,
                    &[0, 1],
                    &[-(1.0 + 2.0 * f32::EPSILON), x],
                    &[0, 2],
                    &[0],
                    &mut dst,
                    0,
                )
            };
            assert_eq!(dst[0], 2f32.powi(-46), "{}", k.name());
            let mut dst = [-(1.0 + 2.0 * f32::EPSILON)];
            // SAFETY: item 1 of a 2-row source of width 1 into the one destination row.
            unsafe { (k.scatter_add)(&src, 1, &[1], &[x], &[0], 1, &mut dst, 0) };
            assert_eq!(dst[0], 2f32.powi(-46), "{} scatter_add", k.name());
        }
    }

    #[test]
    fn scalar_reference_is_the_plain_definition() {
        // src rows: r0 = [1, 2], r1 = [10, 20]; segment 0 = r1·0.5 + r0·1 + r1·2, segment 1 empty.
        let src = [1.0f32, 2.0, 10.0, 20.0];
        let mut dst = [9.0f32; 4];
        // SAFETY: items below 2 rows, dst rows 1 and 0 of a 2-row destination.
        unsafe {
            scalar::reduce_segments(
                &src,
                2,
                &[1, 0, 1],
                &[0.5, 1.0, 2.0],
                &[0, 3, 3],
                &[1, 0],
                &mut dst,
                0,
            )
        };
        assert_eq!(dst, [0.0, 0.0, 26.0, 52.0]);
        // An empty segment writes +0.0, and a -0.0 contribution added to 0 gives +0.0, as
        // PyTorch's zero-initialised accumulation does.
        let mut dst = [9.0f32; 1];
        // SAFETY: as above.
        unsafe { scalar::reduce_segments(&[-0.0], 1, &[0], &[1.0], &[0, 1], &[0], &mut dst, 0) };
        assert_eq!(dst[0].to_bits(), 0.0f32.to_bits());
    }
}
