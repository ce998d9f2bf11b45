//! `emb bag`: `F.embedding_bag` on tensor files: pooled rows (sum, mean, max) per bag, written
//! to `.npy` or `.safetensors`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use embedding_lookup::table::formats::{self, Format, TensorDType};
use embedding_lookup::table::Residency;
use embedding_lookup::{
    BagMode, BagOptions, Bags, DType, Element, Index, MaxNorm, OpenMode, Table,
};
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
    /// PyTorch's max_norm: referenced rows whose norm exceeds this are rescaled to it (> 0)
    /// before pooling. Without --write-back the table file is left untouched and the output
    /// is pooled from the rescaled rows.
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
    /// mapped writable; the table must be aligned for its dtype).
    #[arg(long, requires = "max_norm")]
    write_back: bool,
    /// The output file (.npy, or .safetensors with tensor "out"); shape (bags, dim).
    #[arg(long)]
    out: PathBuf,
    /// Output dtype: f32, or native (the table's own dtype, accumulated in f32, rounded once).
    #[arg(long, default_value = "f32", value_parser = ["f32", "native"])]
    out_dtype: String,
    #[arg(long, help = crate::THREADS_HELP)]
    threads: Option<usize>,
    /// Keep the table in memory (resident), serve it from disk with batch read-ahead
    /// (out-of-core), or choose from its size against available memory (auto).
    #[arg(long, default_value = "auto")]
    residency: Residency,
}

fn parse_norm_type(s: &str) -> Result<f64, String> {
    embedding_lookup::conformance::parse_float(s)
        .ok_or_else(|| format!("not a number: {s:?} (a p > 0, or inf)"))
}

pub fn run(args: Args, verbose: bool) -> CliResult {
    // Bad renorm values are refused before the table is opened, let alone written.
    let max_norm = args
        .max_norm
        .map(|m| MaxNorm::new(m)?.with_norm_type(args.norm_type))
        .transpose()?;
    let mode = if args.write_back {
        OpenMode::MapWritable
    } else {
        OpenMode::Map
    };
    let (mut table, table_path) = open_table(&args.table, mode, args.residency)?;
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
        max_norm,
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
        if let Some(m) = max_norm {
            eprintln!(
                "max_norm {} (p = {}), {}",
                m.max_norm(),
                m.norm_type(),
                if args.write_back {
                    "renormed in the table file"
                } else {
                    "output only"
                }
            );
        }
    }
    let start = Instant::now();
    let threads = args.threads;
    let write_back = args.write_back;
    let (table, data, out) = (&mut table, &indices.data, &args.out);
    let bag_count = crate::with_threads(threads, move || -> CliResult<usize> {
        let job = Job {
            table,
            bags,
            options: &options,
            out,
            write_back,
        };
        match out_dtype {
            DType::F32 => job.write::<f32>(data),
            DType::F16 => job.write::<f16>(data),
            DType::BF16 => job.write::<bf16>(data),
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

/// One `emb bag` run, once the inputs are read.
struct Job<'t, 'a, 'b> {
    table: &'t mut Table<'a>,
    bags: Bags<'b, i64>,
    options: &'b BagOptions<'b>,
    out: &'b std::path::Path,
    /// Renorm the table file in place (`max_norm` is set).
    write_back: bool,
}

impl Job<'_, '_, '_> {
    fn write<O: Element>(self, indices: &IndexData) -> CliResult<usize> {
        match indices {
            IndexData::I32(v) => self.write_typed::<_, O>(v),
            IndexData::I64(v) => self.write_typed::<_, O>(v),
            IndexData::U32(v) => self.write_typed::<_, O>(v),
            IndexData::U64(v) => self.write_typed::<_, O>(v),
        }
    }

    /// Pool everything (the library checks every input first, and in place renorms the
    /// table file only then, flushing it), then write through a temporary file renamed into
    /// place: a refused input leaves no file and an untouched table. The output file is
    /// begun first, so that a bad output path is found before the table is changed.
    fn write_typed<I: Index, O: Element>(self, indices: &[I]) -> CliResult<usize> {
        let (table, bags, options) = (self.table, self.bags, self.options);
        let count = bags.count(indices.len())?;
        let shape = [count, table.dim()];
        let mut file =
            formats::begin_single_tensor(self.out, "out", &TensorDType::Float(O::DTYPE), &shape)?;
        let pooled: Vec<O> = if self.write_back {
            let len = count
                .checked_mul(table.dim())
                .ok_or("the output does not fit in memory")?;
            let mut pooled = vec![O::default(); len];
            table.bag_renorm_in_place(indices, bags, options, &mut pooled)?;
            table.flush()?;
            pooled
        } else {
            table.bag(indices, bags, options)?
        };
        file.write_all(bytemuck::cast_slice(&pooled))?;
        file.commit()?;
        Ok(count)
    }
}
