//! Bag kernels: pool runs of table rows (sum, weighted sum, mean, max) into one output row per
//! bag, as `EmbeddingBag` and FBGEMM's `EmbeddingSpMDM` do.
//!
//! A kernel receives a block of bags already reduced to plain row numbers: padding entries
//! are dropped by the caller, so a bag is the run `rows[bounds[b]..bounds[b + 1]]` and the
//! mean's divisor is simply that run's length. Each bag is accumulated in f32 registers,
//! a block of dimensions at a time (up to eight vectors), reading every entry's row once per
//! block; f16/bf16 rows are widened on load, a per-sample weight is fused as an FMA, and the
//! mean's division and the rounding to a 16-bit output happen at the single store. The row
//! numbers after `bounds[bags]` (up to `prefetch` of them) are only prefetched, so prefetching runs ahead across block boundaries.
//!
//! Every kernel computes each output element in the same order as the scalar reference
//! (entries in bag order, starting from +0.0; max starting from the first entry), so results
//! are bit-identical across instruction sets (the weighted sum's multiply-add rounds once on
//! every kernel, the portable one included).

mod portable;
pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use super::Isa;

/// How a bag's rows are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// `sum_i rows[i]`, or `sum_i weights[i] * rows[i]` when weights are given.
    Sum,
    /// The sum divided by the number of entries (by 1 for an empty bag).
    Mean,
    /// Element-wise maximum, as PyTorch takes it: the first entry, then every later value
    /// greater than the current one (NaN is kept only when it comes first). Empty bag: zeros.
    Max,
}

/// A block of bags, reduced to row numbers.
#[derive(Clone, Copy, Debug)]
pub struct BagBlock<'a> {
    /// Row numbers: the bags' entries, then up to `prefetch` rows only prefetched.
    pub rows: &'a [usize],
    /// `bags + 1` non-decreasing positions in `rows`: bag `b` is `rows[bounds[b]..bounds[b+1]]`.
    pub bounds: &'a [usize],
    /// Per-entry weights aligned with `rows` (at least `bounds[bags]` of them), `Sum` only.
    pub weights: Option<&'a [f32]>,
    /// How many entries ahead of the one being pooled to prefetch (0: none).
    pub prefetch: usize,
}

impl BagBlock<'_> {
    /// Number of bags.
    pub fn bags(&self) -> usize {
        self.bounds.len().saturating_sub(1)
    }
}

/// Pool bags of an f32 table into f32 output rows.
///
/// # Safety
/// Every `block.rows[i]` (lookahead included) satisfies `(rows[i] + 1) * dim <= table.len()`;
/// `block.bounds` is non-empty, non-decreasing and its last value is `<= rows.len()`;
/// `weights`, if given, holds at least `bounds[bags]` values and `pool` is `Sum`;
/// `out.len() >= bags * dim`; the CPU supports the kernel's instruction set.
pub type PoolF32Fn =
    unsafe fn(table: &[f32], dim: usize, block: &BagBlock<'_>, pool: Pool, out: &mut [f32]);

/// Pool bags of a 16-bit table (f16 or bf16 bit patterns) into f32 output rows.
///
/// # Safety
/// As [`PoolF32Fn`].
pub type PoolHalfToF32Fn =
    unsafe fn(table: &[u16], dim: usize, block: &BagBlock<'_>, pool: Pool, out: &mut [f32]);

/// Pool bags of a 16-bit table into output rows of the same 16-bit type, accumulated in f32
/// and rounded once (to nearest, ties to even) at the store.
///
/// # Safety
/// As [`PoolF32Fn`].
pub type PoolHalfFn =
    unsafe fn(table: &[u16], dim: usize, block: &BagBlock<'_>, pool: Pool, out: &mut [u16]);

/// The bag kernels of one instruction-set level.
#[derive(Clone, Copy, Debug)]
pub struct BagKernels {
    isa: Isa,
    pub(crate) f32: PoolF32Fn,
    pub(crate) f16_to_f32: PoolHalfToF32Fn,
    pub(crate) bf16_to_f32: PoolHalfToF32Fn,
    pub(crate) f16: PoolHalfFn,
    pub(crate) bf16: PoolHalfFn,
}

impl BagKernels {
    /// The kernels in use on this CPU ([`Isa::detect`]).
    pub fn detect() -> BagKernels {
        Self::for_isa(Isa::detect()).expect("the detected ISA is available")
    }

    /// The kernels of one level, or `None` if the CPU cannot run it. Levels without their own
    /// bag kernels (NEON) use the portable ones.
    pub fn for_isa(isa: Isa) -> Option<BagKernels> {
        if !isa.is_available() {
            return None;
        }
        Some(match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => BagKernels {
                isa,
                f32: avx512::pool_f32,
                f16_to_f32: avx512::pool_f16_to_f32,
                bf16_to_f32: avx512::pool_bf16_to_f32,
                f16: avx512::pool_f16,
                bf16: avx512::pool_bf16,
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => BagKernels {
                isa,
                f32: avx2::pool_f32,
                f16_to_f32: avx2::pool_f16_to_f32,
                bf16_to_f32: avx2::pool_bf16_to_f32,
                f16: avx2::pool_f16,
                bf16: avx2::pool_bf16,
            },
            Isa::Scalar => BagKernels {
                isa,
                f32: scalar::pool_f32,
                f16_to_f32: scalar::pool_f16_to_f32,
                bf16_to_f32: scalar::pool_bf16_to_f32,
                f16: scalar::pool_f16,
                bf16: scalar::pool_bf16,
            },
            // Portable vectors, also on NEON (which `wide` lowers to).
            _ => BagKernels {
                isa,
                f32: portable::pool_f32,
                f16_to_f32: portable::pool_f16_to_f32,
                bf16_to_f32: portable::pool_bf16_to_f32,
                f16: portable::pool_f16,
                bf16: portable::pool_bf16,
            },
        })
    }

    /// The instruction-set level.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The kernel's name (`avx512`, `avx2+f16c`, `portable`, `scalar`; NEON runs the portable
    /// kernels and says `neon`).
    pub fn name(&self) -> &'static str {
        self.isa.name()
    }
}

/// f32 to bf16 bits, rounded to nearest with ties to even; NaN stays NaN (quieted), exactly as
/// `half::bf16::from_f32`. Shared by every kernel's scalar tail.
#[inline(always)]
pub(crate) fn f32_to_bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    if x & 0x7fff_ffff > 0x7f80_0000 {
        return ((x >> 16) | 0x0040) as u16;
    }
    (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

#[cfg(test)]
mod tests {
    //! Every kernel against the scalar reference: every pool, every table/output type, every
    //! width up to two of the widest vector blocks plus one, empty, single-entry and long
    //! bags, duplicate rows, weights, special values.
    use super::*;
    use crate::kernels::DEFAULT_PREFETCH_DISTANCE;
    use crate::util::Rng;

    /// Widest block: 8 vectors of 16 f32 lanes; widths cross every vector and block boundary
    /// up to here, then a few past two blocks.
    const WIDTHS: &[usize] = &[
        0, 1, 2, 3, 5, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 47, 48, 63, 64, 65, 100, 127, 128,
        129, 143, 255, 256, 257, 300,
    ];

    /// Bags of lengths 0, 1, 2, 3, 40 and a few random ones, back to back, with lookahead.
    fn block(rows: usize, rng: &mut Rng) -> (Vec<usize>, Vec<usize>, Vec<f32>) {
        let lens = [0usize, 1, 3, 0, 2, 40, 1, 0, 5, 17];
        let mut bounds = vec![0];
        let mut total = 0;
        for l in lens {
            total += l;
            bounds.push(total);
        }
        let ids = (0..total + DEFAULT_PREFETCH_DISTANCE)
            .map(|_| rng.below(rows as u64) as usize)
            .collect();
        let weights = (0..total)
            .map(|i| match i % 5 {
                0 => 1.0,
                1 => -0.5,
                2 => 0.0,
                _ => rng.normal(),
            })
            .collect();
        (ids, bounds, weights)
    }

    /// Same bits, except that NaNs match any NaN: which operand's payload an add passes on is
    /// not fixed (the compiler may swap an add's operands).
    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    }

    fn f32_table(n: usize, rng: &mut Rng) -> Vec<f32> {
        let specials = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        (0..n)
            .map(|i| {
                if i % 11 == 0 {
                    specials[i / 11 % specials.len()]
                } else {
                    rng.normal() * 4.0
                }
            })
            .collect()
    }

    fn u16_table(n: usize, rng: &mut Rng, bf16: bool) -> Vec<u16> {
        let values = f32_table(n, rng);
        values
            .iter()
            .map(|&v| {
                if bf16 {
                    f32_to_bf16_bits(v)
                } else {
                    half::f16::from_f32(v).to_bits()
                }
            })
            .collect()
    }

    const POOLS: [(Pool, bool); 4] = [
        (Pool::Sum, false),
        (Pool::Sum, true),
        (Pool::Mean, false),
        (Pool::Max, false),
    ];

    #[test]
    fn f32_tables_match_scalar() {
        let mut rng = Rng::new(7);
        let reference = BagKernels::for_isa(Isa::Scalar).unwrap();
        for isa in Isa::all_available() {
            let k = BagKernels::for_isa(isa).unwrap();
            for &dim in WIDTHS {
                let rows = 9;
                let table = f32_table(rows * dim, &mut rng);
                let (ids, bounds, weights) = block(rows, &mut rng);
                for (pool, weighted) in POOLS {
                    let b = BagBlock {
                        rows: &ids,
                        bounds: &bounds,
                        weights: weighted.then_some(&weights[..]),
                        prefetch: DEFAULT_PREFETCH_DISTANCE,
                    };
                    let n = b.bags() * dim;
                    let mut want = vec![f32::from_bits(0xdead); n + 1];
                    let mut got = want.clone();
                    // SAFETY: rows drawn below `rows`, bounds within `ids`, buffers hold every bag.
                    unsafe {
                        (reference.f32)(&table, dim, &b, pool, &mut want);
                        (k.f32)(&table, dim, &b, pool, &mut got);
                    }
                    assert!(
                        same_bits(&got, &want),
                        "{} f32 {pool:?} weighted {weighted} dim {dim}",
                        k.name()
                    );
                }
            }
        }
    }

    #[test]
    fn half_tables_match_scalar() {
        let mut rng = Rng::new(8);
        let reference = BagKernels::for_isa(Isa::Scalar).unwrap();
        for isa in Isa::all_available() {
            let k = BagKernels::for_isa(isa).unwrap();
            for &dim in WIDTHS {
                let rows = 7;
                for bf16 in [false, true] {
                    let table = u16_table(rows * dim, &mut rng, bf16);
                    let (ids, bounds, weights) = block(rows, &mut rng);
                    let (wide_ref, wide_k, nat_ref, nat_k) = if bf16 {
                        (reference.bf16_to_f32, k.bf16_to_f32, reference.bf16, k.bf16)
                    } else {
                        (reference.f16_to_f32, k.f16_to_f32, reference.f16, k.f16)
                    };
                    for (pool, weighted) in POOLS {
                        let b = BagBlock {
                            rows: &ids,
                            bounds: &bounds,
                            weights: weighted.then_some(&weights[..]),
                            prefetch: DEFAULT_PREFETCH_DISTANCE,
                        };
                        let n = b.bags() * dim;
                        let what = format!(
                            "{} {} {pool:?} weighted {weighted} dim {dim}",
                            k.name(),
                            if bf16 { "bf16" } else { "f16" }
                        );
                        let mut want = vec![f32::from_bits(0xdead); n + 1];
                        let mut got = want.clone();
                        let mut want16 = vec![0xabcdu16; n + 1];
                        let mut got16 = want16.clone();
                        // SAFETY: as above.
                        unsafe {
                            wide_ref(&table, dim, &b, pool, &mut want);
                            wide_k(&table, dim, &b, pool, &mut got);
                            nat_ref(&table, dim, &b, pool, &mut want16);
                            nat_k(&table, dim, &b, pool, &mut got16);
                        }
                        assert!(same_bits(&got, &want), "{what} (to f32)");
                        let nan = |h: u16| {
                            if bf16 {
                                h & 0x7fff > 0x7f80
                            } else {
                                h & 0x7fff > 0x7c00
                            }
                        };
                        let same16 = got16
                            .iter()
                            .zip(&want16)
                            .all(|(&g, &w)| g == w || (nan(g) && nan(w)));
                        assert!(same16, "{what} (native)");
                    }
                }
            }
        }
    }

    /// A weighted entry whose product overflows f32 but whose fused sum does not: rounding
    /// the product first gives +inf (and +inf + -inf = NaN one entry later), the reference's
    /// single rounding gives a finite sum. Every kernel, on every nonzero width, rounds once. (The
    /// portable kernel rounded twice on x86_64, where `wide` has no FMA at compile time.)
    #[test]
    fn weighted_sums_round_once_even_where_the_product_overflows() {
        let reference = BagKernels::for_isa(Isa::Scalar).unwrap();
        for isa in Isa::all_available() {
            let k = BagKernels::for_isa(isa).unwrap();
            for &dim in WIDTHS.iter().filter(|&&d| d > 0) {
                // Row 0 = -3e38, row 1 = 3e38, row 2 = -inf; bag {0 × 1, 1 × 2, 2 × 1}.
                let mut table = vec![-3e38f32; dim];
                table.extend(std::iter::repeat_n(3e38f32, dim));
                table.extend(std::iter::repeat_n(f32::NEG_INFINITY, dim));
                for (rows, want_first) in
                    [(&[0usize, 1][..], 3e38f32), (&[0, 1, 2], f32::NEG_INFINITY)]
                {
                    let weights = [1.0f32, 2.0, 1.0];
                    let bounds = [0, rows.len()];
                    let b = BagBlock {
                        rows,
                        bounds: &bounds,
                        weights: Some(&weights[..rows.len()]),
                        prefetch: DEFAULT_PREFETCH_DISTANCE,
                    };
                    let mut want = vec![0.0f32; dim];
                    let mut got = vec![0.0f32; dim];
                    // SAFETY: rows below 3, bounds within `rows`, buffers hold the one bag.
                    unsafe {
                        (reference.f32)(&table, dim, &b, Pool::Sum, &mut want);
                        (k.f32)(&table, dim, &b, Pool::Sum, &mut got);
                    }
                    assert_eq!(
                        want[0].to_bits(),
                        want_first.to_bits(),
                        "the reference fuses"
                    );
                    assert!(
                        same_bits(&got, &want),
                        "{} dim {dim} rows {rows:?}: {got:?}",
                        k.name()
                    );
                }
            }
        }
    }

    #[test]
    fn scalar_reference_is_the_plain_definition() {
        // Rows [1, -2], [3, 0.5], [NaN, 7]; bags: {0, 1}, {}, {2, 0}, {1}.
        let table = [1.0f32, -2.0, 3.0, 0.5, f32::NAN, 7.0];
        let rows = [0, 1, 2, 0, 1];
        let bounds = [0, 2, 2, 4, 5];
        let b = BagBlock {
            rows: &rows,
            bounds: &bounds,
            weights: None,
            prefetch: DEFAULT_PREFETCH_DISTANCE,
        };
        let mut out = [9.0f32; 8];
        let k = BagKernels::for_isa(Isa::Scalar).unwrap();
        // SAFETY: rows below 3 of a 3 × 2 table; out holds 4 bags of 2.
        unsafe { (k.f32)(&table, 2, &b, Pool::Sum, &mut out) };
        assert_eq!(out[..4], [4.0, -1.5, 0.0, 0.0]);
        assert!(out[4].is_nan() && out[5] == 5.0 && out[6..] == [3.0, 0.5]);
        // SAFETY: as above.
        unsafe { (k.f32)(&table, 2, &b, Pool::Mean, &mut out) };
        assert_eq!(out[..4], [2.0, -0.75, 0.0, 0.0]);
        assert_eq!(out[5], 2.5);
        // Max keeps a NaN that comes first, and ignores one that comes later.
        // SAFETY: as above.
        unsafe { (k.f32)(&table, 2, &b, Pool::Max, &mut out) };
        assert_eq!(out[..4], [3.0, 0.5, 0.0, 0.0]);
        assert!(out[4].is_nan() && out[5] == 7.0);
        let later_nan = BagBlock {
            rows: &[0, 2],
            bounds: &[0, 2],
            weights: None,
            prefetch: DEFAULT_PREFETCH_DISTANCE,
        };
        // SAFETY: as above, one bag.
        unsafe { (k.f32)(&table, 2, &later_nan, Pool::Max, &mut out) };
        assert_eq!(out[..2], [1.0, 7.0]);
        let weighted = BagBlock {
            rows: &[0, 1],
            bounds: &[0, 2],
            weights: Some(&[2.0, -1.0]),
            prefetch: DEFAULT_PREFETCH_DISTANCE,
        };
        // SAFETY: as above, one bag.
        unsafe { (k.f32)(&table, 2, &weighted, Pool::Sum, &mut out) };
        assert_eq!(out[..2], [-1.0, -4.5]);
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut rng = Rng::new(3);
        let mut specials = vec![
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1.0e-40,
            f32::from_bits(0x3f80_8000), // a tie: rounds to even (down)
            f32::from_bits(0x3f81_8000), // a tie: rounds to even (up)
            f32::from_bits(0x7f80_0001), // signalling NaN
        ];
        specials.extend((0..10_000).map(|_| f32::from_bits(rng.next_u64() as u32)));
        for v in specials {
            assert_eq!(
                f32_to_bf16_bits(v),
                half::bf16::from_f32(v).to_bits(),
                "{v:e} ({:#010x})",
                v.to_bits()
            );
        }
    }
}
