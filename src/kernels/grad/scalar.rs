//! The reference: one element at a time, bounds-checked, no prefetch, `f32::mul_add` (a true
//! fused multiply-add on every target). Every other gradient kernel must produce the same bits.

/// # Safety
/// None beyond [`ReduceSegmentsFn`](super::ReduceSegmentsFn)'s contract; this reference
/// checks bounds.
#[allow(clippy::too_many_arguments)] // the kernel signature: slices and sizes
pub(crate) unsafe fn reduce_segments(
    src: &[f32],
    dim: usize,
    items: &[u32],
    weights: &[f32],
    bounds: &[u32],
    dst_rows: &[usize],
    dst: &mut [f32],
    _prefetch: usize,
) {
    let base = bounds[0];
    for (k, b) in bounds.windows(2).enumerate() {
        let (start, end) = ((b[0] - base) as usize, (b[1] - base) as usize);
        let out = &mut dst[dst_rows[k] * dim..(dst_rows[k] + 1) * dim];
        for (j, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for a in start..end {
                acc = weights[a].mul_add(src[items[a] as usize * dim + j], acc);
            }
            *o = acc;
        }
    }
}

/// # Safety
/// None beyond [`ScatterAddFn`](super::ScatterAddFn)'s contract; this reference checks
/// bounds.
#[allow(clippy::too_many_arguments)] // the kernel signature: slices and sizes
pub(crate) unsafe fn scatter_add(
    src: &[f32],
    dim: usize,
    items: &[u32],
    weights: &[f32],
    dst_rows: &[usize],
    count: usize,
    dst: &mut [f32],
    _prefetch: usize,
) {
    for a in 0..count {
        let (s, d) = (items[a] as usize * dim, dst_rows[a] * dim);
        for j in 0..dim {
            dst[d + j] = weights[a].mul_add(src[s + j], dst[d + j]);
        }
    }
}
