//! `emb bench --table FILE`: lookups from an existing table file, as a user serves it, against
//! the device's own random-read rate measured on the same file in the same run.

use std::process::ExitCode;
use std::time::Instant;

use embedding_lookup::table::formats;
use embedding_lookup::workload;
use embedding_lookup::{OpenMode, OpenOptions, Table};

use crate::bench::{Args, Progress, Timing};
use crate::CliResult;

pub fn run(args: &Args, spec: &str, verbose: bool) -> CliResult {
    let started = Instant::now();
    let progress = Progress::new(started);
    let (path, tensor) = formats::split_tensor_spec(spec);
    let table = Table::open_with(
        &path,
        &OpenOptions {
            tensor: tensor.as_deref(),
            mode: OpenMode::Map,
            residency: args.residency,
            populate: false,
        },
    )?;
    if table.rows() == 0 || args.batch == 0 {
        return Err("the table and --batch must not be empty".into());
    }
    let dim = table.dim();
    let mut out = vec![0.0f32; args.batch * dim];
    let iters = args.iters.max(1);
    let mut times = Vec::with_capacity(iters);
    let mut disk_bytes = Vec::with_capacity(iters);
    let mut resident = Vec::with_capacity(iters);
    for i in 0..iters {
        // New ids every batch: a warm run is then the steady state of a stream of batches.
        let indices = workload::indices(args.batch, table.rows(), args.dist, 2 + i as u64);
        if args.cold {
            table.drop_cached_pages()?;
        }
        resident.push(table.resident_fraction(&indices));
        progress.say(&format!("timing lookups {}/{iters}", i + 1));
        let before = read_bytes();
        let start = Instant::now();
        table.lookup_into(&indices, &mut out)?;
        times.push(start.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (before, read_bytes()) {
            disk_bytes.push((b - a) as f64 / args.batch as f64);
        }
    }
    progress.say("measuring the device: 4 KiB O_DIRECT random reads, depth 1 and 32");
    let file_len = std::fs::metadata(&path)?.len();
    let qd1 = crate::device::random_read_rate(&path, 0..file_len, 1, args.device_seconds)?;
    let qd32 = crate::device::random_read_rate(&path, 0..file_len, 32, args.device_seconds)?;
    progress.done();

    let engine = timing(&mut times);
    let rows_per_s = args.batch as f64 / engine.median;
    let disk_per_lookup = median(&mut disk_bytes);
    let resident_fraction = median(&mut resident);
    let threads = rayon::current_num_threads();
    if args.json {
        let obj = serde_json::json!({
            "op": "lookup", "table": path.display().to_string(),
            "rows": table.rows(), "dim": dim, "dtype": table.dtype().name(),
            "table_bytes": table.as_bytes().len(), "batch": args.batch,
            "dist": format!("{:?}", args.dist), "cold": args.cold,
            "residency": table.residency().name(),
            "page_reader": table.page_reader(),
            "rows_per_s": rows_per_s,
            "disk_bytes_per_lookup": disk_per_lookup,
            "resident_fraction": resident_fraction,
            "device_iops_qd1": qd1,
            "device_iops_qd32": qd32,
            "ratio_to_qd32": rows_per_s / qd32,
            "kernel": embedding_lookup::kernel_name(),
            "threads": threads, "iters": iters,
            "median_s": engine.median, "min_s": engine.min, "max_s": engine.max,
        });
        println!("{obj}");
    } else {
        println!(
            "lookup from {} ({} × {dim} {}, {:.2} GB), batch {}, {:?}, {}: {}{}, kernel {}, {threads} threads",
            path.display(),
            table.rows(),
            table.dtype(),
            table.as_bytes().len() as f64 / 1e9,
            args.batch,
            args.dist,
            if args.cold { "cold" } else { "warm" },
            table.residency(),
            table
                .page_reader()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            embedding_lookup::kernel_name(),
        );
        println!(
            "  engine  {:>10.0} lookups/s  (median of {iters}, {:.0}-{:.0})",
            rows_per_s,
            args.batch as f64 / engine.max,
            args.batch as f64 / engine.min
        );
        println!(
            "          {:>10.0} bytes read from disk per lookup, {:.1}% of rows resident before",
            disk_per_lookup,
            resident_fraction * 100.0
        );
        println!(
            "  device  {qd1:>10.0} reads/s at depth 1, {qd32:.0} at depth 32 (4 KiB, O_DIRECT, same file); engine/depth-32 {:.2}",
            rows_per_s / qd32
        );
        let missed = 1.0 - resident_fraction;
        if !args.cold && missed > 0.0 {
            println!(
                "          the depth-32 rate over the rows that missed: {:.0} lookups/s",
                qd32 / missed
            );
        }
    }
    if verbose {
        eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(ExitCode::SUCCESS)
}

/// Bytes this process has caused to be read from storage (`/proc/self/io`, `read_bytes`).
fn read_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    let line = io.lines().find(|l| l.starts_with("read_bytes:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn timing(t: &mut [f64]) -> Timing {
    t.sort_by(f64::total_cmp);
    Timing {
        median: t[t.len() / 2],
        min: t[0],
        max: t[t.len() - 1],
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
