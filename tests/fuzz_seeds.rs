//! Every committed fuzz seed (valid and broken inputs, and each crash reproducer kept as a
//! `regression_*` seed) through its fuzz target's own check, on stable Rust in every test run,
//! decoded exactly as libFuzzer hands it to the target. The checks and their naive references
//! are the fuzz crate's modules, compiled in here as well.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};

#[path = "../fuzz/src/bag.rs"]
#[allow(dead_code)]
mod bag;
#[path = "../fuzz/src/file_reference.rs"]
#[allow(dead_code)]
mod file_reference;
#[path = "../fuzz/src/files.rs"]
#[allow(dead_code)]
mod files;
#[path = "../fuzz/src/lookup.rs"]
#[allow(dead_code)]
mod lookup;
#[path = "../fuzz/src/reference.rs"]
#[allow(dead_code)]
mod reference;
#[path = "../fuzz/src/renorm.rs"]
#[allow(dead_code)]
mod renorm;

/// The targets this file replays; the test below holds it equal to the fuzz crate's.
const TARGETS: [&str; 5] = [
    "bag_offsets",
    "lookup_bounds",
    "npy_file",
    "renorm",
    "safetensors_file",
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5, "{target}: only {} seeds", seeds.len());
    seeds
}

/// Decode a seed as `libfuzzer_sys::fuzz_target!` does for a typed input. A seed that does not
/// decode would test nothing, so it fails.
fn decode<T: for<'a> Arbitrary<'a>>(target: &str, name: &str, bytes: &[u8]) -> T {
    assert!(
        bytes.len() >= T::size_hint(0).0,
        "{target}/{name}: shorter than the input's minimum size, so libFuzzer skips it"
    );
    T::arbitrary_take_rest(Unstructured::new(bytes))
        .unwrap_or_else(|e| panic!("{target}/{name}: does not decode: {e}"))
}

/// Run one target's check on every seed, naming the seed that fails.
fn replay(target: &str, check: impl Fn(&str, &[u8])) {
    for (name, bytes) in seeds(target) {
        eprintln!("{target}/{name}");
        check(&name, &bytes);
    }
}

#[test]
fn the_replayed_targets_are_the_fuzz_crates_targets() {
    let sources: BTreeSet<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").unwrap_or(&name).to_string()
        })
        .collect();
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let bins: BTreeSet<String> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "embedding-lookup-fuzz")
        .map(String::from)
        .collect();
    let corpora: BTreeSet<String> = std::fs::read_dir(fuzz_dir().join("corpus"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let replayed: BTreeSet<String> = TARGETS.iter().map(|t| t.to_string()).collect();
    assert_eq!(sources, replayed, "fuzz_targets/ against this file");
    assert_eq!(bins, replayed, "fuzz/Cargo.toml [[bin]]s against this file");
    assert_eq!(corpora, replayed, "corpus/ directories against this file");
}

#[test]
fn lookup_bounds_seeds_pass() {
    replay("lookup_bounds", |name, bytes| {
        lookup::check(decode("lookup_bounds", name, bytes))
    });
}

#[test]
fn bag_offsets_seeds_pass() {
    replay("bag_offsets", |name, bytes| {
        bag::check(decode("bag_offsets", name, bytes))
    });
}

#[test]
fn renorm_seeds_pass() {
    replay("renorm", |name, bytes| {
        renorm::check(decode("renorm", name, bytes))
    });
}

#[test]
fn safetensors_file_seeds_pass() {
    replay("safetensors_file", |_, bytes| {
        files::check(bytes, "safetensors")
    });
}

#[test]
fn npy_file_seeds_pass() {
    replay("npy_file", |_, bytes| files::check(bytes, "npy"));
}

/// The file checks' reference readers judge the committed seeds themselves: every `valid_*`
/// seed is valid to them, and at least five of the others plainly invalid (not left to the
/// library's policy), so the checks compare the library against both verdicts on these files.
#[test]
fn the_file_references_judge_the_seeds() {
    use file_reference::Verdict;
    for (target, read) in [
        ("npy_file", file_reference::npy as fn(&[u8]) -> Verdict),
        ("safetensors_file", file_reference::safetensors),
    ] {
        let mut invalid = 0;
        for (name, bytes) in seeds(target) {
            let verdict = read(&bytes);
            eprintln!("{target}/{name}: {verdict:?}");
            if name.starts_with("valid_") {
                assert!(
                    matches!(verdict, Verdict::Valid(_)),
                    "{target}/{name}: {verdict:?}"
                );
            }
            invalid += usize::from(matches!(verdict, Verdict::Invalid(_)));
        }
        assert!(
            invalid >= 5,
            "{target}: only {invalid} seeds plainly invalid"
        );
    }
}
