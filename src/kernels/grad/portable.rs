//! Portable kernel: any CPU. Columns are reduced in blocks of 32 held in registers (four
//! groups of eight lanes) while the segment's rows stream past, with `f32::mul_add` per lane.
//! Where the target has fused multiply-add (aarch64 always, x86_64 with FMA enabled at
//! compile time) this compiles to vector FMA instructions; elsewhere `mul_add` is a correct
//! but slower library call (on x86_64 the AVX2 or AVX-512 kernel is picked before this one).
//! The last `dim % 8` columns go through the scalar expression.

use crate::kernels::prefetch_read;

/// Lanes per group, and groups per register block.
const LANES: usize = 8;
const GROUPS: usize = 4;

/// # Safety
/// [`ReduceSegmentsFn`](super::ReduceSegmentsFn)'s contract.
#[allow(clippy::too_many_arguments)] // the kernel signature: slices and sizes
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
    let vec_cols = dim / LANES * LANES;
    let prefetch = |a: usize| {
        if let Some(&ahead) = items.get(a + prefetch) {
            prefetch_read(sp.wrapping_add(ahead as usize * dim) as *const u8, dim * 4);
        }
    };
    for (k, b) in bounds.windows(2).enumerate() {
        let (start, end) = ((b[0] - base) as usize, (b[1] - base) as usize);
        // SAFETY: the contract puts dst_rows[k] inside `dst`.
        let out = unsafe { dst.as_mut_ptr().add(*dst_rows.get_unchecked(k) * dim) };
        let mut j0 = 0;
        while j0 < vec_cols {
            let groups = ((vec_cols - j0) / LANES).min(GROUPS);
            let mut acc = [[0.0f32; LANES]; GROUPS];
            for a in start..end {
                if j0 == 0 {
                    prefetch(a);
                }
                // SAFETY: a < n <= items.len(), weights.len(); items are inside `src`, and the
                // columns j0 .. j0 + groups * LANES are below vec_cols <= dim.
                unsafe {
                    let w = *weights.get_unchecked(a);
                    let row = sp.add(*items.get_unchecked(a) as usize * dim + j0);
                    for (g, acc) in acc.iter_mut().enumerate().take(groups) {
                        let x = std::ptr::read_unaligned(row.add(g * LANES) as *const [f32; LANES]);
                        for (acc, x) in acc.iter_mut().zip(x) {
                            *acc = w.mul_add(x, *acc);
                        }
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate().take(groups) {
                // SAFETY: as above, inside the destination row.
                unsafe {
                    std::ptr::write_unaligned(out.add(j0 + g * LANES) as *mut [f32; LANES], *acc)
                };
            }
            j0 += groups * LANES;
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
/// [`ScatterAddFn`](super::ScatterAddFn)'s contract.
#[allow(clippy::too_many_arguments)] // the kernel signature: slices and sizes
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
        // `dst` by the contract, and do not overlap (one is the caller's shared slice, the
        // other its exclusive one).
        let (w, s, d) = unsafe {
            let s = std::slice::from_raw_parts(sp.add(*items.get_unchecked(a) as usize * dim), dim);
            let d = std::slice::from_raw_parts_mut(dp.add(*dst_rows.get_unchecked(a) * dim), dim);
            (*weights.get_unchecked(a), s, d)
        };
        let mut sc = s.chunks_exact(LANES);
        let mut dc = d.chunks_exact_mut(LANES);
        for (s, d) in (&mut sc).zip(&mut dc) {
            for (d, &s) in d.iter_mut().zip(s) {
                *d = w.mul_add(s, *d);
            }
        }
        for (d, &s) in dc.into_remainder().iter_mut().zip(sc.remainder()) {
            *d = w.mul_add(s, *d);
        }
    }
}
