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

// ---------------------------------------------------------------------------------------------
// Rows already within max_norm. PyTorch scales a row only when `norm > max_norm`, and each row
// on its own, so a PyTorch renorm case stays a true case when two of its referenced rows are
// replaced by rows within max_norm and their expectations by those rows as stored.

/// A 16-wide row of multiples of 1/64 (exact in every dtype) whose norm is at most 0.4 for
/// every p: well within a max_norm of 1.
fn small_row(dim: usize) -> Vec<f32> {
    (0..dim).map(|j| ((j % 5) as f32 - 2.0) / 64.0).collect()
}

/// `[max_norm, 0, 0, ...]`: a norm of exactly max_norm for every p, which is not above it.
fn boundary_row(dim: usize, max_norm: f32) -> Vec<f32> {
    (0..dim)
        .map(|j| if j == 0 { max_norm } else { 0.0 })
        .collect()
}

/// `case` with table row `r` replaced by `row` before and after, and the output rows that
/// look it up replaced too.
fn with_row_left_alone(case: &mut Case, r: usize, row: &[f32]) {
    let ids = case.tensor("indices").unwrap().to_i64().unwrap();
    let dtype = case.tensor("weight").unwrap().float_dtype().unwrap();
    let bytes = Tensor::from_f32(dtype, vec![1, row.len()], row).data;
    for name in ["weight", "weight_after"] {
        let t = case.tensors.get_mut(name).unwrap();
        let rb = bytes.len();
        t.data[r * rb..(r + 1) * rb].copy_from_slice(&bytes);
    }
    let out = case.tensors.get_mut("out").unwrap();
    let rb = bytes.len();
    for (k, _) in ids.iter().enumerate().filter(|(_, &i)| i as usize == r) {
        out.data[k * rb..(k + 1) * rb].copy_from_slice(&bytes);
    }
}

/// Every PyTorch renorm lookup case, with one referenced row well within max_norm and one at
/// exactly max_norm: passes, those rows come out (in the table and the output) with their
/// stored bits, and an expectation that they were scaled fails.
#[test]
fn rows_within_max_norm_are_left_alone() {
    let mut ran = 0;
    for original in cases() {
        if original.meta("op").as_deref() != Some("embedding")
            || !original.metadata.contains_key("max_norm")
        {
            continue;
        }
        let max_norm = original.meta_f64("max_norm").unwrap().unwrap() as f32;
        let ids = original.tensor("indices").unwrap().to_i64().unwrap();
        let dim = original.tensor("weight").unwrap().shape[1];
        let small = ids[0] as usize;
        let at_limit = *ids.iter().find(|&&i| i as usize != small).unwrap() as usize;
        let mut case = original.clone();
        with_row_left_alone(&mut case, small, &small_row(dim));
        with_row_left_alone(&mut case, at_limit, &boundary_row(dim, max_norm));
        // The derived rows differ from PyTorch's own, so the engine sees new input there.
        assert!(case.tensor("weight").unwrap() != original.tensor("weight").unwrap());

        let report = conformance::run_case(&case);
        assert_eq!(report.outcome, Outcome::Passed, "{}", case.name);
        let weight = case.tensor("weight").unwrap();
        let rb = weight.data.len() / weight.shape[0];
        let produced = |name: &str| {
            &report
                .produced
                .iter()
                .find(|(n, _)| n == name)
                .unwrap()
                .1
                .data
        };
        for r in [small, at_limit] {
            // Bits, not the f32 tolerance the runner allows for rescaled rows.
            assert!(
                produced("weight_after")[r * rb..(r + 1) * rb] == weight.data[r * rb..(r + 1) * rb],
                "{}: row {r} within max_norm was changed",
                case.name
            );
        }
        for (k, &i) in ids.iter().enumerate() {
            if i as usize == small || i as usize == at_limit {
                assert!(
                    produced("out")[k * rb..(k + 1) * rb]
                        == weight.data[i as usize * rb..(i as usize + 1) * rb],
                    "{}: output position {k} is not row {i} as stored",
                    case.name
                );
            }
        }

        // Had the engine halved the small row, the case would fail.
        let mut scaled = case.clone();
        let halved: Vec<f32> = small_row(dim).iter().map(|v| v / 2.0).collect();
        let dtype = weight.float_dtype().unwrap();
        let bytes = Tensor::from_f32(dtype, vec![1, dim], &halved).data;
        scaled.tensors.get_mut("weight_after").unwrap().data[small * rb..(small + 1) * rb]
            .copy_from_slice(&bytes);
        assert!(
            matches!(outcome(&scaled), Outcome::Failed(_)),
            "{}",
            case.name
        );
        ran += 1;
    }
    assert_eq!(ran, 12, "renorm lookup cases");
}
