//! The `emb` command end to end: lookup, info, convert, conformance, errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use embedding_lookup::table::formats::{write_tensors, TensorDType, TensorToWrite};
use embedding_lookup::{DType, Table};

fn emb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_emb"))
        .args(args)
        .output()
        .expect("emb runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write_indices<T: bytemuck::Pod>(path: &Path, dtype: TensorDType, shape: Vec<usize>, v: &[T]) {
    write_tensors(
        path,
        &[TensorToWrite {
            name: "ids",
            dtype,
            shape,
            data: bytemuck::cast_slice(v),
        }],
        &Default::default(),
    )
    .unwrap();
}

fn read_npy(path: &Path) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let parsed = embedding_lookup::table::formats::parse(
        &bytes,
        embedding_lookup::table::formats::Format::Npy,
    )
    .unwrap();
    let e = &parsed.entries[0];
    (e.shape.clone(), bytes[e.data.clone()].to_vec())
}

struct Files {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        Files { _dir: dir, root }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

#[test]
fn lookup_npy_and_safetensors_inputs_every_index_type() {
    let f = Files::new();
    let table = Table::randn(10, 3, DType::F32, 1).unwrap();
    table.save(f.p("table.npy")).unwrap();
    table
        .save_as(f.p("model.safetensors"), "emb.weight")
        .unwrap();
    let idx: [i64; 8] = [1, 2, 4, 5, 4, 3, 2, 9];
    let want: Vec<f32> = table.lookup(&idx).unwrap();
    let i32s: Vec<i32> = idx.iter().map(|&v| v as i32).collect();
    let u32s: Vec<u32> = idx.iter().map(|&v| v as u32).collect();
    let u64s: Vec<u64> = idx.iter().map(|&v| v as u64).collect();
    write_indices(&f.p("i64.npy"), TensorDType::I64, vec![2, 4], &idx);
    write_indices(&f.p("i32.npy"), TensorDType::I32, vec![2, 4], &i32s);
    write_indices(&f.p("u32.npy"), TensorDType::U32, vec![2, 4], &u32s);
    write_indices(&f.p("u64.safetensors"), TensorDType::U64, vec![2, 4], &u64s);
    for (tbl, ids) in [
        (
            s(&f.p("table.npy")).to_string(),
            s(&f.p("i64.npy")).to_string(),
        ),
        (
            format!("{}:emb.weight", s(&f.p("model.safetensors"))),
            s(&f.p("i32.npy")).to_string(),
        ),
        (
            s(&f.p("model.safetensors")).to_string(),
            s(&f.p("u32.npy")).to_string(),
        ),
        (
            s(&f.p("table.npy")).to_string(),
            format!("{}:ids", s(&f.p("u64.safetensors"))),
        ),
    ] {
        let out = f.p("out.npy");
        let o = emb(&[
            "lookup",
            "--table",
            &tbl,
            "--indices",
            &ids,
            "--out",
            s(&out),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (shape, data) = read_npy(&out);
        assert_eq!(shape, [2, 4, 3]);
        assert_eq!(bytemuck::pod_collect_to_vec::<u8, f32>(&data), want);
    }
}

#[test]
fn native_output_dtype_and_bf16_needs_safetensors() {
    let f = Files::new();
    let table = Table::randn(10, 5, DType::BF16, 2).unwrap();
    table.save(f.p("t.safetensors")).unwrap();
    write_indices(&f.p("i.npy"), TensorDType::I64, vec![3], &[0i64, 9, 9]);
    let (t, i) = (f.p("t.safetensors"), f.p("i.npy"));
    let base = ["lookup", "--table", s(&t), "--indices", s(&i)];
    let o = emb(&[
        &base[..],
        &["--out", s(&f.p("o.npy")), "--out-dtype", "native"],
    ]
    .concat());
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("a bf16 output has no .npy dtype"), "{err}");
    assert!(!f.p("o.npy").exists());
    let o = emb(&[
        &base[..],
        &["--out", s(&f.p("o.safetensors")), "--out-dtype", "native"],
    ]
    .concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = Table::open(f.p("o.safetensors"), Some("out"));
    // The output is 2-D here ((3,) indices + dim), so it also opens as a table.
    let back = back.unwrap();
    let want: Vec<half::bf16> = table.lookup(&[0i64, 9, 9]).unwrap();
    assert_eq!(back.as_slice::<half::bf16>().unwrap(), want.as_slice());
}

#[test]
fn errors_exit_2_name_the_problem_and_leave_no_output() {
    let f = Files::new();
    Table::randn(10, 4, DType::F32, 3)
        .unwrap()
        .save(f.p("t.npy"))
        .unwrap();
    write_indices(&f.p("bad.npy"), TensorDType::I64, vec![3], &[1i64, 10, 2]);
    std::fs::write(f.p("out.npy"), b"previous contents").unwrap();
    let o = emb(&[
        "lookup",
        "--table",
        s(&f.p("t.npy")),
        "--indices",
        s(&f.p("bad.npy")),
        "--out",
        s(&f.p("out.npy")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: index 10 at position 1 is out of range for a table of 10 rows"),
        "{err}"
    );
    assert_eq!(std::fs::read(f.p("out.npy")).unwrap(), b"previous contents");
    let o = emb(&[
        "lookup",
        "--table",
        s(&f.p("t.npy")),
        "--indices",
        s(&f.p("bad.npy")),
        "--out",
        s(&f.p("o.npy")),
        "--padding-idx",
        "-11",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("padding_idx -11"));
    let o = emb(&[
        "lookup",
        "--table",
        s(&f.p("missing.npy")),
        "--indices",
        s(&f.p("bad.npy")),
        "--out",
        s(&f.p("o.npy")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.npy"));
    // Float indices are refused with the dtype named.
    write_indices(
        &f.p("float.npy"),
        TensorDType::Float(DType::F32),
        vec![2],
        &[0.0f32, 1.0],
    );
    let o = emb(&[
        "lookup",
        "--table",
        s(&f.p("t.npy")),
        "--indices",
        s(&f.p("float.npy")),
        "--out",
        s(&f.p("o.npy")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("dtype f32"));
    let leftovers: Vec<_> = std::fs::read_dir(&f.root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert!(!f.p("o.npy").exists());
}

#[test]
fn info_lists_tensors_and_zero_copy() {
    let f = Files::new();
    Table::randn(4, 2, DType::F16, 3)
        .unwrap()
        .save_as(f.p("m.safetensors"), "emb")
        .unwrap();
    let o = emb(&["info", s(&f.p("m.safetensors"))]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("emb") && text.contains("f16") && text.contains("[4, 2]"),
        "{text}"
    );
    assert!(text.contains("zero-copy"), "{text}");
}

#[test]
fn convert_round_trips_through_every_dtype() {
    let f = Files::new();
    let table = Table::randn(100, 7, DType::F32, 4).unwrap();
    table.save(f.p("t.safetensors")).unwrap();
    for dtype in ["f16", "bf16"] {
        let out = f.p(&format!("t_{dtype}.safetensors"));
        let o = emb(&[
            "convert",
            s(&f.p("t.safetensors")),
            s(&out),
            "--dtype",
            dtype,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let converted = Table::open(&out, None).unwrap();
        let want = table.to_dtype(dtype.parse().unwrap()).unwrap();
        assert_eq!(converted.as_bytes(), want.as_bytes(), "{dtype}");
        // And back: widening is exact, so f32 → dtype → f32 → dtype gives the same bytes, and
        // the f32 file holds exactly the narrowed values.
        let wide = f.p(&format!("t_{dtype}_f32.npy"));
        let again = f.p(&format!("t_{dtype}_again.safetensors"));
        for (from, to, as_dtype) in [(&out, &wide, "f32"), (&wide, &again, dtype)] {
            let o = emb(&["convert", s(from), s(to), "--dtype", as_dtype]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let wide = Table::open(&wide, None).unwrap();
        assert_eq!(wide.dtype(), DType::F32);
        let narrowed: Vec<f32> = want.lookup(&(0..100u32).collect::<Vec<_>>()).unwrap();
        assert_eq!(
            wide.as_slice::<f32>().unwrap(),
            &narrowed[..],
            "{dtype} widened"
        );
        let again = Table::open(&again, None).unwrap();
        assert_eq!(again.as_bytes(), want.as_bytes(), "{dtype} round trip");
    }
    let o = emb(&[
        "convert",
        s(&f.p("t.safetensors")),
        s(&f.p("b.npy")),
        "--dtype",
        "bf16",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!f.p("b.npy").exists());
}

#[test]
fn conformance_runs_the_fixtures_and_writes_results() {
    let f = Files::new();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch");
    let o = emb(&["conformance", s(&fixtures), "--write", s(&f.p("out"))]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    let last = text.lines().last().unwrap();
    assert!(last.contains(" passed, 0 failed"), "{last}");
    assert!(text.contains("PASS lookup_seed_example"));
    // The written output equals the fixture's expected output.
    let written = Table::open(f.p("out/lookup_f32_d16_r5_int64.safetensors"), Some("out"));
    assert!(written.is_err(), "a 3-D output is not a table");
    let bytes = std::fs::read(f.p("out/lookup_seed_example.safetensors")).unwrap();
    let parsed = embedding_lookup::table::formats::parse(
        &bytes,
        embedding_lookup::table::formats::Format::SafeTensors,
    )
    .unwrap();
    let case = embedding_lookup::conformance::Case::load(
        &fixtures.join("lookup_seed_example.safetensors"),
    )
    .unwrap();
    let out = parsed.select(Some("out"), None, Path::new("x")).unwrap();
    assert_eq!(
        &bytes[out.data.clone()],
        case.tensor("out").unwrap().data.as_slice()
    );
    // A refused case records the error kind.
    let bytes = std::fs::read(f.p("out/error_index_negative.safetensors")).unwrap();
    let parsed = embedding_lookup::table::formats::parse(
        &bytes,
        embedding_lookup::table::formats::Format::SafeTensors,
    )
    .unwrap();
    assert_eq!(
        parsed.metadata.get("error").map(String::as_str),
        Some("index_out_of_range")
    );
}

/// The fixtures' hand-made example, loaded for tampering.
fn example_case() -> embedding_lookup::conformance::Case {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch");
    embedding_lookup::conformance::Case::load(&fixtures.join("lookup_seed_example.safetensors"))
        .unwrap()
}

/// Write `case` as `dir/name.safetensors`.
fn write_case(dir: &Path, name: &str, case: &embedding_lookup::conformance::Case) {
    std::fs::create_dir_all(dir).unwrap();
    let tensors: Vec<TensorToWrite<'_>> = case
        .tensors
        .iter()
        .map(|(n, t)| TensorToWrite {
            name: n,
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
            data: &t.data,
        })
        .collect();
    write_tensors(
        &dir.join(format!("{name}.safetensors")),
        &tensors,
        &case.metadata,
    )
    .unwrap();
}

#[test]
fn conformance_fails_on_a_wrong_case() {
    let f = Files::new();
    let mut case = example_case();
    let out = case.tensors.get_mut("out").unwrap();
    out.data[0] ^= 0x40;
    let dir = f.p("cases");
    write_case(&dir, "tampered", &case);
    let o = emb(&["conformance", s(&dir)]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("FAIL tampered") && text.contains("0 passed, 1 failed"),
        "{text}"
    );
}

/// A case without its expected output checks nothing: it fails rather than passes.
#[test]
fn conformance_fails_a_case_without_its_expected_tensor() {
    let f = Files::new();
    let mut case = example_case();
    case.tensors.remove("out");
    let dir = f.p("cases");
    write_case(&dir, "no_out", &case);
    let o = emb(&["conformance", s(&dir)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL no_out") && text.contains("no expected tensor \"out\""),
        "{text}"
    );
}

/// Skipped cases (an operation this version does not know) fail the run unless allowed, and
/// a run in which nothing passed fails even then.
#[test]
fn conformance_fails_when_cases_are_skipped_or_nothing_passed() {
    let f = Files::new();
    let mut unknown = example_case();
    unknown
        .metadata
        .insert("op".into(), "\"embedding_quantum\"".into());
    let only_skips = f.p("only_skips");
    write_case(&only_skips, "future_op", &unknown);
    for extra in [&[][..], &["--allow-skipped"]] {
        let mut args = vec!["conformance", s(&only_skips)];
        args.extend_from_slice(extra);
        let o = emb(&args);
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("no case passed"), "{err}");
    }
    let mixed = f.p("mixed");
    write_case(&mixed, "future_op", &unknown);
    write_case(&mixed, "example", &example_case());
    let o = emb(&["conformance", s(&mixed)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("1 passed, 0 failed, 1 skipped"), "{text}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--allow-skipped"));
    let o = emb(&["conformance", s(&mixed), "--allow-skipped"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn demo_prints_the_example() {
    let o = emb(&["demo", "--rows", "1000", "--batch", "1000", "--iters", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("zero-copy: true"), "{text}");
    assert!(text.contains("output (2, 4, 3)"), "{text}");
    assert!(text.contains("M rows/s"), "{text}");
    // Rows 0 and 4 of the output are both table row 4.
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.contains('[') && l.contains(',') && !l.contains("indices"))
        .collect();
    let strip = |l: &str| {
        l.trim_matches(|c: char| c == '[' || c == ']' || c == ',' || c == ' ')
            .to_string()
    };
    assert_eq!(strip(rows[2]), strip(rows[4]), "{text}");
}

/// A kernel level that does not exist, or that this CPU cannot run, is refused with the value
/// and the choices named, not silently replaced by another one.
#[test]
fn an_unusable_kernel_level_is_refused() {
    #[cfg(target_arch = "x86_64")]
    let missing = "neon";
    #[cfg(not(target_arch = "x86_64"))]
    let missing = "avx512";
    for (value, says) in [
        ("avx9", "EMBEDDING_LOOKUP_ISA=avx9 names no kernel level"),
        (missing, "this CPU cannot run the"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_emb"))
            .args(["demo", "--rows", "10", "--batch", "10", "--iters", "1"])
            .env("EMBEDDING_LOOKUP_ISA", value)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{value}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(says) && err.contains("scalar"),
            "{value}: {err}"
        );
        assert!(o.stdout.is_empty(), "{value}: ran anyway");
    }
}
