//! Robustness: hostile arguments and files, files changed under a table, and many threads
//! sharing one table. Every failure must be an `Error` naming what is wrong, never a panic.

use std::path::Path;

use embedding_lookup::table::formats::{self, TensorDType, TensorToWrite};
use embedding_lookup::{DType, Error, OpenMode, OpenOptions, StorageKind, Table};
use half::{bf16, f16};

// ---------------------------------------------------------------------------------------------
// Hostile arguments

#[test]
fn empty_rowed_slices_cannot_claim_more_rows_than_an_isize() {
    // Regression: `borrowed(&[], usize::MAX, 0)` made a table whose negative indices passed
    // validation (wrapped below the row count).
    for rows in [usize::MAX, isize::MAX as usize + 1] {
        let e = Table::borrowed::<f32>(&[], rows, 0).unwrap_err();
        assert_eq!(e.kind(), "invalid_argument", "{e}");
        assert!(e.to_string().contains(&rows.to_string()), "{e}");
        assert!(Table::borrowed_mut::<f16>(&mut [], rows, 0).is_err());
        assert!(Table::from_slice::<bf16>(&[], rows, 0).is_err());
    }
    let t = Table::borrowed::<f32>(&[], isize::MAX as usize, 0).unwrap();
    match t.lookup::<i64, f32>(&[0, -2]) {
        Err(Error::IndexOutOfRange {
            index: -2,
            position: 1,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn rows_of_more_bytes_than_an_isize_are_refused_even_in_empty_tables() {
    // Regression (found by fuzzing npy_file): a (0, 2^62) f32 file opened as a table whose
    // `row_bytes()` overflowed.
    let wide = 1usize << 62;
    assert!(Table::zeros(0, wide, DType::F32).is_err());
    assert!(Table::borrowed::<f32>(&[], 0, wide).is_err());
    assert!(Table::borrowed_mut::<f16>(&mut [], 0, usize::MAX).is_err());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wide.npy");
    std::fs::write(&p, npy_bytes(&format!("(0, {wide})"), "<f4", &[])).unwrap();
    let e = Table::open(&p, None).unwrap_err();
    assert_eq!(e.kind(), "format", "{e}");
    assert!(e.to_string().contains("does not fit"), "{e}");
    // The widest rows that fit are fine, as f16 (2 bytes each).
    let t = Table::zeros(0, isize::MAX as usize / 2, DType::F16).unwrap();
    assert_eq!(t.row_bytes(), isize::MAX as usize - 1);
    assert!(t.lookup::<i64, f32>(&[]).unwrap().is_empty());
}

#[test]
fn lookup_reports_bad_indices_before_allocating_its_output() {
    // Regression (found by fuzzing npy_file): an f16 table of shape (0, 2^62 - 1) widened to
    // f32 made `lookup` allocate 2^62 - 1 floats for a bad index, a panic (layout overflow)
    // instead of the index error.
    let dim = (1usize << 62) - 1;
    let t = Table::borrowed::<f16>(&[], 0, dim).unwrap();
    for idx in [&[0u64][..], &[5, 0]] {
        match t.lookup::<u64, f32>(idx) {
            Err(Error::IndexOutOfRange { position: 0, .. }) => {}
            other => panic!("{:?}", other.map(|v| v.len())),
        }
        match t.lookup::<u64, f16>(idx) {
            Err(Error::IndexOutOfRange { position: 0, .. }) => {}
            other => panic!("{:?}", other.map(|v| v.len())),
        }
    }
    assert!(t.lookup::<u64, f32>(&[]).unwrap().is_empty());
    // The dtype is still checked first.
    assert_eq!(
        t.lookup::<u64, bf16>(&[0]).unwrap_err().kind(),
        "dtype_mismatch"
    );
}

#[test]
fn row_past_the_end_is_none_for_any_row_number() {
    // Regression: `row(usize::MAX)` overflowed `(row + 1) * dim` (a panic in debug builds).
    let t = Table::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2).unwrap();
    for r in [3, 4, usize::MAX / 2 + 1, usize::MAX - 1, usize::MAX] {
        assert_eq!(t.row::<f32>(r).unwrap(), None, "row {r}");
    }
    assert_eq!(t.row::<f32>(2).unwrap(), Some(&[5.0f32, 6.0][..]));
    let empty = Table::borrowed::<f32>(&[], 1 << 40, 0).unwrap();
    assert_eq!(empty.row::<f32>(usize::MAX).unwrap(), None);
    assert_eq!(empty.row::<f32>((1 << 40) - 1).unwrap(), Some(&[][..]));
}

#[test]
fn empty_rows_of_any_count_up_to_isize_max() {
    // Regression: `zeros`/`from_slice` multiplied rows by the element size before the zero
    // dimension and refused a (2^62, 0) table that `borrowed` accepted; files of that shape
    // (which numpy and PyTorch write) were refused as overflowing.
    let rows = 1usize << 62;
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("empty.safetensors");
    formats::write_tensors(
        &st,
        &[TensorToWrite {
            name: "weight",
            dtype: TensorDType::Float(DType::F32),
            shape: vec![rows, 0],
            data: &[],
        }],
        &Default::default(),
    )
    .unwrap();
    let npy = dir.path().join("empty.npy");
    Table::zeros(rows, 0, DType::F16)
        .unwrap()
        .save(&npy)
        .unwrap();
    let tables = [
        Table::zeros(rows, 0, DType::F32).unwrap(),
        Table::from_slice::<bf16>(&[], rows, 0).unwrap(),
        Table::open(&st, None).unwrap(),
        Table::open(&npy, None).unwrap(),
    ];
    for t in &tables {
        assert_eq!(t.shape(), [rows, 0]);
        assert!(t
            .lookup::<u64, f32>(&[rows as u64 - 1, 0])
            .unwrap()
            .is_empty());
        match t.lookup::<i64, f32>(&[0, rows as i64, -1]) {
            Err(Error::IndexOutOfRange { position: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    // Above isize::MAX rows: refused everywhere.
    let too_many = isize::MAX as usize + 1;
    assert!(Table::zeros(too_many, 0, DType::F32).is_err());
    let bytes = npy_bytes(&format!("({too_many}, 0)"), "<f4", &[]);
    let p = dir.path().join("too_many.npy");
    std::fs::write(&p, bytes).unwrap();
    let e = Table::open(&p, None).unwrap_err();
    assert_eq!(e.kind(), "format", "{e}");
}

// ---------------------------------------------------------------------------------------------
// Hostile files: named cases with the error each must give (every committed fuzz seed runs
// through the fuzz targets' own checks in `tests/fuzz_seeds.rs`).

fn npy_bytes(shape: &str, descr: &str, data: &[u8]) -> Vec<u8> {
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    v.extend_from_slice(dict.as_bytes());
    v.extend_from_slice(data);
    v
}

fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// Each hostile file is refused in every open mode with a format error naming the file and
/// the problem.
#[test]
fn hostile_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let f32x4 = bytemuck::cast_slice::<f32, u8>(&[1.0, 2.0, 3.0, 4.0]).to_vec();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("npy", b"\x93NUMPY\x01".to_vec(), "truncated"),
        (
            "npy",
            npy_bytes("(2, 2)", "<f4", &f32x4[..12]),
            "needs 16 data bytes",
        ),
        (
            "npy",
            npy_bytes("(1, 2)", "<f4", &f32x4),
            "needs 8 data bytes",
        ),
        (
            "npy",
            npy_bytes("(4611686018427387904, 4)", "<f4", &f32x4),
            "overflows",
        ),
        ("npy", npy_bytes("(2, 2)", ">f4", &f32x4), "big-endian"),
        (
            "npy",
            npy_bytes("(2, 2)", "<c8", &f32x4),
            "\"<c8\" is not supported",
        ),
        ("npy", npy_bytes("(2, -2)", "<f4", &f32x4), "bad dimension"),
        ("npy", npy_bytes("(4,)", "<f4", &f32x4), "2-D"),
        ("npy", npy_bytes("(2, 2)", "<i4", &f32x4), "dtype i32"),
        (
            "safetensors",
            safetensors_bytes(
                r#"{"weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,64]}}"#,
                &f32x4,
            ),
            "safetensors",
        ),
        (
            "safetensors",
            safetensors_bytes(
                r#"{"weight":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,16]}}"#,
                &f32x4,
            ),
            "safetensors",
        ),
        (
            "safetensors",
            safetensors_bytes(
                r#"{"weight":{"dtype":"F64","shape":[1,2],"data_offsets":[0,16]}}"#,
                &f32x4,
            ),
            "dtype",
        ),
        (
            "safetensors",
            safetensors_bytes(
                r#"{"weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
                &f32x4[..15],
            ),
            "safetensors",
        ),
        (
            "safetensors",
            [u64::MAX.to_le_bytes().as_slice(), b"{}"].concat(),
            "safetensors",
        ),
        ("safetensors", b"\x08\x00".to_vec(), "safetensors"),
    ];
    for (i, (ext, bytes, reason)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.{ext}"));
        std::fs::write(&path, bytes).unwrap();
        for mode in [OpenMode::Map, OpenMode::MapWritable, OpenMode::Copy] {
            let e = Table::open_with(
                &path,
                &OpenOptions {
                    tensor: None,
                    mode,
                    ..Default::default()
                },
            )
            .unwrap_err();
            let msg = e.to_string();
            assert_eq!(e.kind(), "format", "case {i}: {msg}");
            assert!(
                msg.contains(&format!("case{i}.{ext}")) && msg.contains(reason),
                "case {i} ({mode:?}): {msg:?} should name the file and {reason:?}"
            );
        }
    }
}

/// A writable map needs data aligned for its dtype; read-only opens copy misaligned data.
#[test]
fn misaligned_data_cannot_be_mapped_writable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.safetensors");
    // The 8-byte length and this header put the data at an odd offset.
    let header = r#"{"w":{"dtype":"F16","shape":[1,2],"data_offsets":[0,4]}} "#;
    assert_eq!((8 + header.len()) % 2, 1);
    let data: Vec<u8> = [f16::from_f32(1.5), f16::from_f32(-2.0)]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(&path, safetensors_bytes(header, &data)).unwrap();
    let e = Table::open_with(
        &path,
        &OpenOptions {
            tensor: None,
            mode: OpenMode::MapWritable,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("not aligned"), "{e}");
    let t = Table::open(&path, None).unwrap();
    assert!(!t.is_zero_copy());
    assert_eq!(t.lookup::<i32, f32>(&[0]).unwrap(), [1.5, -2.0]);
}

// ---------------------------------------------------------------------------------------------
// Files changed after opening

fn saved_table(dir: &Path, name: &str) -> (Table<'static>, std::path::PathBuf) {
    let table = Table::randn(64, 16, DType::F32, 11).unwrap();
    let path = dir.join(name);
    table.save(&path).unwrap();
    (table, path)
}

/// `OpenMode::Copy` owns its data: truncating, rewriting or removing the file later changes
/// nothing.
#[test]
fn copied_table_survives_the_file_being_truncated_rewritten_or_removed() {
    let dir = tempfile::tempdir().unwrap();
    for ext in ["safetensors", "npy"] {
        let (original, path) = saved_table(dir.path(), &format!("t.{ext}"));
        let copy = Table::open_with(
            &path,
            &OpenOptions {
                tensor: None,
                mode: OpenMode::Copy,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(copy.storage_kind(), StorageKind::Owned);
        let idx: Vec<u32> = (0..64).rev().collect();
        let want: Vec<f32> = original.lookup(&idx).unwrap();

        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert_eq!(copy.lookup::<u32, f32>(&idx).unwrap(), want);
        std::fs::write(&path, vec![0xffu8; 100_000]).unwrap();
        assert_eq!(copy.lookup::<u32, f32>(&idx).unwrap(), want);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(copy.lookup::<u32, f32>(&idx).unwrap(), want);
        assert_eq!(copy.as_bytes(), original.as_bytes());
    }
}

/// Replacing a file by renaming a new one over it (as `Table::save` and every `emb` output
/// do) is safe for a table mapped from the old file: the map keeps the old contents.
#[test]
fn mapped_table_keeps_its_contents_when_the_file_is_replaced_by_rename() {
    let dir = tempfile::tempdir().unwrap();
    let (original, path) = saved_table(dir.path(), "t.safetensors");
    let mapped = Table::open(&path, None).unwrap();
    assert!(mapped.is_zero_copy());
    // Save a different table over the mapped file's path, and over itself.
    Table::randn(3, 2, DType::F16, 1)
        .unwrap()
        .save(&path)
        .unwrap();
    assert_eq!(mapped.as_bytes(), original.as_bytes());
    mapped.save(&path).unwrap();
    let reopened = Table::open(&path, None).unwrap();
    assert_eq!(reopened.as_bytes(), original.as_bytes());
    let idx = [63i64, 0, 17];
    assert_eq!(
        mapped.lookup::<i64, f32>(&idx).unwrap(),
        original.lookup::<i64, f32>(&idx).unwrap()
    );
}

/// The hazard documented on `Table::open`: a mapped file truncated in place while the table is
/// alive faults on access (SIGBUS). The child process below does exactly that and must die by
/// SIGBUS; the same sequence with `OpenMode::Copy` must succeed.
#[cfg(target_os = "linux")]
#[test]
fn mapped_file_truncated_in_place_faults_and_copy_does_not() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    // Large enough that the data spans pages beyond the truncated size.
    let table = Table::randn(4096, 64, DType::F32, 5).unwrap();
    for (mode, dies) in [("map", true), ("copy", false)] {
        let path = dir.path().join(format!("{mode}.safetensors"));
        table.save(&path).unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "truncation_child",
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("EMB_TRUNCATION_CHILD", &path)
            .env("EMB_TRUNCATION_MODE", mode)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if dies {
            assert_eq!(
                out.status.signal(),
                Some(7), // SIGBUS
                "{mode}: {:?}\n{stderr}",
                out.status
            );
        } else {
            assert!(out.status.success(), "{mode}: {:?}\n{stderr}", out.status);
            assert!(String::from_utf8_lossy(&out.stdout).contains("child read"));
        }
    }
}

/// Run by `mapped_file_truncated_in_place_faults_and_copy_does_not` in a child process.
#[test]
#[ignore = "a child process of mapped_file_truncated_in_place_faults_and_copy_does_not"]
fn truncation_child() {
    let path = std::env::var_os("EMB_TRUNCATION_CHILD").expect("run by the parent test");
    let mode = match std::env::var("EMB_TRUNCATION_MODE").unwrap().as_str() {
        "map" => OpenMode::Map,
        _ => OpenMode::Copy,
    };
    let t = Table::open_with(
        &path,
        &OpenOptions {
            tensor: None,
            mode,
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    let last = t.rows() as i64 - 1;
    let out: Vec<f32> = t.lookup(&[last]).unwrap();
    println!("child read {}", out.iter().sum::<f32>());
}

// ---------------------------------------------------------------------------------------------
// Threads

/// Tables are shared between threads (`Send + Sync`); writing needs `&mut Table`, which the
/// borrow checker grants only while no other thread holds the table (see the compile_fail
/// examples on `Table`).
#[test]
fn tables_and_errors_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Table<'static>>();
    send_sync::<Table<'_>>();
    send_sync::<Error>();
    send_sync::<OpenMode>();
    send_sync::<StorageKind>();
}

/// 64 threads looking up the same table at once get exactly what one thread gets, for every
/// storage (owned, borrowed, mapped, writable map) and dtype, small and parallel-sized batches.
#[test]
fn sixty_four_threads_share_one_table() {
    let dir = tempfile::tempdir().unwrap();
    let base = Table::randn(5000, 96, DType::F32, 21).unwrap();
    let mut tables: Vec<Table<'static>> = Vec::new();
    for (i, dtype) in [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .enumerate()
    {
        let t = base.to_dtype(dtype).unwrap();
        let path = dir.path().join(format!("t{i}.safetensors"));
        t.save(&path).unwrap();
        tables.push(Table::open(&path, None).unwrap());
        tables.push(
            Table::open_with(
                &path,
                &OpenOptions {
                    tensor: None,
                    mode: OpenMode::MapWritable,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        tables.push(t);
    }
    let borrowed_data: Vec<f32> = base.as_slice::<f32>().unwrap().to_vec();
    let borrowed = Table::borrowed(&borrowed_data, 5000, 96).unwrap();
    let mut all: Vec<&Table<'_>> = tables.iter().collect();
    all.push(&borrowed);

    // Small batches (serial in each thread) and one over the parallel threshold.
    let batches: Vec<Vec<i64>> = [7usize, 300, 4000]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n)
                .map(|i| ((i * 7919 + k * 13) % 5000) as i64)
                .collect()
        })
        .collect();
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for table in all {
        let want: Vec<Vec<f32>> = one_thread.install(|| {
            batches
                .iter()
                .map(|b| table.lookup::<i64, f32>(b).unwrap())
                .collect()
        });
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..64)
                .map(|t| {
                    let (batches, want) = (&batches, &want);
                    s.spawn(move || {
                        for round in 0..2 {
                            let k = (t + round) % batches.len();
                            let got: Vec<f32> = table.lookup(&batches[k]).unwrap();
                            assert!(
                                got.iter()
                                    .zip(&want[k])
                                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                                "thread {t}, batch {k}: {table:?}"
                            );
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        });
    }
}

/// An owned table moved into an `Arc` and shared with spawned (`'static`) threads.
#[test]
fn arc_shared_table_across_spawned_threads() {
    let table = std::sync::Arc::new(Table::randn(100, 8, DType::BF16, 2).unwrap());
    let idx: Vec<u32> = (0..100).rev().collect();
    let want: Vec<bf16> = table.lookup(&idx).unwrap();
    let handles: Vec<_> = (0..64)
        .map(|_| {
            let (table, idx) = (table.clone(), idx.clone());
            std::thread::spawn(move || table.lookup::<u32, bf16>(&idx).unwrap())
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), want);
    }
}

// ---------------------------------------------------------------------------------------------
// Writing files

/// Regression: when the final rename failed (or the flush or sync before it), the temporary
/// file was left behind, since only an uncommitted drop removed it.
#[test]
fn a_failed_commit_removes_the_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let table = Table::randn(4, 3, DType::F32, 1).unwrap();
    for name in ["taken.npy", "taken.safetensors"] {
        let dest = dir.path().join(name);
        std::fs::create_dir(&dest).unwrap();
        let e = table.save(&dest).unwrap_err();
        assert_eq!(e.kind(), "io", "{e}");
        assert!(e.to_string().contains(name), "{e}");
        let mut file =
            formats::begin_single_tensor(&dest, "out", &TensorDType::Float(DType::F32), &[4, 3])
                .unwrap();
        file.write_all(table.as_bytes()).unwrap();
        assert_eq!(file.commit().unwrap_err().kind(), "io");
        assert!(dest.is_dir());
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "temporary files left: {names:?}");
}

/// Regression: the first lookup, however small, asked rayon for its thread count, which starts
/// the global pool (one thread per core). Small work must not involve rayon at all. Checked in
/// a child process, where nothing else has started the pool.
#[cfg(target_os = "linux")]
#[test]
fn small_lookups_start_no_threads() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "small_lookup_child",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("EMB_SMALL_LOOKUP_CHILD", "1")
        .env("RAYON_NUM_THREADS", "4")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("new threads: 0 after a small lookup, 4 after a large one"),
        "{stdout}"
    );
}

/// Run by `small_lookups_start_no_threads` in a child process: no new thread for a small
/// lookup, rayon's 4 once a large lookup needs them.
#[cfg(target_os = "linux")]
#[test]
#[ignore = "a child process of small_lookups_start_no_threads"]
fn small_lookup_child() {
    assert!(std::env::var_os("EMB_SMALL_LOOKUP_CHILD").is_some());
    let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let before = threads();
    let t = Table::randn(1000, 64, DType::F32, 1).unwrap();
    let small: Vec<f32> = t.lookup(&[1i64, 2, 3]).unwrap();
    assert_eq!(small.len(), 3 * 64);
    let after_small = threads();
    let many: Vec<i64> = (0..100_000).map(|i| i % 1000).collect();
    let large: Vec<f32> = t.lookup(&many).unwrap();
    assert_eq!(large.len(), 100_000 * 64);
    println!(
        "new threads: {} after a small lookup, {} after a large one",
        after_small - before,
        threads() - before
    );
}

// ---------------------------------------------------------------------------------------------
// Kernel selection

/// `EMBEDDING_LOOKUP_ISA` forces a lower kernel level (how CI runs the suite on every lower
/// level); without it, the best level the CPU has is used. A suite run with a value that is
/// not honoured fails here rather than testing another kernel than the one asked for.
#[test]
fn the_kernel_in_use_is_the_forced_or_the_best_one() {
    use embedding_lookup::kernels::Isa;
    let want = match std::env::var("EMBEDDING_LOOKUP_ISA") {
        Ok(v) if !v.trim().is_empty() => {
            let isa = Isa::from_name(&v)
                .unwrap_or_else(|| panic!("EMBEDDING_LOOKUP_ISA={v} names no kernel level"));
            assert!(
                isa.is_available(),
                "EMBEDDING_LOOKUP_ISA={v}: this CPU cannot run it, so it cannot be tested here"
            );
            isa
        }
        _ => Isa::all_available()[0],
    };
    assert_eq!(Isa::requested().unwrap().unwrap_or(want), want);
    assert_eq!(embedding_lookup::kernel_name(), want.name());
    eprintln!("kernel in use: {}", want.name());
}

/// A library user's typo in `EMBEDDING_LOOKUP_ISA` keeps the best kernels but is reported
/// on stderr (the library cannot refuse to run). Checked in a child run of this test.
#[test]
fn an_unknown_kernel_level_is_reported_by_the_library() {
    const CHILD: &str = "EMBEDDING_LOOKUP_TEST_CHILD";
    let name = "an_unknown_kernel_level_is_reported_by_the_library";
    if std::env::var_os(CHILD).is_some() {
        println!("kernel {}", embedding_lookup::kernel_name());
        return;
    }
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env("EMBEDDING_LOOKUP_ISA", "avx9")
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert!(o.status.success());
    let best = embedding_lookup::kernels::Isa::all_available()[0].name();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(out.contains(&format!("kernel {best}")), "{out}");
    assert!(
        err.contains("EMBEDDING_LOOKUP_ISA=avx9 names no kernel level")
            && err.contains(&format!("using the {best} kernels")),
        "{err}"
    );
}

/// Replacing a file keeps its permissions: an output the user had made private (0600) must
/// not become world-readable because it was rewritten through a temporary file.
#[cfg(unix)]
#[test]
fn replacing_a_file_keeps_its_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let table = Table::randn(4, 3, DType::F32, 1).unwrap();
    for (name, mode) in [("private.npy", 0o600), ("shared.safetensors", 0o640)] {
        let path = dir.path().join(name);
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        table.save(&path).unwrap();
        let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, mode, "{name}: {got:o}");
        assert_eq!(
            Table::open(&path, None).unwrap().as_bytes(),
            table.as_bytes()
        );
    }
}
