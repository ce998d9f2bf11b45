//! The element types a table can hold: f32, f16 and bf16.

use std::fmt;

use half::{bf16, f16};

/// The element type of a table or an output, known at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`): the top 16 bits of an f32.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The lowercase name used on the command line and in messages: `f32`, `f16`, `bf16`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            // PyTorch's and numpy's spellings too, as their users type them.
            "f32" | "fp32" | "float32" | "float" | "torch.float32" | "torch.float" => {
                Ok(DType::F32)
            }
            "f16" | "fp16" | "float16" | "half" | "torch.float16" | "torch.half" => Ok(DType::F16),
            "bf16" | "bfloat16" | "torch.bfloat16" => Ok(DType::BF16),
            _ => Err(crate::Error::InvalidArgument(format!(
                "unknown dtype {s:?} (expected f32, f16 or bf16, or fp32, float16, bfloat16, ...)"
            ))),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A table element: `f32`, `half::f16` or `half::bf16`. Sealed: the kernels are written for
/// exactly these three.
pub trait Element:
    sealed::Sealed + bytemuck::Pod + Copy + Default + PartialEq + Send + Sync + fmt::Debug + 'static
{
    /// The run-time tag of this type.
    const DTYPE: DType;
    /// Widen to f32: exact for all three types, bf16 bit for bit (a signalling NaN stays
    /// signalling, as PyTorch's `c10::BFloat16` widens it).
    fn to_f32(self) -> f32;
    /// Round from f32 to nearest, ties to even (as `half` does).
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32. `half`'s own conversion sets the quiet bit of a
        // NaN, which would make a row copied through it differ from the stored bits.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
