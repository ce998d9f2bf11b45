//! `lookup_bounds`: arbitrary tables, indices of every index type and padding_idx; the engine
//! must return exactly the naive reference's result or the right error, leave the output
//! untouched on error, and never panic.

use arbitrary::Arbitrary;
use embedding_lookup::{kernels, DType, Element, Error, Index, Table};
use half::{bf16, f16};

use crate::reference::{self, Ty, Widen};

/// Largest number of indices one input expands to (after repetition).
const MAX_INDICES: usize = 1 << 13;
/// Largest table row count when rows hold data (dim > 0).
const MAX_DATA_ROWS: usize = 1 << 10;

/// A row count: small, or anything at all (only used when rows hold no data, dim = 0).
#[derive(Arbitrary, Debug)]
pub enum Rows {
    /// 0..=255.
    Small(u8),
    /// 0..=1023 (taken modulo).
    Medium(u16),
    /// Any value; with dim > 0 it is reduced to `MAX_DATA_ROWS`.
    Any(u64),
}

/// One index, described relative to the row count so that boundaries come up often.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum IndexSpec {
    /// `n % rows` (0 when rows = 0).
    InRange(u16),
    /// `rows`: one past the end.
    Rows,
    /// `rows - 1`: the last row (-1 when rows = 0).
    RowsMinus1,
    /// `-(n + 1)`.
    Negative(u8),
    /// Any 64-bit value.
    Raw(i64),
    /// Any unsigned 64-bit value.
    RawUnsigned(u64),
}

/// `padding_idx`, relative to rows or raw.
#[derive(Arbitrary, Debug)]
pub enum PaddingSpec {
    /// No padding index.
    None,
    /// `rows - 1 - n` ... counted from the start or end.
    Near(i8),
    /// `-rows` (allowed) or `-rows - 1` (not).
    MinusRows(bool),
    /// `rows` (not allowed).
    Rows,
    /// Any value.
    Raw(i64),
}

/// The index type used for the whole list.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum IndexType {
    /// i32.
    I32,
    /// i64.
    I64,
    /// u32.
    U32,
    /// u64.
    U64,
    /// usize.
    Usize,
}

/// The output element type asked for.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum OutChoice {
    /// f32 (a copy for f32 tables, a widening for f16/bf16).
    F32,
    /// f16.
    F16,
    /// bf16.
    Bf16,
}

/// How the table's storage is made.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum StorageChoice {
    /// `Table::from_slice` (owned, aligned copy).
    Owned,
    /// `Table::borrowed` over an exactly-sized vector (overreads are caught by the sanitizer).
    Borrowed,
    /// `Table::borrowed_mut`.
    BorrowedMut,
}

/// One fuzz input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    dtype: u8,
    rows: Rows,
    dim: u8,
    storage: StorageChoice,
    /// Table contents, cycled to fill the table (special bit patterns come up on their own).
    values: Vec<u16>,
    padding: PaddingSpec,
    index_type: IndexType,
    indices: Vec<IndexSpec>,
    /// The list is repeated `1 + repeat` times (up to `MAX_INDICES`), reaching the parallel path.
    repeat: u8,
    out: OutChoice,
    /// Give an output buffer this many elements too long (positive) or short (negative).
    out_len_delta: Option<i8>,
    /// Rows to read with `Table::row`, any value.
    probe_rows: Vec<u64>,
    /// Prefetch distance for this input (the default when `None`); capped by the library.
    prefetch: Option<u8>,
    /// Streaming-store threshold in output bytes (the default when `None`): small values send
    /// small outputs through the streaming kernels.
    stream_threshold: Option<u16>,
}

/// The library's tuning defaults, read once before any input changes them.
fn defaults() -> (usize, usize) {
    static DEFAULTS: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    *DEFAULTS.get_or_init(|| (kernels::prefetch_distance(), kernels::streaming_threshold()))
}

/// Run one input; panics on any disagreement.
pub fn check(input: Input) {
    let (prefetch, stream) = defaults();
    kernels::set_prefetch_distance(input.prefetch.map_or(prefetch, usize::from));
    kernels::set_streaming_threshold(input.stream_threshold.map_or(stream, usize::from));
    let ty = match input.dtype % 3 {
        0 => Ty::F32,
        1 => Ty::F16,
        _ => Ty::Bf16,
    };
    let dim = (input.dim % 80) as usize;
    let rows = match input.rows {
        Rows::Small(r) => r as usize,
        Rows::Medium(r) => r as usize % MAX_DATA_ROWS,
        Rows::Any(r) if dim == 0 => usize::try_from(r).unwrap_or(usize::MAX),
        Rows::Any(r) => (r % MAX_DATA_ROWS as u64) as usize,
    };
    let elems = rows * dim; // dim = 0 or rows <= MAX_DATA_ROWS: no overflow
    let mut bits: Vec<u16> = if input.values.is_empty() {
        (0..elems).map(|i| i as u16).collect()
    } else {
        input.values.iter().copied().cycle().take(elems).collect()
    };
    // f32 tables use two 16-bit values per element.
    if ty == Ty::F32 {
        bits = if input.values.is_empty() {
            (0..elems * 2).map(|i| i as u16).collect()
        } else {
            input
                .values
                .iter()
                .copied()
                .cycle()
                .take(elems * 2)
                .collect()
        };
    }
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    match ty {
        Ty::F32 => with_table::<f32>(&input, &bytes, ty, rows, dim),
        Ty::F16 => with_table::<f16>(&input, &bytes, ty, rows, dim),
        Ty::Bf16 => with_table::<bf16>(&input, &bytes, ty, rows, dim),
    }
}

fn with_table<T: Element>(input: &Input, bytes: &[u8], ty: Ty, rows: usize, dim: usize) {
    // Exactly sized, element-aligned storage.
    let mut data: Vec<T> = bytemuck::pod_collect_to_vec(bytes);
    data.shrink_to_fit();
    let made = match input.storage {
        StorageChoice::Owned => Table::from_slice(&data, rows, dim),
        StorageChoice::Borrowed => Table::borrowed(&data, rows, dim),
        StorageChoice::BorrowedMut => Table::borrowed_mut(&mut data, rows, dim),
    };
    // A table is only refused when its row count, row bytes or total bytes do not fit an
    // isize.
    let max = isize::MAX as usize;
    let fits = rows <= max
        && dim * ty.size() <= max
        && (rows == 0 || dim == 0 || rows.checked_mul(dim * ty.size()).is_some_and(|n| n <= max));
    let mut table = match made {
        Ok(t) => {
            assert!(fits, "a {rows} × {dim} table was accepted");
            t
        }
        Err(e) => {
            assert!(!fits, "a {rows} × {dim} table was refused: {e}");
            return;
        }
    };
    assert_eq!(
        (table.rows(), table.dim(), table.dtype()),
        (rows, dim, T::DTYPE)
    );
    assert_eq!(table.as_bytes(), bytes);

    // padding_idx: accepted exactly when -rows <= p < rows, normalised as PyTorch does.
    let p = match input.padding {
        PaddingSpec::None => None,
        PaddingSpec::Near(n) => Some(if n < 0 {
            (rows as i64).wrapping_add(n as i64)
        } else {
            n as i64
        }),
        PaddingSpec::MinusRows(over) => Some((rows as i64).wrapping_neg() - over as i64),
        PaddingSpec::Rows => Some(rows as i64),
        PaddingSpec::Raw(v) => Some(v),
    };
    if let Some(p) = p {
        let want = reference::normalize_padding_idx(p, rows);
        table = match (table.with_padding_idx(p), want) {
            (Ok(t), Some(n)) => {
                assert_eq!(t.padding_idx(), Some(n));
                t
            }
            (
                Err(Error::PaddingIdxOutOfRange {
                    padding_idx,
                    rows: r,
                }),
                None,
            ) => {
                assert_eq!((padding_idx, r), (p, rows));
                return;
            }
            (got, want) => panic!("padding_idx {p}, rows {rows}: got {got:?}, want {want:?}"),
        };
    }

    // Table::row for arbitrary row numbers.
    for &r in &input.probe_rows {
        let r = usize::try_from(r).unwrap_or(usize::MAX);
        let got = table.row::<T>(r).expect("the table's own dtype");
        if r < rows {
            let row = got.expect("a row below rows");
            let want = &bytes[r * dim * ty.size()..(r + 1) * dim * ty.size()];
            assert_eq!(bytemuck::cast_slice::<T, u8>(row), want);
        } else {
            assert!(got.is_none(), "row {r} of {rows}");
        }
    }

    let specs: Vec<IndexSpec> = {
        let times = 1 + input.repeat as usize;
        let n = (input.indices.len().saturating_mul(times)).min(MAX_INDICES);
        input.indices.iter().copied().cycle().take(n).collect()
    };
    match input.index_type {
        IndexType::I32 => run::<i32>(input, &table, bytes, ty, &specs, |v| v as i32),
        IndexType::I64 => run::<i64>(input, &table, bytes, ty, &specs, |v| v as i64),
        IndexType::U32 => run::<u32>(input, &table, bytes, ty, &specs, |v| v as u32),
        IndexType::U64 => run::<u64>(input, &table, bytes, ty, &specs, |v| v as u64),
        IndexType::Usize => run::<usize>(input, &table, bytes, ty, &specs, |v| v as usize),
    }
}

/// The value each spec stands for (wrapped into the index type by `cast`).
pub fn spec_value(s: IndexSpec, rows: usize) -> i128 {
    let r = rows as i128;
    match s {
        IndexSpec::InRange(n) if rows > 0 => n as i128 % r,
        IndexSpec::InRange(_) => 0,
        IndexSpec::Rows => r,
        IndexSpec::RowsMinus1 => r - 1,
        IndexSpec::Negative(n) => -(n as i128) - 1,
        IndexSpec::Raw(v) => v as i128,
        IndexSpec::RawUnsigned(v) => v as i128,
    }
}

fn run<I: Index + Widen>(
    input: &Input,
    table: &Table<'_>,
    bytes: &[u8],
    ty: Ty,
    specs: &[IndexSpec],
    cast: impl Fn(i128) -> I,
) {
    let rows = table.rows();
    let indices: Vec<I> = specs.iter().map(|&s| cast(spec_value(s, rows))).collect();
    let values: Vec<i128> = indices.iter().map(|&i| i.exact()).collect();
    match input.out {
        OutChoice::F32 => lookup_as::<I, f32>(input, table, bytes, ty, &indices, &values),
        OutChoice::F16 => lookup_as::<I, f16>(input, table, bytes, ty, &indices, &values),
        OutChoice::Bf16 => lookup_as::<I, bf16>(input, table, bytes, ty, &indices, &values),
    }
}

/// What the engine must do, in its documented order of checks: dtype, output length, indices.
#[derive(Debug)]
enum Expect {
    DType,
    OutputLength { expected: usize, actual: usize },
    Index { index: i128, position: usize },
    Rows(Vec<u8>),
}

fn lookup_as<I: Index, O: Element>(
    input: &Input,
    table: &Table<'_>,
    bytes: &[u8],
    ty: Ty,
    indices: &[I],
    values: &[i128],
) {
    let (rows, dim) = (table.rows(), table.dim());
    let widen = match (ty, O::DTYPE) {
        (Ty::F32, DType::F32) | (Ty::F16, DType::F16) | (Ty::Bf16, DType::BF16) => Some(false),
        (Ty::F16 | Ty::Bf16, DType::F32) => Some(true),
        _ => None,
    };
    let want_len = indices.len() * dim;
    let len = match input.out_len_delta {
        Some(d) => (want_len as isize + d as isize).max(0) as usize,
        None => want_len,
    };
    // The allocating API: dtype, then indices.
    let core = match (widen, reference::first_bad_index(values, rows)) {
        (None, _) => Expect::DType,
        (Some(_), Some((index, position))) => Expect::Index { index, position },
        (Some(w), None) => Expect::Rows(reference::gather(bytes, ty, dim, values, w)),
    };
    let got: Result<Vec<O>, Error> = table.lookup(indices);
    check_outcome(&core, got.as_ref().map(|v| &v[..]), rows, table.dtype());

    // Into a buffer: dtype, then the buffer's length, then indices.
    let expect = match core {
        Expect::DType => Expect::DType,
        _ if len != want_len => Expect::OutputLength {
            expected: want_len,
            actual: len,
        },
        other => other,
    };

    // Filled with a sentinel: after an error the buffer must hold nothing else.
    let sentinel = O::from_f32(-12345.0);
    let mut out = vec![sentinel; len];
    let got = table.lookup_into(indices, &mut out);
    let ok = got.as_ref().map(|()| &out[..]);
    check_outcome(&expect, ok, rows, table.dtype());
    if !matches!(expect, Expect::Rows(_)) {
        assert!(
            out.iter()
                .all(|v| v.to_f32().to_bits() == sentinel.to_f32().to_bits()),
            "output written before an error"
        );
    }
}

fn check_outcome<O: Element>(
    expect: &Expect,
    got: Result<&[O], &Error>,
    rows: usize,
    dtype: DType,
) {
    match (expect, got) {
        (Expect::DType, Err(Error::DTypeMismatch { expected, actual })) => {
            assert_eq!((*expected, *actual), (dtype, O::DTYPE));
        }
        (
            Expect::OutputLength { expected, actual },
            Err(Error::OutputLength {
                expected: e,
                actual: a,
            }),
        ) => assert_eq!((expected, actual), (e, a)),
        (
            Expect::Index { index, position },
            Err(Error::IndexOutOfRange {
                index: i,
                position: p,
                rows: r,
            }),
        ) => assert_eq!((index, position, &rows), (i, p, r)),
        (Expect::Rows(want), Ok(out)) => {
            assert!(
                bytemuck::cast_slice::<O, u8>(out) == &want[..],
                "gathered rows differ"
            );
        }
        (e, g) => panic!("expected {e:?}, got {:?}", g.map(|v| v.len())),
    }
}
