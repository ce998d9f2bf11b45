//! `emb bag`: `F.embedding_bag` on tensor files: pooled rows (sum, mean, max) per bag, written
//! to `.npy` or `.safetensors`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use embedding_lookup::table::formats::{self, Format, TensorDType};
use embedding_lookup::{BagMode, BagOptions, Bags, DType, Element, Index, OpenMode, Table};
use half::{bf16, f16};

use crate::input::{open_table, read_f32, read_indices, IndexData};
use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// The table: FILE[:TENSOR] (.safetensors or .npy).
    #[arg(long)]
    table: String,
    /// The indices: FILE[:TENSOR], 1-D with --offsets, or 2-D (B, N) meaning B bags of N.
    #[arg(long)]
    indices: String,
    /// Where each bag starts in 1-D indices: FILE[:TENSOR] (offsets[0] = 0, non-decreasing).
    #[arg(long)]
    offsets: Option<String>,
    /// The last offset is the end of the last bag (CSR style): len(offsets) - 1 bags.
    #[arg(long)]
    include_last_offset: bool,
    /// How a bag's rows are pooled.
    #[arg(long, value_parser = ["sum", "mean", "max"])]
    mode: String,
    /// One weight per index (same shape as the indices), sum mode only: FILE[:TENSOR].
    #[arg(long)]
    per_sample_weights: Option<String>,
    /// PyTorch's padding_idx (-rows <= N < rows): such entries are left out of their bag.
    #[arg(long, allow_hyphen_values = true)]
    padding_idx: Option<i64>,
    /// Renorm rows to this norm before pooling (not supported yet: refused).
    #[arg(long)]
    max_norm: Option<f32>,
    /// The p of the p-norm for --max-norm.
    #[arg(long, default_value_t = 2.0, allow_hyphen_values = true)]
    norm_type: f32,
    /// The output file (.npy, or .safetensors with tensor "out"); shape (bags, dim).
    #[arg(long)]
    out: PathBuf,
    /// Output dtype: f32, or native (the table's own dtype, accumulated in f32, rounded once).
    #[arg(long, default_value = "f32", value_parser = ["f32", "native"])]
    out_dtype: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(args: Args, verbose: bool) -> CliResult {
    let (mut table, table_path) = open_table(&args.table, OpenMode::Map)?;
    if let Some(p) = args.padding_idx {
        table = table.with_padding_idx(p)?;
    }
    let indices = read_indices(&args.indices)?;
    let offsets = args.offsets.as_deref().map(read_offsets).transpose()?;
    let per_bag = match (&indices.shape[..], &offsets) {
        ([_], Some(_)) => None,
        ([_], None) => {
            return Err("1-D indices need --offsets (or give 2-D indices of shape (B, N))".into())
        }
        ([_, _], Some(_)) => {
            return Err(
                "2-D indices (B, N) are B bags of N: --offsets is only for 1-D indices".into(),
            )
        }
        ([_, _], None) if args.include_last_offset => {
            return Err("--include-last-offset is only for 1-D indices with --offsets".into())
        }
        ([_, n], None) => Some(*n),
        (shape, _) => return Err(format!("indices must be 1-D or 2-D, got shape {shape:?}").into()),
    };
    let weights = match &args.per_sample_weights {
        None => None,
        Some(spec) => {
            let (shape, w) = read_f32(spec)?;
            if shape != indices.shape {
                return Err(format!(
                    "per_sample_weights have shape {shape:?}, but the indices have shape {:?}",
                    indices.shape
                )
                .into());
            }
            Some(w)
        }
    };
    let options = BagOptions {
        mode: args.mode.parse::<BagMode>()?,
        per_sample_weights: weights.as_deref(),
        max_norm: args.max_norm,
        norm_type: args.norm_type,
    };
    let bags = match (per_bag, &offsets) {
        (Some(n), _) => Bags::Fixed(n),
        (None, Some(offsets)) => Bags::Offsets {
            offsets,
            include_last_offset: args.include_last_offset,
        },
        (None, None) => unreachable!("checked above"),
    };
    let out_dtype = match args.out_dtype.as_str() {
        "native" => table.dtype(),
        _ => DType::F32,
    };
    if out_dtype == DType::BF16 && Format::from_path(&args.out)? == Format::Npy {
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
    let start = Instant::now();
    let threads = args.threads;
    let (table, data, out) = (&table, &indices.data, &args.out);
    let bag_count = crate::with_threads(threads, move || -> CliResult<usize> {
        match out_dtype {
            DType::F32 => write_bags::<f32>(table, data, bags, &options, out),
            DType::F16 => write_bags::<f16>(table, data, bags, &options, out),
            DType::BF16 => write_bags::<bf16>(table, data, bags, &options, out),
        }
    })??;
    if verbose {
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{} bags of {} entries in {:.3} s ({:.1} M entries/s incl. writing) on {} threads",
            bag_count,
            indices.len(),
            secs,
            indices.len() as f64 / secs / 1e6,
            threads.unwrap_or_else(rayon::current_num_threads)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Offsets of any integer type, as i64 (a u64 beyond i64's range cannot be a valid offset and
/// is reported as past the end).
fn read_offsets(spec: &str) -> Result<Vec<i64>, embedding_lookup::Error> {
    let t = read_indices(spec)?;
    if t.shape.len() != 1 {
        return Err(embedding_lookup::Error::BadOffsets(format!(
            "offsets must be 1-D, got shape {:?}",
            t.shape
        )));
    }
    Ok(match t.data {
        IndexData::I32(v) => v.into_iter().map(i64::from).collect(),
        IndexData::I64(v) => v,
        IndexData::U32(v) => v.into_iter().map(i64::from).collect(),
        IndexData::U64(v) => v
            .into_iter()
            .map(|o| i64::try_from(o).unwrap_or(i64::MAX))
            .collect(),
    })
}

fn write_bags<O: Element>(
    table: &Table<'_>,
    indices: &IndexData,
    bags: Bags<'_, i64>,
    options: &BagOptions<'_>,
    out: &std::path::Path,
) -> CliResult<usize> {
    match indices {
        IndexData::I32(v) => write_typed::<_, O>(table, v, bags, options, out),
        IndexData::I64(v) => write_typed::<_, O>(table, v, bags, options, out),
        IndexData::U32(v) => write_typed::<_, O>(table, v, bags, options, out),
        IndexData::U64(v) => write_typed::<_, O>(table, v, bags, options, out),
    }
}

/// Pool everything (the library checks every input first), then write through a temporary
/// file renamed into place: a refused input leaves no file.
fn write_typed<I: Index, O: Element>(
    table: &Table<'_>,
    indices: &[I],
    bags: Bags<'_, i64>,
    options: &BagOptions<'_>,
    out: &std::path::Path,
) -> CliResult<usize> {
    let pooled: Vec<O> = table.bag(indices, bags, options)?;
    let count = bags.count(indices.len())?;
    let shape = [count, table.dim()];
    let mut file = formats::begin_single_tensor(out, "out", &TensorDType::Float(O::DTYPE), &shape)?;
    file.write_all(bytemuck::cast_slice(&pooled))?;
    file.commit()?;
    Ok(count)
}
