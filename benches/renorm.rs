//! Lookup with max_norm against the plain lookup of the same indices, in the same run.
//!
//! `cargo bench --bench renorm` runs two groups (under two minutes in all):
//! - `renorm_1gib`: the workload, a 4M × 64 f32 table (1 GiB), 1M uniform random
//!   indices, 2 threads. `lookup` is the baseline; `output_only` is the fused renorm;
//!   `in_place` is the fused output pass plus the write-back of the rows it rescaled;
//!   `two_pass` renorms in place and then looks up, for comparison. Every
//!   referenced row is rescaled in every iteration (max_norm shrinks a little each time), the
//!   worst case: each row is also written back to the table.
//! - `renorm_small`: 64K × 64 f32 and f16 tables (16 / 8 MiB, mostly cache-resident) with
//!   256K indices, where the renorm arithmetic, not memory latency, shows.
//!
//! `in_place` (every row rescaled and written back each iteration) is the worst case;
//! `in_place_steady` keeps max_norm fixed, so after the first iteration the rows are within
//! it and only their norms are checked, as in training once the referenced rows have been
//! renormed.
//!
//! `EMB_BENCH_SKIP_1GIB=1` skips the large group (building the table takes a few seconds).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use embedding_lookup::util::Rng;
use embedding_lookup::{DType, MaxNorm, Table};
use rayon::prelude::*;

/// A table of uniform values in [-1, 1) (2-norm about sqrt(dim / 3), above any max_norm used
/// here), filled in parallel.
fn table(rows: usize, dim: usize, dtype: DType) -> Table<'static> {
    let mut t = Table::zeros(rows, dim, DType::F32).unwrap();
    t.as_mut_slice::<f32>()
        .unwrap()
        .par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = Rng::new(c as u64);
            for v in chunk {
                *v = (rng.uniform() * 2.0 - 1.0) as f32;
            }
        });
    if dtype == DType::F32 {
        t
    } else {
        t.to_dtype(dtype).unwrap()
    }
}

fn indices(n: usize, rows: usize) -> Vec<i64> {
    let mut rng = Rng::new(42);
    (0..n).map(|_| rng.below(rows as u64) as i64).collect()
}

/// A max_norm a little below the last one, so that every referenced row is rescaled again.
fn shrinking(k: &mut i32) -> MaxNorm {
    *k += 1;
    MaxNorm::new(0.999f64.powi(*k)).unwrap()
}

fn run_group(c: &mut Criterion, name: &str, table: &mut Table<'static>, n: usize, secs: u64) {
    let idx = indices(n, table.rows());
    let dim = table.dim();
    let mut out = vec![0.0f32; n * dim];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(secs));
    g.throughput(Throughput::Elements(n as u64));
    let id = |what: &str| {
        BenchmarkId::new(
            what,
            format!(
                "{}x{}_{}_{}",
                table.rows(),
                dim,
                table.dtype(),
                embedding_lookup::kernel_name()
            ),
        )
    };
    let (lookup, only, in_place, steady, two_pass) = (
        id("lookup"),
        id("output_only"),
        id("in_place"),
        id("in_place_steady"),
        id("two_pass"),
    );
    g.bench_function(lookup, |b| {
        b.iter(|| pool.install(|| table.lookup_into(&idx, &mut out).unwrap()))
    });
    let m = MaxNorm::new(1.0).unwrap();
    g.bench_function(only, |b| {
        b.iter(|| pool.install(|| table.lookup_renorm_output_only(&idx, &mut out, m).unwrap()))
    });
    let mut k = 0;
    g.bench_function(in_place, |b| {
        b.iter(|| {
            let m = shrinking(&mut k);
            pool.install(|| table.lookup_renorm_in_place(&idx, &mut out, m).unwrap())
        })
    });
    g.bench_function(steady, |b| {
        b.iter(|| pool.install(|| table.lookup_renorm_in_place(&idx, &mut out, m).unwrap()))
    });
    g.bench_function(two_pass, |b| {
        b.iter(|| {
            let m = shrinking(&mut k);
            pool.install(|| {
                table.renorm_in_place(&idx, m).unwrap();
                table.lookup_into(&idx, &mut out).unwrap()
            })
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    if std::env::var_os("EMB_BENCH_SKIP_1GIB").is_none() {
        let mut big = table(4 << 20, 64, DType::F32);
        run_group(c, "renorm_1gib", &mut big, 1 << 20, 4);
    }
    for dtype in [DType::F32, DType::F16] {
        let mut small = table(64 << 10, 64, dtype);
        run_group(c, "renorm_small", &mut small, 256 << 10, 2);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
