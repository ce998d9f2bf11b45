//! Portable bag kernels on `wide` vectors (8 lanes), for any CPU: the same passes as the x86
//! kernels (up to eight accumulator vectors per pass, then scalar accumulators for the last
//! `dim % 8` columns), with prefetch where the target has a prefetch instruction.
//!
//! The weighted sum's multiply-add rounds once, as in the scalar reference, on every target:
//! `wide` fuses it where the target has FMA at compile time (aarch64, or x86_64 built with
//! `fma`); elsewhere [`fused_mul_add`] goes lane by lane through `f32::mul_add`.

use bytemuck::cast;
use half::f16;
use wide::{f32x8, u32x8};

use super::{f32_to_bf16_bits, BagBlock, Pool};
use crate::kernels::gather::scalar::bf16_to_f32;
use crate::kernels::prefetch_read;

/// f32 lanes per vector.
const LANES: usize = 8;

/// `x * w + a` rounded once, lane by lane equal to `f32::mul_add` (the scalar reference).
///
/// `wide` rounds the product and the sum separately where the target lacks FMA at compile
/// time, and two roundings can differ from one by far more than an ulp when the product
/// overflows (a finite fused sum becomes ±inf, or ±inf + ∓inf = NaN). There each lane goes
/// through `f32::mul_add`, a correct library call; on x86_64 this kernel runs only where AVX2
/// is missing or when forced, so the slower call costs nothing on the usual path.
#[inline(always)]
fn fused_mul_add(x: f32x8, w: f32x8, a: f32x8) -> f32x8 {
    #[cfg(any(
        all(target_arch = "aarch64", target_feature = "neon"),
        all(target_feature = "avx", target_feature = "fma")
    ))]
    {
        x.mul_add(w, a)
    }
    #[cfg(not(any(
        all(target_arch = "aarch64", target_feature = "neon"),
        all(target_feature = "avx", target_feature = "fma")
    )))]
    {
        let (x, w, a) = (x.to_array(), w.to_array(), a.to_array());
        f32x8::from(std::array::from_fn::<f32, LANES, _>(|k| {
            x[k].mul_add(w[k], a[k])
        }))
    }
}
/// Accumulator vectors per pass over a bag.
const MAX_VECS: usize = 8;

/// # Safety
/// [`PoolF32Fn`](super::PoolF32Fn)'s contract (this kernel checks bounds).
pub(super) unsafe fn pool_f32(
    table: &[f32],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    let ops = Ops {
        load: |s: &[f32]| f32x8::new(lanes(s)),
        load_one: |v: f32| v,
        store: |d: &mut [f32], v: f32x8| d.copy_from_slice(&cast::<f32x8, [f32; 8]>(v)),
        store_one: |v: f32| v,
    };
    pool_rows(table, dim, block, pool, out, ops);
}

/// # Safety
/// [`PoolHalfToF32Fn`](super::PoolHalfToF32Fn)'s contract.
pub(super) unsafe fn pool_f16_to_f32(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    let ops = Ops {
        load: load_f16,
        load_one: |h: u16| f16::from_bits(h).to_f32(),
        store: |d: &mut [f32], v: f32x8| d.copy_from_slice(&cast::<f32x8, [f32; 8]>(v)),
        store_one: |v: f32| v,
    };
    pool_rows(table, dim, block, pool, out, ops);
}

/// # Safety
/// [`PoolHalfToF32Fn`](super::PoolHalfToF32Fn)'s contract.
pub(super) unsafe fn pool_bf16_to_f32(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    let ops = Ops {
        load: load_bf16,
        load_one: bf16_to_f32,
        store: |d: &mut [f32], v: f32x8| d.copy_from_slice(&cast::<f32x8, [f32; 8]>(v)),
        store_one: |v: f32| v,
    };
    pool_rows(table, dim, block, pool, out, ops);
}

/// # Safety
/// [`PoolHalfFn`](super::PoolHalfFn)'s contract.
pub(super) unsafe fn pool_f16(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [u16],
) {
    let ops = Ops {
        load: load_f16,
        load_one: |h: u16| f16::from_bits(h).to_f32(),
        store: |d: &mut [u16], v: f32x8| {
            for (o, x) in d.iter_mut().zip(cast::<f32x8, [f32; 8]>(v)) {
                *o = f16::from_f32(x).to_bits();
            }
        },
        store_one: |v: f32| f16::from_f32(v).to_bits(),
    };
    pool_rows(table, dim, block, pool, out, ops);
}

/// # Safety
/// [`PoolHalfFn`](super::PoolHalfFn)'s contract.
pub(super) unsafe fn pool_bf16(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [u16],
) {
    let ops = Ops {
        load: load_bf16,
        load_one: bf16_to_f32,
        store: |d: &mut [u16], v: f32x8| {
            for (o, x) in d.iter_mut().zip(cast::<f32x8, [f32; 8]>(v)) {
                *o = f32_to_bf16_bits(x);
            }
        },
        store_one: f32_to_bf16_bits,
    };
    pool_rows(table, dim, block, pool, out, ops);
}

/// The 8 values of a vector-sized slice.
#[inline(always)]
fn lanes<T: Copy + Default>(s: &[T]) -> [T; LANES] {
    let mut a = [T::default(); LANES];
    a.copy_from_slice(s);
    a
}

/// 8 f16 values widened (lane by lane; the portable path has no conversion instruction).
fn load_f16(s: &[u16]) -> f32x8 {
    f32x8::new(lanes(s).map(|h| f16::from_bits(h).to_f32()))
}

/// 8 bf16 values widened exactly: a shift into the top half.
fn load_bf16(s: &[u16]) -> f32x8 {
    cast(u32x8::new(lanes(s).map(u32::from)) << 16u32)
}

/// The loads and stores of one table/output type pair.
#[derive(Clone, Copy)]
struct Ops<L, LO, S, SO> {
    load: L,
    load_one: LO,
    store: S,
    store_one: SO,
}

/// The bag loop: per bag, passes of up to [`MAX_VECS`] vectors, then a scalar pass for the
/// last `dim % 8` columns.
fn pool_rows<T: Copy, O, L, LO, S, SO>(
    table: &[T],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [O],
    ops: Ops<L, LO, S, SO>,
) where
    L: Fn(&[T]) -> f32x8 + Copy,
    LO: Fn(T) -> f32 + Copy,
    S: Fn(&mut [O], f32x8) + Copy,
    SO: Fn(f32) -> O + Copy,
{
    let vecs = dim / LANES;
    let tail = dim % LANES;
    let row_bytes = dim * std::mem::size_of::<T>();
    let mean = pool == Pool::Mean;
    let max = pool == Pool::Max;
    let weights = if pool == Pool::Sum {
        block.weights
    } else {
        None
    };
    for b in 0..block.bags() {
        let (start, end) = (block.bounds[b], block.bounds[b + 1]);
        let count = (end - start).max(1) as f32;
        let pass = |col: usize, first: bool| Pass {
            table,
            dim,
            rows: &block.rows[..end],
            start,
            lookahead: block.rows,
            weights,
            max,
            col,
            prefetch_bytes: if first && block.prefetch > 0 {
                row_bytes
            } else {
                0
            },
            prefetch_distance: block.prefetch,
        };
        let dst = &mut out[b * dim..(b + 1) * dim];
        let mut v0 = 0;
        while v0 < vecs {
            let n = (vecs - v0).min(MAX_VECS);
            let p = pass(v0 * LANES, v0 == 0);
            macro_rules! run {
                ($n:literal) => {{
                    let acc = p.accumulate::<_, $n>(ops.load);
                    let cols = &mut dst[v0 * LANES..(v0 + $n) * LANES];
                    for (d, a) in cols.chunks_exact_mut(LANES).zip(acc) {
                        (ops.store)(d, if mean { a / f32x8::splat(count) } else { a });
                    }
                }};
            }
            match n {
                1 => run!(1),
                2 => run!(2),
                3 => run!(3),
                4 => run!(4),
                5 => run!(5),
                6 => run!(6),
                7 => run!(7),
                _ => run!(8),
            }
            v0 += n;
        }
        if tail != 0 {
            let col = vecs * LANES;
            let acc = pass(col, vecs == 0).tail(tail, ops.load_one);
            for (d, &a) in dst[col..].iter_mut().zip(&acc[..tail]) {
                *d = (ops.store_one)(if mean { a / count } else { a });
            }
        }
    }
}

/// One pass over a bag's entries for a block of columns.
#[derive(Clone, Copy)]
struct Pass<'a, T> {
    table: &'a [T],
    dim: usize,
    /// The block's rows up to the bag's end.
    rows: &'a [usize],
    start: usize,
    /// All of the block's rows, lookahead included.
    lookahead: &'a [usize],
    weights: Option<&'a [f32]>,
    max: bool,
    col: usize,
    prefetch_bytes: usize,
    /// Entries ahead of the current one whose row is prefetched.
    prefetch_distance: usize,
}

impl<T: Copy> Pass<'_, T> {
    /// Accumulate `N` full vectors over the bag's entries.
    #[inline(always)]
    fn accumulate<L: Fn(&[T]) -> f32x8, const N: usize>(self, load: L) -> [f32x8; N] {
        let mut acc = [f32x8::ZERO; N];
        let entries = self.rows[self.start..].iter().enumerate();
        for (k, &r) in entries {
            let i = self.start + k;
            self.prefetch(i);
            let src = &self.table[r * self.dim + self.col..][..N * LANES];
            let x = |v: usize| load(&src[v * LANES..][..LANES]);
            match (self.weights, self.max) {
                (_, true) if k == 0 => {
                    for (v, a) in acc.iter_mut().enumerate() {
                        *a = x(v);
                    }
                }
                (_, true) => {
                    for (v, a) in acc.iter_mut().enumerate() {
                        let x = x(v);
                        *a = x.simd_gt(*a).select(x, *a);
                    }
                }
                (Some(w), false) => {
                    let w = f32x8::splat(w[i]);
                    for (v, a) in acc.iter_mut().enumerate() {
                        *a = fused_mul_add(x(v), w, *a);
                    }
                }
                (None, false) => {
                    for (v, a) in acc.iter_mut().enumerate() {
                        *a += x(v);
                    }
                }
            }
        }
        acc
    }

    /// Accumulate the last `tail < 8` columns with scalars.
    #[inline(always)]
    fn tail<LO: Fn(T) -> f32>(self, tail: usize, load_one: LO) -> [f32; LANES] {
        let mut acc = [0.0f32; LANES];
        for (k, &r) in self.rows[self.start..].iter().enumerate() {
            let i = self.start + k;
            self.prefetch(i);
            let src = &self.table[r * self.dim + self.col..][..tail];
            for (a, &s) in acc.iter_mut().zip(src) {
                let x = load_one(s);
                *a = match (self.weights, self.max) {
                    (_, true) if k == 0 || x > *a => x,
                    (_, true) => *a,
                    (Some(w), false) => x.mul_add(w[i], *a),
                    (None, false) => *a + x,
                };
            }
        }
        acc
    }

    #[inline(always)]
    fn prefetch(&self, i: usize) {
        if self.prefetch_bytes != 0 {
            if let Some(&ahead) = self.lookahead.get(i + self.prefetch_distance) {
                prefetch_read(
                    self.table.as_ptr().wrapping_add(ahead * self.dim) as *const u8,
                    self.prefetch_bytes,
                );
            }
        }
    }
}
