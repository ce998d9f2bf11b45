//! Gradient throughput: 1M lookups into a 1M × 64 f32 table, uniform indices.
//!
//! `lookup` (the forward gather of the same indices) is the same-run baseline; `naive_dense`
//! is PyTorch's CPU algorithm written plainly (zero the gradient, scatter-add each position
//! in order, one thread). `dense` includes writing the whole 256 MiB gradient; `coalesced`
//! writes only the touched rows, into the previous step's buffers (`coalesced_into`);
//! `sparse` is PyTorch's uncoalesced copy (`sparse_into`, buffers reused); `sgd_step` applies the
//! coalesced gradient (about 663k distinct rows) to the table.
//!
//! Every large buffer (table, `grad_output`, outputs) lives in the crate's owned table storage,
//! which asks for transparent huge pages, so the gradient's random row reads pay the same TLB
//! cost as the lookup's; `dense_vec_grad_output` repeats `dense` with `grad_output` in a plain
//! `Vec` (4 KiB pages) to show what that costs.
//!
//! `cargo bench --bench grad` (about a minute).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use embedding_lookup::ops::grad::EmbeddingBackward;
use embedding_lookup::ops::optim::Sgd;
use embedding_lookup::util::Rng;
use embedding_lookup::{DType, Table};

const ROWS: usize = 1 << 20;
const DIM: usize = 64;
const LOOKUPS: usize = 1 << 20;

fn naive_dense(idx: &[i64], go: &[f32], gw: &mut [f32]) {
    gw.fill(0.0);
    for (p, &i) in idx.iter().enumerate() {
        let row = &mut gw[i as usize * DIM..(i as usize + 1) * DIM];
        for (w, g) in row.iter_mut().zip(&go[p * DIM..(p + 1) * DIM]) {
            *w += g;
        }
    }
}

fn bench(c: &mut Criterion) {
    eprintln!(
        "kernel {}, {} threads",
        embedding_lookup::kernel_name(),
        rayon::current_num_threads()
    );
    let mut rng = Rng::new(1);
    let mut table = Table::randn(ROWS, DIM, DType::F32, 2).unwrap();
    let idx: Vec<i64> = (0..LOOKUPS)
        .map(|_| rng.below(ROWS as u64) as i64)
        .collect();
    let go_vec: Vec<f32> = (0..LOOKUPS * DIM).map(|_| rng.normal()).collect();
    let go_table = Table::from_slice(&go_vec, LOOKUPS, DIM).unwrap();
    let go = go_table.as_slice::<f32>().unwrap();
    let mut out_table = Table::zeros(LOOKUPS, DIM, DType::F32).unwrap();
    let out = out_table.as_mut_slice::<f32>().unwrap();
    let mut gw_table = Table::zeros(ROWS, DIM, DType::F32).unwrap();
    let gw = gw_table.as_mut_slice::<f32>().unwrap();
    let bw = EmbeddingBackward::new(&idx);

    let mut g = c.benchmark_group("grad_1M_lookups_1Mx64_f32");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(LOOKUPS as u64));
    g.bench_function("lookup", |b| {
        b.iter(|| table.lookup_into(black_box(&idx), out).unwrap())
    });
    g.bench_function("naive_dense", |b| {
        b.iter(|| naive_dense(black_box(&idx), go, gw))
    });
    g.bench_function("dense", |b| {
        b.iter(|| bw.dense_into(black_box(go), ROWS, DIM, gw).unwrap())
    });
    g.bench_function("dense_vec_grad_output", |b| {
        b.iter(|| bw.dense_into(black_box(&go_vec), ROWS, DIM, gw).unwrap())
    });
    let mut grad = bw.coalesced(go, ROWS, DIM).unwrap();
    g.bench_function("coalesced", |b| {
        b.iter(|| {
            bw.coalesced_into(black_box(go), ROWS, DIM, &mut grad)
                .unwrap()
        })
    });
    let mut pairs = bw.sparse(go, ROWS, DIM).unwrap();
    g.bench_function("sparse", |b| {
        b.iter(|| {
            bw.sparse_into(black_box(go), ROWS, DIM, &mut pairs)
                .unwrap()
        })
    });
    let mut sgd = Sgd::new(1e-6).unwrap();
    g.bench_function("sgd_step", |b| {
        b.iter(|| sgd.step(&mut table, black_box(&grad)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
