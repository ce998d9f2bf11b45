//! Embedding bags against same-run baselines: a memcpy moving as many bytes as a bag does
//! (every row read, one row a bag written) and a naive loop, both on the same thread count.
//!
//! The case of the issue: a 4M × 64 table (1 GiB in f32, 512 MiB in f16), 1M uniform random
//! indices in bags of 32, 2 threads. Every figure is in rows per second (criterion's
//! "elem/s"): one row is one index pooled; memcpy's rows/s is the bag's rows/s at memcpy's
//! bandwidth (it moves a bag's `entries + bags` rows of bytes, read + written, in the time
//! shown). Bytes/s is rows/s × 256 (f32) or × 128 (f16), plus 1/32 for the written rows.
//!
//! `cargo bench --bench bag` (about a minute and a half). Under `cargo test` the same code runs
//! once on a small table.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use embedding_lookup::util::Rng;
use embedding_lookup::{BagMode, BagOptions, Bags, DType, Table};
use half::f16;
use rayon::prelude::*;

const DIM: usize = 64;
const PER_BAG: usize = 32;
const THREADS: usize = 2;

/// Full size under `cargo bench`, small under `cargo test --benches`.
fn sizes() -> (usize, usize) {
    if std::env::args().any(|a| a == "--bench") {
        (4 << 20, 1 << 20)
    } else {
        (1 << 12, 1 << 12)
    }
}

/// A table of uniform values in [-0.5, 0.5), filled fast (normal values would take seconds).
fn table(rows: usize, dtype: DType) -> Table<'static> {
    let mut t = Table::zeros(rows, DIM, dtype).unwrap();
    let mut rng = Rng::new(42);
    let mut next = move || (rng.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32) - 0.5;
    match dtype {
        DType::F32 => t
            .as_mut_slice::<f32>()
            .unwrap()
            .iter_mut()
            .for_each(|v| *v = next()),
        DType::F16 => t
            .as_mut_slice::<f16>()
            .unwrap()
            .iter_mut()
            .for_each(|v| *v = f16::from_f32(next())),
        DType::BF16 => unreachable!(),
    }
    t
}

fn quick<'a>(
    c: &'a mut Criterion,
    name: &str,
    entries: usize,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(entries as u64));
    g
}

/// The plain loop: per bag, add every row into the output row; rayon over bags.
fn naive<T: Copy + Send + Sync>(
    table: &[T],
    indices: &[i64],
    out: &mut [f32],
    widen: impl Fn(T) -> f32 + Sync,
) {
    out.par_chunks_mut(DIM).enumerate().for_each(|(b, o)| {
        o.fill(0.0);
        for &i in &indices[b * PER_BAG..(b + 1) * PER_BAG] {
            let row = &table[i as usize * DIM..(i as usize + 1) * DIM];
            for (o, &x) in o.iter_mut().zip(row) {
                *o += widen(x);
            }
        }
    });
}

fn bags(c: &mut Criterion) {
    let (rows, entries) = sizes();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build()
        .unwrap();
    let mut rng = Rng::new(7);
    let indices: Vec<i64> = (0..entries)
        .map(|_| rng.below(rows as u64) as i64)
        .collect();
    let offsets: Vec<i64> = (0..entries / PER_BAG)
        .map(|b| (b * PER_BAG) as i64)
        .collect();
    let mut out = vec![0.0f32; offsets.len() * DIM];
    let weights: Vec<f32> = (0..entries).map(|_| rng.normal()).collect();
    eprintln!(
        "bag benchmarks: kernel {}, {rows} × {DIM} table, {entries} entries in bags of {PER_BAG}, {THREADS} threads",
        embedding_lookup::kernel_name()
    );

    for dtype in [DType::F32, DType::F16] {
        let t = table(rows, dtype);
        let row_bytes = t.row_bytes();
        let mut g = quick(c, &format!("bag_{dtype}"), entries);
        for (name, mode, w) in [
            ("sum", BagMode::Sum, None),
            ("max", BagMode::Max, None),
            ("mean", BagMode::Mean, None),
            ("weighted_sum", BagMode::Sum, Some(&weights[..])),
        ] {
            let options = BagOptions {
                mode,
                per_sample_weights: w,
                ..Default::default()
            };
            g.bench_function(name, |b| {
                b.iter(|| {
                    pool.install(|| {
                        t.bag_into(
                            black_box(&indices),
                            Bags::offsets(&offsets),
                            &options,
                            &mut out,
                        )
                    })
                    .unwrap()
                })
            });
        }
        match dtype {
            DType::F32 => {
                let data = t.as_slice::<f32>().unwrap();
                g.bench_function("naive_sum", |b| {
                    b.iter(|| pool.install(|| naive(data, black_box(&indices), &mut out, |x| x)))
                });
            }
            _ => {
                let data = t.as_slice::<f16>().unwrap();
                g.bench_function("naive_sum", |b| {
                    b.iter(|| {
                        pool.install(|| naive(data, black_box(&indices), &mut out, f16::to_f32))
                    })
                });
            }
        }
        // memcpy moving the bytes a bag moves, on the same threads: every row read once and
        // each bag's row written once, so half of that copied (a copy reads and writes).
        let half = (entries + offsets.len()) * row_bytes / 2;
        let src = vec![1u8; half];
        let mut dst = vec![0u8; half];
        g.bench_function("memcpy", |b| {
            b.iter(|| {
                pool.install(|| {
                    embedding_lookup::workload::parallel_memcpy(black_box(&src), &mut dst)
                })
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bags);
criterion_main!(benches);
