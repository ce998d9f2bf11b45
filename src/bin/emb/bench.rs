//! `emb bench`: time an operation on a generated workload and report it against a memcpy of
//! the same thread count and a naive loop, both measured in the same process.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use embedding_lookup::workload::{self, Distribution};
use embedding_lookup::{BagMode, BagOptions, Bags, DType, Element, MaxNorm, Table};
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
    pub(crate) batch: usize,
    /// The operation: lookup, renorm (lookup with max_norm) or bag.
    #[arg(long, default_value = "lookup", value_parser = ["lookup", "renorm", "bag"])]
    op: String,
    /// Entries per bag (--op bag): the batch is cut into bags of this many.
    #[arg(long, default_value_t = 32)]
    bag_size: usize,
    /// Pooling (--op bag).
    #[arg(long, default_value = "sum", value_parser = ["sum", "mean", "max"])]
    mode: String,
    /// max_norm (--op renorm); rows of the random table have norms of about sqrt(dim / 3).
    #[arg(long, default_value_t = 1.0)]
    max_norm: f64,
    /// Renorm mode (--op renorm): output-only, or in-place (the first, untimed iteration
    /// rescales the rows; timed iterations then find them within max_norm, as in training
    /// steps after the first).
    #[arg(long, default_value = "output-only", value_parser = ["output-only", "in-place"])]
    renorm: String,
    /// Index distribution: uniform or zipf:S.
    #[arg(long, default_value = "uniform")]
    pub(crate) dist: Distribution,
    /// Where the table lives: memory, or mmap (written to a temporary file, mapped, pages
    /// cached before timing).
    #[arg(long, default_value = "memory", value_parser = ["memory", "mmap"])]
    storage: String,
    /// Output dtype: f32, or native (the table's dtype).
    #[arg(long, default_value = "f32", value_parser = ["f32", "native"])]
    out_dtype: String,
    #[arg(long, help = crate::THREADS_HELP)]
    pub(crate) threads: Option<usize>,
    /// Timed iterations (at least 1).
    #[arg(long, default_value_t = 11, value_parser = crate::positive)]
    pub(crate) iters: usize,
    /// Rows ahead to prefetch (default: the library's measured default).
    #[arg(long)]
    prefetch: Option<usize>,
    /// Streaming stores: auto (outputs above the library's threshold), always or never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    stream: String,
    /// Bytes from a 64-byte boundary to the output: a multiple of 4 below 64 (16 is where the
    /// system allocator puts a large `Vec`).
    #[arg(long, default_value_t = 0)]
    out_offset: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Benchmark lookups from an existing table file, FILE[:TENSOR], mapped as `emb lookup`
    /// maps it (no copy into memory), against the device's own random-read rate on the same
    /// file. Each timed batch draws new ids (--batch of them, from --dist).
    #[arg(long, value_name = "FILE[:TENSOR]")]
    pub(crate) table: Option<String>,
    /// With --table: drop the file's cached pages before each timed batch.
    #[arg(long, requires = "table")]
    pub(crate) cold: bool,
    /// With --table: the residency policy (auto, resident, out-of-core).
    #[arg(long, default_value = "auto", requires = "table")]
    pub(crate) residency: embedding_lookup::table::Residency,
    /// With --table: seconds for each of the device measurements (depth 1 and 32).
    #[arg(long, default_value_t = 3.0, requires = "table")]
    pub(crate) device_seconds: f64,
}

/// Bytes each memcpy baseline iteration copies (read + written counts twice this).
const MEMCPY_BYTES: usize = 512 << 20;

pub fn run(args: Args, verbose: bool) -> CliResult {
    let threads = args.threads;
    crate::with_threads(threads, move || run_in_pool(args, verbose))?
}

fn run_in_pool(args: Args, verbose: bool) -> CliResult {
    use embedding_lookup::kernels;
    if let Some(spec) = args.table.clone() {
        return crate::bench_table::run(&args, &spec, verbose);
    }
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
    let out_rows = match args.op.as_str() {
        "bag" => {
            if args.bag_size == 0 || batch % args.bag_size != 0 {
                return Err("--batch must be a positive multiple of --bag-size".into());
            }
            batch / args.bag_size
        }
        _ => batch,
    };
    // The output is an owned table: 64-byte aligned, huge pages on Linux, as a careful caller
    // would allocate it (an f32 table of the same shape holds every output dtype), used from
    // `--out-offset` bytes in.
    if args.out_offset >= 64 || !args.out_offset.is_multiple_of(4) {
        return Err(format!(
            "--out-offset {} must be a multiple of 4 below 64",
            args.out_offset
        )
        .into());
    }
    let mut out_table = Table::zeros(batch + 1, dim.max(16), DType::F32)?;
    let out_bytes = &mut bytemuck::cast_slice_mut::<f32, u8>(out_table.as_mut_slice::<f32>()?)
        [args.out_offset..args.out_offset + batch * dim * 4];
    let max_norm = MaxNorm::new(args.max_norm)?;
    let bag_options = BagOptions::mode(args.mode.parse::<BagMode>()?);
    let op = args.op.clone();
    let in_place = args.renorm == "in-place";
    let run_once = |table: &mut Table<'_>, out: &mut [u8]| -> Result<(), embedding_lookup::Error> {
        match out_dtype {
            DType::F32 => run_op(
                table,
                &op,
                in_place,
                max_norm,
                &bag_options,
                args.bag_size,
                &indices,
                cast_mut::<f32>(out),
            ),
            DType::F16 => run_op(
                table,
                &op,
                in_place,
                max_norm,
                &bag_options,
                args.bag_size,
                &indices,
                cast_mut::<f16>(out),
            ),
            DType::BF16 => run_op(
                table,
                &op,
                in_place,
                max_norm,
                &bag_options,
                args.bag_size,
                &indices,
                cast_mut::<bf16>(out),
            ),
        }
    };
    let out_used = out_rows * dim * out_dtype.size();
    run_once(&mut table, &mut out_bytes[..out_used])?; // warm-up: faults in the output pages
    let engine = time_iters(args.iters, &progress, &args.op, || {
        run_once(&mut table, &mut out_bytes[..out_used]).map_err(Into::into)
    })?;
    // Beside renorm and bags: the plain lookup of the same indices, in the same run.
    let plain = if args.op == "lookup" {
        None
    } else {
        let out = cast_mut::<f32>(&mut out_bytes[..batch * dim * 4]);
        table.lookup_into(&indices, out)?;
        Some(time_iters(args.iters, &progress, "plain lookup", || {
            table.lookup_into(&indices, out).map_err(Into::into)
        })?)
    };

    // The naive loop (f32 tables into f32 output only: that is the loop users write).
    let naive = if args.op == "lookup" && args.dtype == DType::F32 && out_dtype == DType::F32 {
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

    // Bytes that must move: every looked-up row read, every output row written, the indices.
    let moved = (batch * (table.row_bytes() + 8) + out_rows * dim * out_dtype.size()) as f64;
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
            "out_offset": args.out_offset,
        });
        if let Some(n) = &naive {
            obj["naive_rows_per_s"] = serde_json::json!(batch as f64 / n.median);
            obj["ratio_to_naive"] = serde_json::json!(n.median / engine.median);
        }
        if let Some(p) = &plain {
            obj["lookup_rows_per_s"] = serde_json::json!(batch as f64 / p.median);
            obj["time_vs_lookup"] = serde_json::json!(engine.median / p.median);
        }
        if args.op == "bag" {
            obj["bag_size"] = serde_json::json!(args.bag_size);
            obj["mode"] = serde_json::json!(args.mode);
        }
        if args.op == "renorm" {
            obj["max_norm"] = serde_json::json!(args.max_norm);
            obj["renorm"] = serde_json::json!(args.renorm);
        }
        println!("{obj}");
    } else {
        println!(
            "{} {rows} × {dim} {} -> {}, batch {batch}, {:?}, {}: kernel {}, {threads_used} threads, prefetch {}, stream {}{}",
            args.op, args.dtype, out_dtype, args.dist, args.storage,
            embedding_lookup::kernel_name(), kernels::prefetch_distance(), args.stream,
            if args.out_offset > 0 { format!(", output at +{} bytes", args.out_offset) } else { String::new() }
        );
        println!(
            "  engine  {:>8.2} M rows/s  {:>6.2} GB/s  (median of {}, spread {:.0}%)",
            rows_per_s / 1e6,
            bytes_per_s / 1e9,
            args.iters,
            spread * 100.0
        );
        if let Some(p) = &plain {
            println!(
                "  lookup  {:>8.2} M rows/s  (plain lookup of the same indices; {} takes {:.2}× its time)",
                batch as f64 / p.median / 1e6,
                args.op,
                engine.median / p.median
            );
        }
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

/// One run of the operation under test into `out` (rows of the output dtype).
#[allow(clippy::too_many_arguments)]
fn run_op<O: Element>(
    table: &mut Table<'_>,
    op: &str,
    in_place: bool,
    max_norm: MaxNorm,
    bag_options: &BagOptions<'_>,
    bag_size: usize,
    indices: &[i64],
    out: &mut [O],
) -> Result<(), embedding_lookup::Error> {
    match op {
        "renorm" if in_place => table.lookup_renorm_in_place(indices, out, max_norm),
        "renorm" => table.lookup_renorm_output_only(indices, out, max_norm),
        "bag" => table.bag_into(indices, Bags::fixed(bag_size), bag_options, out),
        _ => table.lookup_into(indices, out),
    }
}

pub(crate) struct Timing {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
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
pub(crate) struct Progress {
    started: Instant,
    terminal: bool,
    last: std::cell::Cell<f64>,
}

impl Progress {
    pub(crate) fn new(started: Instant) -> Progress {
        use std::io::IsTerminal;
        Progress {
            started,
            terminal: std::io::stderr().is_terminal(),
            last: std::cell::Cell::new(0.0),
        }
    }
    pub(crate) fn say(&self, what: &str) {
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
    pub(crate) fn done(&self) {
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
