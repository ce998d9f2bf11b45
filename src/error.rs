//! The one error type of the crate.

use std::fmt;
use std::path::PathBuf;

use crate::dtype::DType;

/// Everything that can go wrong, one variant per failure.
///
/// Messages are lowercase and name what is wrong: which index at which position, which file
/// and why. Nothing is written to an output or a table before an error is returned.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An index is negative or not below the table's row count.
    IndexOutOfRange {
        /// The offending value, widened to i128 so every index type fits.
        index: i128,
        /// Its position in the flat index list.
        position: usize,
        /// The table's row count.
        rows: usize,
    },
    /// `padding_idx` is outside `-rows..rows`.
    PaddingIdxOutOfRange {
        /// The value given.
        padding_idx: i64,
        /// The table's row count.
        rows: usize,
    },
    /// An output buffer has the wrong number of elements.
    OutputLength {
        /// Elements required (`indices.len() * dim` for a lookup).
        expected: usize,
        /// Elements given.
        actual: usize,
    },
    /// Data of one shape was given where another was required.
    ShapeMismatch(String),
    /// The requested element types cannot be combined (for example an f16 table into bf16 output).
    DTypeMismatch {
        /// What the operation has.
        expected: DType,
        /// What it was asked for.
        actual: DType,
    },
    /// The operation writes to the table, but the table is read-only (a read-only map or a
    /// borrowed slice).
    ReadOnlyTable,
    /// A numeric option is outside its domain (`max_norm <= 0`, NaN, ...).
    InvalidArgument(String),
    /// Bag offsets are malformed.
    BadOffsets(String),
    /// `per_sample_weights` were given with a mode other than sum, or with the wrong length.
    PerSampleWeights(String),
    /// A file could not be parsed as a table.
    Format {
        /// The file, when known.
        path: Option<PathBuf>,
        /// What is wrong with it.
        reason: String,
    },
    /// An operating-system error on a file.
    Io {
        /// The file, when known.
        path: Option<PathBuf>,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Reading a table's pages from its file failed (an out-of-core table's read-ahead): the
    /// operation stopped before touching the page, so it raised no signal.
    DiskRead {
        /// The file.
        path: PathBuf,
        /// The byte offset in the file of the page that could not be read.
        offset: u64,
        /// The underlying error (`UnexpectedEof` when the file is shorter than the table).
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short machine-readable name of the error kind, as used in the PyTorch fixtures'
    /// `expect_error` field (`index_out_of_range`, `padding_idx_out_of_range`, `bad_offsets`,
    /// `per_sample_weights_mode`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::IndexOutOfRange { .. } => "index_out_of_range",
            Error::PaddingIdxOutOfRange { .. } => "padding_idx_out_of_range",
            Error::OutputLength { .. } => "output_length",
            Error::ShapeMismatch(_) => "shape_mismatch",
            Error::DTypeMismatch { .. } => "dtype_mismatch",
            Error::ReadOnlyTable => "read_only_table",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::BadOffsets(_) => "bad_offsets",
            Error::PerSampleWeights(_) => "per_sample_weights_mode",
            Error::Format { .. } => "format",
            Error::Io { .. } => "io",
            Error::DiskRead { .. } => "disk_read",
        }
    }

    pub(crate) fn format(path: Option<&std::path::Path>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.map(|p| p.to_path_buf()),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: Some(path.to_path_buf()),
            source,
        }
    }

    /// Attach a file path to a format or I/O error that has none yet.
    pub(crate) fn with_path(self, p: &std::path::Path) -> Self {
        match self {
            Error::Format { path: None, reason } => Error::Format {
                path: Some(p.to_path_buf()),
                reason,
            },
            Error::Io { path: None, source } => Error::Io {
                path: Some(p.to_path_buf()),
                source,
            },
            other => other,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::IndexOutOfRange {
                index,
                position,
                rows,
            } => write!(
                f,
                "index {index} at position {position} is out of range for a table of {rows} rows"
            ),
            Error::PaddingIdxOutOfRange { padding_idx, rows } => write!(
                f,
                "padding_idx {padding_idx} is out of range for a table of {rows} rows \
                 (allowed: -{rows} <= padding_idx < {rows})"
            ),
            Error::OutputLength { expected, actual } => write!(
                f,
                "output buffer holds {actual} elements but {expected} are required"
            ),
            Error::ShapeMismatch(s) => write!(f, "shape mismatch: {s}"),
            Error::DTypeMismatch { expected, actual } => {
                write!(
                    f,
                    "dtype mismatch: the table holds {expected}, {actual} was asked for"
                )?;
                if *expected != DType::F32 {
                    write!(f, " (a lookup's output may be {expected} or f32)")?;
                }
                Ok(())
            }
            Error::ReadOnlyTable => write!(
                f,
                "the table is read-only (a read-only file map or a borrowed slice); \
                 open it writable or use an output-only mode"
            ),
            Error::InvalidArgument(s) => write!(f, "invalid argument: {s}"),
            Error::BadOffsets(s) => write!(f, "bad offsets: {s}"),
            Error::PerSampleWeights(s) => write!(f, "per_sample_weights: {s}"),
            Error::Format { path, reason } => match path {
                Some(p) => write!(f, "{}: {reason}", p.display()),
                None => write!(f, "{reason}"),
            },
            Error::Io { path, source } => match path {
                Some(p) => write!(f, "{}: {source}", p.display()),
                None => write!(f, "{source}"),
            },
            Error::DiskRead {
                path,
                offset,
                source,
            } => write!(
                f,
                "{}: reading the table's page at byte {offset}: {source}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } | Error::DiskRead { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Self {
        Error::Io { path: None, source }
    }
}
