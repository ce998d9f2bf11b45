//! `op = embedding_backward`: the dense gradient (`grad_weight`), and for sparse cases the
//! uncoalesced pairs (`grad_indices`, `grad_values`, in lookup order), within 1e-6 relative.

use super::{check_close, check_exact, Case, CaseReport, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::grad::EmbeddingBackward;
use crate::table::formats::TensorDType;

/// Relative tolerance of gradient values (the fixtures' README: summation order may differ).
const RTOL: f32 = 1e-6;
/// Absolute floor for values that cancel to near zero.
const ATOL: f32 = 1e-6;

pub(super) fn run(case: &Case, report: &mut CaseReport) -> Result<()> {
    let weight = case.tensor("weight")?;
    let indices = case.tensor("indices")?.to_i64()?;
    let grad_output = case.tensor("grad_output")?.to_f32()?;
    let [rows, dim] = weight.shape[..] else {
        return Err(crate::Error::ShapeMismatch(format!(
            "weight must be 2-D, got {:?}",
            weight.shape
        )));
    };
    let bw = EmbeddingBackward::new(&indices)
        .padding_idx(case.meta_i64("padding_idx")?)
        .scale_grad_by_freq(case.meta_bool("scale_grad_by_freq")?);
    let sparse = case.meta_bool("sparse")?;

    let result = if sparse {
        bw.sparse(&grad_output, rows, dim)
            .map(|s| (s.to_dense(), Some(s)))
    } else {
        bw.dense(&grad_output, rows, dim).map(|d| (d, None))
    };
    let Some((dense, pairs)) = report.settle(case, result) else {
        return Ok(());
    };
    if let Some(want) = report.expected(case, "grad_weight") {
        check_close(report, "grad_weight", &dense, &want.to_f32()?, RTOL, ATOL);
    }
    report.produced.push((
        "grad_weight".into(),
        Tensor::from_f32(DType::F32, vec![rows, dim], &dense),
    ));
    if let Some(pairs) = pairs {
        let gi = Tensor::from_slice(TensorDType::I64, vec![pairs.len()], pairs.indices());
        let gv = Tensor::from_f32(DType::F32, vec![pairs.len(), dim], pairs.values());
        if let Some(want) = report.expected(case, "grad_indices") {
            // Compare as i64 whatever integer type the fixture used.
            let want = Tensor::from_slice(TensorDType::I64, want.shape.clone(), &want.to_i64()?);
            check_exact(report, "grad_indices", &gi, &want);
        }
        if let Some(want) = report.expected(case, "grad_values") {
            check_close(
                report,
                "grad_values",
                pairs.values(),
                &want.to_f32()?,
                RTOL,
                ATOL,
            );
        }
        report.produced.push(("grad_indices".into(), gi));
        report.produced.push(("grad_values".into(), gv));
    }
    Ok(())
}
