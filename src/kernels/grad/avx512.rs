//! AVX-512 gradient kernel: columns in blocks of 64 (four 16-lane vectors held in registers
//! while the segment's rows stream past), masked loads and stores for a partial block, so
//! there is no scalar remainder. One fused multiply-add per element, as the scalar reference.

use std::arch::x86_64::*;

use crate::kernels::prefetch_read;

/// # Safety
/// [`ReduceSegmentsFn`](super::ReduceSegmentsFn)'s contract; the CPU has AVX-512 F.
#[allow(clippy::too_many_arguments)] // the kernel signature: slices and sizes
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn reduce_segments(
    src: &[f32],
    dim: usize,
    items: &[u32],
    weights: &[f32],
    bounds: &[u32],
    dst_rows: &[usize],
    dst: &mut [f32],
    prefetch: usize,
) {
    let base = bounds[0];
    let sp = src.as_ptr();
    for (k, b) in bounds.windows(2).enumerate() {
        let (start, end) = ((b[0] - base) as usize, (b[1] - base) as usize);
        // SAFETY: the contract puts dst_rows[k] inside `dst`.
        let out = unsafe { dst.as_mut_ptr().add(*dst_rows.get_unchecked(k) * dim) };
        let mut j0 = 0;
        while j0 < dim {
            let width = (dim - j0).min(64);
            // One mask per vector of the block; lanes past `width` are neither read nor written.
            let all: u64 = if width == 64 {
                u64::MAX
            } else {
                (1u64 << width) - 1
            };
            let m = [
                all as u16,
                (all >> 16) as u16,
                (all >> 32) as u16,
                (all >> 48) as u16,
            ];
            // SAFETY: items and weights at offsets below n are covered by the contract and
            // every row is inside `src`; masked-off lanes are not accessed; the lookahead item
            // is only prefetched.
            unsafe {
                let mut acc = [_mm512_setzero_ps(); 4];
                for a in start..end {
                    if j0 == 0 {
                        if let Some(&ahead) = items.get(a + prefetch) {
                            prefetch_read(
                                sp.wrapping_add(ahead as usize * dim) as *const u8,
                                dim * 4,
                            );
                        }
                    }
                    let w = _mm512_set1_ps(*weights.get_unchecked(a));
                    let row = sp.add(*items.get_unchecked(a) as usize * dim + j0);
                    let x0 = _mm512_maskz_loadu_ps(m[0], row);
                    let x1 = _mm512_maskz_loadu_ps(m[1], row.wrapping_add(16));
                    let x2 = _mm512_maskz_loadu_ps(m[2], row.wrapping_add(32));
                    let x3 = _mm512_maskz_loadu_ps(m[3], row.wrapping_add(48));
                    acc[0] = _mm512_fmadd_ps(w, x0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(w, x1, acc[1]);
                    acc[2] = _mm512_fmadd_ps(w, x2, acc[2]);
                    acc[3] = _mm512_fmadd_ps(w, x3, acc[3]);
                }
                let o = out.add(j0);
                _mm512_mask_storeu_ps(o, m[0], acc[0]);
                _mm512_mask_storeu_ps(o.wrapping_add(16), m[1], acc[1]);
                _mm512_mask_storeu_ps(o.wrapping_add(32), m[2], acc[2]);
                _mm512_mask_storeu_ps(o.wrapping_add(48), m[3], acc[3]);
            }
            j0 += width;
        }
    }
}

/// # Safety
/// [`ScatterAddFn`](super::ScatterAddFn)'s contract; the CPU has AVX-512 F.
#[allow(clippy::too_many_arguments)] // the kernel signature: slices and sizes
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn scatter_add(
    src: &[f32],
    dim: usize,
    items: &[u32],
    weights: &[f32],
    dst_rows: &[usize],
    count: usize,
    dst: &mut [f32],
    prefetch: usize,
) {
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    let tail: __mmask16 = ((1u32 << (dim % 16)) - 1) as u16;
    for a in 0..count {
        if let (Some(&s), Some(&d)) = (items.get(a + prefetch), dst_rows.get(a + prefetch)) {
            prefetch_read(sp.wrapping_add(s as usize * dim) as *const u8, dim * 4);
            prefetch_read(dp.wrapping_add(d * dim) as *const u8, dim * 4);
        }
        // SAFETY: a < count, inside items/weights/dst_rows; the rows are inside `src` and
        // `dst` by the contract; every access stays within `j..dim`, the tail masked.
        unsafe {
            let w = _mm512_set1_ps(*weights.get_unchecked(a));
            let s = sp.add(*items.get_unchecked(a) as usize * dim);
            let d = dp.add(*dst_rows.get_unchecked(a) * dim);
            let mut j = 0;
            while j + 64 <= dim {
                let x0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(s.add(j)), _mm512_loadu_ps(d.add(j)));
                let x1 = _mm512_fmadd_ps(
                    w,
                    _mm512_loadu_ps(s.add(j + 16)),
                    _mm512_loadu_ps(d.add(j + 16)),
                );
                let x2 = _mm512_fmadd_ps(
                    w,
                    _mm512_loadu_ps(s.add(j + 32)),
                    _mm512_loadu_ps(d.add(j + 32)),
                );
                let x3 = _mm512_fmadd_ps(
                    w,
                    _mm512_loadu_ps(s.add(j + 48)),
                    _mm512_loadu_ps(d.add(j + 48)),
                );
                _mm512_storeu_ps(d.add(j), x0);
                _mm512_storeu_ps(d.add(j + 16), x1);
                _mm512_storeu_ps(d.add(j + 32), x2);
                _mm512_storeu_ps(d.add(j + 48), x3);
                j += 64;
            }
            while j + 16 <= dim {
                let x = _mm512_fmadd_ps(w, _mm512_loadu_ps(s.add(j)), _mm512_loadu_ps(d.add(j)));
                _mm512_storeu_ps(d.add(j), x);
                j += 16;
            }
            if j < dim {
                let x = _mm512_fmadd_ps(
                    w,
                    _mm512_maskz_loadu_ps(tail, s.add(j)),
                    _mm512_maskz_loadu_ps(tail, d.add(j)),
                );
                _mm512_mask_storeu_ps(d.add(j), tail, x);
            }
        }
    }
}
