//! Lookup benchmarks, each group with its baselines beside it: the naive `copy_from_slice`
//! loop a user would write, and a memcpy of the same output bytes.
//!
//! `cargo bench --bench lookup` runs the quick profile (a few minutes on 2 cores);
//! `EMB_BENCH=full cargo bench --bench lookup` adds every dim, dtype and batch size.
//! Throughput is in elements = rows looked up (for memcpy: rows of the same size copied).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use embedding_lookup::workload::{self, Distribution};
use embedding_lookup::{kernels, DType, Table};

fn full() -> bool {
    std::env::var("EMB_BENCH").is_ok_and(|v| v == "full")
}

/// Engine, naive loop and memcpy on one workload, in one criterion group. Every contender
/// gets its arguments through `black_box`, as a call with run-time arguments would: otherwise
/// the compiler hoists the naive loop's set-up (the division by `dim`, the bounds checks) out
/// of the timing loop, which no real caller gets.
fn compare(c: &mut Criterion, group_name: &str, table: &Table<'_>, indices: &[i64], label: &str) {
    let dim = table.dim();
    let batch = indices.len();
    let mut group = c.benchmark_group(group_name);
    configure(&mut group, table.as_bytes().len() + batch * dim * 4);
    group.throughput(Throughput::Elements(batch as u64));
    let mut out = vec![0.0f32; batch * dim];
    group.bench_function(
        BenchmarkId::new(format!("engine/{}", kernels::Isa::detect().name()), label),
        |b| {
            b.iter(|| {
                table
                    .lookup_into(black_box(indices), black_box(&mut out[..]))
                    .unwrap()
            })
        },
    );
    // The engine's split of this job: the baselines run on the same threads.
    let tasks = workload::engine_task_count(batch, table.row_bytes() + dim * 4);
    if table.dtype() == DType::F32 {
        let t = table.as_slice::<f32>().unwrap();
        if batch <= 1 << 14 {
            group.bench_function(BenchmarkId::new("naive_serial", label), |b| {
                b.iter(|| {
                    naive_serial(
                        black_box(t),
                        black_box(dim),
                        black_box(indices),
                        black_box(&mut out),
                    )
                })
            });
        }
        // Where the engine splits, the naive loop split over the same threads too.
        if tasks > 1 {
            group.bench_function(BenchmarkId::new("naive_rayon", label), |b| {
                b.iter(|| {
                    workload::naive_lookup(
                        black_box(t),
                        black_box(dim),
                        black_box(indices),
                        black_box(&mut out),
                    )
                })
            });
        }
    }
    // memcpy of the same output bytes, split as the engine splits the lookup.
    let src = vec![1.0f32; batch * dim];
    group.bench_function(BenchmarkId::new("memcpy", label), |b| {
        b.iter(|| {
            workload::memcpy_in_tasks(
                bytemuck::cast_slice(black_box(&src)),
                bytemuck::cast_slice_mut(black_box(&mut out)),
                tasks,
            )
        })
    });
    group.finish();
}

/// The loop a user writes: `copy_from_slice` per row, on one thread.
fn naive_serial(t: &[f32], dim: usize, indices: &[i64], out: &mut [f32]) {
    for (o, &i) in out.chunks_exact_mut(dim).zip(indices) {
        let r = i as usize;
        o.copy_from_slice(&t[r * dim..(r + 1) * dim]);
    }
}

fn configure(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    bytes: usize,
) {
    if bytes > 64 << 20 {
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(3));
    } else {
        group.measurement_time(Duration::from_secs(2));
    }
    group.warm_up_time(Duration::from_millis(500));
}

/// Cache-resident: table 4096 × 64 and batch 4096, so output fits in cache too.
fn cache_resident(c: &mut Criterion) {
    let table = workload::random_table(4096, 64, DType::F32, 1).unwrap();
    let idx = workload::indices(4096, 4096, Distribution::Uniform, 2);
    compare(
        c,
        "lookup_cache_resident",
        &table,
        &idx,
        "f32_4096x64_b4096",
    );
}

/// Mid-sized batches on a hot table, around the size from which work is split over threads
/// (`parallel::MIN_SPLIT_BYTES`): 1024 rows of 256 bytes move 512 KiB.
fn split_sizes(c: &mut Criterion) {
    let table = workload::random_table(4096, 64, DType::F32, 1).unwrap();
    for batch in [512usize, 1024, 2048, 8192, 16384] {
        let idx = workload::indices(batch, 4096, Distribution::Uniform, 3);
        compare(c, "lookup_split", &table, &idx, &format!("b{batch}"));
    }
}

/// Small batches on a hot table: per-call overhead.
fn small_batches(c: &mut Criterion) {
    let table = workload::random_table(4096, 64, DType::F32, 1).unwrap();
    for batch in [1usize, 8, 64] {
        let idx = workload::indices(batch, 4096, Distribution::Uniform, 3);
        compare(c, "lookup_small_batch", &table, &idx, &format!("b{batch}"));
    }
}

/// Table sizes in L2, in L3 and far beyond (1 GiB), f32, dim 64.
fn table_sizes(c: &mut Criterion) {
    let sizes: &[(usize, &str)] = &[(2048, "512KiB"), (65536, "16MiB"), (4 << 20, "1GiB")];
    for &(rows, name) in sizes {
        let table = workload::random_table(rows, 64, DType::F32, 4).unwrap();
        let batch = if rows >= 4 << 20 { 1 << 20 } else { 1 << 16 };
        let idx = workload::indices(batch, rows, Distribution::Uniform, 5);
        compare(
            c,
            "lookup_table_size",
            &table,
            &idx,
            &format!("f32_d64_{name}_b{batch}"),
        );
    }
}

/// Every dtype on a 1 GiB-class table (4M rows × 64), f32 output, 1M uniform indices.
fn dtypes(c: &mut Criterion) {
    let idx = workload::indices(1 << 20, 4 << 20, Distribution::Uniform, 6);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let table = workload::random_table(4 << 20, 64, dtype, 7).unwrap();
        compare(
            c,
            "lookup_dtype",
            &table,
            &idx,
            &format!("{dtype}_4Mx64_b1M"),
        );
    }
}

/// Row widths, on a table of about 64 MiB (beyond L3), batch 64K.
fn dims(c: &mut Criterion) {
    let dims: &[usize] = if full() {
        &[16, 64, 128, 256, 1024]
    } else {
        &[16, 256, 1024]
    };
    for &dim in dims {
        let rows = (64 << 20) / (dim * 4);
        let table = workload::random_table(rows, dim, DType::F32, 8).unwrap();
        let idx = workload::indices(1 << 16, rows, Distribution::Uniform, 9);
        compare(c, "lookup_dim", &table, &idx, &format!("f32_d{dim}_64MiB"));
    }
}

/// Zipf-distributed indices on the 1 GiB table: hot rows stay in cache.
fn zipf(c: &mut Criterion) {
    let table = workload::random_table(4 << 20, 64, DType::F32, 10).unwrap();
    let idx = workload::indices(1 << 20, 4 << 20, Distribution::Zipf(1.05), 11);
    compare(c, "lookup_zipf", &table, &idx, "f32_4Mx64_zipf1.05_b1M");
}

/// The prefetch distance sweep behind `kernels::DEFAULT_PREFETCH_DISTANCE`.
fn prefetch(c: &mut Criterion) {
    let table = workload::random_table(4 << 20, 64, DType::F32, 12).unwrap();
    let idx = workload::indices(1 << 20, 4 << 20, Distribution::Uniform, 13);
    let mut out = vec![0.0f32; idx.len() * 64];
    let mut group = c.benchmark_group("prefetch");
    configure(&mut group, 1 << 30);
    group.throughput(Throughput::Elements(idx.len() as u64));
    for distance in [0usize, 4, 8, 16, 32, 64] {
        group.bench_function(BenchmarkId::new("f32_4Mx64_b1M", distance), |b| {
            kernels::set_prefetch_distance(distance);
            b.iter(|| table.lookup_into(&idx, &mut out).unwrap())
        });
    }
    kernels::set_prefetch_distance(kernels::DEFAULT_PREFETCH_DISTANCE);
    group.finish();
}

/// Table conversion f32 -> f16 / bf16 (64 MiB), against a memcpy of the input.
fn conversion(c: &mut Criterion) {
    let table = workload::random_table(1 << 18, 64, DType::F32, 14).unwrap();
    let mut group = c.benchmark_group("convert");
    configure(&mut group, 128 << 20);
    group.throughput(Throughput::Bytes(table.as_bytes().len() as u64));
    for to in [DType::F16, DType::BF16] {
        let mut dst = vec![0u8; table.as_bytes().len() / 2];
        group.bench_function(BenchmarkId::new("f32_to", to.name()), |b| {
            b.iter(|| {
                embedding_lookup::table::convert_bytes(DType::F32, table.as_bytes(), to, &mut dst)
            })
        });
    }
    let mut dst = vec![0u8; table.as_bytes().len()];
    group.bench_function(BenchmarkId::new("memcpy", "f32"), |b| {
        b.iter(|| dst.copy_from_slice(table.as_bytes()))
    });
    group.finish();
}

fn groups(c: &mut Criterion) {
    cache_resident(c);
    small_batches(c);
    split_sizes(c);
    table_sizes(c);
    dtypes(c);
    dims(c);
    zipf(c);
    if full() {
        prefetch(c);
    }
    conversion(c);
}

criterion_group!(benches, groups);
criterion_main!(benches);
