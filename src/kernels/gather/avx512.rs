//! AVX-512 (F, BW, VL) gather kernels: 64-byte vectors, masked loads and stores for the row
//! tail (no scalar remainder loop), `vcvtph2ps` for f16, a zero-extend and shift for bf16.
//!
//! The whole row loop sits inside the `#[target_feature]` function so that it compiles as
//! AVX-512 code; only the function pointer call per block happens outside.

use std::arch::x86_64::*;

use crate::kernels::{prefetch_read, PREFETCH_DISTANCE};

/// # Safety
/// [`CopyRowsFn`](super::CopyRowsFn)'s contract; the CPU has AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn copy_rows(
    table: &[u8],
    row_bytes: usize,
    rows: &[usize],
    count: usize,
    out: &mut [u8],
) {
    let base = table.as_ptr();
    for i in 0..count {
        if let Some(&ahead) = rows.get(i + PREFETCH_DISTANCE) {
            prefetch_read(base.wrapping_add(ahead * row_bytes), row_bytes);
        }
        // SAFETY: the contract puts every row inside the table and `count` rows inside `out`.
        unsafe {
            let src = base.add(*rows.get_unchecked(i) * row_bytes);
            let dst = out.as_mut_ptr().add(i * row_bytes);
            copy_row(src, dst, row_bytes);
        }
    }
}

/// Copy `n` bytes: four vectors per step, then single vectors, then one masked vector.
///
/// # Safety
/// `src` readable and `dst` writable for `n` bytes; AVX-512 F and BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn copy_row(src: *const u8, dst: *mut u8, n: usize) {
    let mut off = 0;
    // SAFETY: every access below stays within `off..n`; masked lanes are not accessed.
    unsafe {
        while off + 256 <= n {
            let a = _mm512_loadu_si512(src.add(off) as *const _);
            let b = _mm512_loadu_si512(src.add(off + 64) as *const _);
            let c = _mm512_loadu_si512(src.add(off + 128) as *const _);
            let d = _mm512_loadu_si512(src.add(off + 192) as *const _);
            _mm512_storeu_si512(dst.add(off) as *mut _, a);
            _mm512_storeu_si512(dst.add(off + 64) as *mut _, b);
            _mm512_storeu_si512(dst.add(off + 128) as *mut _, c);
            _mm512_storeu_si512(dst.add(off + 192) as *mut _, d);
            off += 256;
        }
        while off + 64 <= n {
            let a = _mm512_loadu_si512(src.add(off) as *const _);
            _mm512_storeu_si512(dst.add(off) as *mut _, a);
            off += 64;
        }
        if off < n {
            let mask: __mmask64 = (1u64 << (n - off)) - 1;
            let a = _mm512_maskz_loadu_epi8(mask, src.add(off) as *const i8);
            _mm512_mask_storeu_epi8(dst.add(off) as *mut i8, mask, a);
        }
    }
}

/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract; the CPU has AVX-512 F, BW, VL and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn f16_rows_to_f32(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract.
    unsafe {
        widen_rows(table, dim, rows, count, out, |h| _mm512_cvtph_ps(h));
    }
}

/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract; the CPU has AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn bf16_rows_to_f32(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract.
    unsafe {
        widen_rows(table, dim, rows, count, out, |h| {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        });
    }
}

/// The shared widening loop: 16 lanes per vector, two vectors per step, a masked tail.
///
/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract; AVX-512 F, BW, VL and F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn widen_rows(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    widen: impl Fn(__m256i) -> __m512,
) {
    let base = table.as_ptr();
    for i in 0..count {
        if let Some(&ahead) = rows.get(i + PREFETCH_DISTANCE) {
            prefetch_read(base.wrapping_add(ahead * dim) as *const u8, dim * 2);
        }
        // SAFETY: the contract puts every row inside the table and `count` rows inside `out`;
        // every access stays within `j..dim` of the row; masked lanes are not accessed.
        unsafe {
            let src = base.add(*rows.get_unchecked(i) * dim);
            let dst = out.as_mut_ptr().add(i * dim);
            let mut j = 0;
            while j + 32 <= dim {
                let a = _mm256_loadu_si256(src.add(j) as *const __m256i);
                let b = _mm256_loadu_si256(src.add(j + 16) as *const __m256i);
                _mm512_storeu_ps(dst.add(j), widen(a));
                _mm512_storeu_ps(dst.add(j + 16), widen(b));
                j += 32;
            }
            while j + 16 <= dim {
                let a = _mm256_loadu_si256(src.add(j) as *const __m256i);
                _mm512_storeu_ps(dst.add(j), widen(a));
                j += 16;
            }
            if j < dim {
                let mask: __mmask16 = (1u32 << (dim - j)) as u16 - 1;
                let a = _mm256_maskz_loadu_epi16(mask, src.add(j) as *const i16);
                _mm512_mask_storeu_ps(dst.add(j), mask, widen(a));
            }
        }
    }
}
