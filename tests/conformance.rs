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

/// Every case passes or is skipped (for operations not built yet); none fails.
#[test]
fn no_case_fails() {
    let mut failures = Vec::new();
    for case in cases() {
        if let Outcome::Failed(why) = conformance::run_case(&case).outcome {
            failures.push(format!("{}: {why}", case.name));
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
