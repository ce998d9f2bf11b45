//! Portable renorm kernels on `wide` vectors: the 16 lanes are two `f32x8`, elements are
//! widened 16 at a time into an f32 buffer, writes go element by element through the reference.

use wide::f32x8;

use super::{drive, NormKind, RenormJob, RowOps};
use crate::dtype::Element;
use half::{bf16, f16};

/// # Safety
/// [`RenormRowsFn`](super::RenormRowsFn)'s contract.
pub(super) unsafe fn renorm_f32(job: &RenormJob, rows: &[usize], slots: &[usize], count: usize) {
    // SAFETY: forwarded contract.
    unsafe { drive::<f32, Portable>(job, rows, slots, count) }
}

/// # Safety
/// [`RenormRowsFn`](super::RenormRowsFn)'s contract.
pub(super) unsafe fn renorm_f16(job: &RenormJob, rows: &[usize], slots: &[usize], count: usize) {
    // SAFETY: forwarded contract.
    unsafe { drive::<f16, Portable>(job, rows, slots, count) }
}

/// # Safety
/// [`RenormRowsFn`](super::RenormRowsFn)'s contract.
pub(super) unsafe fn renorm_bf16(job: &RenormJob, rows: &[usize], slots: &[usize], count: usize) {
    // SAFETY: forwarded contract.
    unsafe { drive::<bf16, Portable>(job, rows, slots, count) }
}

/// The portable row operations.
struct Portable;

// SAFETY: plain Rust and `wide`, no instruction-set requirement.
unsafe impl<T: Element> RowOps<T> for Portable {
    #[inline(always)]
    unsafe fn lanes(src: *const T, dim: usize, kind: NormKind) -> ([f32; 16], bool) {
        // SAFETY: the caller makes `src` readable for `dim` elements.
        let row = unsafe { std::slice::from_raw_parts(src, dim) };
        let mut lo = f32x8::ZERO;
        let mut hi = f32x8::ZERO;
        let mut nan = f32x8::ZERO;
        let step = |acc: f32x8, x: f32x8, nan: &mut f32x8| match kind {
            NormKind::L1 => acc + x.abs(),
            NormKind::L2 => acc + x * x,
            _ => {
                *nan |= x.is_nan();
                acc.fast_max(x.abs())
            }
        };
        for group in row.chunks(16) {
            // Zeros past the row's end add nothing to any lane.
            let mut buf = [0.0f32; 16];
            for (b, x) in buf.iter_mut().zip(group) {
                *b = x.to_f32();
            }
            let a: [f32; 8] = buf[..8].try_into().expect("8 lanes");
            let b: [f32; 8] = buf[8..].try_into().expect("8 lanes");
            lo = step(lo, f32x8::from(a), &mut nan);
            hi = step(hi, f32x8::from(b), &mut nan);
        }
        let mut lanes = [0.0f32; 16];
        lanes[..8].copy_from_slice(&lo.to_array());
        lanes[8..].copy_from_slice(&hi.to_array());
        (lanes, nan.any())
    }

    #[inline(always)]
    unsafe fn scale(
        src: *const T,
        dim: usize,
        scale: f32,
        table: *mut T,
        out: *mut u8,
        out_f32: bool,
    ) {
        // SAFETY: forwarded contract; the reference writes element by element.
        unsafe { <super::scalar::Scalar as RowOps<T>>::scale(src, dim, scale, table, out, out_f32) }
    }

    #[inline(always)]
    unsafe fn copy(src: *const T, dim: usize, out: *mut u8, out_f32: bool) {
        // SAFETY: forwarded contract.
        unsafe {
            if !out_f32 || std::mem::size_of::<T>() == 4 {
                std::ptr::copy_nonoverlapping(
                    src as *const u8,
                    out,
                    dim * std::mem::size_of::<T>(),
                );
            } else {
                <super::scalar::Scalar as RowOps<T>>::copy(src, dim, out, out_f32)
            }
        }
    }
}
