//! What a new user meets first: bounded thread counts, `emb convert` never destroying its
//! input, errors that say what is wrong and for what, and figures that explain themselves.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

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

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exit status 2 with an `error:` line holding every one of `needles`.
fn assert_refused(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err:?}");
    }
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
    /// A 10 × 3 f32 table as `table.npy` and ids `[1, 2, 9]` as `ids.npy`.
    fn table_and_ids(&self) -> Table<'static> {
        let table = Table::randn(10, 3, DType::F32, 1).unwrap();
        table.save(self.p("table.npy")).unwrap();
        write_raw(
            &self.p("ids.npy"),
            "",
            TensorDType::I64,
            vec![3],
            &[1i64, 2, 9],
        );
        table
    }
}

fn write_raw<T: bytemuck::Pod>(
    path: &Path,
    name: &str,
    dtype: TensorDType,
    shape: Vec<usize>,
    v: &[T],
) {
    write_tensors(
        path,
        &[TensorToWrite {
            name,
            dtype,
            shape,
            data: bytemuck::cast_slice(v),
        }],
        &Default::default(),
    )
    .unwrap();
}

#[test]
fn absurd_thread_counts_are_refused_before_any_thread_starts() {
    let f = Files::new();
    f.table_and_ids();
    let (table, ids, out) = (f.p("table.npy"), f.p("ids.npy"), f.p("out.npy"));
    for n in ["100000", "1025", "0"] {
        let t = Instant::now();
        let o = emb(&[
            "lookup",
            "--table",
            s(&table),
            "--indices",
            s(&ids),
            "--out",
            s(&out),
            "--threads",
            n,
        ]);
        assert_refused(&o, &["--threads", n, "1024"]);
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{n} threads took {:?}",
            t.elapsed()
        );
        assert!(!out.exists());
    }
    let o = emb(&[
        "bag",
        "--mode",
        "sum",
        "--table",
        s(&table),
        "--indices",
        s(&ids),
        "--offsets",
        s(&ids),
        "--out",
        s(&out),
        "--threads",
        "5000",
    ]);
    assert_refused(&o, &["--threads", "5000", "1024"]);
    let o = emb(&[
        "bench",
        "--rows",
        "16",
        "--batch",
        "16",
        "--iters",
        "1",
        "--threads",
        "5000",
    ]);
    assert_refused(&o, &["--threads", "5000", "1024"]);
    // The bound itself is accepted, and said in --help.
    let o = emb(&[
        "lookup",
        "--table",
        s(&table),
        "--indices",
        s(&ids),
        "--out",
        s(&out),
        "--threads",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let help = stdout(&emb(&["lookup", "--help"]));
    assert!(help.contains("1 to 1024"), "{help}");
    assert_eq!(embedding_lookup::util::MAX_THREADS, 1024);
    assert!(embedding_lookup::util::thread_pool(1025).is_err());
    assert!(embedding_lookup::util::thread_pool(0).is_err());
}

/// A model of three tensors, `emb.weight` 10 × 3 f32 among them.
fn model(f: &Files) -> (PathBuf, Vec<u8>) {
    let path = f.p("model.safetensors");
    let emb: Vec<f32> = (0..30).map(|i| i as f32 * 0.5).collect();
    let other = [1.0f32; 4];
    let ids = [0i64, 1, 2, 3];
    write_tensors(
        &path,
        &[
            TensorToWrite {
                name: "emb.weight",
                dtype: TensorDType::Float(DType::F32),
                shape: vec![10, 3],
                data: bytemuck::cast_slice(&emb),
            },
            TensorToWrite {
                name: "head.weight",
                dtype: TensorDType::Float(DType::F32),
                shape: vec![2, 2],
                data: bytemuck::cast_slice(&other),
            },
            TensorToWrite {
                name: "position_ids",
                dtype: TensorDType::I64,
                shape: vec![1, 4],
                data: bytemuck::cast_slice(&ids),
            },
        ],
        &Default::default(),
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

#[test]
fn convert_refuses_an_output_that_is_its_input_by_any_path() {
    let f = Files::new();
    let (path, before) = model(&f);
    std::os::unix::fs::symlink(&path, f.p("link.safetensors")).unwrap();
    std::fs::hard_link(&path, f.p("hard.safetensors")).unwrap();
    std::fs::create_dir(f.p("sub")).unwrap();
    let spec = format!("{}:emb.weight", s(&path));
    let dotted = f.p("sub/../model.safetensors");
    for out in [
        path.clone(),
        f.p("link.safetensors"),
        f.p("hard.safetensors"),
        dotted,
    ] {
        let o = emb(&["convert", &spec, s(&out), "--dtype", "f16"]);
        assert_refused(&o, &["is the input", "model.safetensors"]);
        assert_eq!(std::fs::read(&path).unwrap(), before, "{}", out.display());
    }
    assert!(std::fs::symlink_metadata(f.p("link.safetensors"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn convert_keeps_the_tensor_name_unless_told_and_says_what_it_writes() {
    let f = Files::new();
    let (path, _) = model(&f);
    let spec = format!("{}:emb.weight", s(&path));
    let out = f.p("emb16.safetensors");
    let o = emb(&["convert", &spec, s(&out), "--dtype", "f16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = Table::open(&out, Some("emb.weight")).unwrap();
    assert_eq!((t.rows(), t.dim(), t.dtype()), (10, 3, DType::F16));
    assert!(Table::open(&out, Some("weight")).is_err());
    let o = emb(&[
        "convert",
        &spec,
        s(&out),
        "--dtype",
        "bf16",
        "--name",
        "tok",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(Table::open(&out, Some("tok")).unwrap().dtype(), DType::BF16);
    let help = stdout(&emb(&["convert", "--help"]));
    for n in ["must not be the input", "--name", "other tensors"] {
        assert!(help.contains(n), "{n:?} not in {help}");
    }
}

/// A library-only user (`default-features = false`) compiles neither clap nor indicatif.
#[test]
fn the_library_alone_depends_on_neither_clap_nor_indicatif() {
    let tree = |features: &[&str]| {
        let o = Command::new(env!("CARGO"))
            .args(["tree", "-e", "normal", "--prefix", "none", "--offline"])
            .args(features)
            .arg("--manifest-path")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .output()
            .expect("cargo tree runs");
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let names = |t: &str| -> Vec<String> {
        t.lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    };
    let lib_only = names(&tree(&["--no-default-features"]));
    assert!(lib_only.iter().any(|n| n == "rayon"), "{lib_only:?}");
    for dep in ["clap", "indicatif"] {
        assert!(!lib_only.iter().any(|n| n == dep), "{dep} in {lib_only:?}");
    }
    // The command line still has them by default.
    let full = names(&tree(&[]));
    assert!(full.iter().any(|n| n == "clap"), "{full:?}");
}

#[test]
fn zero_iterations_rows_or_batch_are_refused_not_reported() {
    for args in [
        &["demo", "--iters", "0"][..],
        &["demo", "--rows", "0"],
        &["demo", "--batch", "0"],
        &["bench", "--rows", "64", "--batch", "64", "--iters", "0"],
    ] {
        let o = emb(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("at least 1"), "{args:?}: {err}");
        assert!(err.contains(args[args.len() - 2]), "{args:?}: {err}");
        assert!(stdout(&o).is_empty(), "{args:?} printed {}", stdout(&o));
    }
}

#[test]
fn demo_says_what_its_ratio_is() {
    let o = emb(&["demo", "--rows", "1024", "--batch", "4096", "--iters", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.starts_with("ratio = "))
        .unwrap_or_else(|| panic!("no explanation of the ratio in {out}"));
    for n in [
        "memcpy of the same bytes",
        "this run",
        "1.0",
        "copy bandwidth",
        "median of 3",
    ] {
        assert!(line.contains(n), "{n:?} not in {line}");
    }
    // The percentage is the printed ratio's.
    let ratio: f64 = out
        .split("ratio ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ratio in {out}"));
    // Within the rounding of the two-decimal ratio.
    let pct = (ratio * 100.0).round() as i64;
    assert!(
        (pct - 1..=pct + 1).any(|p| line.contains(&format!(" {p}% "))),
        "{line} vs {ratio}"
    );
}

/// A `.npy` file with any `descr`, written by hand (NumPy's own layout, version 1.0).
fn npy_raw(path: &Path, descr: &str, shape: &str, data: &[u8]) {
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    v.extend_from_slice(dict.as_bytes());
    v.extend_from_slice(data);
    std::fs::write(path, v).unwrap();
}

fn f64_table() -> Vec<f64> {
    // Values that round differently to each width, and one that double rounding through f32
    // would get wrong for f16 (just above an f16 tie, below f32's resolution of the tie).
    let mut v: Vec<f64> = (0..27)
        .map(|i| (i as f64 - 13.0) / 3.0 + 1e-9 * i as f64)
        .collect();
    v.extend([0.1, 1.0 + 2f64.powi(-11) + 2f64.powi(-40), -65504.0]);
    v
}

#[test]
fn a_float64_table_is_refused_for_what_it_is_and_emb_convert_reads_it() {
    let f = Files::new();
    let v = f64_table();
    npy_raw(&f.p("t64.npy"), "<f8", "(10, 3)", bytemuck::cast_slice(&v));
    write_raw(&f.p("ids.npy"), "", TensorDType::I64, vec![2], &[0i64, 9]);
    let o = emb(&[
        "lookup",
        "--table",
        s(&f.p("t64.npy")),
        "--indices",
        s(&f.p("ids.npy")),
        "--out",
        s(&f.p("o.npy")),
    ]);
    assert_refused(
        &o,
        &[
            "float64 tables are not supported",
            "emb convert",
            "--dtype f32",
        ],
    );
    assert!(!stderr(&o).contains("not a valid"), "{}", stderr(&o));
    // The fix is one command; each width rounds the f64 once, to nearest.
    for (dtype, out) in [
        ("f32", "t32.npy"),
        ("f16", "t16.safetensors"),
        ("bf16", "tb.safetensors"),
    ] {
        let o = emb(&[
            "convert",
            s(&f.p("t64.npy")),
            s(&f.p(out)),
            "--dtype",
            dtype,
        ]);
        assert!(o.status.success(), "{dtype}: {}", stderr(&o));
        let t = Table::open(f.p(out), None).unwrap();
        assert_eq!((t.rows(), t.dim()), (10, 3));
        let want: Vec<u8> = match dtype {
            "f32" => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
            "f16" => v
                .iter()
                .flat_map(|&x| half::f16::from_f64(x).to_le_bytes())
                .collect(),
            _ => v
                .iter()
                .flat_map(|&x| half::bf16::from_f64(x).to_le_bytes())
                .collect(),
        };
        assert_eq!(t.as_bytes(), &want[..], "{dtype}");
    }
    // safetensors F64 likewise, and named once as unsupported.
    write_raw(
        &f.p("m.safetensors"),
        "w",
        TensorDType::F64,
        vec![10, 3],
        &v,
    );
    let o = emb(&[
        "lookup",
        "--table",
        s(&f.p("m.safetensors")),
        "--indices",
        s(&f.p("ids.npy")),
        "--out",
        s(&f.p("o.npy")),
    ]);
    assert_refused(&o, &["float64 tables are not supported", "m.safetensors:w"]);
    assert!(!stderr(&o).contains("(unsupported)"), "{}", stderr(&o));
    let o = emb(&[
        "convert",
        s(&f.p("m.safetensors")),
        s(&f.p("m32.safetensors")),
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = Table::open(f.p("m32.safetensors"), Some("w")).unwrap();
    assert_eq!(
        t.as_slice::<f32>().unwrap()[28],
        (1.0 + 2f64.powi(-11) + 2f64.powi(-40)) as f32
    );
}

#[test]
fn narrow_integer_indices_are_widened_and_other_dtypes_named_as_indices() {
    let f = Files::new();
    let table = f.table_and_ids();
    let want: Vec<f32> = table.lookup(&[1i64, 2, 9, 0]).unwrap();
    let idx = [1u8, 2, 9, 0];
    for (descr, data) in [
        ("|i1", idx.to_vec()),
        ("|u1", idx.to_vec()),
        (
            "<i2",
            idx.iter().flat_map(|&i| (i as i16).to_le_bytes()).collect(),
        ),
        (
            "<u2",
            idx.iter().flat_map(|&i| (i as u16).to_le_bytes()).collect(),
        ),
    ] {
        npy_raw(&f.p("ids.npy"), descr, "(2, 2)", &data);
        let out = f.p("out.npy");
        let o = emb(&[
            "lookup",
            "--table",
            s(&f.p("table.npy")),
            "--indices",
            s(&f.p("ids.npy")),
            "--out",
            s(&out),
        ]);
        assert!(o.status.success(), "{descr}: {}", stderr(&o));
        // A (2, 2, 3) output: read its bytes through the npy parser.
        let bytes = std::fs::read(&out).unwrap();
        let parsed = embedding_lookup::table::formats::parse(
            &bytes,
            embedding_lookup::table::formats::Format::Npy,
        )
        .unwrap();
        assert_eq!(parsed.entries[0].shape, [2, 2, 3], "{descr}");
        assert_eq!(
            &bytes[parsed.entries[0].data.clone()],
            bytemuck::cast_slice::<f32, u8>(&want),
            "{descr}"
        );
    }
    // A negative int8 index is an out-of-range index, named as such.
    npy_raw(&f.p("ids.npy"), "|i1", "(2,)", &[1, 0xff]);
    let o = emb(&[
        "lookup",
        "--table",
        s(&f.p("table.npy")),
        "--indices",
        s(&f.p("ids.npy")),
        "--out",
        s(&f.p("out.npy")),
    ]);
    assert_refused(&o, &["index -1 at position 1"]);
    // Floats and booleans as indices: said to be wrong as indices, with the types that work.
    npy_raw(&f.p("ids.npy"), "<f4", "(1,)", &1.0f32.to_le_bytes());
    let o = emb(&[
        "lookup",
        "--table",
        s(&f.p("table.npy")),
        "--indices",
        s(&f.p("ids.npy")),
        "--out",
        s(&f.p("out.npy")),
    ]);
    assert_refused(&o, &["indices", "not an index type", "int8", "uint64"]);
    npy_raw(&f.p("ids.npy"), "|b1", "(1,)", &[1]);
    let o = emb(&[
        "lookup",
        "--table",
        s(&f.p("table.npy")),
        "--indices",
        s(&f.p("ids.npy")),
        "--out",
        s(&f.p("out.npy")),
    ]);
    assert_refused(
        &o,
        &["ids.npy", "\"|b1\" is not supported", "indices", "<i1"],
    );
    assert!(!stderr(&o).contains("not a valid"), "{}", stderr(&o));
    // An index file given as the table: said to hold indices.
    write_raw(
        &f.p("ids2d.npy"),
        "",
        TensorDType::I64,
        vec![2, 2],
        &[0i64, 1, 2, 3],
    );
    let o = emb(&[
        "lookup",
        "--table",
        s(&f.p("ids2d.npy")),
        "--indices",
        s(&f.p("ids2d.npy")),
        "--out",
        s(&f.p("out.npy")),
    ]);
    assert_refused(
        &o,
        &["cannot be a table", "has dtype i64", "indices, not a table"],
    );
}

/// A model of many tensors, as a transformer's file is: a wrong name gets the nearest names and
/// the count, not every name on one line; with no name, the one 2-D float tensor is the table
/// (integer tensors such as `position_ids` are not tables); PyTorch's dtype spellings work.
#[test]
fn many_tensors_wrong_names_and_pytorch_dtype_names() {
    let f = Files::new();
    let path = f.p("model.safetensors");
    let table: Vec<f32> = (0..30).map(|i| i as f32).collect();
    let bias = [0.5f32; 3];
    let ids = [0i64, 1, 2, 3];
    let names: Vec<String> = (0..40).map(|i| format!("encoder.layer.{i}.bias")).collect();
    let mut tensors = vec![
        TensorToWrite {
            name: "embeddings.word_embeddings.weight",
            dtype: TensorDType::Float(DType::F32),
            shape: vec![10, 3],
            data: bytemuck::cast_slice(&table),
        },
        TensorToWrite {
            name: "embeddings.position_ids",
            dtype: TensorDType::I64,
            shape: vec![1, 4],
            data: bytemuck::cast_slice(&ids),
        },
    ];
    tensors.extend(names.iter().map(|n| TensorToWrite {
        name: n,
        dtype: TensorDType::Float(DType::F32),
        shape: vec![3],
        data: bytemuck::cast_slice(&bias),
    }));
    write_tensors(&path, &tensors, &Default::default()).unwrap();
    let ids = f.p("ids.npy");
    npy_raw(&ids, "<i8", "(2,)", bytemuck::cast_slice(&[4i64, 9]));
    let looked_up = f.p("out.npy");

    let o = emb(&[
        "lookup",
        "--table",
        s(&path),
        "--indices",
        s(&ids),
        "--out",
        s(&looked_up),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = Table::open(&looked_up, None).unwrap();
    assert_eq!(
        got.as_slice::<f32>().unwrap(),
        [12.0, 13.0, 14.0, 27.0, 28.0, 29.0]
    );

    let typo = format!("{}:embeddings.word_embedding.weight", s(&path));
    let o = emb(&[
        "lookup",
        "--table",
        &typo,
        "--indices",
        s(&ids),
        "--out",
        s(&looked_up),
    ]);
    assert_refused(
        &o,
        &[
            "did you mean",
            "embeddings.word_embeddings.weight",
            "42 tensors",
        ],
    );
    assert!(
        stderr(&o).len() < 1000,
        "{} bytes: {}",
        stderr(&o).len(),
        stderr(&o)
    );

    let out = f.p("half.safetensors");
    for dtype in ["fp16", "torch.float16", "bfloat16", "fp32"] {
        let o = emb(&["convert", s(&path), s(&out), "--dtype", dtype]);
        assert!(o.status.success(), "--dtype {dtype}: {}", stderr(&o));
    }
}
