//! Embedding bags with `max_norm` against the plain bag of the same run.
//!
//! The case of the bag issue: a 4M × 64 f32 table (1 GiB), 1M uniform random indices in bags
//! of 32, 2 threads, `max_norm` 2.3 in the 2-norm (about half the rows exceed it). Measured:
//! - `plain_sum`: the bag without renorm (the baseline);
//! - `output_only_sum`: `bag_into` with `max_norm` (the table untouched);
//! - `in_place_sum`: `bag_renorm_in_place` (after the first iteration the rows are already
//!   within the norm, so later iterations compute every norm but rescale nothing);
//! - `renorm_lookup`: `lookup_renorm_output_only` of the same indices, the renorm pass alone.
//!
//! Figures are rows (entries) per second. `cargo bench --bench bag_renorm` (about a minute);
//! under `cargo test` the same code runs once on a small table.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use embedding_lookup::util::Rng;
use embedding_lookup::{BagMode, BagOptions, Bags, DType, MaxNorm, Table};

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

/// A table of uniform values in [-0.5, 0.5), filled fast.
fn table(rows: usize) -> Table<'static> {
    let mut t = Table::zeros(rows, DIM, DType::F32).unwrap();
    let mut rng = Rng::new(42);
    t.as_mut_slice::<f32>()
        .unwrap()
        .iter_mut()
        .for_each(|v| *v = (rng.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32) - 0.5);
    t
}

fn bag_renorm(c: &mut Criterion) {
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
    let mut lookup_out = vec![0.0f32; entries * DIM];
    let max_norm = MaxNorm::new(2.3).unwrap();
    let plain = BagOptions::mode(BagMode::Sum);
    let renorm = BagOptions {
        max_norm: Some(max_norm),
        ..plain
    };
    let mut t = table(rows);
    eprintln!(
        "bag_renorm benchmarks: kernel {}, {rows} × {DIM} f32 table, {entries} entries in bags \
         of {PER_BAG}, {THREADS} threads",
        embedding_lookup::kernel_name()
    );
    let mut g = c.benchmark_group("bag_renorm_f32");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(entries as u64));
    g.bench_function("plain_sum", |b| {
        b.iter(|| {
            pool.install(|| {
                t.bag_into(
                    black_box(&indices),
                    Bags::offsets(&offsets),
                    &plain,
                    &mut out,
                )
            })
            .unwrap()
        })
    });
    g.bench_function("output_only_sum", |b| {
        b.iter(|| {
            pool.install(|| {
                t.bag_into(
                    black_box(&indices),
                    Bags::offsets(&offsets),
                    &renorm,
                    &mut out,
                )
            })
            .unwrap()
        })
    });
    g.bench_function("renorm_lookup", |b| {
        b.iter(|| {
            pool.install(|| {
                t.lookup_renorm_output_only(black_box(&indices), &mut lookup_out, max_norm)
            })
            .unwrap()
        })
    });
    g.bench_function("in_place_sum", |b| {
        b.iter(|| {
            pool.install(|| {
                t.bag_renorm_in_place(
                    black_box(&indices),
                    Bags::offsets(&offsets),
                    &renorm,
                    &mut out,
                )
            })
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bag_renorm);
criterion_main!(benches);
