//! `op = embedding_bag`: `F.embedding_bag` cases. The library's f32 output is compared with
//! PyTorch's `out` for f32 tables and with `out_f32` (PyTorch on the table widened to f32) for
//! f16/bf16 tables, within [`RTOL`]; for those, the output in the table's own dtype (rounded
//! once) must also be within one unit in the last place of PyTorch's `out`. What is written
//! with `--write` is the f32 output.

use super::{check_close, check_ulps, Case, CaseReport, Outcome, Tensor};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ops::bag::{BagMode, BagOptions, Bags};
use crate::table::Table;

/// Relative tolerance against PyTorch's f32 results: the summation order differs (FBGEMM
/// accumulates in its own order).
const RTOL: f32 = 1e-6;

pub(super) fn run(case: &Case, report: &mut CaseReport) -> Result<()> {
    if case.meta_f64("max_norm")?.is_some() {
        report.outcome = Outcome::Skipped(
            "max_norm with bags is not supported yet (it needs the renorm pass)".into(),
        );
        return Ok(());
    }
    let table = case.tensor("weight")?.to_table()?;
    let indices = case.tensor("indices")?;
    let idx = indices.to_i64()?;
    let mode: BagMode = case.meta("mode").as_deref().unwrap_or("mean").parse()?;
    let include_last_offset = case.meta_bool("include_last_offset")?;
    let offsets = case
        .tensors
        .get("offsets")
        .map(Tensor::to_i64)
        .transpose()?;
    let weights = case
        .tensors
        .get("per_sample_weights")
        .map(Tensor::to_f32)
        .transpose()?;
    let bags = match (&indices.shape[..], &offsets) {
        ([_], Some(offsets)) => Bags::Offsets {
            offsets,
            include_last_offset,
        },
        ([_, n], None) => Bags::Fixed(*n),
        (shape, _) => {
            return Err(Error::format(
                Some(&case.path),
                format!(
                    "indices of shape {shape:?} with offsets {:?}",
                    offsets.is_some()
                ),
            ))
        }
    };
    let options = BagOptions {
        mode,
        per_sample_weights: weights.as_deref(),
        ..BagOptions::default()
    };
    let result = match case.meta_i64("padding_idx")? {
        Some(p) => table.with_padding_idx(p),
        None => Ok(table),
    }
    .and_then(|table| {
        let out: Vec<f32> = table.bag(&idx, bags, &options)?;
        let native = match table.dtype() {
            DType::F32 => None,
            DType::F16 => Some(native::<half::f16>(&table, &idx, bags, &options)?),
            DType::BF16 => Some(native::<half::bf16>(&table, &idx, bags, &options)?),
        };
        Ok((out, native, table.dtype(), table.dim()))
    });
    let Some((out, native, dtype, dim)) = report.settle(case, result) else {
        return Ok(());
    };
    let shape = vec![out.len() / dim.max(1), dim];
    let want_f32 = match dtype {
        DType::F32 => "out",
        DType::F16 | DType::BF16 => "out_f32",
    };
    if let Some(want) = case.tensors.get(want_f32) {
        check_close(report, want_f32, &out, &want.to_f32()?, RTOL, 0.0);
    }
    if let (Some(native), Some(want)) = (native, case.tensors.get("out")) {
        let got = Tensor {
            dtype: crate::table::formats::TensorDType::Float(dtype),
            shape: shape.clone(),
            data: native,
        };
        check_ulps(report, "out", &got, want, 1);
    }
    report.produced.push((
        "out".into(),
        Tensor::from_slice(
            crate::table::formats::TensorDType::Float(DType::F32),
            shape,
            &out,
        ),
    ));
    Ok(())
}

/// The bags in the table's own dtype, as bytes.
fn native<O: Element>(
    table: &Table<'_>,
    idx: &[i64],
    bags: Bags<'_, i64>,
    options: &BagOptions<'_>,
) -> Result<Vec<u8>> {
    let out: Vec<O> = table.bag(idx, bags, options)?;
    Ok(bytemuck::cast_slice(&out).to_vec())
}
