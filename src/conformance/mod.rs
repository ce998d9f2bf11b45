//! Conformance with PyTorch: run golden case files (made with `F.embedding`,
//! `F.embedding_bag` and `backward`) through the library and compare.
//!
//! A case is a `.safetensors` file holding input tensors (`weight`, `indices`, ...), the
//! expected outputs (`out`, `weight_after`, `grad_weight`, ...) and string metadata (`op`,
//! `padding_idx`, `max_norm`, `expect_error`, ...). `emb conformance` and the test suite both
//! run cases through [`run_case`]. A case passes only when something was compared: a case
//! without `expect_error` must hold every expected tensor its operation produces (a missing
//! one fails the case), and an operation this library does not know is
//! [`Outcome::Skipped`], never passed.

mod bag;
mod grad;
mod lookup;
mod renorm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::table::formats::{self, Format, TensorDType, TensorToWrite};
use crate::table::Table;

/// A tensor read from a case file, owned.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Element type.
    pub dtype: TensorDType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor from typed elements.
    pub fn from_slice<T: bytemuck::Pod>(dtype: TensorDType, shape: Vec<usize>, v: &[T]) -> Tensor {
        Tensor {
            dtype,
            shape,
            data: bytemuck::cast_slice(v).to_vec(),
        }
    }

    /// A float tensor from f32 values, stored in `dtype` (rounded to nearest even).
    pub fn from_f32(dtype: DType, shape: Vec<usize>, v: &[f32]) -> Tensor {
        let mut data = vec![0u8; v.len() * dtype.size()];
        crate::table::convert_bytes(DType::F32, bytemuck::cast_slice(v), dtype, &mut data);
        Tensor {
            dtype: TensorDType::Float(dtype),
            shape,
            data,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The float dtype, or an error.
    pub fn float_dtype(&self) -> Result<DType> {
        match self.dtype {
            TensorDType::Float(d) => Ok(d),
            ref other => Err(Error::InvalidArgument(format!(
                "expected a float tensor, got {other}"
            ))),
        }
    }

    /// The values widened to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = self.float_dtype()?;
        let mut out = vec![0.0f32; self.len()];
        crate::table::convert_bytes(
            d,
            &self.data,
            DType::F32,
            bytemuck::cast_slice_mut(&mut out),
        );
        Ok(out)
    }

    /// Integer values as i64 (I32, I64, U32, U64).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        Ok(match self.dtype {
            TensorDType::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(&self.data)
                .into_iter()
                .map(i64::from)
                .collect(),
            TensorDType::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(&self.data),
            TensorDType::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(&self.data)
                .into_iter()
                .map(i64::from)
                .collect(),
            TensorDType::U64 => bytemuck::pod_collect_to_vec::<u8, u64>(&self.data)
                .into_iter()
                .map(|v| v as i64)
                .collect(),
            ref other => {
                return Err(Error::InvalidArgument(format!(
                    "expected an integer tensor, got {other}"
                )))
            }
        })
    }

    /// A 2-D float tensor as an owned table.
    pub fn to_table(&self) -> Result<Table<'static>> {
        let d = self.float_dtype()?;
        let [rows, dim] = self.shape[..] else {
            return Err(Error::ShapeMismatch(format!(
                "a table must be 2-D, got shape {:?}",
                self.shape
            )));
        };
        match d {
            DType::F32 => Table::from_slice(
                &bytemuck::pod_collect_to_vec::<u8, f32>(&self.data),
                rows,
                dim,
            ),
            DType::F16 => Table::from_slice(
                &bytemuck::pod_collect_to_vec::<u8, f16>(&self.data),
                rows,
                dim,
            ),
            DType::BF16 => Table::from_slice(
                &bytemuck::pod_collect_to_vec::<u8, bf16>(&self.data),
                rows,
                dim,
            ),
        }
    }
}

/// One golden case.
#[derive(Clone, Debug)]
pub struct Case {
    /// The file name without extension.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// The `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
    /// The tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
}

impl Case {
    /// Read a case file.
    pub fn load(path: &Path) -> Result<Case> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let parsed = formats::parse(&bytes, Format::SafeTensors).map_err(|e| e.with_path(path))?;
        let tensors = parsed
            .entries
            .iter()
            .map(|e| {
                (
                    e.name.clone(),
                    Tensor {
                        dtype: e.dtype.clone(),
                        shape: e.shape.clone(),
                        data: bytes[e.data.clone()].to_vec(),
                    },
                )
            })
            .collect();
        Ok(Case {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_path_buf(),
            metadata: parsed.metadata,
            tensors,
        })
    }

    /// A metadata string, JSON-decoded when it is a JSON string literal.
    pub fn meta(&self, key: &str) -> Option<String> {
        let raw = self.metadata.get(key)?;
        match serde_json::from_str::<serde_json::Value>(raw) {
            Ok(serde_json::Value::String(s)) => Some(s),
            _ => Some(raw.clone()),
        }
    }

    /// A boolean metadata value (`true`/`false`), false when absent.
    pub fn meta_bool(&self, key: &str) -> Result<bool> {
        match self.meta(key).as_deref() {
            None | Some("false") | Some("False") => Ok(false),
            Some("true") | Some("True") => Ok(true),
            Some(other) => Err(Error::InvalidArgument(format!(
                "{key}: not a boolean: {other}"
            ))),
        }
    }

    /// An integer metadata value, `None` when absent or `null`/`None`.
    pub fn meta_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.meta(key).as_deref() {
            None | Some("null") | Some("None") => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| Error::InvalidArgument(format!("{key}: not an integer: {s}"))),
        }
    }

    /// A float metadata value (`inf` accepted), `None` when absent or `null`/`None`.
    pub fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key).as_deref() {
            None | Some("null") | Some("None") => Ok(None),
            Some(s) => parse_float(s)
                .map(Some)
                .ok_or_else(|| Error::InvalidArgument(format!("{key}: not a number: {s}"))),
        }
    }

    /// A tensor, or an error naming the missing one.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::format(Some(&self.path), format!("case has no tensor {name:?}")))
    }
}

/// Parse a float as Python prints it (`inf`, `-inf`, `nan` included).
pub fn parse_float(s: &str) -> Option<f64> {
    match s.trim().to_ascii_lowercase().as_str() {
        "inf" | "infinity" | "+inf" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        other => other.parse().ok(),
    }
}

/// How a case went.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The library's result matches the expected one (or the expected error).
    Passed,
    /// It does not; the string says where.
    Failed(String),
    /// The operation is not built yet; the string says which.
    Skipped(String),
}

/// The result of one case: the outcome, and what the library produced (for `--write`).
#[derive(Clone, Debug)]
pub struct CaseReport {
    /// The case's name.
    pub name: String,
    /// Passed, failed or skipped.
    pub outcome: Outcome,
    /// Tensors the library produced, named as in the fixtures (`out`, `weight_after`, ...).
    pub produced: Vec<(String, Tensor)>,
    /// The error kind, when the library refused the case.
    pub error: Option<&'static str>,
}

impl CaseReport {
    fn new(name: &str) -> CaseReport {
        CaseReport {
            name: name.to_string(),
            outcome: Outcome::Passed,
            produced: Vec::new(),
            error: None,
        }
    }

    /// Record a failure (keeps the first).
    pub(crate) fn fail(&mut self, why: impl Into<String>) {
        if self.outcome == Outcome::Passed {
            self.outcome = Outcome::Failed(why.into());
        }
    }

    /// The expected tensor `name` of a case that was not refused; a case without it fails,
    /// since a result that is not compared with anything proves nothing.
    pub(crate) fn expected<'c>(&mut self, case: &'c Case, name: &str) -> Option<&'c Tensor> {
        let want = case.tensors.get(name);
        if want.is_none() {
            self.fail(format!(
                "the case has no expected tensor {name:?}, so the result cannot be checked"
            ));
        }
        want
    }

    /// Settle a result against the case's `expect_error`: an expected error must be the one
    /// produced; an unexpected one fails the case.
    pub(crate) fn settle<T>(&mut self, case: &Case, result: Result<T>) -> Option<T> {
        let expected = case.meta("expect_error");
        match (result, expected) {
            (Ok(v), None) => Some(v),
            (Ok(_), Some(want)) => {
                self.fail(format!(
                    "expected error {want}, but the library accepted the case"
                ));
                None
            }
            (Err(e), want) => {
                self.error = Some(e.kind());
                match want {
                    Some(w) if w == e.kind() => {}
                    Some(w) => self.fail(format!("expected error {w}, got {}: {e}", e.kind())),
                    None => self.fail(format!("unexpected error: {e}")),
                }
                None
            }
        }
    }
}

/// Run one case through the library.
pub fn run_case(case: &Case) -> CaseReport {
    let mut report = CaseReport::new(&case.name);
    let result = match case.meta("op").as_deref() {
        Some("embedding") => {
            if case.metadata.contains_key("max_norm") {
                renorm::run(case, &mut report)
            } else {
                lookup::run(case, &mut report)
            }
        }
        Some("embedding_bag") => bag::run(case, &mut report),
        Some("embedding_backward") => grad::run(case, &mut report),
        Some(other) => {
            report.outcome = Outcome::Skipped(format!("unknown op {other:?}"));
            Ok(())
        }
        None => Err(Error::format(
            Some(&case.path),
            "case has no \"op\" metadata",
        )),
    };
    if let Err(e) = result {
        // A malformed case (not a library refusal): report it as a failure.
        report.fail(format!("could not run the case: {e}"));
    }
    report
}

/// Every `*.safetensors` case in a directory, sorted by name.
pub fn case_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// Write what the library produced for a case to `dir/<case>.safetensors`; a refused case
/// gets metadata `error` = the error kind.
pub fn write_report(report: &CaseReport, dir: &Path) -> Result<()> {
    let tensors: Vec<TensorToWrite<'_>> = report
        .produced
        .iter()
        .map(|(name, t)| TensorToWrite {
            name,
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
            data: &t.data,
        })
        .collect();
    let mut metadata = BTreeMap::new();
    if let Some(kind) = report.error {
        metadata.insert("error".to_string(), kind.to_string());
    }
    formats::write_tensors(
        &dir.join(format!("{}.safetensors", report.name)),
        &tensors,
        &metadata,
    )
}

/// Compare bit for bit.
pub(crate) fn check_exact(report: &mut CaseReport, what: &str, got: &Tensor, want: &Tensor) {
    if got.dtype != want.dtype || got.shape != want.shape {
        report.fail(format!(
            "{what}: got {} {:?}, expected {} {:?}",
            got.dtype, got.shape, want.dtype, want.shape
        ));
    } else if got.data != want.data {
        let size = got.dtype.size().unwrap_or(1).max(1);
        let first = got
            .data
            .chunks(size)
            .zip(want.data.chunks(size))
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        report.fail(format!(
            "{what}: element {first} differs (bit-exact comparison)"
        ));
    }
}

/// Compare f32 values: `|got - want| <= atol + rtol * |want|` everywhere, except that a
/// non-finite expectation (±inf, NaN) and a tolerance of zero require equal bits: otherwise
/// `rtol * inf` would accept anything, and `-0 == +0` would pass a sign error.
#[allow(dead_code)] // used by the renorm, bag and gradient operations
pub(crate) fn check_close(
    report: &mut CaseReport,
    what: &str,
    got: &[f32],
    want: &[f32],
    rtol: f32,
    atol: f32,
) {
    if got.len() != want.len() {
        report.fail(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
        return;
    }
    let exact = rtol == 0.0 && atol == 0.0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if exact || !w.is_finite() {
            g.to_bits() == w.to_bits()
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        if !ok {
            report.fail(format!(
                "{what}: element {i} is {g:e} ({:#010x}), expected {w:e} ({:#010x})",
                g.to_bits(),
                w.to_bits()
            ));
            return;
        }
    }
}

/// Compare values of a 16-bit dtype within `ulps` units in the last place.
#[allow(dead_code)] // used by the renorm, bag and gradient operations
pub(crate) fn check_ulps(
    report: &mut CaseReport,
    what: &str,
    got: &Tensor,
    want: &Tensor,
    ulps: u32,
) {
    if got.dtype != want.dtype || got.shape != want.shape {
        report.fail(format!(
            "{what}: got {} {:?}, expected {} {:?}",
            got.dtype, got.shape, want.dtype, want.shape
        ));
        return;
    }
    let g: Vec<u16> = bytemuck::pod_collect_to_vec(&got.data);
    let w: Vec<u16> = bytemuck::pod_collect_to_vec(&want.data);
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        if !half_within_ulps(got.dtype.clone(), a, b, ulps) {
            report.fail(format!(
                "{what}: element {i} bits {a:#06x}, expected {b:#06x} (more than {ulps} ulp apart)"
            ));
            return;
        }
    }
}

/// Whether the 16-bit value `got` is within `ulps` of `want`. A non-finite expectation, or a
/// tolerance of zero, needs equal bits; otherwise -0 and +0 count as one unit apart, so that
/// "0 ulps" means the same bits.
fn half_within_ulps(dtype: TensorDType, got: u16, want: u16, ulps: u32) -> bool {
    let exponent = match dtype {
        TensorDType::Float(DType::BF16) => 0x7f80,
        _ => 0x7c00,
    };
    if ulps == 0 || want & exponent == exponent {
        return got == want;
    }
    // Sign-magnitude bits on a monotonic integer line (-0 just below +0), where ulps are
    // differences.
    let line = |b: u16| -> i32 {
        if b & 0x8000 != 0 {
            -((b & 0x7fff) as i32) - 1
        } else {
            b as i32
        }
    };
    (line(got) - line(want)).unsigned_abs() <= ulps
}
