//! AVX-512 (F, BW, VL) renorm kernels: the 16 lanes are one vector, row tails are masked
//! loads and stores, `vcvtph2ps`/`vcvtps2ph` convert f16, integer rounding converts bf16.

use std::arch::x86_64::*;

use super::{drive, mark_rescaled, row_scale, NormKind, RenormJob, RowOps};
use crate::dtype::Element;
use crate::kernels::prefetch_read;
use crate::kernels::realign::Realign;
use half::{bf16, f16};

/// # Safety
/// [`RenormRowsFn`](super::RenormRowsFn)'s contract; the CPU has AVX-512 F, BW, VL and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn renorm_f32(job: &RenormJob, rows: &[usize], slots: &[usize], count: usize) {
    // SAFETY: forwarded contract; these functions have the features they use.
    unsafe {
        // Streaming into an output 16, 32 or 48 bytes past a line: joined lines (`Realign`).
        let shift = match (job.stream_out, job.out as usize % 64) {
            (true, 16) => 12,
            (true, 32) => 8,
            (true, 48) => 4,
            _ => 0,
        };
        macro_rules! l2_rows {
            ($n:literal) => {
                match shift {
                    12 => l2_f32_rows::<$n, 12>(job, rows, slots, count),
                    8 => l2_f32_rows::<$n, 8>(job, rows, slots, count),
                    4 => l2_f32_rows::<$n, 4>(job, rows, slots, count),
                    _ => l2_f32_rows::<$n, 0>(job, rows, slots, count),
                }
            };
        }
        match (job.norm, job.dim) {
            (NormKind::L2, 16) => l2_rows!(1),
            (NormKind::L2, 32) => l2_rows!(2),
            (NormKind::L2, 48) => l2_rows!(3),
            (NormKind::L2, 64) => l2_rows!(4),
            (NormKind::L2, 96) => l2_rows!(6),
            (NormKind::L2, 128) => l2_rows!(8),
            _ => drive::<f32, Avx512>(job, rows, slots, count),
        }
    }
}

/// The common case on its own: f32 rows of `N` whole vectors and the 2-norm. Each row is
/// loaded once into registers, its norm and scale computed there, and the registers stored:
/// about 1.5× the generic loop's speed on 1 GiB tables, whose per-row mask, null and norm-kind
/// checks delayed the loads of later rows. Bit-identical to the generic loop: the same lane
/// sums, the same reduction tree as [`reduce16`](super::reduce16), the same [`row_scale`].
///
/// With `SHIFT` other than 0 the output rows stream through a [`Realign`] (the output
/// `4 * (16 - SHIFT)` bytes past a line, `job.stream_out`, slots `0..count`).
///
/// # Safety
/// [`RenormRowsFn`](super::RenormRowsFn)'s contract with `job.dim == 16 * N` and
/// `job.norm == L2`; if `SHIFT != 0`, `job.out` is `4 * (16 - SHIFT)` bytes past a line
/// boundary; the CPU has AVX-512 F, BW, VL and F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn l2_f32_rows<const N: usize, const SHIFT: i32>(
    job: &RenormJob,
    rows: &[usize],
    slots: &[usize],
    count: usize,
) {
    let dim = N * 16;
    let row_bytes = dim * 4;
    let base = job.table as *mut f32;
    // SAFETY: the contract puts `count` consecutive output rows at `job.out` when `SHIFT != 0`.
    let mut lines = (SHIFT != 0 && count > 0).then(|| unsafe { Realign::<SHIFT>::new(job.out) });
    for k in 0..count {
        if job.prefetch > 0 {
            if let Some(&ahead) = rows.get(k + job.prefetch) {
                prefetch_read(job.table.wrapping_add(ahead * row_bytes), row_bytes);
            }
        }
        // SAFETY: the contract puts every row inside the table (`dim` elements) and every slot
        // inside the output; in place, this thread alone touches this row during the call.
        unsafe {
            let src = base.add(*rows.get_unchecked(k) * dim);
            let slot = *slots.get_unchecked(k);
            let mut x = [_mm512_setzero_ps(); N];
            for (v, x) in x.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(src.add(v * 16));
            }
            let mut acc = _mm512_setzero_ps();
            for x in x {
                acc = _mm512_add_ps(acc, _mm512_mul_ps(x, x));
            }
            // reduce16's tree: lane l + lane l+8, then +4, +2, +1.
            // The upper half through the f64 view: `extractf32x8` would need AVX-512 DQ.
            let high = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc));
            let a8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm256_castpd_ps(high));
            let a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps::<1>(a8));
            let a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
            let a1 = _mm_add_ss(a2, _mm_movehdup_ps(a2));
            if let Some(s) = row_scale::<f32>(_mm_cvtss_f32(a1).sqrt(), job.max_norm) {
                mark_rescaled(job, slot);
                let s = _mm512_set1_ps(s);
                for x in x.iter_mut() {
                    *x = _mm512_mul_ps(*x, s);
                }
                if job.write_back {
                    for (v, x) in x.iter().enumerate() {
                        _mm512_storeu_ps(src.add(v * 16), *x);
                    }
                }
            }
            if let Some(lines) = lines.as_mut() {
                // Slot `k`: the rows are consecutive (the contract for a misaligned stream).
                for x in x {
                    lines.push(_mm512_castps_si512(x));
                }
            } else if !job.out.is_null() {
                let out = job.out.add(slot * row_bytes) as *mut f32;
                for (v, x) in x.iter().enumerate() {
                    if job.stream_out {
                        // Aligned: the job's contract for `stream_out`.
                        _mm512_stream_ps(out.add(v * 16), *x);
                    } else {
                        _mm512_storeu_ps(out.add(v * 16), *x);
                    }
                }
            }
        }
    }
    if let Some(lines) = lines {
        // SAFETY: as for the pushes; at least one row was pushed.
        unsafe { lines.finish() };
    }
    if job.stream_out {
        // Order the streamed rows before whatever the caller writes next.
        crate::kernels::finish_streaming_stores();
    }
}

/// # Safety
/// As [`renorm_f32`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn renorm_f16(job: &RenormJob, rows: &[usize], slots: &[usize], count: usize) {
    // SAFETY: forwarded contract; this function has the features `Avx512` uses.
    unsafe { drive::<f16, Avx512>(job, rows, slots, count) }
}

/// # Safety
/// As [`renorm_f32`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn renorm_bf16(job: &RenormJob, rows: &[usize], slots: &[usize], count: usize) {
    // SAFETY: forwarded contract; this function has the features `Avx512` uses.
    unsafe { drive::<bf16, Avx512>(job, rows, slots, count) }
}

/// Conversions between a dtype's elements and 16 f32 lanes.
///
/// # Safety
/// Called only from functions compiled with AVX-512 F, BW, VL and F16C.
unsafe trait Lanes16: Element {
    /// Load 16 elements (`mask` selects which; the others read as zero).
    unsafe fn load(src: *const Self, mask: __mmask16) -> __m512;
    /// Round 16 f32 lanes to this dtype and store the `mask`ed ones to `table` (unless null)
    /// and to `out` (unless null) as this dtype or, when `out_f32`, widened back to f32.
    unsafe fn store(v: __m512, mask: __mmask16, table: *mut Self, out: *mut u8, out_f32: bool);
    /// Copy 16 elements (the `mask`ed ones) as they are or widened.
    unsafe fn copy(src: *const Self, mask: __mmask16, out: *mut u8, out_f32: bool);
}

// SAFETY: only AVX-512 F instructions, called from functions compiled with them.
unsafe impl Lanes16 for f32 {
    #[inline(always)]
    unsafe fn load(src: *const f32, mask: __mmask16) -> __m512 {
        // SAFETY: masked-off lanes are not accessed; the caller makes the others readable.
        unsafe { _mm512_maskz_loadu_ps(mask, src) }
    }
    #[inline(always)]
    unsafe fn store(v: __m512, mask: __mmask16, table: *mut f32, out: *mut u8, _out_f32: bool) {
        // SAFETY: as for `load`, for writes.
        unsafe {
            if !table.is_null() {
                _mm512_mask_storeu_ps(table, mask, v);
            }
            if !out.is_null() {
                _mm512_mask_storeu_ps(out as *mut f32, mask, v);
            }
        }
    }
    #[inline(always)]
    unsafe fn copy(src: *const f32, mask: __mmask16, out: *mut u8, _out_f32: bool) {
        // SAFETY: as for `load` and `store`.
        unsafe { _mm512_mask_storeu_ps(out as *mut f32, mask, _mm512_maskz_loadu_ps(mask, src)) }
    }
}

// SAFETY: AVX-512 F/BW/VL and F16C instructions, called from functions compiled with them.
unsafe impl Lanes16 for f16 {
    #[inline(always)]
    unsafe fn load(src: *const f16, mask: __mmask16) -> __m512 {
        // SAFETY: masked-off lanes are not accessed.
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src as *const i16)) }
    }
    #[inline(always)]
    unsafe fn store(v: __m512, mask: __mmask16, table: *mut f16, out: *mut u8, out_f32: bool) {
        // SAFETY: masked-off lanes are not accessed; the caller is compiled with AVX-512 F.
        unsafe {
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            if !table.is_null() {
                _mm256_mask_storeu_epi16(table as *mut i16, mask, h);
            }
            if !out.is_null() {
                if out_f32 {
                    _mm512_mask_storeu_ps(out as *mut f32, mask, _mm512_cvtph_ps(h));
                } else {
                    _mm256_mask_storeu_epi16(out as *mut i16, mask, h);
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn copy(src: *const f16, mask: __mmask16, out: *mut u8, out_f32: bool) {
        // SAFETY: masked-off lanes are not accessed.
        unsafe {
            let h = _mm256_maskz_loadu_epi16(mask, src as *const i16);
            if out_f32 {
                _mm512_mask_storeu_ps(out as *mut f32, mask, _mm512_cvtph_ps(h));
            } else {
                _mm256_mask_storeu_epi16(out as *mut i16, mask, h);
            }
        }
    }
}

// SAFETY: AVX-512 F/BW/VL instructions, called from functions compiled with them.
unsafe impl Lanes16 for bf16 {
    #[inline(always)]
    unsafe fn load(src: *const bf16, mask: __mmask16) -> __m512 {
        // SAFETY: masked-off lanes are not accessed; the caller is compiled with AVX-512 BW.
        unsafe {
            let h = _mm256_maskz_loadu_epi16(mask, src as *const i16);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
    #[inline(always)]
    unsafe fn store(v: __m512, mask: __mmask16, table: *mut bf16, out: *mut u8, out_f32: bool) {
        // SAFETY: masked-off lanes are not accessed; the caller is compiled with AVX-512 F.
        unsafe {
            let b = f32_to_bf16(v);
            let h = _mm512_cvtepi32_epi16(b);
            if !table.is_null() {
                _mm256_mask_storeu_epi16(table as *mut i16, mask, h);
            }
            if !out.is_null() {
                if out_f32 {
                    let w = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(b));
                    _mm512_mask_storeu_ps(out as *mut f32, mask, w);
                } else {
                    _mm256_mask_storeu_epi16(out as *mut i16, mask, h);
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn copy(src: *const bf16, mask: __mmask16, out: *mut u8, out_f32: bool) {
        // SAFETY: masked-off lanes are not accessed.
        unsafe {
            if out_f32 {
                _mm512_mask_storeu_ps(out as *mut f32, mask, Self::load(src, mask));
            } else {
                let h = _mm256_maskz_loadu_epi16(mask, src as *const i16);
                _mm256_mask_storeu_epi16(out as *mut i16, mask, h);
            }
        }
    }
}

/// f32 to bf16 bits (in the low half of each 32-bit lane), rounding to nearest even; NaNs keep
/// their top bits and become quiet, as `half::bf16::from_f32` does.
#[inline(always)]
fn f32_to_bf16(v: __m512) -> __m512i {
    // SAFETY: AVX-512 F only, and every caller is compiled with it.
    unsafe {
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
        let nan = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40));
        let is_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_mask_blend_epi32(is_nan, rounded, nan)
    }
}

/// The AVX-512 row operations.
struct Avx512;

// SAFETY: AVX-512 F/BW/VL and F16C; used only by the `#[target_feature]` functions above.
unsafe impl<T: Lanes16> RowOps<T> for Avx512 {
    #[inline(always)]
    unsafe fn lanes(src: *const T, dim: usize, kind: NormKind) -> ([f32; 16], bool) {
        // SAFETY: every access stays within `j..dim`; masked-off lanes are not accessed.
        unsafe {
            let mut acc = _mm512_setzero_ps();
            let mut nan: __mmask16 = 0;
            let mut j = 0;
            while j < dim {
                let mask: __mmask16 = if dim - j >= 16 {
                    0xffff
                } else {
                    ((1u32 << (dim - j)) - 1) as u16
                };
                let x = T::load(src.add(j), mask);
                acc = match kind {
                    NormKind::L1 => _mm512_add_ps(acc, _mm512_abs_ps(x)),
                    NormKind::L2 => _mm512_add_ps(acc, _mm512_mul_ps(x, x)),
                    _ => {
                        nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
                        _mm512_max_ps(acc, _mm512_abs_ps(x))
                    }
                };
                j += 16;
            }
            let mut lanes = [0.0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
            (lanes, nan != 0)
        }
    }

    #[inline(always)]
    unsafe fn scale(
        src: *const T,
        dim: usize,
        scale: f32,
        table: *mut T,
        out: *mut u8,
        out_f32: bool,
    ) {
        let out_size = if out_f32 { 4 } else { std::mem::size_of::<T>() };
        // SAFETY: every access stays within `j..dim`; masked-off lanes are not accessed; each
        // chunk is loaded before it is stored.
        unsafe {
            let s = _mm512_set1_ps(scale);
            let mut j = 0;
            while j < dim {
                let mask: __mmask16 = if dim - j >= 16 {
                    0xffff
                } else {
                    ((1u32 << (dim - j)) - 1) as u16
                };
                let v = _mm512_mul_ps(T::load(src.add(j), mask), s);
                let t = if table.is_null() { table } else { table.add(j) };
                let o = if out.is_null() {
                    out
                } else {
                    out.add(j * out_size)
                };
                T::store(v, mask, t, o, out_f32);
                j += 16;
            }
        }
    }

    #[inline(always)]
    unsafe fn copy(src: *const T, dim: usize, out: *mut u8, out_f32: bool) {
        let out_size = if out_f32 { 4 } else { std::mem::size_of::<T>() };
        // SAFETY: every access stays within `j..dim`; masked-off lanes are not accessed.
        unsafe {
            let mut j = 0;
            while j < dim {
                let mask: __mmask16 = if dim - j >= 16 {
                    0xffff
                } else {
                    ((1u32 << (dim - j)) - 1) as u16
                };
                T::copy(src.add(j), mask, out.add(j * out_size), out_f32);
                j += 16;
            }
        }
    }
}
