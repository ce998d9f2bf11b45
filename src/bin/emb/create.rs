//! `emb create`: write a large table of random values (uniform in [-1, 1)) at the disk's write
//! speed, for reproducing the larger-than-memory benchmarks on any machine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Instant;

use embedding_lookup::table::formats::{self, TensorDType};
use embedding_lookup::DType;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// The output file: .npy (f32, f16) or .safetensors (f32, f16, bf16).
    output: PathBuf,
    /// Rows (the vocabulary size).
    #[arg(long)]
    rows: usize,
    /// Elements per row.
    #[arg(long)]
    dim: usize,
    /// Element type: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// The tensor's name in a .safetensors file.
    #[arg(long, default_value = "weight")]
    name: String,
    /// Seed of the values (the same seed gives the same file).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Bytes generated and written per step; two steps are in memory at a time.
const STEP: usize = 64 << 20;

pub fn run(args: Args, verbose: bool) -> CliResult {
    if args.rows == 0 || args.dim == 0 {
        return Err("--rows and --dim must be at least 1".into());
    }
    let len = args
        .rows
        .checked_mul(args.dim)
        .and_then(|n| n.checked_mul(args.dtype.size()))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or("the table does not fit in the address space")?;
    check_free_space(&args.output, len as u64)?;
    let mut file = formats::begin_single_tensor(
        &args.output,
        &args.name,
        &TensorDType::Float(args.dtype),
        &[args.rows, args.dim],
    )?;
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template"),
    );
    let start = Instant::now();
    let (dtype, seed) = (args.dtype, args.seed);
    // A generator thread fills the next step while this one writes the last.
    let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(1);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    let steps = len.div_ceil(STEP);
    std::thread::scope(|s| -> CliResult<()> {
        s.spawn(move || {
            for step in 0..steps {
                let mut buf = empty_rx.try_recv().unwrap_or_default();
                buf.resize(STEP.min(len - step * STEP), 0);
                fill(&mut buf, dtype, seed, step * STEP);
                if full_tx.send(buf).is_err() {
                    break; // the writer stopped on an error
                }
            }
        });
        for buf in full_rx {
            file.write_all(&buf)?;
            bar.inc(buf.len() as u64);
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })?;
    file.commit()?;
    bar.finish_and_clear();
    if verbose {
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{}: {} × {} {dtype}, {:.2} GB in {secs:.1} s ({:.2} GB/s, synced)",
            args.output.display(),
            args.rows,
            args.dim,
            len as f64 / 1e9,
            len as f64 / secs / 1e9
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Fill `buf`, which starts at byte `at` of the table, with values that depend only on the seed
/// and the element's position.
fn fill(buf: &mut [u8], dtype: DType, seed: u64, at: usize) {
    const PIECE: usize = 1 << 20;
    buf.par_chunks_mut(PIECE)
        .enumerate()
        .for_each(|(i, piece)| {
            let first = (at + i * PIECE) / dtype.size();
            let mut state = seed ^ (first as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = || {
                // splitmix64: fast and good enough for benchmark values.
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                let z = z ^ (z >> 31);
                (z >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0
            };
            match dtype {
                DType::F32 => piece
                    .chunks_exact_mut(4)
                    .for_each(|e| e.copy_from_slice(&next().to_le_bytes())),
                DType::F16 => piece
                    .chunks_exact_mut(2)
                    .for_each(|e| e.copy_from_slice(&half::f16::from_f32(next()).to_le_bytes())),
                DType::BF16 => piece
                    .chunks_exact_mut(2)
                    .for_each(|e| e.copy_from_slice(&half::bf16::from_f32(next()).to_le_bytes())),
            }
        });
}

/// Refuse up front a table the output's file system has no room for.
fn check_free_space(output: &std::path::Path, needed: u64) -> CliResult<()> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let dir = match output.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `c` is a NUL-terminated path and `st` points to a statvfs to fill.
        if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("{} (the output's directory): {e}", dir.display()).into());
        }
        // SAFETY: statvfs succeeded, so it filled `st`.
        let st = unsafe { st.assume_init() };
        #[allow(clippy::unnecessary_cast)] // the fields are narrower on 32-bit targets
        let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
        if free < needed {
            return Err(format!(
                "{}: the table needs {:.2} GB but its file system has {:.2} GB free",
                output.display(),
                needed as f64 / 1e9,
                free as f64 / 1e9
            )
            .into());
        }
    }
    #[cfg(not(unix))]
    let _ = (output, needed);
    Ok(())
}
