//! aarch64 NEON gather kernels: 16-byte vectors for copies, a widen-and-shift for bf16. f16
//! uses the portable kernel (stable Rust has no f16 vector type on aarch64 yet).

use std::arch::aarch64::*;

use crate::kernels::prefetch_read;

/// # Safety
/// [`CopyRowsFn`](super::CopyRowsFn)'s contract; the CPU has NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn copy_rows(
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
        // each access stays within `off..row_bytes` of the row.
        unsafe {
            let src = base.add(*rows.get_unchecked(i) * row_bytes);
            let dst = out.as_mut_ptr().add(i * row_bytes);
            let mut off = 0;
            while off + 64 <= row_bytes {
                let v = vld1q_u8_x4(src.add(off));
                vst1q_u8_x4(dst.add(off), v);
                off += 64;
            }
            while off + 16 <= row_bytes {
                vst1q_u8(dst.add(off), vld1q_u8(src.add(off)));
                off += 16;
            }
            while off < row_bytes {
                *dst.add(off) = *src.add(off);
                off += 1;
            }
        }
    }
}

/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract; the CPU has NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn bf16_rows_to_f32(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    prefetch: usize,
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
            while j + 8 <= dim {
                let h = vld1q_u16(src.add(j));
                let lo = vshll_n_u16::<16>(vget_low_u16(h));
                let hi = vshll_n_u16::<16>(vget_high_u16(h));
                vst1q_f32(dst.add(j), vreinterpretq_f32_u32(lo));
                vst1q_f32(dst.add(j + 4), vreinterpretq_f32_u32(hi));
                j += 8;
            }
            while j < dim {
                *dst.add(j) = super::scalar::bf16_to_f32(*src.add(j));
                j += 1;
            }
        }
    }
}
