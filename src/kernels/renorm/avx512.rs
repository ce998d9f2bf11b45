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
    /// Load 16 elements (`mask` selects which; the others read as zero), widened exactly.
    unsafe fn load(src: *const Self, mask: __mmask16) -> __m512;
    /// Round 16 f32 lanes to this dtype (to nearest even), returned widened back to f32.
    unsafe fn round(v: __m512) -> __m512;
    /// Store 16 lanes already representable in this dtype (the `mask`ed ones) as this dtype.
    unsafe fn store(v: __m512, mask: __mmask16, dst: *mut Self);
}

// SAFETY: only AVX-512 F instructions, called from functions compiled with them.
unsafe impl Lanes16 for f32 {
    #[inline(always)]
    unsafe fn load(src: *const f32, mask: __mmask16) -> __m512 {
        // SAFETY: masked-off lanes are not accessed; the caller makes the others readable.
        unsafe { _mm512_maskz_loadu_ps(mask, src) }
    }
    #[inline(always)]
    unsafe fn round(v: __m512) -> __m512 {
        v
    }
    #[inline(always)]
    unsafe fn store(v: __m512, mask: __mmask16, dst: *mut f32) {
        // SAFETY: as for `load`, for writes.
        unsafe { _mm512_mask_storeu_ps(dst, mask, v) }
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
    unsafe fn round(v: __m512) -> __m512 {
        // SAFETY: the caller is compiled with AVX-512 F.
        unsafe {
            _mm512_cvtph_ps(_mm512_cvtps_ph::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(v))
        }
    }
    #[inline(always)]
    unsafe fn store(v: __m512, mask: __mmask16, dst: *mut f16) {
        // SAFETY: masked-off lanes are not accessed; `v` is exact in f16, so the conversion
        // does not round.
        unsafe {
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_mask_storeu_epi16(dst as *mut i16, mask, h)
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
    unsafe fn round(v: __m512) -> __m512 {
        // SAFETY: the caller is compiled with AVX-512 F.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(f32_to_bf16(v))) }
    }
    #[inline(always)]
    unsafe fn store(v: __m512, mask: __mmask16, dst: *mut bf16) {
        // SAFETY: masked-off lanes are not accessed; `v` is exact in bf16, so its top halves
        // are the bf16 bits.
        unsafe {
            let h = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_castps_si512(v)));
            _mm256_mask_storeu_epi16(dst as *mut i16, mask, h)
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

/// The mask of the first `n.min(16)` lanes.
#[inline(always)]
fn lanes_mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// Write one output row: `value(j, mask)` gives the 16 lanes from element `j` (already in the
/// output's precision); f32 output rows, when `stream`, go through non-temporal stores for
/// every whole 64-byte line, the unaligned head and tail through masked stores.
///
/// # Safety
/// `out` writable for `dim` elements of f32 (`out_f32`) or `T`; AVX-512 F, BW, VL.
#[inline(always)]
unsafe fn write_row<T: Lanes16>(
    dim: usize,
    out: *mut u8,
    out_f32: bool,
    stream: bool,
    mut value: impl FnMut(usize, __mmask16) -> __m512,
) {
    // SAFETY: every access stays within `j..dim`; masked-off lanes are not accessed; streamed
    // stores are to 64-byte aligned addresses inside the row.
    unsafe {
        if out_f32 || std::mem::size_of::<T>() == 4 {
            let out = out as *mut f32;
            let mut j = 0;
            if stream {
                // Elements before the first 64-byte boundary (f32 outputs are 4-aligned).
                let head = ((64 - (out as usize & 63)) & 63) / 4;
                if head > 0 {
                    let mask = lanes_mask(head.min(dim));
                    _mm512_mask_storeu_ps(out, mask, value(0, mask));
                    j = head.min(dim);
                }
                while j + 16 <= dim {
                    _mm512_stream_ps(out.add(j), value(j, 0xffff));
                    j += 16;
                }
            }
            while j < dim {
                let mask = lanes_mask(dim - j);
                _mm512_mask_storeu_ps(out.add(j), mask, value(j, mask));
                j += 16;
            }
        } else {
            let out = out as *mut T;
            let mut j = 0;
            while j < dim {
                let mask = lanes_mask(dim - j);
                T::store(value(j, mask), mask, out.add(j));
                j += 16;
            }
        }
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
        stream: bool,
    ) {
        // SAFETY: every access stays within `j..dim`; masked-off lanes are not accessed; each
        // chunk is loaded before it is stored.
        unsafe {
            let s = _mm512_set1_ps(scale);
            let scaled =
                |j: usize, mask: __mmask16| T::round(_mm512_mul_ps(T::load(src.add(j), mask), s));
            if out.is_null() {
                let mut j = 0;
                while j < dim {
                    let mask = lanes_mask(dim - j);
                    T::store(scaled(j, mask), mask, table.add(j));
                    j += 16;
                }
                return;
            }
            write_row::<T>(dim, out, out_f32, stream, |j, mask| {
                let v = scaled(j, mask);
                if !table.is_null() {
                    T::store(v, mask, table.add(j));
                }
                v
            });
        }
    }

    #[inline(always)]
    unsafe fn copy(src: *const T, dim: usize, out: *mut u8, out_f32: bool, stream: bool) {
        // SAFETY: every access stays within `j..dim`; masked-off lanes are not accessed.
        unsafe {
            if !out_f32 && std::mem::size_of::<T>() == 2 {
                // Native 16-bit output: move the bits.
                let mut j = 0;
                while j < dim {
                    let mask = lanes_mask(dim - j);
                    let h = _mm256_maskz_loadu_epi16(mask, src.add(j) as *const i16);
                    _mm256_mask_storeu_epi16((out as *mut i16).add(j), mask, h);
                    j += 16;
                }
                return;
            }
            write_row::<T>(dim, out, out_f32, stream, |j, mask| {
                T::load(src.add(j), mask)
            });
        }
    }
}
