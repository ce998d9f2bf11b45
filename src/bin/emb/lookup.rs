//! `emb lookup`: rows of a table for the indices in a file, written to `.npy` or
//! `.safetensors`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use embedding_lookup::table::formats::{self, Format, TensorDType};
use embedding_lookup::{DType, Element, Index, OpenMode, Table};
use half::{bf16, f16};

use crate::input::{open_table, read_indices, IndexData};
use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// The table: FILE[:TENSOR] (.safetensors or .npy).
    #[arg(long)]
    table: String,
    /// The indices: FILE[:TENSOR] (int32, int64, uint32 or uint64, any shape).
    #[arg(long)]
    indices: String,
    /// The output file (.npy, or .safetensors with tensor "out"); shape indices.shape + [dim].
    #[arg(long)]
    out: PathBuf,
    /// PyTorch's padding_idx (-rows <= N < rows); forward returns the stored row.
    #[arg(long, allow_hyphen_values = true)]
    padding_idx: Option<i64>,
    /// Output dtype: f32 (widened exactly), or native (the table's own dtype).
    #[arg(long, default_value = "f32", value_parser = ["f32", "native"])]
    out_dtype: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// Output rows computed and written per step, bounding memory for huge index files.
const CHUNK_ROWS: usize = 1 << 16;

pub fn run(args: Args, verbose: bool) -> CliResult {
    let (mut table, table_path) = open_table(&args.table, OpenMode::Map)?;
    if let Some(p) = args.padding_idx {
        table = table.with_padding_idx(p)?;
    }
    let indices = read_indices(&args.indices)?;
    let out_dtype = match args.out_dtype.as_str() {
        "native" => table.dtype(),
        _ => DType::F32,
    };
    let out_format = Format::from_path(&args.out)?;
    if out_dtype == DType::BF16 && out_format == Format::Npy {
        return Err(
            "a bf16 output has no .npy dtype: write .safetensors, or use --out-dtype f32".into(),
        );
    }
    if verbose {
        eprintln!(
            "table {}: {} × {} {}, {:?}, zero-copy: {}; kernel {}",
            table_path.display(),
            table.rows(),
            table.dim(),
            table.dtype(),
            table.storage_kind(),
            table.is_zero_copy(),
            embedding_lookup::kernel_name()
        );
    }
    let shape = embedding_lookup::output_shape(&indices.shape, table.dim());
    let start = Instant::now();
    let threads = args.threads;
    let (table, data, out) = (&table, &indices.data, &args.out);
    crate::with_threads(threads, move || -> CliResult<()> {
        match out_dtype {
            DType::F32 => write_lookup::<f32>(table, data, out, &shape),
            DType::F16 => write_lookup::<f16>(table, data, out, &shape),
            DType::BF16 => write_lookup::<bf16>(table, data, out, &shape),
        }
    })??;
    if verbose {
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{} rows in {:.3} s ({:.1} M rows/s incl. writing) on {} threads",
            indices.len(),
            secs,
            indices.len() as f64 / secs / 1e6,
            threads.unwrap_or_else(rayon::current_num_threads)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn write_lookup<O: Element>(
    table: &Table<'_>,
    indices: &IndexData,
    out: &std::path::Path,
    shape: &[usize],
) -> CliResult<()> {
    match indices {
        IndexData::I32(v) => write_chunks::<_, O>(table, v, out, shape),
        IndexData::I64(v) => write_chunks::<_, O>(table, v, out, shape),
        IndexData::U32(v) => write_chunks::<_, O>(table, v, out, shape),
        IndexData::U64(v) => write_chunks::<_, O>(table, v, out, shape),
    }
}

/// Validate every index first, then look up and write chunk by chunk through a temporary
/// file that is renamed into place only when complete.
fn write_chunks<I: Index, O: Element>(
    table: &Table<'_>,
    indices: &[I],
    out: &std::path::Path,
    shape: &[usize],
) -> CliResult<()> {
    embedding_lookup::index::validate(indices, table.rows())?;
    let mut file = formats::begin_single_tensor(out, "out", &TensorDType::Float(O::DTYPE), shape)?;
    let dim = table.dim();
    let mut buf = vec![O::default(); CHUNK_ROWS.min(indices.len()) * dim];
    for chunk in indices.chunks(CHUNK_ROWS) {
        let out_chunk = &mut buf[..chunk.len() * dim];
        table.lookup_into(chunk, out_chunk)?;
        file.write_all(bytemuck::cast_slice(out_chunk))?;
    }
    file.commit()?;
    Ok(())
}
