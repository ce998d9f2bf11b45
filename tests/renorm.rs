//! max_norm through the public API and the `emb` binary: the PyTorch `renorm_*` cases in
//! both modes and both forms, duplicates, thread counts, bad values, read-only tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use embedding_lookup::conformance::{self, Case, Outcome, Tensor};
use embedding_lookup::table::formats::{write_tensors, TensorDType, TensorToWrite};
use embedding_lookup::{DType, Element, Error, MaxNorm, OpenMode, OpenOptions, Table};
use half::{bf16, f16};

fn torch_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch")
}

fn renorm_cases() -> Vec<Case> {
    let cases: Vec<Case> = conformance::case_files(&torch_dir())
        .unwrap()
        .iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("renorm_"))
        })
        .map(|p| Case::load(p).unwrap())
        .collect();
    assert_eq!(cases.len(), 12, "f32/f16/bf16 × p = 1, 2, 3.5, inf");
    cases
}

/// The conformance runner: in place against `out` and `weight_after`, output only against
/// in place with the table bit-identical.
#[test]
fn every_renorm_case_passes_through_the_library() {
    for case in renorm_cases() {
        let report = conformance::run_case(&case);
        assert_eq!(report.outcome, Outcome::Passed, "{}", case.name);
        let names: Vec<&str> = report.produced.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["out", "weight_after"], "{}", case.name);
    }
}

/// f16/bf16 must be equal to PyTorch's bits; f32 within a relative 2e-6.
fn assert_matches(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(
        (&got.dtype, &got.shape),
        (&want.dtype, &want.shape),
        "{what}"
    );
    if got.dtype == TensorDType::Float(DType::F32) {
        let (g, w) = (got.to_f32().unwrap(), want.to_f32().unwrap());
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(
                (a - b).abs() <= 2e-6 * b.abs(),
                "{what}: element {i} is {a}, expected {b}"
            );
        }
    } else {
        assert!(got.data == want.data, "{what}: bits differ");
    }
}

fn emb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_emb"))
        .args(args)
        .output()
        .expect("run emb")
}

fn write_one(path: &Path, name: &str, t: &Tensor) {
    write_tensors(
        path,
        &[TensorToWrite {
            name,
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
            data: &t.data,
        }],
        &BTreeMap::new(),
    )
    .unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn every_renorm_case_passes_through_emb_lookup() {
    let dir = tempfile::tempdir().unwrap();
    for case in renorm_cases() {
        let table = dir.path().join(format!("{}_table.safetensors", case.name));
        let indices = dir
            .path()
            .join(format!("{}_indices.safetensors", case.name));
        write_one(&table, "weight", case.tensor("weight").unwrap());
        write_one(&indices, "indices", case.tensor("indices").unwrap());
        let max_norm = case.meta("max_norm").unwrap();
        let norm_type = case.meta("norm_type").unwrap();
        let original = std::fs::read(&table).unwrap();

        // Output only: the table file is not touched.
        let only = dir.path().join(format!("{}_only.safetensors", case.name));
        let common = [
            "lookup",
            "--table",
            s(&table),
            "--indices",
            s(&indices),
            "--out-dtype",
            "native",
            "--max-norm",
            &max_norm,
            "--norm-type",
            &norm_type,
        ];
        let run = emb(&[&common[..], &["--out", s(&only)]].concat());
        assert!(run.status.success(), "{}: {:?}", case.name, run);
        assert_eq!(std::fs::read(&table).unwrap(), original, "{}", case.name);
        let only = Case::load(&only).unwrap();
        assert_matches(
            &format!("{} output only", case.name),
            only.tensor("out").unwrap(),
            case.tensor("out").unwrap(),
        );

        // --write-back: the same output, and the table file renormed as PyTorch's weight.
        let in_place = dir
            .path()
            .join(format!("{}_in_place.safetensors", case.name));
        let run = emb(&[&common[..], &["--out", s(&in_place), "--write-back"]].concat());
        assert!(run.status.success(), "{}: {:?}", case.name, run);
        let in_place = Case::load(&in_place).unwrap();
        assert_eq!(
            in_place.tensor("out").unwrap(),
            only.tensor("out").unwrap(),
            "{}: the two modes' outputs differ",
            case.name
        );
        let after = Case::load(&table).unwrap();
        assert_matches(
            &format!("{} table file after --write-back", case.name),
            after.tensor("weight").unwrap(),
            case.tensor("weight_after").unwrap(),
        );
    }
}

#[test]
fn emb_refuses_bad_values_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let case = &renorm_cases()[0];
    let table = dir.path().join("t.safetensors");
    let indices = dir.path().join("i.safetensors");
    write_one(&table, "weight", case.tensor("weight").unwrap());
    write_one(&indices, "indices", case.tensor("indices").unwrap());
    let original = std::fs::read(&table).unwrap();
    let out = dir.path().join("o.safetensors");
    for (bad, message) in [
        (
            &["--max-norm", "0", "--write-back"][..],
            "max_norm must be greater than 0",
        ),
        (
            &["--max-norm", "-1", "--write-back"],
            "max_norm must be greater than 0",
        ),
        (
            &["--max-norm", "nan", "--write-back"],
            "max_norm must be greater than 0",
        ),
        (
            &["--max-norm", "1", "--norm-type", "0", "--write-back"],
            "norm_type",
        ),
        (&["--max-norm", "1", "--norm-type", "-inf"], "norm_type"),
        (&["--max-norm", "1", "--norm-type", "nan"], "norm_type"),
        (&["--norm-type", "2"], "--max-norm"),
        (&["--write-back"], "--max-norm"),
    ] {
        let base = [
            "lookup",
            "--table",
            s(&table),
            "--indices",
            s(&indices),
            "--out",
            s(&out),
        ];
        let run = emb(&[&base[..], bad].concat());
        assert_eq!(run.status.code(), Some(2), "{bad:?}");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(stderr.contains(message), "{bad:?}: {stderr}");
        assert!(!out.exists(), "{bad:?}: an output was written");
        assert_eq!(std::fs::read(&table).unwrap(), original, "{bad:?}");
    }
}

/// A table of `rows × dim` normal values of norm about `sqrt(dim)`, in `dtype`.
fn random_table(rows: usize, dim: usize, dtype: DType, seed: u64) -> Table<'static> {
    Table::randn(rows, dim, dtype, seed).unwrap()
}

fn random_indices(n: usize, rows: usize, seed: u64) -> Vec<i64> {
    let mut rng = embedding_lookup::util::Rng::new(seed);
    (0..n).map(|_| rng.below(rows as u64) as i64).collect()
}

/// In place on `threads` threads: (output bytes, table bytes).
fn in_place_on<O: Element>(
    threads: usize,
    table: &Table<'_>,
    indices: &[i64],
    m: MaxNorm,
) -> (Vec<O>, Vec<u8>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut t = table.to_dtype(table.dtype()).unwrap();
    let mut out = vec![O::default(); indices.len() * table.dim()];
    pool.install(|| t.lookup_renorm_in_place(indices, &mut out, m))
        .unwrap();
    (out, t.as_bytes().to_vec())
}

/// Rows referenced many times, by positions spread over every parallel chunk: each row is
/// renormed once. bf16 shows a second renorm: rounding the scale to bf16 often leaves the
/// rescaled norm above max_norm, so renorming twice would change the row again. The
/// expected table is the original with each referenced row replaced by the output-only
/// result (computed from the original rows); results are identical on 1, 2 and 8 threads.
#[test]
fn duplicates_are_renormed_once_and_threads_agree() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (rows, n) in [(1000, 300_000), (100_000, 200_000), (7, 50)] {
            let table = random_table(rows, 33, dtype, 5);
            let indices = random_indices(n, rows, 6);
            let m = MaxNorm::new(1.5).unwrap();
            let mut expected_out = vec![0.0f32; n * 33];
            table
                .lookup_renorm_output_only(&indices, &mut expected_out, m)
                .unwrap();
            let mut expected_table = table.to_dtype(DType::F32).unwrap();
            {
                let e = expected_table.as_mut_slice::<f32>().unwrap();
                for (p, &i) in indices.iter().enumerate() {
                    let i = i as usize;
                    e[i * 33..(i + 1) * 33].copy_from_slice(&expected_out[p * 33..(p + 1) * 33]);
                }
            }
            let expected_table = expected_table.to_dtype(dtype).unwrap();
            let (out1, table1) = in_place_on::<f32>(1, &table, &indices, m);
            assert!(out1 == expected_out, "{dtype} rows {rows}: output");
            assert!(
                table1 == expected_table.as_bytes(),
                "{dtype} rows {rows}: table"
            );
            for threads in [2, 8] {
                let (out, t) = in_place_on::<f32>(threads, &table, &indices, m);
                assert!(
                    out == out1,
                    "{dtype} rows {rows}: {threads} threads, output"
                );
                assert!(t == table1, "{dtype} rows {rows}: {threads} threads, table");
            }
            // A second renorm of the same rows changes bf16 rows: the check above has teeth.
            if dtype == DType::BF16 && rows == 1000 {
                let mut twice =
                    Table::from_slice(bytemuck::cast_slice::<u8, bf16>(&table1), rows, 33).unwrap();
                twice.renorm_in_place(&indices, m).unwrap();
                assert!(
                    twice.as_bytes() != &table1[..],
                    "renorming twice is a no-op"
                );
            }
        }
    }
}

#[test]
fn output_dtype_native_or_f32_and_modes_agree() {
    for dtype in [DType::F16, DType::BF16] {
        let table = random_table(500, 20, dtype, 9);
        let indices = random_indices(3000, 500, 10);
        let m = MaxNorm::new(2.0).unwrap().with_norm_type(1.0).unwrap();
        let (wide, t1) = in_place_on::<f32>(2, &table, &indices, m);
        let narrow: Vec<u8> = match dtype {
            DType::F16 => {
                bytemuck::cast_slice(&in_place_on::<f16>(2, &table, &indices, m).0).to_vec()
            }
            _ => bytemuck::cast_slice(&in_place_on::<bf16>(2, &table, &indices, m).0).to_vec(),
        };
        let widened = Tensor {
            dtype: TensorDType::Float(dtype),
            shape: vec![wide.len()],
            data: narrow,
        }
        .to_f32()
        .unwrap();
        assert_eq!(
            wide, widened,
            "{dtype}: f32 output is the widened native output"
        );
        let mut only = vec![0.0f32; wide.len()];
        table
            .lookup_renorm_output_only(&indices, &mut only, m)
            .unwrap();
        assert!(only == wide, "{dtype}: output only = in place");
        assert!(t1 != table.as_bytes(), "{dtype}: some rows were rescaled");
    }
}

#[test]
fn bad_values_are_refused() {
    for bad in [0.0, -1.0, f64::NAN, f64::NEG_INFINITY] {
        let e = MaxNorm::new(bad).unwrap_err();
        assert_eq!(e.kind(), "invalid_argument", "{bad}");
        assert!(e.to_string().contains("max_norm"), "{e}");
        let e = MaxNorm::new(1.0).unwrap().with_norm_type(bad).unwrap_err();
        assert!(e.to_string().contains("norm_type"), "{e}");
    }
    // Large and infinite values are fine; an infinite max_norm never rescales.
    let m = MaxNorm::new(f64::INFINITY)
        .unwrap()
        .with_norm_type(f64::INFINITY)
        .unwrap();
    let mut table = random_table(10, 4, DType::F32, 1);
    let before = table.as_bytes().to_vec();
    let mut out = vec![0.0f32; 8];
    table
        .lookup_renorm_in_place(&[1i64, 2], &mut out, m)
        .unwrap();
    assert_eq!(table.as_bytes(), &before[..]);
}

#[test]
fn nothing_is_written_before_validation_completes() {
    let m = MaxNorm::new(0.1).unwrap();
    let mut table = random_table(10, 4, DType::F32, 2);
    let before = table.as_bytes().to_vec();
    let sentinel = -7.0f32;
    // A bad index late in the batch: neither output nor table is touched.
    let mut indices = vec![1i64; 5000];
    indices[4321] = 10;
    let mut out = vec![sentinel; 5000 * 4];
    let e = table
        .lookup_renorm_in_place(&indices, &mut out, m)
        .unwrap_err();
    assert!(matches!(
        e,
        Error::IndexOutOfRange {
            index: 10,
            position: 4321,
            rows: 10
        }
    ));
    assert!(out.iter().all(|&v| v == sentinel));
    assert_eq!(table.as_bytes(), &before[..]);
    let e = table.renorm_in_place(&[-1i32], m).unwrap_err();
    assert_eq!(e.kind(), "index_out_of_range");
    // Wrong output length or dtype.
    let mut short = vec![sentinel; 7];
    let e = table
        .lookup_renorm_in_place(&[1i64, 2], &mut short, m)
        .unwrap_err();
    assert_eq!(e.kind(), "output_length");
    let mut wrong = vec![f16::ZERO; 8];
    let e = table
        .lookup_renorm_in_place(&[1i64, 2], &mut wrong, m)
        .unwrap_err();
    assert_eq!(e.kind(), "dtype_mismatch");
    assert!(short.iter().all(|&v| v == sentinel));
    assert_eq!(table.as_bytes(), &before[..]);
    let e = table
        .lookup_renorm_output_only(&indices, &mut out, m)
        .unwrap_err();
    assert_eq!(e.kind(), "index_out_of_range");
    assert!(out.iter().all(|&v| v == sentinel));
}

#[test]
fn read_only_tables_refuse_in_place_and_serve_output_only() {
    let m = MaxNorm::new(0.5).unwrap();
    let data: Vec<f32> = (0..40).map(|v| v as f32 * 0.1).collect();
    let mut borrowed = Table::borrowed(&data, 10, 4).unwrap();
    let mut out = vec![0.0f32; 8];
    let e = borrowed
        .lookup_renorm_in_place(&[3i64, 9], &mut out, m)
        .unwrap_err();
    assert!(matches!(e, Error::ReadOnlyTable), "{e}");
    assert!(out.iter().all(|&v| v == 0.0));
    assert!(matches!(
        borrowed.renorm_in_place(&[3i64], m),
        Err(Error::ReadOnlyTable)
    ));
    borrowed
        .lookup_renorm_output_only(&[3i64, 9], &mut out, m)
        .unwrap();
    let s = (0.5 / (f64::from(scalar_l2(&data[12..16])) + 1e-7)) as f32;
    let want: Vec<f32> = data[12..16].iter().map(|x| x * s).collect();
    assert_eq!(&out[..4], &want[..]);

    // A file: read-only map refuses, writable map renorms the file itself.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let owned = Table::from_slice(&data, 10, 4).unwrap();
    owned.save(&path).unwrap();
    let mut mapped = Table::open(&path, None).unwrap();
    assert!(matches!(
        mapped.lookup_renorm_in_place(&[3i64, 9], &mut out, m),
        Err(Error::ReadOnlyTable)
    ));
    let mut expected = vec![0.0f32; 8];
    mapped
        .lookup_renorm_output_only(&[3i64, 9], &mut expected, m)
        .unwrap();
    drop(mapped);
    let mut writable = Table::open_with(
        &path,
        &OpenOptions {
            tensor: None,
            mode: OpenMode::MapWritable,
            ..Default::default()
        },
    )
    .unwrap();
    writable
        .lookup_renorm_in_place(&[3i64, 9], &mut out, m)
        .unwrap();
    writable.flush().unwrap();
    drop(writable);
    assert_eq!(out, expected);
    let reopened = Table::open(&path, None).unwrap();
    assert_eq!(reopened.row::<f32>(3).unwrap().unwrap(), &expected[..4]);
    assert_eq!(reopened.row::<f32>(9).unwrap().unwrap(), &expected[4..]);
    assert_eq!(reopened.row::<f32>(2).unwrap().unwrap(), &data[8..12]);
}

/// The 2-norm in f32 for a 4-element row: lanes 0..3 each hold one square, and the fixed
/// tree adds (0 + 2) + (1 + 3).
fn scalar_l2(row: &[f32]) -> f32 {
    let sq: Vec<f32> = row.iter().map(|x| x * x).collect();
    ((sq[0] + sq[2]) + (sq[1] + sq[3])).sqrt()
}

#[test]
fn general_p_and_padding_row() {
    // p = 3.5 against the direct formula within f32 rounding; the padding row is renormed
    // like any other (PyTorch's embedding_renorm_ ignores padding_idx).
    let data = [3.0f32, -4.0, 1.0, 0.0, 0.1, 0.1];
    let mut table = Table::from_slice(&data, 2, 3)
        .unwrap()
        .with_padding_idx(0)
        .unwrap();
    let m = MaxNorm::new(1.0).unwrap().with_norm_type(3.5).unwrap();
    let mut out = vec![0.0f32; 6];
    table
        .lookup_renorm_in_place(&[0i64, 1], &mut out, m)
        .unwrap();
    let norm = (3f64.powf(3.5) + 4f64.powf(3.5) + 1.0).powf(1.0 / 3.5);
    let s = 1.0 / (norm + 1e-7);
    for (got, x) in out[..3].iter().zip(&data[..3]) {
        assert!((f64::from(*got) - f64::from(*x) * s).abs() <= 1e-6, "{got}");
    }
    assert_eq!(&out[3..], &data[3..]);
}

/// A bf16 row holding a signalling NaN has a NaN norm and is left alone: the lookup returns
/// its stored bits, widened with the quiet bit still clear, through every path that widens
/// (the renorm lookups in both modes, the plain lookup, `to_dtype`). Runs on the detected
/// kernels; CI runs it again with every forced `EMBEDDING_LOOKUP_ISA`.
#[test]
fn bf16_signalling_nan_rows_come_out_with_their_bits() {
    // 35 wide: a full vector of 32 and a tail of 3, the NaN in the tail (where the AVX2,
    // portable and scalar kernels once quieted it) and in the body.
    let (rows, dim) = (4, 35);
    let mut bits: Vec<u16> = (0..rows * dim)
        .map(|i| bf16::from_f32(((i % 7) as f32 - 3.0) * 0.75).to_bits())
        .collect();
    bits[33] = 0xff8d;
    bits[dim + 3] = 0x7f81;
    let values: Vec<bf16> = bits.iter().map(|&b| bf16::from_bits(b)).collect();
    let mut table = Table::from_slice(&values, rows, dim).unwrap();
    let indices: Vec<i64> = vec![0, 1, 2, 3, 1, 0];
    let widened = |r: usize| -> Vec<u32> {
        bits[r * dim..(r + 1) * dim]
            .iter()
            .map(|&b| (b as u32) << 16)
            .collect()
    };
    let m = MaxNorm::new(1.0).unwrap();
    let plain: Vec<f32> = table.lookup(&indices).unwrap();
    let mut only = vec![0.0f32; indices.len() * dim];
    table
        .lookup_renorm_output_only(&indices, &mut only, m)
        .unwrap();
    let mut in_place = vec![0.0f32; indices.len() * dim];
    table
        .lookup_renorm_in_place(&indices, &mut in_place, m)
        .unwrap();
    for (what, out) in [
        ("lookup", &plain),
        ("output only", &only),
        ("in place", &in_place),
    ] {
        for (pos, &r) in indices.iter().enumerate() {
            let got: Vec<u32> = out[pos * dim..(pos + 1) * dim]
                .iter()
                .map(|x| x.to_bits())
                .collect();
            if r < 2 {
                assert_eq!(got, widened(r as usize), "{what}: position {pos}, row {r}");
            } else if what != "lookup" {
                assert_ne!(got, widened(r as usize), "{what}: row {r} was not rescaled");
            }
        }
    }
    // Rows 0 and 1 are unchanged in the table; rows 2 and 3 were rescaled in place.
    let after: &[u16] = bytemuck::cast_slice(table.as_bytes());
    assert_eq!(&after[..2 * dim], &bits[..2 * dim]);
    let f32_table = Table::from_slice(&values, rows, dim)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let f32_bits: &[u32] = bytemuck::cast_slice(f32_table.as_bytes());
    assert_eq!(f32_bits[33], 0xff8d_0000, "to_dtype(F32)");
    assert_eq!(f32_bits[dim + 3], 0x7f81_0000, "to_dtype(F32)");
}
