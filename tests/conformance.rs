//! The PyTorch golden cases in tests/data/torch, run through the library.

use std::path::Path;

use embedding_lookup::conformance::{self, Case, Outcome};

fn cases() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch");
    let files = conformance::case_files(&dir).expect("fixture directory");
    assert!(files.len() > 100, "fixtures missing: {}", files.len());
    files
        .iter()
        .map(|f| Case::load(f).expect("case loads"))
        .collect()
}

/// Every case passes: none fails, none is skipped.
#[test]
fn every_case_passes() {
    let mut failures = Vec::new();
    for case in cases() {
        match conformance::run_case(&case).outcome {
            Outcome::Passed => {}
            Outcome::Failed(why) => failures.push(format!("{}: {why}", case.name)),
            Outcome::Skipped(why) => failures.push(format!("{}: skipped: {why}", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}

/// Every `embedding` case without max_norm passes bit-exactly, and the error cases are refused
/// with the expected error kind.
#[test]
fn every_plain_lookup_case_passes() {
    let mut passed = 0;
    for case in cases() {
        let op = case.meta("op");
        if op.as_deref() != Some("embedding") || case.metadata.contains_key("max_norm") {
            continue;
        }
        let report = conformance::run_case(&case);
        assert_eq!(report.outcome, Outcome::Passed, "{}", case.name);
        if let Some(kind) = case.meta("expect_error") {
            assert_eq!(report.error, Some(leak(kind)), "{}", case.name);
        } else {
            let (_, out) = report
                .produced
                .iter()
                .find(|(n, _)| n == "out")
                .expect("an output");
            assert_eq!(out, case.tensor("out").unwrap(), "{}", case.name);
        }
        passed += 1;
    }
    // 66 lookups (3 dtypes × 11 shapes × 2 index types), 4 padding, 1 example, 3 errors.
    assert!(passed >= 74, "only {passed} plain lookup cases ran");
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A tampered expected output is detected: the comparison can fail.
#[test]
fn a_wrong_expectation_fails() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch");
    let mut case = Case::load(&dir.join("lookup_seed_example.safetensors")).unwrap();
    let out = case.tensors.get_mut("out").unwrap();
    out.data[5] ^= 1;
    assert!(matches!(
        conformance::run_case(&case).outcome,
        Outcome::Failed(_)
    ));
    // And an expected error that does not happen fails too.
    let mut case = Case::load(&dir.join("lookup_seed_example.safetensors")).unwrap();
    case.metadata
        .insert("expect_error".into(), "index_out_of_range".into());
    assert!(matches!(
        conformance::run_case(&case).outcome,
        Outcome::Failed(_)
    ));
}

// ---------------------------------------------------------------------------------------------
// Generated cases with ±inf, NaN and -0 in the tables, whose expectations are computed here
// (gathers and single-row bags, which need no PyTorch), and comparisons at those values.

use std::collections::BTreeMap;

use embedding_lookup::conformance::Tensor;
use embedding_lookup::table::formats::TensorDType;
use embedding_lookup::DType;

/// Four rows of two values: finite, ±inf, NaN and -0 among them.
const SPECIAL_ROWS: [[f32; 2]; 4] = [
    [1.5, -2.0],
    [f32::INFINITY, -0.0],
    [f32::NAN, f32::NEG_INFINITY],
    [-0.0, 0.25],
];

fn case(op: &str, meta: &[(&str, &str)], tensors: Vec<(&str, Tensor)>) -> Case {
    let mut metadata = BTreeMap::from([("op".to_string(), format!("{op:?}"))]);
    for (k, v) in meta {
        metadata.insert(k.to_string(), v.to_string());
    }
    Case {
        name: op.to_string(),
        path: "generated.safetensors".into(),
        metadata,
        tensors: tensors
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect(),
    }
}

fn special_table(dtype: DType) -> Tensor {
    let flat: Vec<f32> = SPECIAL_ROWS.iter().flatten().copied().collect();
    Tensor::from_f32(dtype, vec![4, 2], &flat)
}

/// The rows `ids` of `table`, as bytes (the expected output of a gather).
fn gathered(table: &Tensor, ids: &[i64]) -> Tensor {
    let row = table.data.len() / table.shape[0];
    let mut data = Vec::new();
    for &i in ids {
        data.extend_from_slice(&table.data[i as usize * row..][..row]);
    }
    Tensor {
        dtype: table.dtype.clone(),
        shape: vec![ids.len(), table.shape[1]],
        data,
    }
}

fn outcome(case: &Case) -> Outcome {
    conformance::run_case(case).outcome
}

/// Lookups of rows holding ±inf, NaN and -0 pass bit for bit in every dtype, and flipping the
/// sign of an expected -0 or of an expected inf fails.
#[test]
fn lookups_of_special_values_are_compared_bit_for_bit() {
    let ids = [3i64, 1, 2, 0, 1];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let weight = special_table(dtype);
        let out = gathered(&weight, &ids);
        let indices = Tensor::from_slice(TensorDType::I64, vec![ids.len()], &ids);
        let good = case(
            "embedding",
            &[],
            vec![
                ("weight", weight.clone()),
                ("indices", indices.clone()),
                ("out", out.clone()),
            ],
        );
        assert_eq!(outcome(&good), Outcome::Passed, "{dtype:?}");
        let size = dtype.size();
        // Element 0 is the -0 of row 3; element 2 the +inf of row 1: flip their signs.
        for element in [0, 2] {
            let mut bad = good.clone();
            bad.tensors.get_mut("out").unwrap().data[element * size + size - 1] ^= 0x80;
            assert!(
                matches!(outcome(&bad), Outcome::Failed(_)),
                "{dtype:?} element {element}"
            );
        }
    }
}

/// Single-row bags return their row (summed onto +0.0, so -0 becomes +0 and ±inf stays), and
/// an expected ±inf or NaN needs the same bits: `rtol * inf` accepts nothing else.
#[test]
fn bag_expectations_of_inf_and_nan_need_equal_bits() {
    let ids = [0i64, 1, 2, 3];
    let weight = special_table(DType::F32);
    let indices = Tensor::from_slice(TensorDType::I64, vec![4, 1], &ids);
    let sums: Vec<f32> = SPECIAL_ROWS.iter().flatten().map(|&v| 0.0 + v).collect();
    let good = case(
        "embedding_bag",
        &[("mode", "\"sum\"")],
        vec![
            ("weight", weight),
            ("indices", indices),
            ("out", Tensor::from_f32(DType::F32, vec![4, 2], &sums)),
        ],
    );
    assert_eq!(outcome(&good), Outcome::Passed);
    // Bag 0 gives 1.5 and -2.0: expecting +inf, -inf or NaN there must fail.
    for (element, wrong) in [(0, f32::INFINITY), (1, f32::NEG_INFINITY), (0, f32::NAN)] {
        let mut bad = good.clone();
        let mut want = sums.clone();
        want[element] = wrong;
        bad.tensors.insert(
            "out".into(),
            Tensor::from_f32(DType::F32, vec![4, 2], &want),
        );
        assert!(
            matches!(outcome(&bad), Outcome::Failed(_)),
            "expected {wrong} at {element}"
        );
    }
}

/// A renorm that rescales nothing (every norm within max_norm, or NaN) leaves each row's
/// bits, -0 and NaN included; with a tolerance of 0 ulps an expected +0 where the table holds
/// -0 fails.
#[test]
fn zero_ulps_tells_minus_zero_from_plus_zero() {
    let ids = [3i64, 2, 3];
    for dtype in [DType::F16, DType::BF16] {
        // Rows 2 (NaN, -inf: its norm is NaN, never above max_norm) and 3 (norm 0.25).
        let weight = special_table(dtype);
        let out = gathered(&weight, &ids);
        let indices = Tensor::from_slice(TensorDType::I64, vec![ids.len()], &ids);
        let good = case(
            "embedding",
            &[("max_norm", "1.0")],
            vec![
                ("weight", weight.clone()),
                ("indices", indices),
                ("out", out),
                ("weight_after", weight.clone()),
            ],
        );
        assert_eq!(outcome(&good), Outcome::Passed, "{dtype:?}");
        for name in ["out", "weight_after"] {
            let mut bad = good.clone();
            let t = bad.tensors.get_mut(name).unwrap();
            // The first element of row 3 (-0): out element 0, weight_after element 6.
            let at = if name == "out" { 1 } else { 6 * 2 + 1 };
            t.data[at] ^= 0x80;
            assert!(
                matches!(outcome(&bad), Outcome::Failed(_)),
                "{dtype:?} {name}"
            );
        }
    }
}

/// A case that is not refused but lacks an expected tensor of its operation fails.
#[test]
fn a_case_without_its_expected_tensors_fails() {
    let mut checked = 0;
    for case in cases() {
        if case.metadata.contains_key("expect_error") {
            continue;
        }
        for name in [
            "out",
            "out_f32",
            "weight_after",
            "grad_weight",
            "grad_indices",
            "grad_values",
        ] {
            // An f32 bag is compared with `out`; its `out_f32` is the same tensor again.
            let f32_table = case.tensor("weight").unwrap().dtype == TensorDType::Float(DType::F32);
            if !case.tensors.contains_key(name) || (name == "out_f32" && f32_table) {
                continue;
            }
            let mut without = case.clone();
            without.tensors.remove(name);
            match outcome(&without) {
                Outcome::Failed(why) => assert!(why.contains(name), "{}: {why}", case.name),
                other => panic!("{} without {name}: {other:?}", case.name),
            }
            checked += 1;
        }
    }
    assert!(checked > 150, "only {checked} expected tensors removed");
}
