//! Out-of-core tables (served from disk with batch read-ahead) give the same bits as the same
//! table in memory for every operation, and a file truncated under its map is an error, not a
//! signal. The policy's choice from memory figures is tested in the library
//! (`table::residency`); read errors injected behind the reader trait in `table::disk`.

use std::path::Path;
use std::process::Command;

use embedding_lookup::table::Residency;
use embedding_lookup::{
    BagMode, BagOptions, Bags, CoalescedGrad, DType, Error, MaxNorm, OpenMode, OpenOptions, Sgd,
    Table,
};

fn open(path: &Path, mode: OpenMode, residency: Residency) -> Table<'static> {
    let t = Table::open_with(
        path,
        &OpenOptions {
            mode,
            residency,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(t.residency(), residency);
    assert!(t.is_zero_copy());
    t
}

/// Ids that touch every part of the table, repeated, over several read-ahead windows.
fn ids(n: usize, rows: usize) -> Vec<i64> {
    let mut rng = embedding_lookup::util::Rng::new(9);
    (0..n).map(|_| rng.below(rows as u64) as i64).collect()
}

/// Shapes whose rows cross page boundaries (400 and 1000 bytes) and one wider than a page.
const SHAPES: [(usize, usize, DType); 4] = [
    (3000, 100, DType::F32),
    (2000, 500, DType::F16),
    (2000, 500, DType::BF16),
    (300, 1500, DType::F32),
];

#[test]
fn lookups_bags_and_renorm_match_the_table_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    for (k, &(rows, dim, dtype)) in SHAPES.iter().enumerate() {
        let mem = embedding_lookup::workload::random_table(rows, dim, dtype, k as u64).unwrap();
        let ext = if dtype == DType::BF16 {
            "safetensors"
        } else {
            "npy"
        };
        let path = dir.path().join(format!("t{k}.{ext}"));
        mem.save(&path).unwrap();
        let disk = open(&path, OpenMode::Map, Residency::OutOfCore);
        assert!(disk.page_reader().is_some());
        disk.drop_cached_pages().unwrap();
        // More than two read-ahead windows (16 Ki positions each).
        let idx = ids(40_000, rows);
        let a: Vec<f32> = disk.lookup(&idx).unwrap();
        assert_eq!(disk.resident_fraction(&idx), 1.0, "read pages stay cached");
        let b: Vec<f32> = mem.lookup(&idx).unwrap();
        assert!(a == b, "lookup {rows} × {dim} {dtype}");
        // Small batches go the inline way.
        disk.drop_cached_pages().unwrap();
        let few = &idx[..7];
        assert_eq!(
            disk.lookup::<i64, f32>(few).unwrap(),
            mem.lookup::<i64, f32>(few).unwrap()
        );

        let m = MaxNorm::new(1.0).unwrap();
        let (mut x, mut y) = (vec![0f32; 3000 * dim], vec![0f32; 3000 * dim]);
        disk.drop_cached_pages().unwrap();
        disk.lookup_renorm_output_only(&idx[..3000], &mut x, m)
            .unwrap();
        mem.lookup_renorm_output_only(&idx[..3000], &mut y, m)
            .unwrap();
        assert!(bits(&x) == bits(&y), "renorm {rows} × {dim} {dtype}");

        let offsets: Vec<i64> = (0..3000).step_by(30).collect();
        for mode in [BagMode::Sum, BagMode::Mean, BagMode::Max] {
            let (mut x, mut y) = (vec![0f32; 100 * dim], vec![0f32; 100 * dim]);
            disk.drop_cached_pages().unwrap();
            let opts = BagOptions::mode(mode);
            disk.bag_into(&idx[..3000], Bags::offsets(&offsets), &opts, &mut x)
                .unwrap();
            mem.bag_into(&idx[..3000], Bags::offsets(&offsets), &opts, &mut y)
                .unwrap();
            assert!(bits(&x) == bits(&y), "bag {mode:?} {rows} × {dim} {dtype}");
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn writes_to_an_out_of_core_map_reach_the_file_as_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, dim) = (5000, 64);
    let mut mem = embedding_lookup::workload::random_table(rows, dim, DType::F32, 4).unwrap();
    let path = dir.path().join("w.npy");
    mem.save(&path).unwrap();
    let mut disk = open(&path, OpenMode::MapWritable, Residency::OutOfCore);
    disk.drop_cached_pages().unwrap();
    let idx = ids(20_000, rows);
    let m = MaxNorm::new(2.0).unwrap();
    let (mut x, mut y) = (vec![0f32; idx.len() * dim], vec![0f32; idx.len() * dim]);
    disk.lookup_renorm_in_place(&idx, &mut x, m).unwrap();
    mem.lookup_renorm_in_place(&idx, &mut y, m).unwrap();
    assert!(bits(&x) == bits(&y));
    let grad = CoalescedGrad::new(rows, dim, vec![3, 777, 4999], vec![0.5; 3 * dim]).unwrap();
    disk.drop_cached_pages().unwrap();
    Sgd::new(0.1).unwrap().step(&mut disk, &grad).unwrap();
    Sgd::new(0.1).unwrap().step(&mut mem, &grad).unwrap();
    disk.flush().unwrap();
    drop(disk);
    let back = Table::open(&path, None).unwrap();
    assert!(back.as_bytes() == mem.as_bytes());
}

#[test]
fn a_file_truncated_under_an_out_of_core_map_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.npy");
    embedding_lookup::workload::random_table(4096, 64, DType::F32, 5)
        .unwrap()
        .save(&path)
        .unwrap();
    let t = open(&path, OpenMode::Map, Residency::OutOfCore);
    let ids: Vec<i64> = vec![0, 4000];
    let mut out = vec![-1.0f32; 2 * 64];
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(8192)
        .unwrap();
    match t.lookup_into(&ids, &mut out) {
        Err(Error::DiskRead {
            path: p,
            offset,
            source,
        }) => {
            assert_eq!(p, path);
            assert_eq!(offset, 8192);
            assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
            assert!(source.to_string().contains("truncated"), "{source}");
        }
        other => panic!("expected a disk read error, got {other:?}"),
    }
    assert!(out.iter().all(|&v| v == -1.0), "nothing written");
}

#[test]
fn auto_keeps_a_small_table_resident_and_copies_are_always_resident() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.npy");
    Table::zeros(10, 4, DType::F32)
        .unwrap()
        .save(&path)
        .unwrap();
    // Table::open decides with Residency::Auto: 160 bytes fit in any machine's memory.
    let t = Table::open(&path, None).unwrap();
    assert_eq!(t.residency(), Residency::Resident);
    assert_eq!(t.page_reader(), None);
    let copy = Table::open_with(
        &path,
        &OpenOptions {
            mode: OpenMode::Copy,
            residency: Residency::OutOfCore,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(copy.residency(), Residency::Resident);
    // Populating a resident map reads it all.
    let populated = Table::open_with(
        &path,
        &OpenOptions {
            populate: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(populated.resident_fraction(&[0i64, 9]), 1.0);
}

fn emb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_emb"))
        .args(args)
        .output()
        .expect("emb runs")
}

#[test]
fn emb_create_writes_a_table_and_bench_measures_it_cold() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("made.npy");
    let p = path.to_str().unwrap();
    let out = emb(&[
        "create", p, "--rows", "20000", "--dim", "32", "--dtype", "f16",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Table::open(&path, None).unwrap();
    assert_eq!((t.rows(), t.dim(), t.dtype()), (20000, 32, DType::F16));
    let vals = t.as_slice::<half::f16>().unwrap();
    assert!(vals.iter().all(|v| v.to_f32().abs() <= 1.0));
    assert!(vals.windows(2).filter(|w| w[0] != w[1]).count() > vals.len() / 2);
    // Same seed, same file.
    let again = dir.path().join("again.npy");
    assert!(emb(&[
        "create",
        again.to_str().unwrap(),
        "--rows",
        "20000",
        "--dim",
        "32",
        "--dtype",
        "f16"
    ])
    .status
    .success());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&again).unwrap()
    );

    let out = emb(&[
        "bench",
        "--table",
        p,
        "--cold",
        "--residency",
        "out-of-core",
        "--batch",
        "5000",
        "--iters",
        "2",
        "--device-seconds",
        "0.1",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // O_DIRECT is refused by some file systems (tmpfs): then the device is not measurable.
        assert!(err.contains("O_DIRECT"), "{err}");
        return;
    }
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(j["residency"], "out-of-core");
    for key in [
        "rows_per_s",
        "disk_bytes_per_lookup",
        "resident_fraction",
        "device_iops_qd1",
        "device_iops_qd32",
    ] {
        assert!(j[key].as_f64().is_some_and(|v| v >= 0.0), "{key}: {stdout}");
    }
    assert!(j["rows_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn emb_create_refuses_bad_shapes_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none.npy");
    let out = emb(&[
        "create",
        path.to_str().unwrap(),
        "--rows",
        "0",
        "--dim",
        "4",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rows"));
    let huge = emb(&[
        "create",
        path.to_str().unwrap(),
        "--rows",
        "4000000000000",
        "--dim",
        "4096",
    ]);
    assert!(!huge.status.success());
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no temporary left"
    );
}
