//! `emb conformance`: PyTorch golden cases through the library.

use std::path::PathBuf;
use std::process::ExitCode;

use embedding_lookup::conformance::{self, Case, Outcome};

use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// A directory of case files (*.safetensors).
    dir: PathBuf,
    /// Also write what the library produced for each case to OUT_DIR/<case>.safetensors.
    #[arg(long, value_name = "OUT_DIR")]
    write: Option<PathBuf>,
    /// Exit 0 even when some cases were skipped (an operation this version does not know).
    /// Without it a skipped case fails the run; a run where no case passed always fails.
    #[arg(long)]
    allow_skipped: bool,
}

pub fn run(args: Args, verbose: bool) -> CliResult {
    if let Some(dir) = &args.write {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let files = conformance::case_files(&args.dir)?;
    if files.is_empty() {
        return Err(format!("{}: no *.safetensors case files", args.dir.display()).into());
    }
    if verbose {
        eprintln!("kernel {}", embedding_lookup::kernel_name());
    }
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for file in files {
        let report = match Case::load(&file) {
            Ok(case) => conformance::run_case(&case),
            Err(e) => {
                failed += 1;
                println!("FAIL {}: cannot read the case: {e}", file.display());
                continue;
            }
        };
        match &report.outcome {
            Outcome::Passed => {
                passed += 1;
                println!("PASS {}", report.name);
            }
            Outcome::Failed(why) => {
                failed += 1;
                println!("FAIL {}: {why}", report.name);
            }
            Outcome::Skipped(why) => {
                skipped += 1;
                println!("SKIP {}: {why}", report.name);
            }
        }
        if let Some(dir) = &args.write {
            if !matches!(report.outcome, Outcome::Skipped(_)) {
                conformance::write_report(&report, dir)?;
            }
        }
    }
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    if passed == 0 {
        eprintln!("error: no case passed, so nothing was checked");
        return Ok(ExitCode::FAILURE);
    }
    if skipped > 0 && !args.allow_skipped {
        eprintln!("error: {skipped} cases were skipped (pass --allow-skipped to accept that)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
