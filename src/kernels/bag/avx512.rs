//! AVX-512 (F, BW, VL) bag kernels: 16 f32 lanes per vector, up to eight accumulator vectors
//! (128 dimensions) per pass over a bag's entries, the row tail by masked loads and stores (no
//! scalar remainder), `vcvtph2ps`/`vcvtps2ph` for f16, shifts for bf16.
//!
//! The bag loop sits inside the `#[target_feature]` functions; the number of accumulators and
//! the pooling are compile-time parameters, chosen once per block of dimensions, so the entry
//! loop is straight-line loads and adds (or FMAs, or max) on registers.

use std::arch::x86_64::*;

use super::{BagBlock, Pool};
use crate::kernels::prefetch_read;

/// f32 lanes per vector.
const LANES: usize = 16;
/// Accumulator vectors per pass over a bag.
const MAX_VECS: usize = 8;

const SUM: u8 = 0;
const WEIGHTED: u8 = 1;
const MAX: u8 = 2;

/// # Safety
/// [`PoolF32Fn`](super::PoolF32Fn)'s contract; the CPU has AVX-512 F, BW, VL and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn pool_f32(
    table: &[f32],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract; masked lanes are never accessed.
    unsafe {
        pool_rows(
            table.as_ptr(),
            dim,
            block,
            pool,
            out.as_mut_ptr(),
            |p, m| _mm512_maskz_loadu_ps(m, p),
            |p, v, m| _mm512_mask_storeu_ps(p, m, v),
        )
    }
}

/// # Safety
/// [`PoolHalfToF32Fn`](super::PoolHalfToF32Fn)'s contract; AVX-512 F, BW, VL and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn pool_f16_to_f32(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract; masked lanes are never accessed.
    unsafe {
        pool_rows(
            table.as_ptr(),
            dim,
            block,
            pool,
            out.as_mut_ptr(),
            |p, m| load_f16(p, m),
            |p, v, m| _mm512_mask_storeu_ps(p, m, v),
        )
    }
}

/// # Safety
/// [`PoolHalfToF32Fn`](super::PoolHalfToF32Fn)'s contract; AVX-512 F, BW, VL and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn pool_bf16_to_f32(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract; masked lanes are never accessed.
    unsafe {
        pool_rows(
            table.as_ptr(),
            dim,
            block,
            pool,
            out.as_mut_ptr(),
            |p, m| load_bf16(p, m),
            |p, v, m| _mm512_mask_storeu_ps(p, m, v),
        )
    }
}

/// # Safety
/// [`PoolHalfFn`](super::PoolHalfFn)'s contract; AVX-512 F, BW, VL and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn pool_f16(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [u16],
) {
    // SAFETY: forwarded contract; masked lanes are never accessed.
    unsafe {
        pool_rows(
            table.as_ptr(),
            dim,
            block,
            pool,
            out.as_mut_ptr(),
            |p, m| load_f16(p, m),
            |p, v, m| {
                let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                _mm256_mask_storeu_epi16(p as *mut i16, m, h)
            },
        )
    }
}

/// # Safety
/// [`PoolHalfFn`](super::PoolHalfFn)'s contract; AVX-512 F, BW, VL and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn pool_bf16(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [u16],
) {
    // SAFETY: forwarded contract; masked lanes are never accessed.
    unsafe {
        pool_rows(
            table.as_ptr(),
            dim,
            block,
            pool,
            out.as_mut_ptr(),
            |p, m| load_bf16(p, m),
            |p, v, m| _mm256_mask_storeu_epi16(p as *mut i16, m, to_bf16(v)),
        )
    }
}

/// Load up to 16 f16 values (lanes outside `m` are zero and not read) and widen them.
///
/// # Safety
/// `p` readable for the lanes in `m`; AVX-512 F, BW, VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn load_f16(p: *const u16, m: __mmask16) -> __m512 {
    // SAFETY: the caller's contract; masked lanes are not accessed.
    unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16)) }
}

/// Load up to 16 bf16 values and widen them (a zero-extend and a shift: exact).
///
/// # Safety
/// `p` readable for the lanes in `m`; AVX-512 F, BW, VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn load_bf16(p: *const u16, m: __mmask16) -> __m512 {
    // SAFETY: the caller's contract; masked lanes are not accessed.
    unsafe {
        let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// Round 16 f32 lanes to bf16 bits, to nearest with ties to even, NaN quieted, as
/// [`f32_to_bf16_bits`](super::f32_to_bf16_bits).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn to_bf16(v: __m512) -> __m256i {
    let x = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
        x,
        _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)),
    ));
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(0x40));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet))
}

/// The bag loop: per bag, passes of up to [`MAX_VECS`] vectors over its entries.
///
/// # Safety
/// The kernel contract, with `table`/`out` the slices' pointers; AVX-512 F, BW, VL, F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn pool_rows<T, O>(
    table: *const T,
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: *mut O,
    load: impl Fn(*const T, __mmask16) -> __m512 + Copy,
    store: impl Fn(*mut O, __m512, __mmask16) + Copy,
) {
    let weights = block.weights.map_or(std::ptr::null(), |w| w.as_ptr());
    // SAFETY: forwarded contract.
    unsafe {
        match (pool, block.weights.is_some()) {
            (Pool::Sum, false) => {
                bags::<T, O, SUM>(table, dim, block, weights, false, out, load, store)
            }
            (Pool::Sum, true) => {
                bags::<T, O, WEIGHTED>(table, dim, block, weights, false, out, load, store)
            }
            (Pool::Mean, _) => {
                bags::<T, O, SUM>(table, dim, block, weights, true, out, load, store)
            }
            (Pool::Max, _) => {
                bags::<T, O, MAX>(table, dim, block, weights, false, out, load, store)
            }
        }
    }
}

/// Every bag of the block with one pooling.
///
/// # Safety
/// As [`pool_rows`]; `weights` points at `bounds[bags]` values when `MODE` is `WEIGHTED`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn bags<T, O, const MODE: u8>(
    table: *const T,
    dim: usize,
    block: &BagBlock<'_>,
    weights: *const f32,
    mean: bool,
    out: *mut O,
    load: impl Fn(*const T, __mmask16) -> __m512 + Copy,
    store: impl Fn(*mut O, __m512, __mmask16) + Copy,
) {
    let vecs = dim.div_ceil(LANES);
    let tail = dim % LANES;
    let tail_mask: __mmask16 = if tail == 0 {
        0xffff
    } else {
        ((1u32 << tail) - 1) as u16
    };
    let row_bytes = dim * std::mem::size_of::<T>();
    for b in 0..block.bags() {
        let (start, end) = (block.bounds[b], block.bounds[b + 1]);
        let scale = mean.then(|| _mm512_set1_ps((end - start).max(1) as f32));
        let mut v0 = 0;
        while v0 < vecs {
            let n = (vecs - v0).min(MAX_VECS);
            let last = if v0 + n == vecs { tail_mask } else { 0xffff };
            let pass = Pass {
                table,
                dim,
                rows: block.rows,
                start,
                end,
                weights,
                col: v0 * LANES,
                last,
                prefetch_bytes: if v0 == 0 && block.prefetch > 0 {
                    row_bytes
                } else {
                    0
                },
                prefetch_distance: block.prefetch,
            };
            // SAFETY: `out` holds every bag of the block; this pass writes the `n` vectors at
            // `b * dim + v0 * LANES`, the last one masked to the row's end.
            let dst = unsafe { out.add(b * dim + v0 * LANES) };
            macro_rules! run {
                ($n:literal) => {{
                    // SAFETY: forwarded contract.
                    let acc = unsafe { pass.accumulate::<_, $n, MODE>(load) };
                    // SAFETY: as for `dst`.
                    unsafe { store_all(acc, dst, last, scale, store) }
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
    /// Lanes of the block's last vector that lie inside the row.
    last: __mmask16,
    /// Bytes to prefetch from the row `prefetch_distance` entries ahead (0: none).
    prefetch_bytes: usize,
    /// Entries ahead of the current one whose row is prefetched.
    prefetch_distance: usize,
}

impl<T> Pass<'_, T> {
    /// Accumulate `N` vectors over the bag's entries: the sum, the weighted sum, or the max.
    ///
    /// # Safety
    /// Every row in `rows` lies in the table; `start <= end <= rows.len()`; the block's
    /// columns `col..col + N * LANES` (the last vector masked by `last`) lie in the row;
    /// `weights` holds `end` values for `WEIGHTED`; AVX-512 F, BW, VL and F16C.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn accumulate<L, const N: usize, const MODE: u8>(self, load: L) -> [__m512; N]
    where
        L: Fn(*const T, __mmask16) -> __m512 + Copy,
    {
        let mask = |v: usize| if v + 1 == N { self.last } else { 0xffff };
        let mut acc = [_mm512_setzero_ps(); N];
        let mut i = self.start;
        // SAFETY: the contract puts every row in the table, every accessed lane in the row.
        unsafe {
            let row = |i: usize| {
                self.table
                    .add(*self.rows.get_unchecked(i) * self.dim + self.col)
            };
            if MODE == MAX && i < self.end {
                self.prefetch(i);
                let src = row(i);
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = load(src.add(v * LANES), mask(v));
                }
                i += 1;
            }
            while i < self.end {
                self.prefetch(i);
                let src = row(i);
                match MODE {
                    SUM => {
                        for (v, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_add_ps(*a, load(src.add(v * LANES), mask(v)));
                        }
                    }
                    WEIGHTED => {
                        let w = _mm512_set1_ps(*self.weights.add(i));
                        for (v, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_fmadd_ps(load(src.add(v * LANES), mask(v)), w, *a);
                        }
                    }
                    _ => {
                        // vmaxps(x, acc) is `x > acc ? x : acc`: PyTorch's comparison, NaN
                        // in either place keeping the current value.
                        for (v, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_max_ps(load(src.add(v * LANES), mask(v)), *a);
                        }
                    }
                }
                i += 1;
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

/// Store `N` accumulators (divided by `scale` for a mean), the last one masked.
///
/// # Safety
/// `dst` writable for `N - 1` full vectors and the lanes of `last`; AVX-512 F, BW, VL, F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn store_all<O, const N: usize>(
    acc: [__m512; N],
    dst: *mut O,
    last: __mmask16,
    scale: Option<__m512>,
    store: impl Fn(*mut O, __m512, __mmask16),
) {
    for (v, a) in acc.into_iter().enumerate() {
        let a = match scale {
            Some(s) => _mm512_div_ps(a, s),
            None => a,
        };
        let m = if v + 1 == N { last } else { 0xffff };
        // SAFETY: the caller's contract.
        unsafe { store(dst.add(v * LANES), a, m) };
    }
}
