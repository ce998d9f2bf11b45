//! Portable kernels on `wide` vectors (8 lanes): any CPU, with prefetch where the target has
//! a prefetch instruction. Row copies use the platform `memcpy`, which is already vectorised.

use bytemuck::cast;
use wide::{f32x8, u32x8};

use crate::kernels::prefetch_read;

/// # Safety
/// [`CopyRowsFn`](super::CopyRowsFn)'s contract.
pub(super) unsafe fn copy_rows(
    table: &[u8],
    row_bytes: usize,
    rows: &[usize],
    count: usize,
    out: &mut [u8],
    prefetch: usize,
) {
    for i in 0..count {
        if let Some(&ahead) = rows.get(i + prefetch) {
            prefetch_read(table.as_ptr().wrapping_add(ahead * row_bytes), row_bytes);
        }
        // SAFETY: the contract puts every row inside the table and `count` rows inside `out`.
        unsafe {
            let src = table.as_ptr().add(*rows.get_unchecked(i) * row_bytes);
            let dst = out.as_mut_ptr().add(i * row_bytes);
            std::ptr::copy_nonoverlapping(src, dst, row_bytes);
        }
    }
}

/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract.
pub(super) unsafe fn f16_rows_to_f32(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    prefetch: usize,
) {
    // SAFETY: forwarded contract.
    unsafe {
        widen_rows(
            table,
            dim,
            rows,
            count,
            out,
            prefetch,
            f16x8_to_f32x8,
            |h| half::f16::from_bits(h).to_f32(),
        )
    }
}

/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract.
pub(super) unsafe fn bf16_rows_to_f32(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    prefetch: usize,
) {
    // SAFETY: forwarded contract.
    unsafe {
        widen_rows(
            table,
            dim,
            rows,
            count,
            out,
            prefetch,
            |h| h << 16u32,
            super::scalar::bf16_to_f32,
        )
    }
}

/// The shared loop: 8 lanes at a time through `vector`, the tail through `scalar`.
///
/// # Safety
/// [`WidenRowsFn`](super::WidenRowsFn)'s contract.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // the kernel contract plus two conversions
unsafe fn widen_rows(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    prefetch: usize,
    vector: impl Fn(u32x8) -> u32x8,
    scalar: impl Fn(u16) -> f32,
) {
    for i in 0..count {
        if let Some(&ahead) = rows.get(i + prefetch) {
            prefetch_read(
                table.as_ptr().wrapping_add(ahead * dim) as *const u8,
                dim * 2,
            );
        }
        // SAFETY: the contract puts every row inside the table and `count` rows inside `out`.
        let (src, dst) = unsafe {
            let r = *rows.get_unchecked(i);
            (
                table.get_unchecked(r * dim..(r + 1) * dim),
                out.get_unchecked_mut(i * dim..(i + 1) * dim),
            )
        };
        let mut src_chunks = src.chunks_exact(8);
        let mut dst_chunks = dst.chunks_exact_mut(8);
        for (s, d) in (&mut src_chunks).zip(&mut dst_chunks) {
            let h = u32x8::new(std::array::from_fn(|k| s[k] as u32));
            let f: [f32; 8] = cast(vector(h));
            d.copy_from_slice(&f);
        }
        for (s, d) in src_chunks
            .remainder()
            .iter()
            .zip(dst_chunks.into_remainder())
        {
            *d = scalar(*s);
        }
    }
}

/// f16 bits (in the low half of each lane) to f32 bits, exactly as the hardware converts:
/// normals and subnormals by rescaling the exponent, infinities kept, NaNs quieted.
#[inline(always)]
fn f16x8_to_f32x8(h: u32x8) -> u32x8 {
    let sign = (h & u32x8::splat(0x8000)) << 16u32;
    let magnitude = h & u32x8::splat(0x7fff);
    // Shifting the 15 magnitude bits into f32 position gives a value 2^-112 too small,
    // subnormals included; one multiply rescales it exactly.
    let shifted: f32x8 = cast(magnitude << 13u32);
    let finite: u32x8 = cast(shifted * f32x8::splat(f32::from_bits(0x7780_0000))); // 2^112
    let inf_or_nan = magnitude.simd_ge(u32x8::splat(0x7c00));
    let nan_quiet = magnitude.simd_gt(u32x8::splat(0x7c00)) & u32x8::splat(0x0040_0000);
    let special = (magnitude << 13u32) | u32x8::splat(0x7f80_0000) | nan_quiet;
    inf_or_nan.bitselect(special, finite) | sign
}
