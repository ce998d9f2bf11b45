//! `op = embedding` with `max_norm`: the lookup with PyTorch's in-place renorm.
//!
//! Each case runs twice: in place (the output must match `out`, the table afterwards
//! `weight_after`) and output only (the output must equal the in-place output bit for bit,
//! and the table must be left bit for bit as it was). f16 and bf16 values must be equal
//! (PyTorch's roundings of the norm and of the scale to the table's dtype are reproduced);
//! f32 values within a relative [`F32_RTOL`], as the norm's summation order differs from
//! PyTorch's (whose order depends on the instruction set it was built for).

use half::{bf16, f16};

use super::{check_close, check_exact, check_ulps, Case, CaseReport, Tensor};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::ops::renorm::MaxNorm;
use crate::table::formats::TensorDType;
use crate::table::Table;

/// Relative tolerance for f32 values.
const F32_RTOL: f32 = 2e-6;
/// Units in the last place allowed for f16 and bf16 values.
const HALF_ULPS: u32 = 0;

/// Run a lookup closure into a buffer of the table's own dtype; the buffer's bytes.
macro_rules! by_dtype {
    ($dtype:expr, $len:expr, |$o:ident| $call:expr) => {
        match $dtype {
            DType::F32 => native::<f32>($len, |$o| $call),
            DType::F16 => native::<f16>($len, |$o| $call),
            DType::BF16 => native::<bf16>($len, |$o| $call),
        }
    };
}

pub(super) fn run(case: &Case, report: &mut CaseReport) -> Result<()> {
    let weight = case.tensor("weight")?;
    let indices = case.tensor("indices")?;
    let idx = indices.to_i64()?;
    let padding = case.meta_i64("padding_idx")?;
    // A missing max_norm is NaN, which MaxNorm refuses.
    let max_norm = case.meta_f64("max_norm")?.unwrap_or(f64::NAN);
    let norm_type = case.meta_f64("norm_type")?.unwrap_or(2.0);
    let open = || -> Result<Table<'static>> {
        let table = weight.to_table()?;
        match padding {
            Some(p) => table.with_padding_idx(p),
            None => Ok(table),
        }
    };

    // In place, as PyTorch does it.
    let in_place = MaxNorm::new(max_norm)
        .and_then(|m| m.with_norm_type(norm_type))
        .and_then(|m| {
            let mut table = open()?;
            let len = idx.len() * table.dim();
            let out = by_dtype!(table.dtype(), len, |o| table
                .lookup_renorm_in_place(&idx, o, m))?;
            Ok((out, table, m))
        });
    let Some((out, table, m)) = report.settle(case, in_place) else {
        return Ok(());
    };
    let dtype = TensorDType::Float(table.dtype());
    let out = Tensor {
        dtype: dtype.clone(),
        shape: crate::output_shape(&indices.shape, table.dim()),
        data: out,
    };
    let after = Tensor {
        dtype,
        shape: weight.shape.clone(),
        data: table.as_bytes().to_vec(),
    };
    if let Some(want) = report.expected(case, "out") {
        compare(report, "out (in place)", &out, want)?;
    }
    if let Some(want) = report.expected(case, "weight_after") {
        compare(report, "weight_after", &after, want)?;
    }

    // Output only: the same output, the table untouched.
    let table = open()?;
    let len = idx.len() * table.dim();
    let only = by_dtype!(table.dtype(), len, |o| table
        .lookup_renorm_output_only(&idx, o, m))?;
    let only = Tensor {
        data: only,
        ..out.clone()
    };
    check_exact(report, "out (output only) against in place", &only, &out);
    let untouched = Tensor {
        data: table.as_bytes().to_vec(),
        ..weight.clone()
    };
    check_exact(report, "table after output only", &untouched, weight);

    report.produced.push(("out".into(), out));
    report.produced.push(("weight_after".into(), after));
    Ok(())
}

/// Compare within the dtype's tolerance.
fn compare(report: &mut CaseReport, what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    if got.shape != want.shape || got.dtype != want.dtype {
        check_exact(report, what, got, want);
        return Ok(());
    }
    match got.float_dtype()? {
        DType::F32 => check_close(report, what, &got.to_f32()?, &want.to_f32()?, F32_RTOL, 0.0),
        DType::F16 | DType::BF16 => check_ulps(report, what, got, want, HALF_ULPS),
    }
    Ok(())
}

/// Run `f` on a fresh output buffer of `len` elements of `T`; the buffer's bytes.
fn native<T: Element>(len: usize, f: impl FnOnce(&mut [T]) -> Result<()>) -> Result<Vec<u8>> {
    let mut out = vec![T::default(); len];
    f(&mut out)?;
    Ok(bytemuck::cast_slice(&out).to_vec())
}
