//! `emb convert`: rewrite a table in another dtype, streaming row blocks so that tables larger
//! than memory convert in bounded memory.

use std::path::PathBuf;
use std::process::ExitCode;

use embedding_lookup::table::convert_bytes;
use embedding_lookup::table::formats::{self, TensorDType};
use embedding_lookup::{DType, Error};
use indicatif::{ProgressBar, ProgressStyle};

use crate::input::{open_entry_of_rank, refuse_overwriting_input};
use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// The table: FILE[:TENSOR] of f32, f16, bf16 or f64 (NumPy's default; rounded to nearest).
    input: String,
    /// The output file, which must not be the input: a .safetensors file holding the one
    /// converted tensor (named as in the input, or --name; "weight" for a .npy input), or a
    /// .npy file. The input's other tensors and metadata are not copied.
    output: PathBuf,
    /// The output dtype: f32, f16 or bf16 (narrowing rounds to nearest even).
    #[arg(long)]
    dtype: DType,
    /// The tensor's name in a .safetensors output (default: its name in the input).
    #[arg(long)]
    name: Option<String>,
}

/// Input bytes converted per step.
const BLOCK_BYTES: usize = 8 << 20;
/// Tables above this size show a progress bar.
const PROGRESS_BYTES: usize = 64 << 20;

pub fn run(args: Args, verbose: bool) -> CliResult {
    let (path, tensor) = formats::split_tensor_spec(&args.input);
    let (entry, map) = open_entry_of_rank(&path, tensor.as_deref(), Some(2))?;
    refuse_overwriting_input(&args.output, &path, "table")?;
    let from = match &entry.dtype {
        TensorDType::Float(d) => Source::Table(*d),
        TensorDType::F64 => Source::F64,
        other => {
            return Err(Error::Format {
                path: Some(path),
                reason: format!(
                    "tensor {} has dtype {other}; emb convert reads f64, f32, f16 and bf16 tables",
                    entry.describe()
                ),
            }
            .into())
        }
    };
    let [rows, dim] = entry.shape[..] else {
        return Err(format!("{}: tensor {} is not 2-D", path.display(), entry.describe()).into());
    };
    let name = match (&args.name, entry.name.as_str()) {
        (Some(n), _) => n.as_str(),
        (None, "") => "weight",
        (None, n) => n,
    };
    let to = args.dtype;
    let mut file =
        formats::begin_single_tensor(&args.output, name, &TensorDType::Float(to), &[rows, dim])?;
    let src = &map[entry.data.clone()];
    let row_bytes = dim * from.size();
    let rows_per_block = (BLOCK_BYTES / row_bytes.max(1)).max(1);
    let block_in = rows_per_block * row_bytes;
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
            match from {
                Source::Table(from) => convert_bytes(from, chunk, to, &mut buf),
                Source::F64 => narrow_f64(chunk, to, &mut buf),
            }
            file.write_all(&buf)?;
            bar.inc(chunk.len() as u64);
        }
    }
    file.commit()?;
    bar.finish_and_clear();
    if verbose {
        eprintln!(
            "{}: {rows} × {dim} {} -> {} ({to}, tensor {name:?})",
            path.display(),
            from.name(),
            args.output.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The element type of the input: a table dtype, or f64 (which only `emb convert` reads).
#[derive(Clone, Copy)]
enum Source {
    Table(DType),
    F64,
}

impl Source {
    fn size(self) -> usize {
        match self {
            Source::Table(d) => d.size(),
            Source::F64 => 8,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Source::Table(d) => d.name(),
            Source::F64 => "f64",
        }
    }
}

/// f64 elements (possibly unaligned bytes) rounded to nearest, ties to even, straight to `to`:
/// one rounding, not two through f32.
fn narrow_f64(src: &[u8], to: DType, dst: &mut [u8]) {
    let values = src
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")));
    match to {
        DType::F32 => {
            for (d, v) in dst.chunks_exact_mut(4).zip(values) {
                d.copy_from_slice(&(v as f32).to_le_bytes());
            }
        }
        DType::F16 => {
            for (d, v) in dst.chunks_exact_mut(2).zip(values) {
                d.copy_from_slice(&half::f16::from_f64(v).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (d, v) in dst.chunks_exact_mut(2).zip(values) {
                d.copy_from_slice(&half::bf16::from_f64(v).to_le_bytes());
            }
        }
    }
}
