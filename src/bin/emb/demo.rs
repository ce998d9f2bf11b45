//! `emb demo`: the main job on an embedded default. Creates a demo table, saves it as
//! `.safetensors`, maps it back zero-copy, looks up the `(2, 4)` example indices and prints
//! them; then measures lookup throughput against a memcpy of the same bytes, in the same run.

use std::process::ExitCode;
use std::time::Instant;

use embedding_lookup::util::Rng;
use embedding_lookup::{DType, Table};

use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// Rows of the throughput table (at least 1).
    #[arg(long, default_value_t = 1 << 20, value_parser = crate::positive)]
    rows: usize,
    /// Row width of the throughput table (at least 1).
    #[arg(long, default_value_t = 64, value_parser = crate::positive)]
    dim: usize,
    /// Lookups per timed iteration (at least 1).
    #[arg(long, default_value_t = 1 << 20, value_parser = crate::positive)]
    batch: usize,
    /// Timed iterations, at least 1 (the median is printed).
    #[arg(long, default_value_t = 7, value_parser = crate::positive)]
    iters: usize,
}

/// The example of the embedding notes: indices of shape (2, 4) into a 10 × 3 table.
const EXAMPLE_INDICES: [i64; 8] = [1, 2, 4, 5, 4, 3, 2, 9];

pub fn run(args: Args, _verbose: bool) -> CliResult {
    // 1. A 10 × 3 table as nn.Embedding(10, 3) would make it, saved and mapped back.
    let dir = std::env::temp_dir().join(format!("emb-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("demo_table.safetensors");
    let result = (|| -> CliResult<()> {
        Table::new_embedding(10, 3, DType::F32, None, 0)?.save(&path)?;
        let table = Table::open(&path, None)?;
        let out: Vec<f32> = table.lookup(&EXAMPLE_INDICES)?;
        println!(
            "table 10 × 3 f32 mapped from {} (zero-copy: {})",
            path.file_name().unwrap_or_default().to_string_lossy(),
            table.is_zero_copy()
        );
        println!("indices (2, 4) = [[1, 2, 4, 5], [4, 3, 2, 9]]");
        println!("output (2, 4, 3) =");
        let fmt_row = |r: &[f32]| {
            let v: Vec<String> = r.iter().map(|v| format!("{v:8.4}")).collect();
            format!("[{}]", v.join(","))
        };
        for (b, batch) in out.chunks(4 * 3).enumerate() {
            for (s, row) in batch.chunks(3).enumerate() {
                let open = match (b, s) {
                    (0, 0) => "[[",
                    (_, 0) => " [",
                    _ => "  ",
                };
                let close = match (b, s) {
                    (1, 3) => "]]",
                    (_, 3) => "],",
                    _ => ",",
                };
                println!("{open}{}{close}", fmt_row(row));
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;

    // 2. Throughput on a larger table, with a memcpy of the same bytes as the baseline.
    let (rows, dim, batch) = (args.rows, args.dim, args.batch);
    eprintln!("building a {rows} × {dim} f32 table and {batch} uniform random indices ...");
    let table = Table::randn(rows, dim, DType::F32, 1)?;
    let mut rng = Rng::new(2);
    let indices: Vec<u32> = (0..batch).map(|_| rng.below(rows as u64) as u32).collect();
    let mut out = vec![0.0f32; batch * dim];
    table.lookup_into(&indices, &mut out)?; // warm-up
    let lookup_s = median_secs(args.iters, || {
        table.lookup_into(&indices, &mut out).map(|_| ())
    })?;
    let src = vec![1.0f32; batch * dim];
    let mut dst = vec![0.0f32; batch * dim];
    let memcpy_s = median_secs(args.iters, || {
        parallel_copy(&src, &mut dst);
        Ok(())
    })?;
    // Bytes moved: each row read once and written once (indices: 4 bytes each).
    let bytes = (batch * dim * 4 * 2 + batch * 4) as f64;
    let copy_bytes = (batch * dim * 4 * 2) as f64;
    let ratio = (bytes / lookup_s) / (copy_bytes / memcpy_s);
    println!(
        "lookup: {:.1} M rows/s, {:.1} GB/s (read + written); memcpy of the same output: {:.1} GB/s; ratio {ratio:.2}; kernel {}, {} threads",
        batch as f64 / lookup_s / 1e6,
        bytes / lookup_s / 1e9,
        copy_bytes / memcpy_s / 1e9,
        embedding_lookup::kernel_name(),
        rayon::current_num_threads()
    );
    println!(
        "ratio = the lookup's bytes per second / a memcpy of the same bytes, both in this run \
         (median of {} iterations): about 1.0 is this machine's copy bandwidth, the limit for \
         moving rows; {ratio:.2} is {:.0}% of it. It depends on the CPU and its memory, not \
         only on this code.",
        args.iters,
        ratio * 100.0
    );
    Ok(ExitCode::SUCCESS)
}

/// Median wall time of `iters` (at least 1) runs of `f`.
pub fn median_secs(
    iters: usize,
    mut f: impl FnMut() -> Result<(), embedding_lookup::Error>,
) -> CliResult<f64> {
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// A memcpy split over rayon's threads: the bandwidth baseline.
pub fn parallel_copy<T: Copy + Send + Sync>(src: &[T], dst: &mut [T]) {
    use rayon::prelude::*;
    let chunk = src.len().div_ceil(rayon::current_num_threads()).max(1);
    dst.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(d, s)| d.copy_from_slice(s));
}
