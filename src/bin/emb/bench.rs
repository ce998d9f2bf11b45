//! `emb bench`: time an operation on a generated workload and report it against a memcpy of
//! the same thread count and a naive loop, both measured in the same process.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use embedding_lookup::workload::{self, Distribution};
use embedding_lookup::{DType, Table};
use half::{bf16, f16};

use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// Table rows.
    #[arg(long, default_value_t = 4 << 20)]
    rows: usize,
    /// Table row width.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Table dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Lookups per iteration.
    #[arg(long, default_value_t = 1 << 20)]
    batch: usize,
    /// The operation.
    #[arg(long, default_value = "lookup", value_parser = ["lookup"])]
    op: String,
    /// Index distribution: uniform or zipf:S.
    #[arg(long, default_value = "uniform")]
    dist: Distribution,
    /// Where the table lives: memory, or mmap (written to a temporary file, mapped, pages
    /// cached before timing).
    #[arg(long, default_value = "memory", value_parser = ["memory", "mmap"])]
    storage: String,
    /// Output dtype: f32, or native (the table's dtype).
    #[arg(long, default_value = "f32", value_parser = ["f32", "native"])]
    out_dtype: String,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed iterations.
    #[arg(long, default_value_t = 11)]
    iters: usize,
    /// Rows ahead to prefetch (default: the library's measured default).
    #[arg(long)]
    prefetch: Option<usize>,
    /// Streaming stores: auto (outputs above the library's threshold), always or never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    stream: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Bytes each memcpy baseline iteration copies (read + written counts twice this).
const MEMCPY_BYTES: usize = 512 << 20;

pub fn run(args: Args, verbose: bool) -> CliResult {
    let threads = args.threads;
    crate::with_threads(threads, move || run_in_pool(args, verbose))?
}

fn run_in_pool(args: Args, verbose: bool) -> CliResult {
    use embedding_lookup::kernels;
    if let Some(p) = args.prefetch {
        kernels::set_prefetch_distance(p);
    }
    match args.stream.as_str() {
        "always" => kernels::set_streaming_threshold(0),
        "never" => kernels::set_streaming_threshold(usize::MAX),
        _ => {}
    }
    let started = Instant::now();
    let progress = Progress::new(started);
    let (rows, dim, batch) = (args.rows, args.dim, args.batch);
    if rows == 0 {
        return Err("--rows must be at least 1".into());
    }
    progress.say(&format!("building a {rows} × {dim} {} table", args.dtype));
    let mut table = workload::random_table(rows, dim, args.dtype, 1)?;
    let _tmp; // keeps the mapped file's directory alive while the table is used
    if args.storage == "mmap" {
        let dir = tempfile_dir()?;
        let path = dir.join("bench_table.safetensors");
        progress.say("writing the table to a file and mapping it");
        table.save(&path)?;
        table = Table::open(&path, None)?;
        // Touch every page so the timing measures cached pages, not the disk.
        let sum: u64 = table
            .as_bytes()
            .iter()
            .step_by(4096)
            .map(|&b| b as u64)
            .sum();
        std::hint::black_box(sum);
        _tmp = TempDir(dir);
    }
    progress.say(&format!("drawing {batch} {:?} indices", args.dist));
    let indices = workload::indices(batch, rows, args.dist, 2);
    let out_dtype = if args.out_dtype == "native" {
        args.dtype
    } else {
        DType::F32
    };

    // The engine.
    let out_len = batch * dim * out_dtype.size();
    let mut out_words = vec![0u64; out_len.div_ceil(8)]; // 8-byte aligned for every dtype
    let out_bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut out_words)[..out_len];
    let mut run_once = || -> Result<(), embedding_lookup::Error> {
        match out_dtype {
            DType::F32 => table.lookup_into(&indices, cast_mut::<f32>(out_bytes)),
            DType::F16 => table.lookup_into(&indices, cast_mut::<f16>(out_bytes)),
            DType::BF16 => table.lookup_into(&indices, cast_mut::<bf16>(out_bytes)),
        }
    };
    run_once()?; // warm-up: faults in the output pages
    let engine = time_iters(args.iters, &progress, "lookup", || {
        run_once().map_err(Into::into)
    })?;

    // The naive loop (f32 tables into f32 output only: that is the loop users write).
    let naive = if args.dtype == DType::F32 && out_dtype == DType::F32 {
        let t = table.as_slice::<f32>()?;
        let out = cast_mut::<f32>(out_bytes);
        workload::naive_lookup(t, dim, &indices, out);
        Some(time_iters(args.iters, &progress, "naive loop", || {
            workload::naive_lookup(t, dim, &indices, out);
            Ok(())
        })?)
    } else {
        None
    };

    // memcpy with the same threads.
    let src = vec![1u8; MEMCPY_BYTES];
    let mut dst = vec![0u8; MEMCPY_BYTES];
    workload::parallel_memcpy(&src, &mut dst);
    let memcpy = time_iters(args.iters, &progress, "memcpy", || {
        workload::parallel_memcpy(&src, &mut dst);
        Ok(())
    })?;
    progress.done();

    let moved = (batch * (table.row_bytes() + dim * out_dtype.size() + 8)) as f64;
    let rows_per_s = batch as f64 / engine.median;
    let bytes_per_s = moved / engine.median;
    let memcpy_bytes_per_s = 2.0 * MEMCPY_BYTES as f64 / memcpy.median;
    let threads_used = rayon::current_num_threads();
    let spread = (engine.max - engine.min) / engine.median;
    if args.json {
        let mut obj = serde_json::json!({
            "op": args.op,
            "rows": rows, "dim": dim, "dtype": args.dtype.name(), "batch": batch,
            "dist": format!("{:?}", args.dist), "storage": args.storage,
            "out_dtype": out_dtype.name(),
            "rows_per_s": rows_per_s,
            "bytes_per_s": bytes_per_s,
            "memcpy_bytes_per_s": memcpy_bytes_per_s,
            "ratio_to_memcpy": bytes_per_s / memcpy_bytes_per_s,
            "kernel": embedding_lookup::kernel_name(),
            "threads": threads_used,
            "iters": args.iters,
            "median_s": engine.median, "min_s": engine.min, "max_s": engine.max,
            "table_zero_copy": table.is_zero_copy(),
            "prefetch": kernels::prefetch_distance(),
            "stream": args.stream,
        });
        if let Some(n) = &naive {
            obj["naive_rows_per_s"] = serde_json::json!(batch as f64 / n.median);
            obj["ratio_to_naive"] = serde_json::json!(n.median / engine.median);
        }
        println!("{obj}");
    } else {
        println!(
            "{} {rows} × {dim} {} -> {}, batch {batch}, {:?}, {}: kernel {}, {threads_used} threads, prefetch {}, stream {}",
            args.op, args.dtype, out_dtype, args.dist, args.storage,
            embedding_lookup::kernel_name(), kernels::prefetch_distance(), args.stream
        );
        println!(
            "  engine  {:>8.2} M rows/s  {:>6.2} GB/s  (median of {}, spread {:.0}%)",
            rows_per_s / 1e6,
            bytes_per_s / 1e9,
            args.iters,
            spread * 100.0
        );
        if let Some(n) = &naive {
            println!(
                "  naive   {:>8.2} M rows/s  {:>6.2} GB/s  engine/naive {:.2}×",
                batch as f64 / n.median / 1e6,
                moved / n.median / 1e9,
                n.median / engine.median
            );
        }
        println!(
            "  memcpy                    {:>6.2} GB/s  engine/memcpy {:.2}",
            memcpy_bytes_per_s / 1e9,
            bytes_per_s / memcpy_bytes_per_s
        );
        println!("  (bytes counted: table rows read + output rows written + 8-byte indices)");
    }
    if verbose {
        eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(ExitCode::SUCCESS)
}

struct Timing {
    median: f64,
    min: f64,
    max: f64,
}

fn time_iters(
    iters: usize,
    progress: &Progress,
    what: &str,
    mut f: impl FnMut() -> CliResult<()>,
) -> CliResult<Timing> {
    let mut t = Vec::with_capacity(iters.max(1));
    for i in 0..iters.max(1) {
        progress.say(&format!("timing {what} {}/{}", i + 1, iters.max(1)));
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(Timing {
        median: t[t.len() / 2],
        min: t[0],
        max: t[t.len() - 1],
    })
}

fn cast_mut<T: bytemuck::Pod>(bytes: &mut [u8]) -> &mut [T] {
    // The buffer is a Vec<u64> viewed as bytes, so it is aligned for every element type.
    bytemuck::cast_slice_mut(bytes)
}

/// A progress line on stderr, shown once the run has taken more than a second: redrawn in
/// place on a terminal, otherwise one line per step at most every few seconds.
struct Progress {
    started: Instant,
    terminal: bool,
    last: std::cell::Cell<f64>,
}

impl Progress {
    fn new(started: Instant) -> Progress {
        use std::io::IsTerminal;
        Progress {
            started,
            terminal: std::io::stderr().is_terminal(),
            last: std::cell::Cell::new(0.0),
        }
    }
    fn say(&self, what: &str) {
        let now = self.started.elapsed().as_secs_f64();
        if now < 1.0 {
            return;
        }
        if self.terminal {
            eprint!("\r\x1b[2K[{now:>5.1} s] {what}");
            let _ = std::io::stderr().flush();
        } else if now - self.last.get() >= 5.0 {
            self.last.set(now);
            eprintln!("[{now:>5.1} s] {what}");
        }
    }
    fn done(&self) {
        if self.terminal && self.started.elapsed().as_secs_f64() > 1.0 {
            eprint!("\r\x1b[2K");
        }
    }
}

fn tempfile_dir() -> CliResult<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("emb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
