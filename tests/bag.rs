//! Embedding bags through the public API and the `emb bag` command: PyTorch's golden cases,
//! a plain reference, every refusal (with nothing written), and thread-count independence.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use embedding_lookup::conformance::{self, Case, Outcome};
use embedding_lookup::table::formats::{write_tensors, TensorDType, TensorToWrite};
use embedding_lookup::util::Rng;
use embedding_lookup::{BagMode, BagOptions, Bags, DType, Error, Table};
use half::{bf16, f16};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch")
}

#[test]
fn every_pytorch_bag_case_passes() {
    let mut ran = 0;
    for file in conformance::case_files(&fixtures()).unwrap() {
        let case = Case::load(&file).unwrap();
        if case.meta("op").as_deref() != Some("embedding_bag") {
            continue;
        }
        let report = conformance::run_case(&case);
        if case.name == "bag_renorm_mean" {
            // max_norm with bags waits for the renorm pass: reported as skipped, never passed.
            assert!(
                matches!(report.outcome, Outcome::Skipped(_)),
                "{}: {:?}",
                case.name,
                report.outcome
            );
            continue;
        }
        assert_eq!(report.outcome, Outcome::Passed, "{}", case.name);
        if case.meta("expect_error").is_none() {
            let (name, out) = &report.produced[0];
            assert_eq!(name, "out");
            assert_eq!(out.dtype, TensorDType::Float(DType::F32), "{}", case.name);
        }
        ran += 1;
    }
    // 39 bag cases and 5 refusals (index, 3 offsets, weights with mean).
    assert_eq!(ran, 44);
}

/// The definition, in f64 over the f32-widened table: the library must be within f32
/// rounding of it.
fn reference(
    table: &[f32],
    dim: usize,
    indices: &[i64],
    bounds: &[(usize, usize)],
    mode: BagMode,
    weights: Option<&[f32]>,
    padding: Option<usize>,
) -> Vec<f64> {
    let mut out = vec![0.0f64; bounds.len() * dim];
    for (b, &(s, e)) in bounds.iter().enumerate() {
        let kept: Vec<usize> = (s..e)
            .filter(|&i| Some(indices[i] as usize) != padding)
            .collect();
        for j in 0..dim {
            let v = |i: usize| table[indices[i] as usize * dim + j] as f64;
            out[b * dim + j] = match mode {
                BagMode::Sum => kept
                    .iter()
                    .map(|&i| v(i) * weights.map_or(1.0, |w| w[i] as f64))
                    .sum(),
                BagMode::Mean => kept.iter().map(|&i| v(i)).sum::<f64>() / kept.len().max(1) as f64,
                BagMode::Max => kept
                    .iter()
                    .map(|&i| v(i))
                    .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
                    .unwrap_or(0.0),
            };
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        // f32 accumulation of up to ~40 standard-normal terms.
        assert!(
            (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}: element {i} is {g}, expected {w}"
        );
    }
}

/// Random bags with empty ones, single entries, a long one and padding entries.
fn random_bags(rng: &mut Rng, rows: usize, bags: usize) -> (Vec<i64>, Vec<i64>) {
    let mut indices = Vec::new();
    let mut offsets = Vec::new();
    for b in 0..bags {
        offsets.push(indices.len() as i64);
        let len = match b % 7 {
            0 => 0,
            1 => 1,
            2 => 70,
            _ => rng.below(12) as usize,
        };
        indices.extend((0..len).map(|_| rng.below(rows as u64) as i64));
    }
    (indices, offsets)
}

fn bounds_of(offsets: &[i64], n: usize) -> Vec<(usize, usize)> {
    (0..offsets.len())
        .map(|b| {
            let end = offsets.get(b + 1).map_or(n, |&o| o as usize);
            (offsets[b] as usize, end)
        })
        .collect()
}

#[test]
fn matches_the_definition_for_every_mode_dtype_and_width() {
    let mut rng = Rng::new(11);
    for dim in [1, 7, 16, 33, 64, 130] {
        let rows = 40;
        let (indices, offsets) = random_bags(&mut rng, rows, 30);
        let bounds = bounds_of(&offsets, indices.len());
        let weights: Vec<f32> = (0..indices.len()).map(|_| rng.normal()).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for padding in [None, Some(3usize)] {
                let mut table = Table::randn(rows, dim, dtype, 5).unwrap();
                if let Some(p) = padding {
                    table = table.with_padding_idx(p as i64).unwrap();
                }
                let widened: Vec<f32> = table
                    .to_dtype(DType::F32)
                    .unwrap()
                    .as_slice()
                    .unwrap()
                    .to_vec();
                for (mode, w) in [
                    (BagMode::Sum, None),
                    (BagMode::Sum, Some(&weights[..])),
                    (BagMode::Mean, None),
                    (BagMode::Max, None),
                ] {
                    let options = BagOptions {
                        mode,
                        per_sample_weights: w,
                        ..Default::default()
                    };
                    let what = format!(
                        "{dtype} dim {dim} {mode} weighted {} padding {padding:?}",
                        w.is_some()
                    );
                    let want = reference(&widened, dim, &indices, &bounds, mode, w, padding);
                    let got: Vec<f32> = table
                        .bag(&indices, Bags::offsets(&offsets), &options)
                        .unwrap();
                    assert_close(&got, &want, &what);
                    // i32 indices and offsets give the same bits.
                    let idx32: Vec<i32> = indices.iter().map(|&i| i as i32).collect();
                    let off32: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
                    let got32: Vec<f32> =
                        table.bag(&idx32, Bags::offsets(&off32), &options).unwrap();
                    assert_eq!(bits(&got32), bits(&got), "{what} (i32)");
                    // The table's own dtype: the f32 result rounded once.
                    match dtype {
                        DType::F32 => {}
                        DType::F16 => {
                            let native: Vec<f16> = table
                                .bag(&indices, Bags::offsets(&offsets), &options)
                                .unwrap();
                            let rounded: Vec<f16> = got.iter().map(|&v| f16::from_f32(v)).collect();
                            assert_eq!(native, rounded, "{what} (native)");
                        }
                        DType::BF16 => {
                            let native: Vec<bf16> = table
                                .bag(&indices, Bags::offsets(&offsets), &options)
                                .unwrap();
                            let rounded: Vec<bf16> =
                                got.iter().map(|&v| bf16::from_f32(v)).collect();
                            assert_eq!(native, rounded, "{what} (native)");
                        }
                    }
                }
            }
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn bag_shapes_csr_and_fixed() {
    // Rows r_k = [k, 10 k].
    let data: Vec<f32> = (0..6).flat_map(|k| [k as f32, 10.0 * k as f32]).collect();
    let table = Table::from_slice(&data, 6, 2).unwrap();
    let sum = BagOptions::mode(BagMode::Sum);
    let indices = [1i64, 2, 3, 4, 5];
    // CSR: the last offset ends the last bag; entries after it belong to no bag.
    let out: Vec<f32> = table.bag(&indices, Bags::csr(&[0i64, 2, 3]), &sum).unwrap();
    assert_eq!(out, [3.0, 30.0, 3.0, 30.0]);
    // Without include_last_offset the last bag runs to the end.
    let out: Vec<f32> = table
        .bag(&indices, Bags::offsets(&[0i64, 2, 3]), &sum)
        .unwrap();
    assert_eq!(out, [3.0, 30.0, 3.0, 30.0, 9.0, 90.0]);
    // No offsets: no bags. One CSR offset: no bags either.
    assert!(table
        .bag::<_, i64, f32>(&indices, Bags::offsets(&[]), &sum)
        .unwrap()
        .is_empty());
    assert!(table
        .bag::<_, i64, f32>(&indices, Bags::csr(&[0]), &sum)
        .unwrap()
        .is_empty());
    // 2-D (2, 2): two bags of two; max of an all-padding bag is zeros.
    let padded = Table::from_slice(&data, 6, 2)
        .unwrap()
        .with_padding_idx(-1)
        .unwrap();
    let out: Vec<f32> = padded
        .bag(
            &[5u64, 5, 0, 4],
            Bags::fixed(2),
            &BagOptions::mode(BagMode::Max),
        )
        .unwrap();
    assert_eq!(out, [0.0, 0.0, 4.0, 40.0]);
    // Every mode, every dtype: a bag of padding only is zeros, like an empty bag.
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = padded.to_dtype(dtype).unwrap();
        for mode in [BagMode::Sum, BagMode::Mean, BagMode::Max] {
            let out: Vec<f32> = t
                .bag(
                    &[5i64, 5, 5, 2],
                    Bags::offsets(&[0i64, 3, 3]),
                    &BagOptions::mode(mode),
                )
                .unwrap();
            assert_eq!(out, [0.0, 0.0, 0.0, 0.0, 2.0, 20.0], "{dtype} {mode}");
        }
    }
    // Mean divides by the non-padding count only.
    let out: Vec<f32> = padded
        .bag(
            &[5u64, 1, 3, 5],
            Bags::fixed(4),
            &BagOptions::mode(BagMode::Mean),
        )
        .unwrap();
    assert_eq!(out, [2.0, 20.0]);
}

#[test]
fn refusals_name_the_problem_and_write_nothing() {
    let table = Table::randn(10, 4, DType::F32, 1).unwrap();
    let indices = [1i64, 2, 3];
    let sentinel = [-7.0f32; 8];
    let check =
        |bags: Bags<'_, i64>, options: &BagOptions<'_>, out_len: usize, kind: &str, text: &str| {
            let mut out = vec![-7.0f32; out_len];
            let e = table
                .bag_into(&indices, bags, options, &mut out)
                .unwrap_err();
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(text), "{e:?} lacks {text:?}");
            assert!(out.iter().all(|&v| v == -7.0), "output written on {e}");
        };
    let sum = BagOptions::mode(BagMode::Sum);
    check(
        Bags::offsets(&[1, 2]),
        &sum,
        8,
        "bad_offsets",
        "offsets[0] is 1",
    );
    check(
        Bags::offsets(&[0, 2, 1]),
        &sum,
        12,
        "bad_offsets",
        "offsets[2] = 1 is less than offsets[1] = 2",
    );
    check(
        Bags::offsets(&[0, 4]),
        &sum,
        8,
        "bad_offsets",
        "offsets[1] = 4 is past the end of the 3 indices",
    );
    check(
        Bags::csr(&[]),
        &sum,
        0,
        "bad_offsets",
        "include_last_offset",
    );
    check(
        Bags::offsets(&[0, 1]),
        &sum,
        4,
        "output_length",
        "8 are required",
    );
    check(Bags::fixed(2), &sum, 8, "shape_mismatch", "3 indices");
    let w = [1.0f32, 2.0, 3.0];
    let mean_w = BagOptions {
        mode: BagMode::Mean,
        per_sample_weights: Some(&w),
        ..Default::default()
    };
    check(
        Bags::offsets(&[0, 1]),
        &mean_w,
        8,
        "per_sample_weights_mode",
        "only supported with mode sum, not mean",
    );
    let max_w = BagOptions {
        mode: BagMode::Max,
        ..mean_w
    };
    check(
        Bags::offsets(&[0, 1]),
        &max_w,
        8,
        "per_sample_weights_mode",
        "not max",
    );
    let short = BagOptions {
        mode: BagMode::Sum,
        per_sample_weights: Some(&w[..2]),
        ..Default::default()
    };
    check(
        Bags::offsets(&[0, 1]),
        &short,
        8,
        "per_sample_weights_mode",
        "2 weights for 3 indices",
    );
    let renorm = BagOptions {
        max_norm: Some(1.0),
        ..BagOptions::mode(BagMode::Mean)
    };
    check(
        Bags::offsets(&[0, 1]),
        &renorm,
        8,
        "invalid_argument",
        "max_norm with bags is not supported yet",
    );
    // An index out of range, named with its position and value.
    let mut out = sentinel;
    let e = table
        .bag_into(&[1i64, 10, 3], Bags::offsets(&[0i64, 1]), &sum, &mut out)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "index 10 at position 1 is out of range for a table of 10 rows"
    );
    assert_eq!(out, sentinel);
    let e = table
        .bag_into(&[1i32, 2, -1], Bags::fixed(3), &sum, &mut out[..4])
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::IndexOutOfRange {
                index: -1,
                position: 2,
                rows: 10
            }
        ),
        "{e}"
    );
    // An f32 table cannot pool into f16.
    let mut half_out = [f16::ZERO; 4];
    let e = table
        .bag_into(&indices, Bags::fixed(3), &sum, &mut half_out)
        .unwrap_err();
    assert_eq!(e.kind(), "dtype_mismatch");
}

#[test]
fn thread_counts_give_identical_bits() {
    let mut rng = Rng::new(99);
    let (rows, dim) = (50_000, 64);
    let mut indices = Vec::new();
    let mut offsets = Vec::new();
    for b in 0..20_000 {
        offsets.push(indices.len() as i64);
        // Very uneven bags: mostly short, every 500th very long.
        let len = if b % 500 == 0 {
            2_000
        } else {
            rng.below(20) as usize
        };
        indices.extend((0..len).map(|_| rng.below(rows) as i64));
    }
    let weights: Vec<f32> = (0..indices.len()).map(|_| rng.normal()).collect();
    for dtype in [DType::F32, DType::BF16] {
        let table = Table::randn(rows as usize, dim, dtype, 3)
            .unwrap()
            .with_padding_idx(7)
            .unwrap();
        for (mode, w) in [
            (BagMode::Sum, Some(&weights[..])),
            (BagMode::Mean, None),
            (BagMode::Max, None),
        ] {
            let options = BagOptions {
                mode,
                per_sample_weights: w,
                ..Default::default()
            };
            let run = |threads: usize| -> Vec<u32> {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let out: Vec<f32> = pool
                    .install(|| table.bag(&indices, Bags::offsets(&offsets), &options))
                    .unwrap();
                bits(&out)
            };
            let one = run(1);
            assert_eq!(run(2), one, "{dtype} {mode}: 2 threads");
            assert_eq!(run(8), one, "{dtype} {mode}: 8 threads");
        }
    }
}

// ---- the `emb bag` command ----

fn write_ints(path: &Path, dtype: TensorDType, shape: Vec<usize>, data: &[u8]) {
    write_tensors(
        path,
        &[TensorToWrite {
            name: "t",
            dtype,
            shape,
            data,
        }],
        &BTreeMap::new(),
    )
    .unwrap();
}

fn emb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_emb"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn emb_bag_writes_what_the_library_computes() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let table = Table::randn(50, 12, DType::F16, 4).unwrap();
    table.save(p("table.safetensors")).unwrap();
    let mut rng = Rng::new(5);
    let (indices, offsets) = random_bags(&mut rng, 50, 9);
    write_ints(
        Path::new(&p("idx.npy")),
        TensorDType::I64,
        vec![indices.len()],
        bytemuck::cast_slice(&indices),
    );
    let off32: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
    write_ints(
        Path::new(&p("off.npy")),
        TensorDType::I32,
        vec![off32.len()],
        bytemuck::cast_slice(&off32),
    );
    let weights: Vec<f32> = (0..indices.len()).map(|_| rng.normal()).collect();
    write_tensors(
        Path::new(&p("w.npy")),
        &[TensorToWrite {
            name: "w",
            dtype: TensorDType::Float(DType::F32),
            shape: vec![weights.len()],
            data: bytemuck::cast_slice(&weights),
        }],
        &BTreeMap::new(),
    )
    .unwrap();
    let padded = Table::open(p("table.safetensors"), None)
        .unwrap()
        .with_padding_idx(-2)
        .unwrap();
    for (mode, extra) in [
        ("sum", vec!["--per-sample-weights", "W"]),
        ("mean", vec![]),
        ("max", vec!["--out-dtype", "native"]),
    ] {
        for threads in ["1", "2"] {
            let out = p(&format!("out_{mode}_{threads}.npy"));
            let wpath = p("w.npy");
            let extra: Vec<&str> = extra
                .iter()
                .map(|&a| if a == "W" { wpath.as_str() } else { a })
                .collect();
            let tp = p("table.safetensors");
            let (ip, op) = (p("idx.npy"), p("off.npy"));
            let mut args = vec![
                "bag",
                "--table",
                &tp,
                "--indices",
                &ip,
                "--offsets",
                &op,
                "--mode",
                mode,
                "--padding-idx",
                "-2",
                "--out",
                &out,
                "--threads",
                threads,
            ];
            args.extend(extra.iter().copied());
            let r = emb(&args);
            assert!(
                r.status.success(),
                "{mode}: {}",
                String::from_utf8_lossy(&r.stderr)
            );
            let written = Table::open(&out, None).unwrap();
            assert_eq!(written.shape(), [offsets.len(), 12]);
            let options = BagOptions {
                mode: mode.parse().unwrap(),
                per_sample_weights: (mode == "sum").then_some(&weights[..]),
                ..Default::default()
            };
            if mode == "max" {
                assert_eq!(written.dtype(), DType::F16);
                let want: Vec<f16> = padded
                    .bag(&indices, Bags::offsets(&offsets), &options)
                    .unwrap();
                assert_eq!(written.as_slice::<f16>().unwrap(), &want[..], "{mode}");
            } else {
                let want: Vec<f32> = padded
                    .bag(&indices, Bags::offsets(&offsets), &options)
                    .unwrap();
                assert_eq!(
                    bits(written.as_slice::<f32>().unwrap()),
                    bits(&want),
                    "{mode}"
                );
            }
        }
    }
    // 2-D indices (3, 2), CSR offsets with include_last_offset.
    let idx2d = [1i64, 2, 3, 4, 5, 6];
    write_ints(
        Path::new(&p("idx2d.npy")),
        TensorDType::I64,
        vec![3, 2],
        bytemuck::cast_slice(&idx2d),
    );
    let (tp, ip, out) = (
        p("table.safetensors"),
        p("idx2d.npy"),
        p("out2d.safetensors"),
    );
    let r = emb(&[
        "bag",
        "--table",
        &tp,
        "--indices",
        &ip,
        "--mode",
        "sum",
        "--out",
        &out,
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let written = Table::open(&out, Some("out")).unwrap();
    let want: Vec<f32> = table
        .bag(&idx2d, Bags::fixed(2), &BagOptions::mode(BagMode::Sum))
        .unwrap();
    assert_eq!(bits(written.as_slice::<f32>().unwrap()), bits(&want));
    write_ints(
        Path::new(&p("csr.npy")),
        TensorDType::I64,
        vec![3],
        bytemuck::cast_slice(&[0i64, 2, 5]),
    );
    let (ip, op, out) = (p("idx.npy"), p("csr.npy"), p("csr_out.npy"));
    let r = emb(&[
        "bag",
        "--table",
        &tp,
        "--indices",
        &ip,
        "--offsets",
        &op,
        "--include-last-offset",
        "--mode",
        "mean",
        "--out",
        &out,
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let written = Table::open(&out, None).unwrap();
    let want: Vec<f32> = table
        .bag(
            &indices,
            Bags::csr(&[0i64, 2, 5]),
            &BagOptions::mode(BagMode::Mean),
        )
        .unwrap();
    assert_eq!(bits(written.as_slice::<f32>().unwrap()), bits(&want));
}

#[test]
fn emb_bag_refuses_bad_input_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    Table::randn(10, 4, DType::F32, 4)
        .unwrap()
        .save(p("t.npy"))
        .unwrap();
    write_ints(
        Path::new(&p("i.npy")),
        TensorDType::I64,
        vec![3],
        bytemuck::cast_slice(&[1i64, 12, 3]),
    );
    write_ints(
        Path::new(&p("ok.npy")),
        TensorDType::I64,
        vec![3],
        bytemuck::cast_slice(&[1i64, 2, 3]),
    );
    write_ints(
        Path::new(&p("o.npy")),
        TensorDType::I64,
        vec![2],
        bytemuck::cast_slice(&[0i64, 2]),
    );
    write_ints(
        Path::new(&p("bad_o.npy")),
        TensorDType::I64,
        vec![2],
        bytemuck::cast_slice(&[0i64, 5]),
    );
    let (t, i, ok, o, bad_o, out) = (
        p("t.npy"),
        p("i.npy"),
        p("ok.npy"),
        p("o.npy"),
        p("bad_o.npy"),
        p("out.npy"),
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--indices", &i, "--offsets", &o, "--mode", "sum"],
            "index 12 at position 1",
        ),
        (
            vec!["--indices", &ok, "--offsets", &bad_o, "--mode", "sum"],
            "offsets[1] = 5 is past the end",
        ),
        (vec!["--indices", &ok, "--mode", "sum"], "need --offsets"),
        (
            vec![
                "--indices",
                &ok,
                "--offsets",
                &o,
                "--mode",
                "mean",
                "--max-norm",
                "1",
            ],
            "max_norm with bags is not supported yet",
        ),
        (
            vec![
                "--indices",
                &ok,
                "--offsets",
                &o,
                "--mode",
                "mean",
                "--per-sample-weights",
                &t,
            ],
            "per_sample_weights have shape",
        ),
    ];
    for (args, text) in cases {
        let mut full = vec!["bag", "--table", &t, "--out", &out];
        full.extend(args);
        let r = emb(&full);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{full:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(text),
            "{full:?}: {stderr}"
        );
        assert!(!Path::new(&out).exists(), "{full:?} left an output");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        5,
        "temporary files left behind"
    );
}
