//! AVX2 + FMA + F16C bag kernels: 8 f32 lanes per vector, up to eight accumulator vectors (64
//! dimensions) per pass over a bag's entries, `vcvtph2ps`/`vcvtps2ph` for f16, shifts for
//! bf16. AVX2 has no 16-bit masked loads, so the last `dim % 8` columns take one more pass with
//! scalar accumulators (same order, same FMA, same bits).

use std::arch::x86_64::*;

use super::{f32_to_bf16_bits, BagBlock, Pool};
use crate::kernels::gather::scalar::bf16_to_f32;
use crate::kernels::prefetch_read;

/// f32 lanes per vector.
const LANES: usize = 8;
/// Accumulator vectors per pass over a bag.
const MAX_VECS: usize = 8;

const SUM: u8 = 0;
const WEIGHTED: u8 = 1;
const MAX: u8 = 2;

/// # Safety
/// [`PoolF32Fn`](super::PoolF32Fn)'s contract; the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn pool_f32(
    table: &[f32],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract; the closures are called only on rows inside the table
    // and outputs inside `out`, by the loop below.
    unsafe {
        let ops = Ops {
            load: |p: *const f32| _mm256_loadu_ps(p),
            load_one: |v: f32| v,
            store: |p: *mut f32, v| _mm256_storeu_ps(p, v),
            store_one: |v: f32| v,
        };
        pool_rows(table.as_ptr(), dim, block, pool, out.as_mut_ptr(), ops)
    }
}

/// # Safety
/// [`PoolHalfToF32Fn`](super::PoolHalfToF32Fn)'s contract; AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn pool_f16_to_f32(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract; the closures are called only on rows inside the table
    // and outputs inside `out`, by the loop below.
    unsafe {
        let ops = Ops {
            load: |p: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            load_one: |h: u16| f16_to_f32(h),
            store: |p: *mut f32, v| _mm256_storeu_ps(p, v),
            store_one: |v: f32| v,
        };
        pool_rows(table.as_ptr(), dim, block, pool, out.as_mut_ptr(), ops)
    }
}

/// # Safety
/// [`PoolHalfToF32Fn`](super::PoolHalfToF32Fn)'s contract; AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn pool_bf16_to_f32(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract; the closures are called only on rows inside the table
    // and outputs inside `out`, by the loop below.
    unsafe {
        let ops = Ops {
            load: |p: *const u16| load_bf16(p),
            load_one: bf16_to_f32,
            store: |p: *mut f32, v| _mm256_storeu_ps(p, v),
            store_one: |v: f32| v,
        };
        pool_rows(table.as_ptr(), dim, block, pool, out.as_mut_ptr(), ops)
    }
}

/// # Safety
/// [`PoolHalfFn`](super::PoolHalfFn)'s contract; AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn pool_f16(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [u16],
) {
    // SAFETY: forwarded contract; the closures are called only on rows inside the table
    // and outputs inside `out`, by the loop below.
    unsafe {
        let ops = Ops {
            load: |p: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            load_one: |h: u16| f16_to_f32(h),
            store: |p: *mut u16, v| {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(p as *mut __m128i, h)
            },
            store_one: |v: f32| f32_to_f16(v),
        };
        pool_rows(table.as_ptr(), dim, block, pool, out.as_mut_ptr(), ops)
    }
}

/// # Safety
/// [`PoolHalfFn`](super::PoolHalfFn)'s contract; AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn pool_bf16(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [u16],
) {
    // SAFETY: forwarded contract; the closures are called only on rows inside the table
    // and outputs inside `out`, by the loop below.
    unsafe {
        let ops = Ops {
            load: |p: *const u16| load_bf16(p),
            load_one: bf16_to_f32,
            store: |p: *mut u16, v| _mm_storeu_si128(p as *mut __m128i, to_bf16(v)),
            store_one: f32_to_bf16_bits,
        };
        pool_rows(table.as_ptr(), dim, block, pool, out.as_mut_ptr(), ops)
    }
}

/// One f16 value to f32 with F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_to_f32(h: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// One f32 to f16 bits with F16C, to nearest, ties to even.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f32_to_f16(v: f32) -> u16 {
    let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v));
    _mm_extract_epi16::<0>(h) as u16
}

/// Load 8 bf16 values and widen them exactly.
///
/// # Safety
/// `p` readable for 8 values; AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_bf16(p: *const u16) -> __m256 {
    // SAFETY: the caller's contract.
    let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// Round 8 f32 lanes to bf16 bits as [`f32_to_bf16_bits`] does.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn to_bf16(v: __m256) -> __m128i {
    let x = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
        x,
        _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)),
    ));
    let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(0x40));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    let r = _mm256_blendv_epi8(rounded, quiet, nan);
    // Every lane is below 2^16, so the saturating pack is exact.
    _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r))
}

/// The loads and stores of one table/output type pair.
#[derive(Clone, Copy)]
struct Ops<L, LO, S, SO> {
    /// 8 table values at a pointer, widened.
    load: L,
    /// One table value, widened.
    load_one: LO,
    /// 8 output values at a pointer, rounded if 16-bit.
    store: S,
    /// One output value.
    store_one: SO,
}

/// The bag loop: per bag, passes of up to [`MAX_VECS`] vectors over its entries, then one
/// scalar pass for the last `dim % 8` columns.
///
/// # Safety
/// The kernel contract, with `table`/`out` the slices' pointers; AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pool_rows<T: Copy, O, L, LO, S, SO>(
    table: *const T,
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: *mut O,
    ops: Ops<L, LO, S, SO>,
) where
    L: Fn(*const T) -> __m256 + Copy,
    LO: Fn(T) -> f32 + Copy,
    S: Fn(*mut O, __m256) + Copy,
    SO: Fn(f32) -> O + Copy,
{
    let weights = block.weights.map_or(std::ptr::null(), |w| w.as_ptr());
    // SAFETY: forwarded contract.
    unsafe {
        match (pool, block.weights.is_some()) {
            (Pool::Sum, false) => {
                bags::<T, O, _, _, _, _, SUM>(table, dim, block, weights, false, out, ops)
            }
            (Pool::Sum, true) => {
                bags::<T, O, _, _, _, _, WEIGHTED>(table, dim, block, weights, false, out, ops)
            }
            (Pool::Mean, _) => {
                bags::<T, O, _, _, _, _, SUM>(table, dim, block, weights, true, out, ops)
            }
            (Pool::Max, _) => {
                bags::<T, O, _, _, _, _, MAX>(table, dim, block, weights, false, out, ops)
            }
        }
    }
}

/// Every bag of the block with one pooling.
///
/// # Safety
/// As [`pool_rows`]; `weights` points at `bounds[bags]` values when `MODE` is `WEIGHTED`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bags<T: Copy, O, L, LO, S, SO, const MODE: u8>(
    table: *const T,
    dim: usize,
    block: &BagBlock<'_>,
    weights: *const f32,
    mean: bool,
    out: *mut O,
    ops: Ops<L, LO, S, SO>,
) where
    L: Fn(*const T) -> __m256 + Copy,
    LO: Fn(T) -> f32 + Copy,
    S: Fn(*mut O, __m256) + Copy,
    SO: Fn(f32) -> O + Copy,
{
    let vecs = dim / LANES;
    let tail = dim % LANES;
    let row_bytes = dim * std::mem::size_of::<T>();
    for b in 0..block.bags() {
        let (start, end) = (block.bounds[b], block.bounds[b + 1]);
        let count = (end - start).max(1) as f32;
        let scale = mean.then(|| _mm256_set1_ps(count));
        let pass = |col: usize, first: bool| Pass {
            table,
            dim,
            rows: block.rows,
            start,
            end,
            weights,
            col,
            prefetch_bytes: if first && block.prefetch > 0 {
                row_bytes
            } else {
                0
            },
            prefetch_distance: block.prefetch,
        };
        let mut v0 = 0;
        while v0 < vecs {
            let n = (vecs - v0).min(MAX_VECS);
            let p = pass(v0 * LANES, v0 == 0);
            // SAFETY: `out` holds every bag of the block; this pass writes `n` full vectors
            // at `b * dim + v0 * LANES`, inside the bag's row.
            let dst = unsafe { out.add(b * dim + v0 * LANES) };
            macro_rules! run {
                ($n:literal) => {{
                    // SAFETY: forwarded contract.
                    let acc = unsafe { p.accumulate::<_, $n, MODE>(ops.load) };
                    for (v, a) in acc.into_iter().enumerate() {
                        let a = match scale {
                            Some(s) => _mm256_div_ps(a, s),
                            None => a,
                        };
                        // SAFETY: as for `dst`.
                        unsafe { (ops.store)(dst.add(v * LANES), a) };
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
            // SAFETY: forwarded contract; columns `col..dim` lie in every row.
            let acc = unsafe { pass(col, vecs == 0).tail::<_, MODE>(tail, ops.load_one) };
            for (j, &a) in acc[..tail].iter().enumerate() {
                let a = if mean { a / count } else { a };
                // SAFETY: `out` holds every bag of the block; `col + j < dim`.
                unsafe { *out.add(b * dim + col + j) = (ops.store_one)(a) };
            }
        }
    }
}

/// One pass over a bag's entries for a block of columns.
#[derive(Clone, Copy)]
struct Pass<'a, T> {
    table: *const T,
    dim: usize,
    rows: &'a [usize],
    start: usize,
    end: usize,
    weights: *const f32,
    /// First column of the block.
    col: usize,
    /// Bytes to prefetch from the row `prefetch_distance` entries ahead (0: none).
    prefetch_bytes: usize,
    /// Entries ahead of the current one whose row is prefetched.
    prefetch_distance: usize,
}

impl<T: Copy> Pass<'_, T> {
    /// Accumulate `N` full vectors over the bag's entries.
    ///
    /// # Safety
    /// Every row in `rows` lies in the table; `start <= end <= rows.len()`; columns
    /// `col..col + N * LANES` lie in the row; `weights` holds `end` values for `WEIGHTED`;
    /// AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn accumulate<L, const N: usize, const MODE: u8>(self, load: L) -> [__m256; N]
    where
        L: Fn(*const T) -> __m256 + Copy,
    {
        let mut acc = [_mm256_setzero_ps(); N];
        let mut i = self.start;
        // SAFETY: the contract puts every row in the table and every column in the row.
        unsafe {
            let row = |i: usize| {
                self.table
                    .add(*self.rows.get_unchecked(i) * self.dim + self.col)
            };
            if MODE == MAX && i < self.end {
                self.prefetch(i);
                let src = row(i);
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = load(src.add(v * LANES));
                }
                i += 1;
            }
            while i < self.end {
                self.prefetch(i);
                let src = row(i);
                match MODE {
                    SUM => {
                        for (v, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_add_ps(*a, load(src.add(v * LANES)));
                        }
                    }
                    WEIGHTED => {
                        let w = _mm256_set1_ps(*self.weights.add(i));
                        for (v, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(load(src.add(v * LANES)), w, *a);
                        }
                    }
                    _ => {
                        // vmaxps(x, acc) is `x > acc ? x : acc`, as PyTorch compares.
                        for (v, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_max_ps(load(src.add(v * LANES)), *a);
                        }
                    }
                }
                i += 1;
            }
        }
        acc
    }

    /// Accumulate the last `tail < 8` columns with scalars.
    ///
    /// # Safety
    /// As [`Pass::accumulate`] for columns `col..col + tail`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tail<LO, const MODE: u8>(self, tail: usize, load_one: LO) -> [f32; LANES]
    where
        LO: Fn(T) -> f32 + Copy,
    {
        let mut acc = [0.0f32; LANES];
        for i in self.start..self.end {
            self.prefetch(i);
            // SAFETY: the contract puts every row in the table and columns col..col+tail in it.
            let src = unsafe {
                self.table
                    .add(*self.rows.get_unchecked(i) * self.dim + self.col)
            };
            for (j, a) in acc[..tail].iter_mut().enumerate() {
                // SAFETY: as above.
                let x = load_one(unsafe { *src.add(j) });
                *a = match MODE {
                    SUM => *a + x,
                    // SAFETY: `weights` holds `end` values for WEIGHTED.
                    WEIGHTED => x.mul_add(unsafe { *self.weights.add(i) }, *a),
                    _ if i == self.start || x > *a => x,
                    _ => *a,
                };
            }
        }
        acc
    }

    #[inline(always)]
    fn prefetch(&self, i: usize) {
        if self.prefetch_bytes != 0 {
            if let Some(&ahead) = self.rows.get(i + self.prefetch_distance) {
                prefetch_read(
                    self.table.wrapping_add(ahead * self.dim) as *const u8,
                    self.prefetch_bytes,
                );
            }
        }
    }
}
