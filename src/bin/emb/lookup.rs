//! `emb lookup`: rows of a table for the indices in a file, written to `.npy` or
//! `.safetensors`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use embedding_lookup::table::formats::{self, Format, TensorDType};
use embedding_lookup::table::Residency;
use embedding_lookup::{DType, Element, Index, MaxNorm, OpenMode, Table};
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
    #[arg(long, help = crate::THREADS_HELP)]
    threads: Option<usize>,
    /// Keep the table in memory (resident), serve it from disk with batch read-ahead
    /// (out-of-core), or choose from its size against available memory (auto).
    #[arg(long, default_value = "auto")]
    residency: Residency,
    /// PyTorch's max_norm: rows whose norm exceeds this are rescaled to it (> 0). Without
    /// --write-back the table file is left untouched and the output holds the rescaled rows.
    #[arg(long, allow_hyphen_values = true)]
    max_norm: Option<f64>,
    /// The p of the p-norm for --max-norm: any p > 0, or `inf`.
    #[arg(
        long,
        default_value = "2",
        requires = "max_norm",
        allow_hyphen_values = true,
        value_parser = parse_norm_type
    )]
    norm_type: f64,
    /// Renorm the referenced rows in the table file itself, as PyTorch does (the file is
    /// mapped writable; the table must be aligned for its dtype). The whole output is then
    /// computed in memory in one pass.
    #[arg(long, requires = "max_norm")]
    write_back: bool,
}

/// What the lookup does about max_norm.
#[derive(Clone, Copy)]
enum Renorm {
    /// A plain lookup.
    Off,
    /// Rescaled rows in the output, the table untouched.
    OutputOnly(MaxNorm),
    /// The table renormed in place, then looked up (one fused pass).
    InPlace(MaxNorm),
}

fn parse_norm_type(s: &str) -> Result<f64, String> {
    embedding_lookup::conformance::parse_float(s)
        .ok_or_else(|| format!("not a number: {s:?} (a p > 0, or inf)"))
}

/// Output rows computed and written per step, bounding memory for huge index files.
const CHUNK_ROWS: usize = 1 << 16;

pub fn run(args: Args, verbose: bool) -> CliResult {
    // Bad renorm values are refused before the table is opened, let alone written.
    let renorm = match args.max_norm {
        None => Renorm::Off,
        Some(m) => {
            let m = MaxNorm::new(m)?.with_norm_type(args.norm_type)?;
            if args.write_back {
                Renorm::InPlace(m)
            } else {
                Renorm::OutputOnly(m)
            }
        }
    };
    let mode = match renorm {
        Renorm::InPlace(_) => OpenMode::MapWritable,
        _ => OpenMode::Map,
    };
    let (mut table, table_path) = open_table(&args.table, mode, args.residency)?;
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
            "table {}: {} × {} {}, {:?}, zero-copy: {}, {}{}; kernel {}",
            table_path.display(),
            table.rows(),
            table.dim(),
            table.dtype(),
            table.storage_kind(),
            table.is_zero_copy(),
            table.residency(),
            table
                .page_reader()
                .map(|r| format!(" (pages read by {r})"))
                .unwrap_or_default(),
            embedding_lookup::kernel_name()
        );
        match renorm {
            Renorm::Off => {}
            Renorm::OutputOnly(m) | Renorm::InPlace(m) => eprintln!(
                "max_norm {} (p = {}), {}",
                m.max_norm(),
                m.norm_type(),
                if matches!(renorm, Renorm::InPlace(_)) {
                    "renormed in the table file"
                } else {
                    "output only"
                }
            ),
        }
    }
    let shape = embedding_lookup::output_shape(&indices.shape, table.dim());
    let start = Instant::now();
    let threads = args.threads;
    let (table, data, out) = (&mut table, &indices.data, &args.out);
    crate::with_threads(threads, move || -> CliResult<()> {
        match out_dtype {
            DType::F32 => write_lookup::<f32>(table, data, out, &shape, renorm),
            DType::F16 => write_lookup::<f16>(table, data, out, &shape, renorm),
            DType::BF16 => write_lookup::<bf16>(table, data, out, &shape, renorm),
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
    table: &mut Table<'_>,
    indices: &IndexData,
    out: &std::path::Path,
    shape: &[usize],
    renorm: Renorm,
) -> CliResult<()> {
    match indices {
        IndexData::I32(v) => write_chunks::<_, O>(table, v, out, shape, renorm),
        IndexData::I64(v) => write_chunks::<_, O>(table, v, out, shape, renorm),
        IndexData::U32(v) => write_chunks::<_, O>(table, v, out, shape, renorm),
        IndexData::U64(v) => write_chunks::<_, O>(table, v, out, shape, renorm),
    }
}

/// Validate every index first, then look up and write chunk by chunk through a temporary
/// file that is renamed into place only when complete. In place, the renorm must see every
/// index at once (each row is renormed once), so the output is computed in one call.
fn write_chunks<I: Index, O: Element>(
    table: &mut Table<'_>,
    indices: &[I],
    out: &std::path::Path,
    shape: &[usize],
    renorm: Renorm,
) -> CliResult<()> {
    embedding_lookup::index::validate(indices, table.rows())?;
    let mut file = formats::begin_single_tensor(out, "out", &TensorDType::Float(O::DTYPE), shape)?;
    let dim = table.dim();
    if let Renorm::InPlace(m) = renorm {
        let len = indices
            .len()
            .checked_mul(dim)
            .ok_or("the output does not fit in memory")?;
        let mut buf = vec![O::default(); len];
        table.lookup_renorm_in_place(indices, &mut buf, m)?;
        table.flush()?;
        file.write_all(bytemuck::cast_slice(&buf))?;
    } else {
        let mut buf = vec![O::default(); CHUNK_ROWS.min(indices.len()) * dim];
        for chunk in indices.chunks(CHUNK_ROWS) {
            let out_chunk = &mut buf[..chunk.len() * dim];
            match renorm {
                Renorm::OutputOnly(m) => table.lookup_renorm_output_only(chunk, out_chunk, m)?,
                _ => table.lookup_into(chunk, out_chunk)?,
            }
            file.write_all(bytemuck::cast_slice(out_chunk))?;
        }
    }
    file.commit()?;
    Ok(())
}
