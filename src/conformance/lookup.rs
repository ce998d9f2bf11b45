//! `op = embedding` without `max_norm`: a plain lookup, compared bit for bit.

use super::{check_exact, Case, CaseReport, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::table::formats::TensorDType;

pub(super) fn run(case: &Case, report: &mut CaseReport) -> Result<()> {
    let weight = case.tensor("weight")?;
    let indices = case.tensor("indices")?;
    let idx = indices.to_i64()?;
    let padding = case.meta_i64("padding_idx")?;
    let table = weight.to_table()?;
    let result = match padding {
        Some(p) => table.with_padding_idx(p),
        None => Ok(table),
    }
    .and_then(|table| Ok((lookup_native(&table, &idx)?, table.dtype(), table.dim())));
    let Some((out, dtype, dim)) = report.settle(case, result) else {
        return Ok(());
    };
    let out = Tensor {
        dtype: TensorDType::Float(dtype),
        shape: crate::output_shape(&indices.shape, dim),
        data: out,
    };
    if let Some(want) = report.expected(case, "out") {
        check_exact(report, "out", &out, want);
    }
    report.produced.push(("out".into(), out));
    Ok(())
}

/// A lookup in the table's own dtype, as bytes.
fn lookup_native(table: &crate::Table<'_>, idx: &[i64]) -> Result<Vec<u8>> {
    use half::{bf16, f16};
    Ok(match table.dtype() {
        DType::F32 => bytemuck::cast_slice(&table.lookup::<_, f32>(idx)?).to_vec(),
        DType::F16 => bytemuck::cast_slice(&table.lookup::<_, f16>(idx)?).to_vec(),
        DType::BF16 => bytemuck::cast_slice(&table.lookup::<_, bf16>(idx)?).to_vec(),
    })
}
