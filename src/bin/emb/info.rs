//! `emb info`: what a tensor file holds.

use std::path::PathBuf;
use std::process::ExitCode;

use embedding_lookup::table::formats::{self, Format, TensorDType};
use embedding_lookup::Error;
use memmap2::Mmap;

use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors or .npy file.
    file: PathBuf,
}

pub fn run(args: Args) -> CliResult {
    let path = &args.file;
    let format = Format::from_path(path)?;
    let file = std::fs::File::open(path).map_err(|e| Error::Io {
        path: Some(path.clone()),
        source: e,
    })?;
    // SAFETY: read-only map, read once to list the header; see Table::open on file changes.
    let map = unsafe { Mmap::map(&file) }?;
    let parsed = formats::parse(&map, format).map_err(|e| match e {
        Error::Format { path: None, reason } => Error::Format {
            path: Some(path.clone()),
            reason,
        },
        other => other,
    })?;
    println!("{}: {:?}, {} bytes", path.display(), format, map.len());
    for (k, v) in &parsed.metadata {
        println!("  metadata {k} = {v}");
    }
    println!(
        "  {:<24} {:<8} {:<20} {:>14}  table view",
        "tensor", "dtype", "shape", "bytes"
    );
    for e in &parsed.entries {
        let view = match &e.dtype {
            TensorDType::Float(d) if e.shape.len() == 2 => {
                if e.data.start % d.size() == 0 {
                    "zero-copy"
                } else {
                    "copied (misaligned)"
                }
            }
            TensorDType::Float(_) => "not 2-D",
            _ => "not a float table",
        };
        let name = if e.name.is_empty() { "<npy>" } else { &e.name };
        println!(
            "  {:<24} {:<8} {:<20} {:>14}  {view}",
            name,
            e.dtype.to_string(),
            format!("{:?}", e.shape),
            e.data.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
