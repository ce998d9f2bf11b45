//! Cases of the embedding bags operation.

use super::{Case, CaseReport, Outcome};
use crate::error::Result;

pub(super) fn run(_case: &Case, report: &mut CaseReport) -> Result<()> {
    report.outcome = Outcome::Skipped("embedding bags are not implemented yet".into());
    Ok(())
}
