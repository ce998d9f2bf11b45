//! `emb`: embedding lookups on tensor files from the command line.

// Doc comments here are clap help texts (`FILE[:TENSOR]`), not links.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

mod bag;
mod bench;
mod bench_table;
mod conformance;
mod convert;
mod create;
mod demo;
mod device;
mod info;
mod input;
mod lookup;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Errors print as `error: ...` and exit with status 2.
type CliResult<T = ExitCode> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser)]
#[command(
    name = "emb",
    version,
    about = "Embedding lookups (torch.nn.Embedding on the CPU) on .safetensors and .npy files"
)]
struct Cli {
    /// Print the kernel in use, thread count, storage and timings on stderr.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the tensors of a file: dtype, shape, and whether a table would be viewed zero-copy.
    Info(info::Args),
    /// Look up indices in a table and write the rows to a file.
    Lookup(lookup::Args),
    /// Pool the rows of bags of indices (sum, mean, max), as torch.nn.EmbeddingBag.
    Bag(bag::Args),
    /// Convert a table to another dtype, streaming.
    Convert(convert::Args),
    /// Run PyTorch golden cases through the library and compare.
    Conformance(conformance::Args),
    /// Time an operation on a generated workload against memcpy and a naive loop.
    Bench(bench::Args),
    /// Write a large table of random values (for the larger-than-memory benchmarks).
    Create(create::Args),
    /// Create a demo table, map it, look up the (2, 4) example indices, and measure throughput.
    Demo(demo::Args),
}

fn main() -> ExitCode {
    ignore_file_size_signal();
    let cli = Cli::parse();
    // A kernel level asked for and not available is refused, not silently replaced.
    if let Err(e) = embedding_lookup::kernels::Isa::requested() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Lookup(a) => lookup::run(a, cli.verbose),
        Command::Bag(a) => bag::run(a, cli.verbose),
        Command::Convert(a) => convert::run(a, cli.verbose),
        Command::Conformance(a) => conformance::run(a, cli.verbose),
        Command::Demo(a) => demo::run(a, cli.verbose),
        Command::Create(a) => create::run(a, cli.verbose),
        Command::Bench(a) => bench::run(a, cli.verbose),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// A file-size limit (`ulimit -f`) raises SIGXFSZ, whose default action kills the process in
/// the middle of a write and leaves the temporary output file behind. Ignored, the write fails
/// with EFBIG instead, which is handled like any other write error: the temporary file is
/// removed, the destination left as it was, and the error printed.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: setting a standard signal's disposition to SIG_IGN installs no handler code and
    // runs before any other thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Run `f` on a rayon pool of `threads` threads, or on the global pool when `None`. The count
/// is bounded (`1..=MAX_THREADS`) before any thread starts.
fn with_threads<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> CliResult<T> {
    match threads {
        None => Ok(f()),
        Some(n) => {
            let pool =
                embedding_lookup::util::thread_pool(n).map_err(|e| format!("--threads: {e}"))?;
            Ok(pool.install(f))
        }
    }
}

/// A count that must be at least 1 (`--iters`, `--rows`, ...): 0 would time nothing and print
/// figures of no run.
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a count: {e}")),
    }
}

/// The help text of every `--threads` option.
const THREADS_HELP: &str =
    "Worker threads, 1 to 1024 (default: all cores); larger counts are refused";
