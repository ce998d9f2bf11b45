//! AVX-512 (F, BW, VL) gather kernels: 64-byte vectors, masked loads and stores for the row
//! tail (no scalar remainder loop), `vcvtph2ps` for f16, a zero-extend and shift for bf16.
//!
//! `STREAM = true` writes the output with non-temporal stores: a large output is not read back
//! soon, and streaming skips the read-for-ownership of every output line, which is a third of
//! the memory traffic of a gather. Rows of whole lines into an output 16, 32 or 48 bytes past a
//! line boundary (a buffer from the system allocator is 16-byte aligned) are joined into whole
//! lines in registers (`kernels::realign`); otherwise a row streams its aligned middle and stores its
//! head and tail with ordinary masked stores. An `sfence` at the end orders the streamed
//! stores before the caller's next write.
//!
//! The whole row loop sits inside the `#[target_feature]` function so that it compiles as
//! AVX-512 code; only the function pointer call per block happens outside.

use std::arch::x86_64::*;

use crate::kernels::prefetch_read;
use crate::kernels::realign::Realign;

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
    if STREAM && row_bytes >= 64 && row_bytes.is_multiple_of(64) && count > 0 {
        // The output's offset in its first line picks the join.
        let realigned: Option<super::CopyRowsFn> = match out.as_ptr() as usize % 64 {
            16 => Some(copy_rows_realigned::<12>),
            32 => Some(copy_rows_realigned::<8>),
            48 => Some(copy_rows_realigned::<4>),
            _ => None, // aligned, or not on a 16-byte boundary
        };
        if let Some(realigned) = realigned {
            // SAFETY: forwarded contract; the output is at the offset the function expects.
            return unsafe { realigned(table, row_bytes, rows, count, out, prefetch) };
        }
    }
    let base = table.as_ptr();
    for i in 0..count {
        if let Some(&ahead) = rows.get(i + prefetch) {
            prefetch_read(base.wrapping_add(ahead * row_bytes), row_bytes);
        }
        // SAFETY: the contract puts every row inside the table and `count` rows inside `out`.
        unsafe {
            let src = base.add(*rows.get_unchecked(i) * row_bytes);
            let dst = out.as_mut_ptr().add(i * row_bytes);
            copy_row::<STREAM>(src, dst, row_bytes);
        }
    }
    if STREAM {
        crate::kernels::finish_streaming_stores();
    }
}

/// [`widen_rows`] with streaming stores into an output `4 * (16 - SHIFT)` bytes past a line
/// boundary, rows of whole lines (`dim` a multiple of 16). See [`Realign`].
///
/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract with `dim` a multiple of 16 and `out` at
/// that offset in its line; AVX-512 F, BW, VL and F16C.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn widen_rows_realigned<const SHIFT: i32>(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    prefetch: usize,
    widen: impl Fn(__m256i) -> __m512,
) {
    let base = table.as_ptr();
    // SAFETY: `out` holds `count * dim` elements, all of them pushed below.
    let mut lines = unsafe { Realign::<SHIFT>::new(out.as_mut_ptr() as *mut u8) };
    for i in 0..count {
        if let Some(&ahead) = rows.get(i + prefetch) {
            prefetch_read(base.wrapping_add(ahead * dim) as *const u8, dim * 2);
        }
        // SAFETY: the contract puts every row inside the table; the pushes stay within the
        // `count * dim` elements of `out`.
        unsafe {
            let src = base.add(*rows.get_unchecked(i) * dim);
            let mut j = 0;
            while j < dim {
                let v = widen(_mm256_loadu_si256(src.add(j) as *const __m256i));
                lines.push(_mm512_castps_si512(v));
                j += 16;
            }
        }
    }
    // SAFETY: as for `push`.
    unsafe { lines.finish() };
    crate::kernels::finish_streaming_stores();
}

/// [`copy_rows`] with streaming stores into an output `4 * (16 - SHIFT)` bytes past a line
/// boundary (16, 32 or 48: a buffer from the system allocator is 16-byte aligned), rows of
/// whole lines. See [`Realign`].
///
/// # Safety
/// [`CopyRowsFn`](super::CopyRowsFn)'s contract with `row_bytes` a multiple of 64 and `out`
/// at that offset in its line; AVX-512 F and BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn copy_rows_realigned<const SHIFT: i32>(
    table: &[u8],
    row_bytes: usize,
    rows: &[usize],
    count: usize,
    out: &mut [u8],
    prefetch: usize,
) {
    let base = table.as_ptr();
    // SAFETY: `out` holds `count * row_bytes` bytes, all of them pushed below.
    let mut lines = unsafe { Realign::<SHIFT>::new(out.as_mut_ptr()) };
    for i in 0..count {
        if let Some(&ahead) = rows.get(i + prefetch) {
            prefetch_read(base.wrapping_add(ahead * row_bytes), row_bytes);
        }
        // SAFETY: the contract puts every row inside the table; the pushes stay within the
        // `count * row_bytes` bytes of `out`.
        unsafe {
            let src = base.add(*rows.get_unchecked(i) * row_bytes);
            let mut off = 0;
            // Loads before stores, as in `copy_row_stream`.
            while off + 256 <= row_bytes {
                let v: [__m512i; 4] =
                    std::array::from_fn(|k| _mm512_loadu_si512(src.add(off + 64 * k) as *const _));
                for v in v {
                    lines.push(v);
                }
                off += 256;
            }
            while off < row_bytes {
                lines.push(_mm512_loadu_si512(src.add(off) as *const _));
                off += 64;
            }
        }
    }
    // SAFETY: as for `push`.
    unsafe { lines.finish() };
    crate::kernels::finish_streaming_stores();
}

/// Copy `n` bytes: whole vectors, loads before stores, then one masked vector. With `STREAM`
/// every whole aligned line of `dst` is written with a streaming store (the unaligned head and
/// the tail with ordinary masked stores), and sixteen loads go before their stores: a
/// streaming store issued right behind its own load halved the rows/s of random 256-byte rows
/// (BENCHMARKS.md, "Streaming stores").
///
/// # Safety
/// `src` readable and `dst` writable for `n` bytes; AVX-512 F and BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn copy_row<const STREAM: bool>(src: *const u8, dst: *mut u8, n: usize) {
    let store = |p: *mut u8, v: __m512i| {
        // SAFETY: the callers below store inside `0..n`, streaming only to aligned lines.
        unsafe {
            if STREAM {
                _mm512_stream_si512(p as *mut _, v)
            } else {
                _mm512_storeu_si512(p as *mut _, v)
            }
        }
    };
    let head = if STREAM {
        dst.align_offset(64).min(n)
    } else {
        0
    };
    // SAFETY: the head, the whole vectors and the tail partition `0..n`; with `STREAM` every
    // vector after the head starts on a line boundary.
    unsafe {
        copy_masked(src, dst, head);
        let mut off = head;
        while STREAM && off + 1024 <= n {
            let v: [__m512i; 16] =
                std::array::from_fn(|k| _mm512_loadu_si512(src.add(off + 64 * k) as *const _));
            for (k, v) in v.into_iter().enumerate() {
                store(dst.add(off + 64 * k), v);
            }
            off += 1024;
        }
        while off + 256 <= n {
            let v: [__m512i; 4] =
                std::array::from_fn(|k| _mm512_loadu_si512(src.add(off + 64 * k) as *const _));
            for (k, v) in v.into_iter().enumerate() {
                store(dst.add(off + 64 * k), v);
            }
            off += 256;
        }
        while off + 64 <= n {
            store(dst.add(off), _mm512_loadu_si512(src.add(off) as *const _));
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
    widen: impl Fn(__m256i) -> __m512 + Copy,
) {
    if STREAM && dim >= 16 && dim.is_multiple_of(16) && count > 0 {
        // As in `copy_rows`: whole lines for an output 16, 32 or 48 bytes past a boundary.
        // SAFETY: forwarded contract; each function expects the offset it is called for.
        unsafe {
            match out.as_ptr() as usize % 64 {
                16 => {
                    return widen_rows_realigned::<12>(
                        table, dim, rows, count, out, prefetch, widen,
                    )
                }
                32 => {
                    return widen_rows_realigned::<8>(table, dim, rows, count, out, prefetch, widen)
                }
                48 => {
                    return widen_rows_realigned::<4>(table, dim, rows, count, out, prefetch, widen)
                }
                _ => {}
            }
        }
    }
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
        crate::kernels::finish_streaming_stores();
    }
}
