//! AVX-512 (F, BW, VL) gather kernels: 64-byte vectors, masked loads and stores for the row
//! tail (no scalar remainder loop), `vcvtph2ps` for f16, a zero-extend and shift for bf16.
//!
//! `STREAM = true` writes the output with non-temporal stores: a large output is not read back
//! soon, and streaming skips the read-for-ownership of every output line, which is a third of
//! the memory traffic of a gather. The unaligned head and tail of each row use ordinary masked
//! stores; an `sfence` at the end orders the streamed stores before the caller's next write.
//!
//! The whole row loop sits inside the `#[target_feature]` function so that it compiles as
//! AVX-512 code; only the function pointer call per block happens outside.

use std::arch::x86_64::*;

use crate::kernels::prefetch_read;

/// # Safety
/// [`CopyRowsFn`](super::CopyRowsFn)'s contract; the CPU has AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
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
        // SAFETY: the contract puts every row inside the table and `count` rows inside `out`.
        unsafe {
            let src = base.add(*rows.get_unchecked(i) * row_bytes);
            let dst = out.as_mut_ptr().add(i * row_bytes);
            if STREAM {
                copy_row_stream(src, dst, row_bytes);
            } else {
                copy_row(src, dst, row_bytes);
            }
        }
    }
    if STREAM {
        _mm_sfence();
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
        copy_masked(src.add(off), dst.add(off), n - off);
    }
}

/// Copy `n` bytes with streaming stores for every whole aligned line of `dst`.
///
/// # Safety
/// `src` readable and `dst` writable for `n` bytes; AVX-512 F and BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn copy_row_stream(src: *const u8, dst: *mut u8, n: usize) {
    let head = (dst.align_offset(64)).min(n);
    // SAFETY: the head, the aligned middle and the tail partition `0..n`; streaming stores go
    // to 64-byte aligned addresses only.
    unsafe {
        copy_masked(src, dst, head);
        let mut off = head;
        // Four loads, then four stores: a streaming store issued right behind its own load
        // halved the rows/s of random 256-byte rows (BENCHMARKS.md, "Streaming stores").
        while off + 1024 <= n {
            let v: [__m512i; 16] =
                std::array::from_fn(|k| _mm512_loadu_si512(src.add(off + 64 * k) as *const _));
            for (k, v) in v.into_iter().enumerate() {
                _mm512_stream_si512(dst.add(off + 64 * k) as *mut _, v);
            }
            off += 1024;
        }
        while off + 256 <= n {
            let a = _mm512_loadu_si512(src.add(off) as *const _);
            let b = _mm512_loadu_si512(src.add(off + 64) as *const _);
            let c = _mm512_loadu_si512(src.add(off + 128) as *const _);
            let d = _mm512_loadu_si512(src.add(off + 192) as *const _);
            _mm512_stream_si512(dst.add(off) as *mut _, a);
            _mm512_stream_si512(dst.add(off + 64) as *mut _, b);
            _mm512_stream_si512(dst.add(off + 128) as *mut _, c);
            _mm512_stream_si512(dst.add(off + 192) as *mut _, d);
            off += 256;
        }
        while off + 64 <= n {
            let a = _mm512_loadu_si512(src.add(off) as *const _);
            _mm512_stream_si512(dst.add(off) as *mut _, a);
            off += 64;
        }
        copy_masked(src.add(off), dst.add(off), n - off);
    }
}

/// Copy `n < 64` bytes with one masked load and store (nothing when `n == 0`).
///
/// # Safety
/// `src` readable and `dst` writable for `n` bytes, `n < 64`; AVX-512 F and BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn copy_masked(src: *const u8, dst: *mut u8, n: usize) {
    debug_assert!(n < 64);
    if n > 0 {
        let mask: __mmask64 = (1u64 << n) - 1;
        // SAFETY: masked-off lanes are neither read nor written.
        unsafe {
            let a = _mm512_maskz_loadu_epi8(mask, src as *const i8);
            _mm512_mask_storeu_epi8(dst as *mut i8, mask, a);
        }
    }
}

/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract; the CPU has AVX-512 F, BW, VL and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
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
        widen_rows::<STREAM>(table, dim, rows, count, out, prefetch, |h| {
            _mm512_cvtph_ps(h)
        });
    }
}

/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract; the CPU has AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
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
        widen_rows::<STREAM>(table, dim, rows, count, out, prefetch, |h| {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        });
    }
}

/// The shared widening loop: 16 lanes per vector, masked head (when streaming, up to the
/// first aligned output line) and tail.
///
/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract; AVX-512 F, BW, VL and F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn widen_rows<const STREAM: bool>(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    prefetch: usize,
    widen: impl Fn(__m256i) -> __m512,
) {
    let base = table.as_ptr();
    for i in 0..count {
        if let Some(&ahead) = rows.get(i + prefetch) {
            prefetch_read(base.wrapping_add(ahead * dim) as *const u8, dim * 2);
        }
        // SAFETY: the contract puts every row inside the table and `count` rows inside `out`;
        // every access stays within `0..dim` of the row; masked lanes are not accessed;
        // streaming stores go to 64-byte aligned addresses only.
        unsafe {
            let src = base.add(*rows.get_unchecked(i) * dim);
            let dst = out.as_mut_ptr().add(i * dim);
            let masked = |j: usize, n: usize| {
                let mask: __mmask16 = ((1u32 << n) - 1) as u16;
                let a = _mm256_maskz_loadu_epi16(mask, src.add(j) as *const i16);
                _mm512_mask_storeu_ps(dst.add(j), mask, widen(a));
            };
            let mut j = 0;
            if STREAM {
                // f32 output is 4-byte aligned, so whole elements reach the line boundary.
                let head = (dst.align_offset(64)).min(dim);
                if head > 0 {
                    masked(0, head);
                }
                j = head;
                while j + 16 <= dim {
                    let a = _mm256_loadu_si256(src.add(j) as *const __m256i);
                    _mm512_stream_ps(dst.add(j), widen(a));
                    j += 16;
                }
            } else {
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
            }
            if j < dim {
                masked(j, dim - j);
            }
        }
    }
    if STREAM {
        _mm_sfence();
    }
}
