//! `renorm`: arbitrary small tables, indices (duplicates and bad ones), `max_norm` and
//! `norm_type` (invalid ones included). Output only must leave the table bit-identical; in
//! place must give the same output bits and leave the table holding exactly what the output
//! holds for the referenced rows, those rows within a few ulps of a naive per-row renorm
//! written from the definition, every other row unchanged; errors leave everything untouched.

use arbitrary::Arbitrary;
use embedding_lookup::{DType, Element, Error, Index, MaxNorm, Table};
use half::{bf16, f16};

use crate::lookup::IndexSpec;
use crate::reference::{self, Ty, Widen};

/// Largest number of indices one input expands to (enough for the parallel path).
const MAX_INDICES: usize = 1 << 12;

/// `max_norm`.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum MaxNormSpec {
    /// `(n + 1) / 16`.
    Small(u8),
    /// `n / 4 - 8` (zero and negative included).
    Signed(i8),
    /// Any f64 (NaN, infinities, subnormals).
    Raw(u64),
}

/// `norm_type`.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum NormTypeSpec {
    /// The default, 2.
    Default,
    /// 1.
    One,
    /// `inf`.
    Inf,
    /// `n / 8` (0 included).
    Eighths(u8),
    /// Any f64.
    Raw(u64),
}

/// One fuzz input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    dtype: u8,
    rows: u8,
    dim: u8,
    values: Vec<u16>,
    /// Scale table values down (f32 tables only): keeps norms in a sensible range more often.
    tame: bool,
    index_type: u8,
    indices: Vec<IndexSpec>,
    repeat: u8,
    max_norm: MaxNormSpec,
    norm_type: NormTypeSpec,
    out_native: bool,
}

/// Run one input; panics on any disagreement.
pub fn check(input: Input) {
    let m = match input.max_norm {
        MaxNormSpec::Small(n) => (n as f64 + 1.0) / 16.0,
        MaxNormSpec::Signed(n) => n as f64 / 4.0 - 8.0,
        MaxNormSpec::Raw(b) => f64::from_bits(b),
    };
    let p = match input.norm_type {
        NormTypeSpec::Default => 2.0,
        NormTypeSpec::One => 1.0,
        NormTypeSpec::Inf => f64::INFINITY,
        NormTypeSpec::Eighths(n) => n as f64 / 8.0,
        NormTypeSpec::Raw(b) => f64::from_bits(b),
    };
    let max_norm = match MaxNorm::new(m) {
        Ok(v) => {
            assert!(m > 0.0, "max_norm {m} accepted");
            v
        }
        Err(e) => {
            assert!(m.is_nan() || m <= 0.0, "max_norm {m} refused: {e}");
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            return;
        }
    };
    let max_norm = match max_norm.with_norm_type(p) {
        Ok(v) => {
            assert!(p > 0.0, "norm_type {p} accepted");
            assert_eq!((v.max_norm(), v.norm_type()), (m, p));
            v
        }
        Err(e) => {
            assert!(p.is_nan() || p <= 0.0, "norm_type {p} refused: {e}");
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            return;
        }
    };
    let ty = match input.dtype % 3 {
        0 => Ty::F32,
        1 => Ty::F16,
        _ => Ty::Bf16,
    };
    let dim = (input.dim % 41) as usize;
    let rows = (input.rows % 64) as usize;
    let elems = rows * dim;
    let src: Vec<u16> = if input.values.is_empty() {
        (0..elems * 2)
            .map(|i| 0x3c00 + (i as u16 % 64) * 16)
            .collect()
    } else {
        input
            .values
            .iter()
            .copied()
            .cycle()
            .take(elems * 2)
            .collect()
    };
    let bytes: Vec<u8> = match ty {
        Ty::F32 => src
            .chunks(2)
            .flat_map(|c| {
                let v = f32::from_bits(c[0] as u32 | (c[1] as u32) << 16);
                let v = if input.tame { v * 2f32.powi(-100) } else { v };
                v.to_le_bytes()
            })
            .collect(),
        _ => src[..elems].iter().flat_map(|b| b.to_le_bytes()).collect(),
    };
    let n = input
        .indices
        .len()
        .saturating_mul(1 + input.repeat as usize)
        .min(MAX_INDICES);
    let values: Vec<i128> = input
        .indices
        .iter()
        .cycle()
        .take(n)
        .map(|&s| crate::lookup::spec_value(s, rows))
        .collect();
    let c = Case {
        bytes: &bytes,
        ty,
        rows,
        dim,
        max_norm,
        out_native: input.out_native,
    };
    match ty {
        Ty::F32 => c.with_table::<f32>(&values, input.index_type),
        Ty::F16 => c.with_table::<f16>(&values, input.index_type),
        Ty::Bf16 => c.with_table::<bf16>(&values, input.index_type),
    }
}

struct Case<'a> {
    bytes: &'a [u8],
    ty: Ty,
    rows: usize,
    dim: usize,
    max_norm: MaxNorm,
    out_native: bool,
}

impl Case<'_> {
    fn with_table<T: Element>(&self, values: &[i128], index_type: u8) {
        match index_type % 3 {
            0 => self.run::<T, i32>(&values.iter().map(|&v| v as i32).collect::<Vec<_>>()),
            1 => self.run::<T, i64>(&values.iter().map(|&v| v as i64).collect::<Vec<_>>()),
            _ => self.run::<T, u64>(&values.iter().map(|&v| v as u64).collect::<Vec<_>>()),
        }
    }

    fn run<T: Element, I: Index + Widen>(&self, indices: &[I]) {
        if self.out_native {
            self.run_as::<T, I, T>(indices)
        } else {
            self.run_as::<T, I, f32>(indices)
        }
    }

    fn run_as<T: Element, I: Index + Widen, O: Element>(&self, indices: &[I]) {
        let (rows, dim) = (self.rows, self.dim);
        let data: Vec<T> = bytemuck::pod_collect_to_vec(self.bytes);
        let table = Table::from_slice(&data, rows, dim).expect("a small table");
        let seen: Vec<i128> = indices.iter().map(|&i| i.exact()).collect();
        let bad = reference::first_bad_index(&seen, rows);

        let sentinel = O::from_f32(-12345.0);
        let mut out1 = vec![sentinel; indices.len() * dim];
        let got1 = table.lookup_renorm_output_only(indices, &mut out1, self.max_norm);
        assert_eq!(
            table.as_bytes(),
            self.bytes,
            "output only changed the table"
        );

        let mut copy = Table::from_slice(&data, rows, dim).expect("a small table");
        let mut out2 = vec![sentinel; indices.len() * dim];
        let got2 = copy.lookup_renorm_in_place(indices, &mut out2, self.max_norm);

        let untouched = |out: &[O]| {
            out.iter()
                .all(|v| v.to_f32().to_bits() == sentinel.to_f32().to_bits())
        };
        if let Some((index, position)) = bad {
            for got in [&got1, &got2] {
                match got {
                    Err(Error::IndexOutOfRange {
                        index: i,
                        position: p,
                        rows: r,
                    }) => assert_eq!((index, position, rows), (*i, *p, *r)),
                    other => panic!("index {index} at {position}: got {other:?}"),
                }
            }
            assert!(
                untouched(&out1) && untouched(&out2),
                "output written before an error"
            );
            assert_eq!(copy.as_bytes(), self.bytes, "table written before an error");
            return;
        }
        got1.expect("output only on valid indices");
        got2.expect("in place on valid indices");
        assert!(
            bytemuck::cast_slice::<O, u8>(&out1) == bytemuck::cast_slice::<O, u8>(&out2),
            "in-place output differs from output-only output"
        );

        // The table after: referenced rows renormed, others unchanged; the output holds the
        // renormed rows.
        let after = copy.as_bytes();
        let rb = dim * self.ty.size();
        let mut referenced = vec![false; rows];
        for &v in &seen {
            referenced[v as usize] = true;
        }
        for r in 0..rows {
            let (old, new) = (
                &self.bytes[r * rb..(r + 1) * rb],
                &after[r * rb..(r + 1) * rb],
            );
            if !referenced[r] {
                assert_eq!(old, new, "row {r} is not referenced but changed");
                continue;
            }
            let unchanged = old == new;
            let old: Vec<f32> = (0..dim).map(|j| self.load(old, j)).collect();
            let new: Vec<f32> = (0..dim).map(|j| self.load(new, j)).collect();
            self.check_row::<T>(r, &old, &new, unchanged);
        }
        // Bits compared raw: `half`'s widening quiets NaNs, the engine's copies must not.
        for (k, &v) in seen.iter().enumerate() {
            let row = &after[v as usize * rb..(v as usize + 1) * rb];
            let o = &out1[k * dim..(k + 1) * dim];
            if O::DTYPE == T::DTYPE {
                assert!(
                    bytemuck::cast_slice::<O, u8>(o) == row,
                    "output position {k} differs from table row {v}"
                );
                continue;
            }
            for (j, got) in o.iter().enumerate() {
                let want = self.load(row, j).to_bits();
                let got = bytemuck::cast::<O, u32>(*got);
                assert!(
                    got == want,
                    "output position {k} element {j}: {got:#x}, table row {v} widens to {want:#x}"
                );
            }
        }
    }

    fn load(&self, row: &[u8], j: usize) -> f32 {
        let b = &row[j * self.ty.size()..(j + 1) * self.ty.size()];
        match self.ty {
            Ty::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Ty::F16 => reference::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
            Ty::Bf16 => reference::bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
        }
    }

    /// A renormed row against the definition: `norm = (Σ|x|^p)^(1/p)` (max |x| for p = ∞), in
    /// f64 here; rounded to the table's dtype; if `norm > max_norm`, the row times
    /// `max_norm / (norm + 1e-7)` (the scale rounded to f32, then to the dtype), each product
    /// rounded to the dtype. The engine sums in f32 in another order, so its norm may differ by
    /// a relative `delta`: where that could change the decision or the scale, the check widens
    /// accordingly.
    fn check_row<T: Element>(&self, r: usize, old: &[f32], new: &[f32], unchanged: bool) {
        let (m, p) = (self.max_norm.max_norm(), self.max_norm.norm_type());
        let general = p != 1.0 && p != 2.0 && p != f64::INFINITY;
        let (eps, sub) = match T::DTYPE {
            DType::F32 => (f32::EPSILON as f64, f32::from_bits(1) as f64),
            DType::F16 => (2f64.powi(-10), 2f64.powi(-24)),
            DType::BF16 => (
                2f64.powi(-7),
                f32::from_bits(1 << 16) as f64 * 2f64.powi(-7),
            ),
        };
        // The engine raises to `p` and `1 / p` in f32 (PyTorch's accumulator type): a tiny p
        // is 0 there, a huge one infinite.
        let p32 = p as f32;
        let (norm, sum) = if p == f64::INFINITY {
            let n = old.iter().fold(0.0f64, |a, &x| {
                if a.is_nan() || x.is_nan() {
                    f64::NAN
                } else {
                    a.max((x as f64).abs())
                }
            });
            (n, n)
        } else if general {
            let s: f64 = old.iter().map(|&x| (x as f64).abs().powf(p32 as f64)).sum();
            (s.powf((1.0f32 / p32) as f64), s)
        } else {
            let s: f64 = old.iter().map(|&x| (x as f64).abs().powf(p)).sum();
            (s.powf(1.0 / p), s)
        };
        if norm.is_nan() {
            // A NaN norm is never greater than max_norm.
            assert!(unchanged, "row {r} with a NaN norm was changed");
            return;
        }
        // The engine's f32 sum may differ from this one by about `dim` roundings, magnified
        // by `1 / p` in the norm.
        let amplify = if general {
            (1.0 / p32 as f64).max(1.0)
        } else {
            1.0
        };
        let delta = (old.len() as f64 + 4.0) * f32::EPSILON as f64 * amplify;
        // f32 sums that overflow or underflow, or a norm too sensitive to its sum: any decision.
        let wild = (!(1e-30..=1e37).contains(&sum) && sum != 0.0)
            || !norm.is_finite()
            || (general && (p32 == 0.0 || p32.is_infinite() || delta > 1e-2));
        let decide = |n: f64| -> Option<f64> {
            let n = T::from_f32(n as f32).to_f32() as f64;
            (n > m).then(|| T::from_f32((m / (n + 1e-7)) as f32).to_f32() as f64)
        };
        let (lo, hi) = (decide(norm * (1.0 - delta)), decide(norm * (1.0 + delta)));
        let round = |v: f64| T::from_f32(v as f32).to_f32() as f64;
        let ctx = |j: usize| {
            let (x, y) = (old[j] as f64, new[j] as f64);
            format!("row {r} element {j}: {x:e} -> {y:e} (norm {norm:e}, max_norm {m:e}, p {p})")
        };
        // Within `slack` of `want`: three roundings (the scale, the product in f32, the dtype).
        let near = |y: f64, want: f64| {
            let slack = 4.0 * eps * want.abs() + 4.0 * sub;
            (y - want).abs() <= slack
        };
        if !wild && lo.is_none() && hi.is_none() {
            assert!(unchanged, "{} (not renormed)", ctx(first_change(old, new)));
            return;
        }
        if let (false, Some(s1)) = (wild, lo) {
            // Renormed at any norm the engine can have computed: one scale in `lo..=hi`.
            let s2 = hi.expect("a larger norm is renormed too");
            for j in 0..old.len() {
                let (x, y) = (old[j] as f64, new[j] as f64);
                let (a, b) = (round(x * s1), round(x * s2));
                let (a, b) = (a.min(b), a.max(b));
                let slack = 3.0 * eps * a.abs().max(b.abs()) + 4.0 * sub;
                assert!(
                    y >= a - slack && y <= b + slack,
                    "{} (want {a:e}..{b:e})",
                    ctx(j)
                );
            }
            return;
        }
        if unchanged {
            // The engine's norm may lie on either side of max_norm (or be anything, `wild`).
            return;
        }
        // Scaled by one scale `s` for the whole row: near 1 when the norm is within rounding
        // of max_norm, anywhere in [0, 1] when `wild`; 0 (a zeroed row) only where the
        // engine's f32 norm may be infinite or the scale small enough to flush the row.
        let (s_min, s_max) = if wild {
            (0.0, 1.0)
        } else {
            (hi.expect("renormed only above max_norm"), 1.0)
        };
        if old.iter().any(|x| x.is_infinite()) {
            // An infinite element makes every norm infinite: scale 0, inf × 0 = NaN.
            for j in 0..old.len() {
                let (x, y) = (old[j] as f64, new[j] as f64);
                let ok = if x.is_infinite() {
                    y.is_nan()
                } else {
                    y == 0.0
                };
                assert!(ok, "{} (an infinite norm scales by 0)", ctx(j));
            }
            return;
        }
        let f32_norm_may_overflow = !norm.is_finite()
            || sum * (1.0 + delta) >= f32::MAX as f64
            || (general && (p32 == 0.0 || p32.is_infinite() || delta > 1e-2));
        // (NaN elements stay NaN under any scale; p = 0 gives such a row a finite norm.)
        let scaled_nan = |j: usize| old[j].is_nan() && new[j].is_nan();
        let largest = (0..old.len())
            .filter(|&j| !old[j].is_nan())
            .max_by(|&i, &j| old[i].abs().total_cmp(&old[j].abs()));
        let Some(largest) = largest.filter(|&j| old[j] != 0.0) else {
            for (j, &y) in new.iter().enumerate() {
                assert!(scaled_nan(j) || y == 0.0, "{} (zeros scaled)", ctx(j));
            }
            return;
        };
        let x_max = old[largest] as f64;
        let smallest_scale = m / (norm * (1.0 + delta) * 2.0 + 1e-7);
        let may_flush = f32_norm_may_overflow || (x_max * smallest_scale).abs() < 2.0 * sub;
        // The scale the row was multiplied by, from its largest element.
        let s = new[largest] as f64 / x_max;
        assert!(
            s >= s_min * (1.0 - 4.0 * eps) - 4.0 * sub / x_max.abs()
                && s <= s_max * (1.0 + 4.0 * eps) + 4.0 * sub / x_max.abs(),
            "{} (a scale of {s:e}, outside {s_min:e}..={s_max:e})",
            ctx(largest)
        );
        assert!(
            may_flush || new.iter().any(|&y| y != 0.0),
            "{} (a row zeroed where its scale cannot flush it)",
            ctx(largest)
        );
        for j in 0..old.len() {
            let (x, y) = (old[j] as f64, new[j] as f64);
            assert!(
                scaled_nan(j) || near(y, round(x * s)),
                "{} (the row's scale {s:e} gives {:e})",
                ctx(j),
                round(x * s)
            );
        }
    }
}

/// The first element whose bits differ (0 when none does).
fn first_change(old: &[f32], new: &[f32]) -> usize {
    (0..old.len())
        .find(|&j| old[j].to_bits() != new[j].to_bits())
        .unwrap_or(0)
}
