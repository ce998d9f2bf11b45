//! Per-call cost of small lookups against the naive loop (a profiling aid).
use embedding_lookup::{kernels, workload, DType};

fn main() {
    let t = workload::random_table(4096, 64, DType::F32, 1).unwrap();
    let w = t.as_slice::<f32>().unwrap();
    for batch in std::env::args()
        .nth(1)
        .map(|b| vec![b.parse::<usize>().unwrap()])
        .unwrap_or(vec![1usize, 8, 64, 4096])
    {
        let idx = workload::indices(batch, 4096, workload::Distribution::Uniform, 2);
        let mut out = vec![0.0f32; 64 * batch];
        let iters = 20_000_000 / batch;
        for pf in [0usize, 16] {
            kernels::set_prefetch_distance(pf);
            let start = std::time::Instant::now();
            for _ in 0..iters {
                t.lookup_into(std::hint::black_box(&idx), &mut out).unwrap();
            }
            let e = start.elapsed().as_nanos() as f64 / iters as f64;
            let start = std::time::Instant::now();
            for _ in 0..iters {
                for (o, &i) in out.chunks_exact_mut(64).zip(std::hint::black_box(&idx)) {
                    o.copy_from_slice(&w[i as usize * 64..(i as usize + 1) * 64]);
                }
            }
            let n = start.elapsed().as_nanos() as f64 / iters as f64;
            println!(
                "batch {batch:5} prefetch {pf:2}: engine {e:9.1} ns  naive {n:9.1} ns  ratio {:.2}",
                e / n
            );
        }
    }
}
