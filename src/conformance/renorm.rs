//! Cases of the max_norm renorm operation.

use super::{Case, CaseReport, Outcome};
use crate::error::Result;

pub(super) fn run(_case: &Case, report: &mut CaseReport) -> Result<()> {
    report.outcome = Outcome::Skipped("max_norm renorm are not implemented yet".into());
    Ok(())
}
