//! AVX2 + F16C renorm kernels: the 16 lanes are two 8-lane vectors; a row's last partial
//! group of 16 is staged through a zeroed buffer for the norm (zeros add nothing to any lane)
//! and finished element by element for the writes.

use std::arch::x86_64::*;

use super::{drive, NormKind, RenormJob, RowOps};
use crate::dtype::Element;
use half::{bf16, f16};

/// # Safety
/// [`RenormRowsFn`](super::RenormRowsFn)'s contract; the CPU has AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn renorm_f32(job: &RenormJob, rows: &[usize], slots: &[usize], count: usize) {
    // SAFETY: forwarded contract; this function has the features `Avx2` uses.
    unsafe { drive::<f32, Avx2>(job, rows, slots, count) }
}

/// # Safety
/// As [`renorm_f32`].
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn renorm_f16(job: &RenormJob, rows: &[usize], slots: &[usize], count: usize) {
    // SAFETY: forwarded contract; this function has the features `Avx2` uses.
    unsafe { drive::<f16, Avx2>(job, rows, slots, count) }
}

/// # Safety
/// As [`renorm_f32`].
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn renorm_bf16(job: &RenormJob, rows: &[usize], slots: &[usize], count: usize) {
    // SAFETY: forwarded contract; this function has the features `Avx2` uses.
    unsafe { drive::<bf16, Avx2>(job, rows, slots, count) }
}

/// Conversions between a dtype's elements and 8 f32 lanes.
///
/// # Safety
/// Called only from functions compiled with AVX2 and F16C.
unsafe trait Lanes8: Element {
    /// Load 8 elements.
    unsafe fn load(src: *const Self) -> __m256;
    /// Round 8 f32 lanes to this dtype; store them to `table` (unless null) and to `out`
    /// (unless null) as this dtype or, when `out_f32`, widened back.
    unsafe fn store(v: __m256, table: *mut Self, out: *mut u8, out_f32: bool);
}

// SAFETY: AVX only, called from functions compiled with AVX2.
unsafe impl Lanes8 for f32 {
    #[inline(always)]
    unsafe fn load(src: *const f32) -> __m256 {
        // SAFETY: the caller makes 8 elements readable.
        unsafe { _mm256_loadu_ps(src) }
    }
    #[inline(always)]
    unsafe fn store(v: __m256, table: *mut f32, out: *mut u8, _out_f32: bool) {
        // SAFETY: the caller makes 8 elements writable.
        unsafe {
            if !table.is_null() {
                _mm256_storeu_ps(table, v);
            }
            if !out.is_null() {
                _mm256_storeu_ps(out as *mut f32, v);
            }
        }
    }
}

// SAFETY: AVX2 and F16C, called from functions compiled with them.
unsafe impl Lanes8 for f16 {
    #[inline(always)]
    unsafe fn load(src: *const f16) -> __m256 {
        // SAFETY: the caller makes 8 elements readable.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(src as *const __m128i)) }
    }
    #[inline(always)]
    unsafe fn store(v: __m256, table: *mut f16, out: *mut u8, out_f32: bool) {
        // SAFETY: the caller makes 8 elements writable; F16C is enabled in the caller.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            if !table.is_null() {
                _mm_storeu_si128(table as *mut __m128i, h);
            }
            if !out.is_null() {
                if out_f32 {
                    _mm256_storeu_ps(out as *mut f32, _mm256_cvtph_ps(h));
                } else {
                    _mm_storeu_si128(out as *mut __m128i, h);
                }
            }
        }
    }
}

// SAFETY: AVX2, called from functions compiled with it.
unsafe impl Lanes8 for bf16 {
    #[inline(always)]
    unsafe fn load(src: *const bf16) -> __m256 {
        // SAFETY: the caller makes 8 elements readable.
        unsafe {
            let h = _mm_loadu_si128(src as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
    #[inline(always)]
    unsafe fn store(v: __m256, table: *mut bf16, out: *mut u8, out_f32: bool) {
        // SAFETY: the caller makes 8 elements writable; AVX2 is enabled in the caller.
        unsafe {
            // Round to nearest even; NaNs keep their top bits and become quiet (as `half`).
            let bits = _mm256_castps_si256(v);
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
            let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
            let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, bias));
            let nan = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x40));
            let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            let b = _mm256_blendv_epi8(rounded, nan, is_nan);
            // Every lane is below 0x10000, so the saturating pack is exact; it interleaves
            // 128-bit halves, which the permute puts back in order.
            let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(b, b));
            let h = _mm256_castsi256_si128(packed);
            if !table.is_null() {
                _mm_storeu_si128(table as *mut __m128i, h);
            }
            if !out.is_null() {
                if out_f32 {
                    let w = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(b));
                    _mm256_storeu_ps(out as *mut f32, w);
                } else {
                    _mm_storeu_si128(out as *mut __m128i, h);
                }
            }
        }
    }
}

/// The AVX2 row operations.
struct Avx2;

impl Avx2 {
    /// Add 8 elements' contributions to one 8-lane accumulator.
    #[inline(always)]
    fn step(acc: __m256, x: __m256, kind: NormKind, nan: &mut __m256) -> __m256 {
        // SAFETY: AVX only, inlined into functions compiled with AVX2.
        unsafe {
            let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
            match kind {
                NormKind::L1 => _mm256_add_ps(acc, abs),
                NormKind::L2 => _mm256_add_ps(acc, _mm256_mul_ps(x, x)),
                _ => {
                    *nan = _mm256_or_ps(*nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
                    _mm256_max_ps(acc, abs)
                }
            }
        }
    }
}

// SAFETY: AVX2 and F16C; used only by the `#[target_feature]` functions above.
unsafe impl<T: Lanes8> RowOps<T> for Avx2 {
    #[inline(always)]
    unsafe fn lanes(src: *const T, dim: usize, kind: NormKind) -> ([f32; 16], bool) {
        // SAFETY: every access stays within `j..dim` of the row or inside `buf`.
        unsafe {
            let mut lo = _mm256_setzero_ps();
            let mut hi = _mm256_setzero_ps();
            let mut nan = _mm256_setzero_ps();
            let mut j = 0;
            while j + 16 <= dim {
                lo = Avx2::step(lo, T::load(src.add(j)), kind, &mut nan);
                hi = Avx2::step(hi, T::load(src.add(j + 8)), kind, &mut nan);
                j += 16;
            }
            if j < dim {
                let mut buf = [T::default(); 16];
                std::ptr::copy_nonoverlapping(src.add(j), buf.as_mut_ptr(), dim - j);
                lo = Avx2::step(lo, T::load(buf.as_ptr()), kind, &mut nan);
                hi = Avx2::step(hi, T::load(buf.as_ptr().add(8)), kind, &mut nan);
            }
            let mut lanes = [0.0f32; 16];
            _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
            (lanes, _mm256_movemask_ps(nan) != 0)
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
        // SAFETY: every access stays within `j..dim`; each chunk is loaded before it is
        // stored.
        unsafe {
            let s = _mm256_set1_ps(scale);
            let mut j = 0;
            while j + 8 <= dim {
                let v = _mm256_mul_ps(T::load(src.add(j)), s);
                let t = if table.is_null() { table } else { table.add(j) };
                let o = if out.is_null() {
                    out
                } else {
                    out.add(j * out_size)
                };
                T::store(v, t, o, out_f32);
                j += 8;
            }
            if j < dim {
                let t = if table.is_null() { table } else { table.add(j) };
                let o = if out.is_null() {
                    out
                } else {
                    out.add(j * out_size)
                };
                <super::scalar::Scalar as RowOps<T>>::scale(
                    src.add(j),
                    dim - j,
                    scale,
                    t,
                    o,
                    out_f32,
                );
            }
        }
    }

    #[inline(always)]
    unsafe fn copy(src: *const T, dim: usize, out: *mut u8, out_f32: bool) {
        // SAFETY: the caller makes both pointers valid for `dim` elements.
        unsafe {
            if !out_f32 || std::mem::size_of::<T>() == 4 {
                let bytes = dim * std::mem::size_of::<T>();
                std::ptr::copy_nonoverlapping(src as *const u8, out, bytes);
                return;
            }
            let mut j = 0;
            while j + 8 <= dim {
                _mm256_storeu_ps((out as *mut f32).add(j), T::load(src.add(j)));
                j += 8;
            }
            while j < dim {
                *(out as *mut f32).add(j) = (*src.add(j)).to_f32();
                j += 1;
            }
        }
    }
}
