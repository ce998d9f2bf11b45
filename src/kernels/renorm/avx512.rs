//! AVX-512 (F, BW, VL) renorm kernels: the 16 lanes are one vector, row tails are masked
//! loads and stores, `vcvtph2ps`/`vcvtps2ph` convert f16, integer rounding converts bf16.

use std::arch::x86_64::*;

use super::{drive, NormKind, RenormJob, RowOps};
use crate::dtype::Element;
use half::{bf16, f16};

/// # Safety
/// [`RenormRowsFn`](super::RenormRowsFn)'s contract; the CPU has AVX-512 F, BW, VL and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn renorm_f32(job: &RenormJob, rows: &[usize], slots: &[usize], count: usize) {
    // SAFETY: forwarded contract; this function has the features `Avx512` uses.
    unsafe { drive::<f32, Avx512>(job, rows, slots, count) }
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
