//! The reference: one element at a time, bounds-checked, no prefetch. Every other gather
//! kernel must produce the same bits.

use half::f16;

/// # Safety
/// None beyond [`CopyRowsFn`](super::CopyRowsFn)'s contract; this reference checks bounds.
pub(crate) unsafe fn copy_rows(
    table: &[u8],
    row_bytes: usize,
    rows: &[usize],
    count: usize,
    out: &mut [u8],
    _prefetch: usize,
) {
    for (i, &r) in rows[..count].iter().enumerate() {
        for j in 0..row_bytes {
            out[i * row_bytes + j] = table[r * row_bytes + j];
        }
    }
}

/// # Safety
/// None beyond [`WidenRowsFn`](super::WidenRowsFn)'s contract; this reference checks bounds.
pub(crate) unsafe fn f16_rows_to_f32(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    _prefetch: usize,
) {
    for (i, &r) in rows[..count].iter().enumerate() {
        for j in 0..dim {
            out[i * dim + j] = f16::from_bits(table[r * dim + j]).to_f32();
        }
    }
}

/// bf16 is the top half of an f32: widening is a shift, NaN payloads kept bit for bit (as
/// PyTorch's `c10::BFloat16` does).
///
/// # Safety
/// None beyond [`WidenRowsFn`](super::WidenRowsFn)'s contract; this reference checks bounds.
pub(crate) unsafe fn bf16_rows_to_f32(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    _prefetch: usize,
) {
    for (i, &r) in rows[..count].iter().enumerate() {
        for j in 0..dim {
            out[i * dim + j] = bf16_to_f32(table[r * dim + j]);
        }
    }
}

/// bf16 bits to f32, exactly.
#[inline(always)]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}
