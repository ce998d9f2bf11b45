//! AVX2 gradient kernel: columns in blocks of 32 (four 8-lane vectors held in registers while
//! the segment's rows stream past), the last `dim % 8` columns through the scalar expression
//! (AVX2's masked stores are slow on some CPUs). One fused multiply-add per element, as the
//! scalar reference (`f32::mul_add` compiles to `vfmadd` inside this FMA function).

use std::arch::x86_64::*;

use crate::kernels::prefetch_read;

/// # Safety
/// [`ReduceSegmentsFn`](super::ReduceSegmentsFn)'s contract; the CPU has AVX2 and FMA.
#[allow(clippy::too_many_arguments)] // the kernel signature: slices and sizes
#[target_feature(enable = "avx2,fma")]
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
    let vec_cols = dim / 8 * 8;
    for (k, b) in bounds.windows(2).enumerate() {
        let (start, end) = ((b[0] - base) as usize, (b[1] - base) as usize);
        // SAFETY: the contract puts dst_rows[k] inside `dst`.
        let out = unsafe { dst.as_mut_ptr().add(*dst_rows.get_unchecked(k) * dim) };
        // Prefetch on the first pass over the segment, whichever loop makes it.
        let prefetch = |a: usize| {
            if let Some(&ahead) = items.get(a + prefetch) {
                prefetch_read(sp.wrapping_add(ahead as usize * dim) as *const u8, dim * 4);
            }
        };
        let mut j0 = 0;
        while j0 < vec_cols {
            let nv = ((vec_cols - j0) / 8).min(4);
            // SAFETY: items and weights at offsets below n are covered by the contract and
            // every row is inside `src`; vectors past `nv` are neither loaded nor stored.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 4];
                for a in start..end {
                    if j0 == 0 {
                        prefetch(a);
                    }
                    let w = _mm256_set1_ps(*weights.get_unchecked(a));
                    let row = sp.add(*items.get_unchecked(a) as usize * dim + j0);
                    if nv == 4 {
                        let x0 = _mm256_loadu_ps(row);
                        let x1 = _mm256_loadu_ps(row.add(8));
                        let x2 = _mm256_loadu_ps(row.add(16));
                        let x3 = _mm256_loadu_ps(row.add(24));
                        acc[0] = _mm256_fmadd_ps(w, x0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(w, x1, acc[1]);
                        acc[2] = _mm256_fmadd_ps(w, x2, acc[2]);
                        acc[3] = _mm256_fmadd_ps(w, x3, acc[3]);
                    } else {
                        for (v, acc) in acc.iter_mut().enumerate().take(nv) {
                            let x = _mm256_loadu_ps(row.add(v * 8));
                            *acc = _mm256_fmadd_ps(w, x, *acc);
                        }
                    }
                }
                for (v, acc) in acc.iter().enumerate().take(nv) {
                    _mm256_storeu_ps(out.add(j0 + v * 8), *acc);
                }
            }
            j0 += nv * 8;
        }
        for j in vec_cols..dim {
            let mut acc = 0.0f32;
            for a in start..end {
                if vec_cols == 0 && j == 0 {
                    prefetch(a);
                }
                // SAFETY: as above; j < dim.
                unsafe {
                    acc = weights
                        .get_unchecked(a)
                        .mul_add(*sp.add(*items.get_unchecked(a) as usize * dim + j), acc);
                }
            }
            // SAFETY: j < dim, inside the destination row.
            unsafe { *out.add(j) = acc };
        }
    }
}

/// # Safety
/// [`ScatterAddFn`](super::ScatterAddFn)'s contract; the CPU has AVX2 and FMA.
#[allow(clippy::too_many_arguments)] // the kernel signature: slices and sizes
#[target_feature(enable = "avx2,fma")]
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
    for a in 0..count {
        if let (Some(&s), Some(&d)) = (items.get(a + prefetch), dst_rows.get(a + prefetch)) {
            prefetch_read(sp.wrapping_add(s as usize * dim) as *const u8, dim * 4);
            prefetch_read(dp.wrapping_add(d * dim) as *const u8, dim * 4);
        }
        // SAFETY: a < count, inside items/weights/dst_rows; the rows are inside `src` and
        // `dst` by the contract; every access stays within `j..dim`.
        unsafe {
            let wf = *weights.get_unchecked(a);
            let w = _mm256_set1_ps(wf);
            let s = sp.add(*items.get_unchecked(a) as usize * dim);
            let d = dp.add(*dst_rows.get_unchecked(a) * dim);
            let mut j = 0;
            while j + 32 <= dim {
                let x0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(s.add(j)), _mm256_loadu_ps(d.add(j)));
                let x1 = _mm256_fmadd_ps(
                    w,
                    _mm256_loadu_ps(s.add(j + 8)),
                    _mm256_loadu_ps(d.add(j + 8)),
                );
                let x2 = _mm256_fmadd_ps(
                    w,
                    _mm256_loadu_ps(s.add(j + 16)),
                    _mm256_loadu_ps(d.add(j + 16)),
                );
                let x3 = _mm256_fmadd_ps(
                    w,
                    _mm256_loadu_ps(s.add(j + 24)),
                    _mm256_loadu_ps(d.add(j + 24)),
                );
                _mm256_storeu_ps(d.add(j), x0);
                _mm256_storeu_ps(d.add(j + 8), x1);
                _mm256_storeu_ps(d.add(j + 16), x2);
                _mm256_storeu_ps(d.add(j + 24), x3);
                j += 32;
            }
            while j + 8 <= dim {
                let x = _mm256_fmadd_ps(w, _mm256_loadu_ps(s.add(j)), _mm256_loadu_ps(d.add(j)));
                _mm256_storeu_ps(d.add(j), x);
                j += 8;
            }
            while j < dim {
                *d.add(j) = wf.mul_add(*s.add(j), *d.add(j));
                j += 1;
            }
        }
    }
}
