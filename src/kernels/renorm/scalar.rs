//! The reference: one element at a time, the 16 lanes in an array. Every other renorm kernel
//! must produce the same bits. [`norm_p`] (general p) is used by every level.

use super::{drive, NormKind, RenormJob, RowOps};
use crate::dtype::Element;

/// The lane accumulators of a row for p = 1, 2 or ∞, and whether any element is NaN.
pub(crate) fn lanes<T: Element>(row: &[T], kind: NormKind) -> ([f32; 16], bool) {
    let mut lanes = [0.0f32; 16];
    let mut any_nan = false;
    for (j, x) in row.iter().enumerate() {
        let x = x.to_f32();
        let l = &mut lanes[j % 16];
        match kind {
            NormKind::L1 => *l += x.abs(),
            NormKind::L2 => *l += x * x,
            NormKind::Inf => {
                any_nan |= x.is_nan();
                *l = l.max(x.abs());
            }
            NormKind::P(_) => unreachable!("general p goes through norm_p"),
        }
    }
    (lanes, any_nan)
}

/// The p-norm of a row for p = 1, 2 or ∞ (through [`super::finish`]) or any p.
#[cfg(test)]
pub(crate) fn norm<T: Element>(row: &[T], kind: NormKind) -> f32 {
    match kind {
        NormKind::P(p) => norm_p(row, p),
        _ => {
            let (l, nan) = lanes(row, kind);
            super::finish(kind, l, nan)
        }
    }
}

/// The general p-norm, `(Σ |x|^p)^(1/p)`, in f32 like PyTorch's `NormOps`: the powers summed
/// in the 16 lanes and [`super::reduce16`], then raised to `1/p` (itself an f32).
pub fn norm_p<T: Element>(row: &[T], p: f32) -> f32 {
    let mut lanes = [0.0f32; 16];
    for (j, x) in row.iter().enumerate() {
        lanes[j % 16] += x.to_f32().abs().powf(p);
    }
    super::reduce16(lanes).powf(1.0 / p)
}

/// The reference operations.
pub(crate) struct Scalar;

// SAFETY: plain Rust, no instruction-set requirement.
unsafe impl<T: Element> RowOps<T> for Scalar {
    #[inline(always)]
    unsafe fn lanes(src: *const T, dim: usize, kind: NormKind) -> ([f32; 16], bool) {
        // SAFETY: the caller makes `src` readable for `dim` elements.
        lanes(unsafe { std::slice::from_raw_parts(src, dim) }, kind)
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
        for j in 0..dim {
            // SAFETY: the caller makes every pointer valid for `dim` elements; each element
            // is read before the same element of `table` (possibly `src`) is written.
            unsafe {
                let v = T::from_f32((*src.add(j)).to_f32() * scale);
                if !table.is_null() {
                    *table.add(j) = v;
                }
                if !out.is_null() {
                    if out_f32 {
                        *(out as *mut f32).add(j) = v.to_f32();
                    } else {
                        *(out as *mut T).add(j) = v;
                    }
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn copy(src: *const T, dim: usize, out: *mut u8, out_f32: bool) {
        for j in 0..dim {
            // SAFETY: the caller makes both pointers valid for `dim` elements.
            unsafe {
                let v = *src.add(j);
                if out_f32 {
                    *(out as *mut f32).add(j) = v.to_f32();
                } else {
                    *(out as *mut T).add(j) = v;
                }
            }
        }
    }
}

/// # Safety
/// [`RenormRowsFn`](super::RenormRowsFn)'s contract, `T` being the table's dtype.
pub(crate) unsafe fn renorm_rows<T: Element>(
    job: &RenormJob,
    rows: &[usize],
    slots: &[usize],
    count: usize,
) {
    // SAFETY: forwarded contract; the scalar operations need no instruction set.
    unsafe { drive::<T, Scalar>(job, rows, slots, count) }
}
