//! Shared pieces of the fuzz targets: arbitrary inputs, naive references written here (not
//! taken from the library), and the checks every target applies.
//!
//! One module per operation under test. A new target adds its reference as a module here, a
//! file under `fuzz_targets/`, a `[[bin]]` in `Cargo.toml` and a seed directory under
//! `corpus/`; `.ci/run` picks up every target `cargo fuzz list` prints.

pub mod bag;
pub mod file_reference;
pub mod files;
pub mod lookup;
pub mod reference;
pub mod renorm;
