//! `emb convert`: rewrite a table in another dtype, streaming row blocks so that tables larger
//! than memory convert in bounded memory.

use std::path::PathBuf;
use std::process::ExitCode;

use embedding_lookup::table::convert_bytes;
use embedding_lookup::table::formats::{self, TensorDType};
use embedding_lookup::table::Residency;
use embedding_lookup::{DType, OpenMode};
use indicatif::{ProgressBar, ProgressStyle};

use crate::input::open_table;
use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// The table: FILE[:TENSOR].
    input: String,
    /// The output file (.safetensors with tensor "weight", or .npy).
    output: PathBuf,
    /// The output dtype: f32, f16 or bf16 (narrowing rounds to nearest even).
    #[arg(long)]
    dtype: DType,
}

/// Input bytes converted per step.
const BLOCK_BYTES: usize = 8 << 20;
/// Tables above this size show a progress bar.
const PROGRESS_BYTES: usize = 64 << 20;

pub fn run(args: Args, verbose: bool) -> CliResult {
    let (table, path) = open_table(&args.input, OpenMode::Map, Residency::Resident)?;
    let (from, to) = (table.dtype(), args.dtype);
    let mut file = formats::begin_single_tensor(
        &args.output,
        "weight",
        &TensorDType::Float(to),
        &[table.rows(), table.dim()],
    )?;
    let src = table.as_bytes();
    let rows_per_block = (BLOCK_BYTES / table.row_bytes().max(1)).max(1);
    let block_in = rows_per_block * table.row_bytes();
    let bar = if src.len() >= PROGRESS_BYTES {
        let bar = ProgressBar::new(src.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut buf = Vec::new();
    if block_in > 0 {
        for chunk in src.chunks(block_in) {
            buf.resize(chunk.len() / from.size() * to.size(), 0);
            convert_bytes(from, chunk, to, &mut buf);
            file.write_all(&buf)?;
            bar.inc(chunk.len() as u64);
        }
    }
    file.commit()?;
    bar.finish_and_clear();
    if verbose {
        eprintln!(
            "{}: {} × {} {from} -> {} ({to})",
            path.display(),
            table.rows(),
            table.dim(),
            args.output.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
