//! Portable kernel on `wide` vectors (8 lanes): any CPU. Columns are reduced eight at a time,
//! four vectors per block held in registers while the segment's rows stream past; the last
//! `dim % 8` columns go through the scalar expression.

use wide::f32x8;

use crate::kernels::{prefetch_read, PREFETCH_DISTANCE};

/// Columns per register block: four vectors of eight.
const BLOCK: usize = 32;

/// # Safety
/// [`ReduceSegmentsFn`](super::ReduceSegmentsFn)'s contract.
pub(super) unsafe fn reduce_segments(
    src: &[f32],
    dim: usize,
    items: &[u32],
    weights: &[f32],
    bounds: &[u32],
    dst_rows: &[usize],
    dst: &mut [f32],
) {
    let base = bounds[0];
    let sp = src.as_ptr();
    let vec_cols = dim / 8 * 8;
    for (k, b) in bounds.windows(2).enumerate() {
        let (start, end) = ((b[0] - base) as usize, (b[1] - base) as usize);
        // SAFETY: the contract puts dst_rows[k] inside `dst`.
        let out = unsafe { dst.as_mut_ptr().add(*dst_rows.get_unchecked(k) * dim) };
        let mut j0 = 0;
        while j0 < vec_cols {
            let nv = ((vec_cols - j0) / 8).min(BLOCK / 8);
            let mut acc = [f32x8::ZERO; BLOCK / 8];
            for a in start..end {
                // SAFETY: a < n <= items.len(), weights.len(); items are inside `src`; the
                // lookahead item, when present, is only prefetched.
                unsafe {
                    if j0 == 0 {
                        if let Some(&ahead) = items.get(a + PREFETCH_DISTANCE) {
                            prefetch_read(
                                sp.wrapping_add(ahead as usize * dim) as *const u8,
                                dim * 4,
                            );
                        }
                    }
                    let w = f32x8::splat(*weights.get_unchecked(a));
                    let row = sp.add(*items.get_unchecked(a) as usize * dim + j0);
                    for (v, acc) in acc.iter_mut().enumerate().take(nv) {
                        let x = f32x8::from(std::ptr::read_unaligned(
                            row.add(v * 8) as *const [f32; 8]
                        ));
                        *acc += w * x;
                    }
                }
            }
            for (v, acc) in acc.iter().enumerate().take(nv) {
                // SAFETY: columns j0 + v*8 .. +8 are below vec_cols <= dim, inside the row.
                unsafe {
                    std::ptr::write_unaligned(out.add(j0 + v * 8) as *mut [f32; 8], acc.to_array())
                };
            }
            j0 += nv * 8;
        }
        for j in vec_cols..dim {
            let mut acc = 0.0f32;
            for a in start..end {
                // SAFETY: as above; j < dim.
                unsafe {
                    acc += *weights.get_unchecked(a)
                        * *sp.add(*items.get_unchecked(a) as usize * dim + j);
                }
            }
            // SAFETY: j < dim, inside the destination row.
            unsafe { *out.add(j) = acc };
        }
    }
}
