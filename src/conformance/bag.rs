//! `op = embedding_bag`: `F.embedding_bag` cases. The library's f32 output is compared with
//! PyTorch's `out` for f32 tables and with `out_f32` (PyTorch on the table widened to f32) for
//! f16/bf16 tables, within [`RTOL`]; for those, the output in the table's own dtype (rounded
//! once) must also be within one unit in the last place of PyTorch's `out`. What is written
//! with `--write` is the f32 output.
//!
//! Cases with `max_norm` run twice: in place ([`Table::bag_renorm_in_place`]: the output
//! against `out` / `out_f32`, the table afterwards against `weight_after`, within the renorm
//! cases' tolerance) and output only ([`Table::bag`]: the output must equal the in-place one
//! bit for bit and the table must be left bit for bit as it was). `--write` then also writes
//! `weight_after`.

use super::{check_close, check_exact, check_ulps, Case, CaseReport, Tensor};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ops::bag::{BagMode, BagOptions, Bags};
use crate::ops::renorm::MaxNorm;
use crate::table::formats::TensorDType;
use crate::table::Table;

/// Relative tolerance against PyTorch's f32 results: the summation order differs (FBGEMM
/// accumulates in its own order).
const RTOL: f32 = 1e-6;
/// Relative tolerance for an f32 table after the renorm (as the renorm cases): the norm's
/// summation order differs from PyTorch's.
const AFTER_RTOL: f32 = 2e-6;

pub(super) fn run(case: &Case, report: &mut CaseReport) -> Result<()> {
    let weight = case.tensor("weight")?;
    let table = weight.to_table()?;
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
    // A missing norm_type is 2; a max_norm MaxNorm refuses is the case's expected error.
    let max_norm = case
        .meta_f64("max_norm")?
        .map(|m| MaxNorm::new(m)?.with_norm_type(case.meta_f64("norm_type")?.unwrap_or(2.0)))
        .transpose();
    let padding = case.meta_i64("padding_idx")?;
    let result = max_norm.and_then(|max_norm| {
        let options = BagOptions {
            mode,
            per_sample_weights: weights.as_deref(),
            max_norm,
        };
        let table = match padding {
            Some(p) => table.with_padding_idx(p)?,
            None => table,
        };
        if max_norm.is_some() {
            // In place, each output dtype on a fresh copy of the table.
            let in_native = match table.dtype() {
                DType::F32 => None,
                DType::F16 => Some(in_place::<half::f16>(&table, padding, &idx, bags, &options)?.0),
                DType::BF16 => {
                    Some(in_place::<half::bf16>(&table, padding, &idx, bags, &options)?.0)
                }
            };
            let (out, after) = in_place::<f32>(&table, padding, &idx, bags, &options)?;
            let out: Vec<f32> = bytemuck::pod_collect_to_vec(&out);
            // Output only, from the table itself, which must stay as it was.
            let only = native::<f32>(&table, &idx, bags, &options)?;
            let only_native = match table.dtype() {
                DType::F32 => None,
                DType::F16 => Some(native::<half::f16>(&table, &idx, bags, &options)?),
                DType::BF16 => Some(native::<half::bf16>(&table, &idx, bags, &options)?),
            };
            let renorm = Renormed {
                only,
                only_native,
                after,
                untouched: table.as_bytes().to_vec(),
            };
            return Ok((out, in_native, table.dtype(), table.dim(), Some(renorm)));
        }
        let out: Vec<f32> = table.bag(&idx, bags, &options)?;
        let native = match table.dtype() {
            DType::F32 => None,
            DType::F16 => Some(native::<half::f16>(&table, &idx, bags, &options)?),
            DType::BF16 => Some(native::<half::bf16>(&table, &idx, bags, &options)?),
        };
        Ok((out, native, table.dtype(), table.dim(), None))
    });
    let Some((out, native, dtype, dim, renorm)) = report.settle(case, result) else {
        return Ok(());
    };
    let shape = vec![out.len() / dim.max(1), dim];
    let want_f32 = match dtype {
        DType::F32 => "out",
        DType::F16 | DType::BF16 => "out_f32",
    };
    if let Some(want) = report.expected(case, want_f32) {
        check_close(report, want_f32, &out, &want.to_f32()?, RTOL, 0.0);
    }
    let native_tensor = native.map(|data| Tensor {
        dtype: TensorDType::Float(dtype),
        shape: shape.clone(),
        data,
    });
    if let Some(got) = &native_tensor {
        if let Some(want) = report.expected(case, "out") {
            check_ulps(report, "out", got, want, 1);
        }
    }
    let out_tensor = Tensor::from_slice(TensorDType::Float(DType::F32), shape.clone(), &out);
    if let Some(r) = renorm {
        let float = |data: Vec<u8>, dtype: DType, shape: &[usize]| Tensor {
            dtype: TensorDType::Float(dtype),
            shape: shape.to_vec(),
            data,
        };
        let after = float(r.after, dtype, &weight.shape);
        if let Some(want) = report.expected(case, "weight_after") {
            if after.shape != want.shape || after.dtype != want.dtype {
                check_exact(report, "weight_after", &after, want);
            } else if dtype == DType::F32 {
                let (got, want) = (after.to_f32()?, want.to_f32()?);
                check_close(report, "weight_after", &got, &want, AFTER_RTOL, 0.0);
            } else {
                check_ulps(report, "weight_after", &after, want, 0);
            }
        }
        let only = float(r.only, DType::F32, &shape);
        check_exact(
            report,
            "out (output only) against in place",
            &only,
            &out_tensor,
        );
        if let (Some(only), Some(native)) = (r.only_native, &native_tensor) {
            let only = float(only, dtype, &shape);
            check_exact(
                report,
                "native out (output only) against in place",
                &only,
                native,
            );
        }
        let untouched = float(r.untouched, dtype, &weight.shape);
        check_exact(report, "table after output only", &untouched, weight);
        report.produced.push(("out".into(), out_tensor));
        report.produced.push(("weight_after".into(), after));
    } else {
        report.produced.push(("out".into(), out_tensor));
    }
    Ok(())
}

/// What a `max_norm` case yields beyond the in-place output.
struct Renormed {
    /// The f32 output of the output-only mode, as bytes.
    only: Vec<u8>,
    /// The output-only output in the table's dtype (f16/bf16 tables), as bytes.
    only_native: Option<Vec<u8>>,
    /// The table after the in-place renorm, as bytes.
    after: Vec<u8>,
    /// The table after the output-only mode, as bytes.
    untouched: Vec<u8>,
}

/// In place on a fresh copy of `table`: the output in `O` and the table afterwards, as bytes.
fn in_place<O: Element>(
    table: &Table<'_>,
    padding: Option<i64>,
    idx: &[i64],
    bags: Bags<'_, i64>,
    options: &BagOptions<'_>,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut copy = table.to_dtype(table.dtype())?;
    if let Some(p) = padding {
        copy = copy.with_padding_idx(p)?;
    }
    let len = bags.count(idx.len())? * copy.dim();
    let mut out = vec![O::default(); len];
    copy.bag_renorm_in_place(idx, bags, options, &mut out)?;
    Ok((
        bytemuck::cast_slice(&out).to_vec(),
        copy.as_bytes().to_vec(),
    ))
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
