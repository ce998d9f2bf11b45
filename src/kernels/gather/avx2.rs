//! AVX2 + F16C gather kernels: 32-byte vectors, `vcvtph2ps` for f16, a zero-extend and shift
//! for bf16, scalar tails (AVX2 has no byte-masked stores). `STREAM = true` uses
//! non-temporal stores for whole aligned 32-byte pieces of the output (see `avx512.rs`).

use std::arch::x86_64::*;

use crate::kernels::prefetch_read;

/// # Safety
/// [`CopyRowsFn`](super::CopyRowsFn)'s contract; the CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn copy_rows<const STREAM: bool>(
    table: &[u8],
    row_bytes: usize,
    rows: &[usize],
    count: usize,
    out: &mut [u8],
    prefetch: usize,
) {
    let base = table.as_ptr();
    for i in 0..count {
        if let Some(&ahead) = rows.get(i + prefetch) {
            prefetch_read(base.wrapping_add(ahead * row_bytes), row_bytes);
        }
        // SAFETY: the contract puts every row inside the table and `count` rows inside `out`;
        // each access below stays within `off..row_bytes` of the row.
        unsafe {
            let src = base.add(*rows.get_unchecked(i) * row_bytes);
            let dst = out.as_mut_ptr().add(i * row_bytes);
            let mut off = 0;
            if STREAM {
                let head = dst.align_offset(32).min(row_bytes);
                std::ptr::copy_nonoverlapping(src, dst, head);
                off = head;
                // Loads before stores (see `avx512::copy_row_stream`).
                while off + 256 <= row_bytes {
                    let v: [__m256i; 8] = std::array::from_fn(|k| {
                        _mm256_loadu_si256(src.add(off + 32 * k) as *const __m256i)
                    });
                    for (k, v) in v.into_iter().enumerate() {
                        _mm256_stream_si256(dst.add(off + 32 * k) as *mut __m256i, v);
                    }
                    off += 256;
                }
                while off + 32 <= row_bytes {
                    let a = _mm256_loadu_si256(src.add(off) as *const __m256i);
                    _mm256_stream_si256(dst.add(off) as *mut __m256i, a);
                    off += 32;
                }
            }
            while off + 128 <= row_bytes {
                let a = _mm256_loadu_si256(src.add(off) as *const __m256i);
                let b = _mm256_loadu_si256(src.add(off + 32) as *const __m256i);
                let c = _mm256_loadu_si256(src.add(off + 64) as *const __m256i);
                let d = _mm256_loadu_si256(src.add(off + 96) as *const __m256i);
                _mm256_storeu_si256(dst.add(off) as *mut __m256i, a);
                _mm256_storeu_si256(dst.add(off + 32) as *mut __m256i, b);
                _mm256_storeu_si256(dst.add(off + 64) as *mut __m256i, c);
                _mm256_storeu_si256(dst.add(off + 96) as *mut __m256i, d);
                off += 128;
            }
            while off + 32 <= row_bytes {
                let a = _mm256_loadu_si256(src.add(off) as *const __m256i);
                _mm256_storeu_si256(dst.add(off) as *mut __m256i, a);
                off += 32;
            }
            if off + 16 <= row_bytes {
                let a = _mm_loadu_si128(src.add(off) as *const __m128i);
                _mm_storeu_si128(dst.add(off) as *mut __m128i, a);
                off += 16;
            }
            while off < row_bytes {
                *dst.add(off) = *src.add(off);
                off += 1;
            }
        }
    }
    if STREAM {
        crate::kernels::finish_streaming_stores();
    }
}

/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract; the CPU has AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn f16_rows_to_f32<const STREAM: bool>(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    prefetch: usize,
) {
    // SAFETY: forwarded contract.
    unsafe {
        widen_rows::<STREAM>(
            table,
            dim,
            rows,
            count,
            out,
            prefetch,
            |h| _mm256_cvtph_ps(h),
            |h| _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32))),
        );
    }
}

/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract; the CPU has AVX2.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn bf16_rows_to_f32<const STREAM: bool>(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    prefetch: usize,
) {
    // SAFETY: forwarded contract.
    unsafe {
        widen_rows::<STREAM>(
            table,
            dim,
            rows,
            count,
            out,
            prefetch,
            |h| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h))),
            super::scalar::bf16_to_f32,
        );
    }
}

/// The shared widening loop: 8 lanes per vector, two vectors per step, a scalar tail.
///
/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract; AVX2 and F16C.
#[inline]
#[target_feature(enable = "avx2,f16c")]
#[allow(clippy::too_many_arguments)] // the kernel contract plus two conversions
unsafe fn widen_rows<const STREAM: bool>(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    prefetch: usize,
    widen: impl Fn(__m128i) -> __m256,
    widen_one: impl Fn(u16) -> f32,
) {
    let base = table.as_ptr();
    for i in 0..count {
        if let Some(&ahead) = rows.get(i + prefetch) {
            prefetch_read(base.wrapping_add(ahead * dim) as *const u8, dim * 2);
        }
        // SAFETY: the contract puts every row inside the table and `count` rows inside `out`;
        // every access stays within `j..dim` of the row.
        unsafe {
            let src = base.add(*rows.get_unchecked(i) * dim);
            let dst = out.as_mut_ptr().add(i * dim);
            let mut j = 0;
            if STREAM {
                let head = dst.align_offset(32).min(dim);
                while j < head {
                    *dst.add(j) = widen_one(*src.add(j));
                    j += 1;
                }
                while j + 8 <= dim {
                    let a = _mm_loadu_si128(src.add(j) as *const __m128i);
                    _mm256_stream_ps(dst.add(j), widen(a));
                    j += 8;
                }
            }
            while j + 16 <= dim {
                let a = _mm_loadu_si128(src.add(j) as *const __m128i);
                let b = _mm_loadu_si128(src.add(j + 8) as *const __m128i);
                _mm256_storeu_ps(dst.add(j), widen(a));
                _mm256_storeu_ps(dst.add(j + 8), widen(b));
                j += 16;
            }
            while j + 8 <= dim {
                let a = _mm_loadu_si128(src.add(j) as *const __m128i);
                _mm256_storeu_ps(dst.add(j), widen(a));
                j += 8;
            }
            while j < dim {
                *dst.add(j) = widen_one(*src.add(j));
                j += 1;
            }
        }
    }
    if STREAM {
        crate::kernels::finish_streaming_stores();
    }
}
