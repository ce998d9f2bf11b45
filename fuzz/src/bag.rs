//! `bag_offsets`: arbitrary small tables, indices, offsets (`include_last_offset` either way)
//! or fixed bag sizes, per-sample weights of any length with any mode, and padding_idx. The
//! engine must give exactly the naive pooling (f32, entries in order, a fused multiply-add per
//! weight, as documented) or the error its documented order of checks gives, leave the output
//! untouched on error, and never panic.

use arbitrary::Arbitrary;
use embedding_lookup::{BagMode, BagOptions, Bags, Element, Error, Index, Table};
use half::{bf16, f16};

use crate::lookup::{IndexSpec, OutChoice};
use crate::reference::{self, Ty, Widen};

/// Largest number of indices one input expands to.
const MAX_INDICES: usize = 1 << 11;

/// One offset: a step from the previous one (so valid offsets come up often), or raw.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum OffsetSpec {
    /// Previous offset plus `n % 4`.
    Step(u8),
    /// The number of indices (the end).
    End,
    /// Any value.
    Raw(i64),
}

/// How the indices are cut into bags.
#[derive(Arbitrary, Debug)]
pub enum BagSpec {
    /// `Bags::Offsets` with i64 offsets.
    Offsets64(Vec<OffsetSpec>, bool),
    /// `Bags::Offsets` with i32 offsets.
    Offsets32(Vec<OffsetSpec>, bool),
    /// `Bags::Fixed(n)`.
    Fixed(u8),
}

/// Per-sample weights.
#[derive(Arbitrary, Debug)]
pub enum WeightSpec {
    /// None.
    None,
    /// One per index, values cycled from the list (raw f32 bits).
    Right(Vec<u32>),
    /// One per index plus `delta` (which may be negative).
    Wrong(i8),
}

/// The index type used for the whole list.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum IndexType {
    /// i32.
    I32,
    /// i64.
    I64,
    /// u32.
    U32,
}

/// One fuzz input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    dtype: u8,
    rows: u8,
    dim: u8,
    values: Vec<u16>,
    padding: Option<i8>,
    index_type: IndexType,
    indices: Vec<IndexSpec>,
    repeat: u8,
    bags: BagSpec,
    mode: u8,
    weights: WeightSpec,
    out: OutChoice,
    out_len_delta: Option<i8>,
}

/// Run one input; panics on any disagreement.
pub fn check(input: Input) {
    let ty = match input.dtype % 3 {
        0 => Ty::F32,
        1 => Ty::F16,
        _ => Ty::Bf16,
    };
    let dim = (input.dim % 41) as usize;
    let rows = (input.rows % 100) as usize;
    let halves = rows * dim * ty.size() / 2;
    let bits: Vec<u16> = if input.values.is_empty() {
        (0..halves).map(|i| (i as u16) ^ 0x3c00).collect()
    } else {
        input.values.iter().copied().cycle().take(halves).collect()
    };
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    match ty {
        Ty::F32 => with_table::<f32>(&input, &bytes, ty, rows, dim),
        Ty::F16 => with_table::<f16>(&input, &bytes, ty, rows, dim),
        Ty::Bf16 => with_table::<bf16>(&input, &bytes, ty, rows, dim),
    }
}

fn with_table<T: Element>(input: &Input, bytes: &[u8], ty: Ty, rows: usize, dim: usize) {
    let data: Vec<T> = bytemuck::pod_collect_to_vec(bytes);
    let mut table = Table::from_slice(&data, rows, dim).expect("a small table");
    let mut padding = None;
    if let Some(p) = input.padding {
        match (
            table.with_padding_idx(p as i64),
            reference::normalize_padding_idx(p as i64, rows),
        ) {
            (Ok(t), Some(n)) => {
                table = t;
                padding = Some(n);
            }
            (Err(_), None) => return,
            (got, want) => panic!("padding_idx {p}, rows {rows}: {got:?}, want {want:?}"),
        }
    }
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
    let ctx = Ctx {
        input,
        table: &table,
        bytes,
        ty,
        padding,
    };
    match input.index_type {
        IndexType::I32 => ctx.run::<i32>(&values, |v| v as i32),
        IndexType::I64 => ctx.run::<i64>(&values, |v| v as i64),
        IndexType::U32 => ctx.run::<u32>(&values, |v| v as u32),
    }
}

struct Ctx<'a> {
    input: &'a Input,
    table: &'a Table<'a>,
    bytes: &'a [u8],
    ty: Ty,
    padding: Option<usize>,
}

/// What the engine must do, in its documented order of checks.
#[derive(Debug)]
enum Expect {
    DType,
    Offsets,
    FixedZero,
    Shape,
    Weights,
    OutputLength { expected: usize, actual: usize },
    Index { index: i128, position: usize },
    Values(Vec<f32>),
}

impl Ctx<'_> {
    fn run<I: Index + Widen>(&self, values: &[i128], cast: impl Fn(i128) -> I) {
        let n = values.len();
        let indices: Vec<I> = values.iter().map(|&v| cast(v)).collect();
        // The index values as the engine sees them (after the wrapping cast).
        let seen: Vec<i128> = indices.iter().map(|&i| i.exact()).collect();
        let resolve = |specs: &[OffsetSpec]| -> Vec<i64> {
            let mut prev = 0i64;
            specs
                .iter()
                .map(|s| {
                    prev = match *s {
                        OffsetSpec::Step(k) => prev.wrapping_add((k % 4) as i64),
                        OffsetSpec::End => n as i64,
                        OffsetSpec::Raw(v) => v,
                    };
                    prev
                })
                .collect()
        };
        match &self.input.bags {
            BagSpec::Offsets64(specs, last) => {
                let offs = resolve(specs);
                let bounds = offsets_bounds(&offs, *last, n);
                self.bag(
                    &indices,
                    &seen,
                    Bags::Offsets {
                        offsets: &offs,
                        include_last_offset: *last,
                    },
                    bounds,
                );
            }
            BagSpec::Offsets32(specs, last) => {
                let offs: Vec<i32> = resolve(specs).iter().map(|&v| v as i32).collect();
                let wide: Vec<i64> = offs.iter().map(|&v| v as i64).collect();
                let bounds = offsets_bounds(&wide, *last, n);
                self.bag(
                    &indices,
                    &seen,
                    Bags::Offsets {
                        offsets: &offs,
                        include_last_offset: *last,
                    },
                    bounds,
                );
            }
            BagSpec::Fixed(k) => {
                let k = *k as usize % 9;
                let bounds = if k == 0 {
                    Err(Expect::FixedZero)
                } else if !n.is_multiple_of(k) {
                    Err(Expect::Shape)
                } else {
                    Ok((0..n / k).map(|b| (b * k, (b + 1) * k)).collect())
                };
                self.bag(&indices, &seen, Bags::<i64>::Fixed(k), bounds);
            }
        }
    }

    fn bag<I: Index, F: Index>(
        &self,
        indices: &[I],
        seen: &[i128],
        bags: Bags<'_, F>,
        bounds: Result<Vec<(usize, usize)>, Expect>,
    ) {
        match self.input.out {
            OutChoice::F32 => self.bag_as::<I, F, f32>(indices, seen, bags, bounds),
            OutChoice::F16 => self.bag_as::<I, F, f16>(indices, seen, bags, bounds),
            OutChoice::Bf16 => self.bag_as::<I, F, bf16>(indices, seen, bags, bounds),
        }
    }

    fn bag_as<I: Index, F: Index, O: Element>(
        &self,
        indices: &[I],
        seen: &[i128],
        bags: Bags<'_, F>,
        bounds: Result<Vec<(usize, usize)>, Expect>,
    ) {
        let (rows, dim, n) = (self.table.rows(), self.table.dim(), indices.len());
        let mode = match self.input.mode % 3 {
            0 => BagMode::Sum,
            1 => BagMode::Mean,
            _ => BagMode::Max,
        };
        let weights: Option<Vec<f32>> = match &self.input.weights {
            WeightSpec::None => None,
            WeightSpec::Right(w) if w.is_empty() => Some(vec![1.5; n]),
            WeightSpec::Right(w) => Some(
                w.iter()
                    .cycle()
                    .take(n)
                    .map(|&b| f32::from_bits(b))
                    .collect(),
            ),
            WeightSpec::Wrong(d) => Some(vec![0.25; (n as isize + *d as isize).max(0) as usize]),
        };
        let widen = match (self.ty, O::DTYPE) {
            (Ty::F32, embedding_lookup::DType::F32)
            | (Ty::F16, embedding_lookup::DType::F16)
            | (Ty::Bf16, embedding_lookup::DType::BF16) => Some(false),
            (Ty::F16 | Ty::Bf16, embedding_lookup::DType::F32) => Some(true),
            _ => None,
        };
        let weights_ok = match &weights {
            None => true,
            Some(w) => mode == BagMode::Sum && w.len() == n,
        };
        let bag_count = bounds.as_ref().map(|b| b.len()).unwrap_or(0);
        let want_len = bag_count * dim;
        let len = match self.input.out_len_delta {
            Some(d) => (want_len as isize + d as isize).max(0) as usize,
            None => want_len,
        };
        let expect = match (widen, bounds) {
            (None, _) => Expect::DType,
            (_, Err(e)) => e,
            _ if !weights_ok => Expect::Weights,
            _ if len != want_len => Expect::OutputLength {
                expected: want_len,
                actual: len,
            },
            (Some(_), Ok(bounds)) => match reference::first_bad_index(seen, rows) {
                Some((index, position)) => Expect::Index { index, position },
                None => Expect::Values(self.pool(seen, &bounds, mode, weights.as_deref())),
            },
        };
        let options = BagOptions {
            mode,
            per_sample_weights: weights.as_deref(),
            max_norm: None,
        };
        let sentinel = O::from_f32(-12345.0);
        let mut out = vec![sentinel; len];
        let got = self.table.bag_into(indices, bags, &options, &mut out);
        match (&expect, &got) {
            (Expect::DType, Err(Error::DTypeMismatch { .. }))
            | (Expect::Offsets, Err(Error::BadOffsets(_)))
            | (Expect::FixedZero, Err(Error::InvalidArgument(_)))
            | (Expect::Shape, Err(Error::ShapeMismatch(_)))
            | (Expect::Weights, Err(Error::PerSampleWeights(_))) => {}
            (
                Expect::OutputLength { expected, actual },
                Err(Error::OutputLength {
                    expected: e,
                    actual: a,
                }),
            ) => assert_eq!((expected, actual), (e, a)),
            (
                Expect::Index { index, position },
                Err(Error::IndexOutOfRange {
                    index: i,
                    position: p,
                    rows: r,
                }),
            ) => assert_eq!((index, position, &rows), (i, p, r)),
            (Expect::Values(want), Ok(())) => {
                for (k, (&w, g)) in want.iter().zip(&out).enumerate() {
                    let w = round_to::<O>(w);
                    let g = g.to_f32();
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{mode} bag {} element {}: got {g:e} ({:#x}), want {w:e} ({:#x})",
                        k / dim.max(1),
                        k % dim.max(1),
                        g.to_bits(),
                        w.to_bits()
                    );
                }
                return;
            }
            (e, g) => panic!("expected {e:?}, got {g:?}"),
        }
        assert!(
            out.iter()
                .all(|v| v.to_f32().to_bits() == sentinel.to_f32().to_bits()),
            "output written before an error"
        );
    }

    /// The naive pooling, bag by bag, entries in order, accumulated in f32.
    fn pool(
        &self,
        seen: &[i128],
        bounds: &[(usize, usize)],
        mode: BagMode,
        weights: Option<&[f32]>,
    ) -> Vec<f32> {
        let dim = self.table.dim();
        let load = |r: usize, j: usize| -> f32 {
            let at = (r * dim + j) * self.ty.size();
            let b = &self.bytes[at..at + self.ty.size()];
            match self.ty {
                Ty::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                Ty::F16 => reference::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
                Ty::Bf16 => reference::bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
            }
        };
        let mut out = Vec::with_capacity(bounds.len() * dim);
        for &(s, e) in bounds {
            let kept: Vec<usize> = (s..e)
                .filter(|&i| Some(seen[i] as usize) != self.padding)
                .collect();
            for j in 0..dim {
                let v = match mode {
                    BagMode::Sum | BagMode::Mean => {
                        let mut acc = 0.0f32;
                        for &i in &kept {
                            let x = load(seen[i] as usize, j);
                            acc = match weights {
                                Some(w) => x.mul_add(w[i], acc),
                                None => acc + x,
                            };
                        }
                        if mode == BagMode::Mean {
                            acc / kept.len().max(1) as f32
                        } else {
                            acc
                        }
                    }
                    BagMode::Max => {
                        let mut acc = 0.0f32;
                        for (k, &i) in kept.iter().enumerate() {
                            let x = load(seen[i] as usize, j);
                            if k == 0 || x > acc {
                                acc = x;
                            }
                        }
                        acc
                    }
                };
                out.push(v);
            }
        }
        out
    }
}

/// An f32 rounded to the output type (nearest, ties to even) and read back.
fn round_to<O: Element>(v: f32) -> f32 {
    match O::DTYPE {
        embedding_lookup::DType::F32 => v,
        embedding_lookup::DType::F16 => f16::from_f32(v).to_f32(),
        embedding_lookup::DType::BF16 => bf16::from_f32(v).to_f32(),
    }
}

/// PyTorch's offset rules: bag ranges, or the error.
fn offsets_bounds(
    offs: &[i64],
    include_last: bool,
    n: usize,
) -> Result<Vec<(usize, usize)>, Expect> {
    if include_last && offs.is_empty() {
        return Err(Expect::Offsets);
    }
    if let Some(&first) = offs.first() {
        if first != 0 {
            return Err(Expect::Offsets);
        }
    }
    for w in offs.windows(2) {
        if w[1] < w[0] || w[1] > n as i64 {
            return Err(Expect::Offsets);
        }
    }
    let bags = offs.len() - usize::from(include_last);
    Ok((0..bags)
        .map(|b| {
            let end = offs.get(b + 1).map_or(n, |&o| o as usize);
            (offs[b] as usize, end)
        })
        .collect())
}
