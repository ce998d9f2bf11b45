//! Naive references, written from the definitions, independent of the library's code.

/// The dtypes a table holds, as the references see them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    /// f32.
    F32,
    /// f16.
    F16,
    /// bf16.
    Bf16,
}

impl Ty {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Ty::F32 => 4,
            Ty::F16 | Ty::Bf16 => 2,
        }
    }
}

/// An index's value as the reference sees it: widened exactly by the language's `as`, not by
/// the library's `Index` conversion under test.
pub trait Widen: Copy {
    /// The exact value.
    fn exact(self) -> i128;
}
macro_rules! widen {
    ($($t:ty),*) => {$(impl Widen for $t { fn exact(self) -> i128 { self as i128 } })*};
}
widen!(i32, i64, u32, u64, usize);

/// IEEE half precision bits to f32, from the bit layout: exact for every finite value, NaNs
/// quieted with their payload kept (as F16C and the `half` crate do).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let negative = h & 0x8000 != 0;
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = (h & 0x3ff) as u32;
    match exp {
        0 => {
            // Zero or subnormal: man × 2^-24, exact in f32.
            let v = man as f32 * (2.0f32).powi(-24);
            if negative {
                -v
            } else {
                v
            }
        }
        31 if man == 0 => f32::from_bits(sign | 0x7f80_0000),
        31 => f32::from_bits(sign | 0x7fc0_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp as u32 + 127 - 15) << 23) | (man << 13)),
    }
}

/// bfloat16 bits to f32: the top half of an f32, NaN payloads kept.
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// PyTorch's `padding_idx` rule: `-rows <= p < rows`, negative counts from the end.
pub fn normalize_padding_idx(p: i64, rows: usize) -> Option<usize> {
    let (p, r) = (p as i128, rows as i128);
    if (-r..r).contains(&p) {
        Some(if p < 0 { (p + r) as usize } else { p as usize })
    } else {
        None
    }
}

/// The first index outside `0..rows`: `(value, position)`.
pub fn first_bad_index(indices: &[i128], rows: usize) -> Option<(i128, usize)> {
    indices
        .iter()
        .enumerate()
        .find(|(_, &v)| v < 0 || v >= rows as i128)
        .map(|(p, &v)| (v, p))
}

/// `out[i] = table[indices[i]]`, element by element, into bytes of the output dtype: a copy
/// when `widen` is false, f16/bf16 widened to f32 when true. All indices must be valid.
pub fn gather(table: &[u8], ty: Ty, dim: usize, indices: &[i128], widen: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for &i in indices {
        let i = usize::try_from(i).expect("validated index");
        for j in 0..dim {
            let at = (i * dim + j) * ty.size();
            let elem = &table[at..at + ty.size()];
            if !widen {
                out.extend_from_slice(elem);
                continue;
            }
            let bits = u16::from_le_bytes([elem[0], elem[1]]);
            let v = match ty {
                Ty::F16 => f16_bits_to_f32(bits),
                Ty::Bf16 => bf16_bits_to_f32(bits),
                Ty::F32 => unreachable!("f32 is never widened"),
            };
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_reference_agrees_with_half_on_every_pattern() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_bits_to_f32(h);
            assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
        }
    }
}
