//! `torch.nn.Embedding` and `torch.nn.EmbeddingBag` on the CPU, as gathers.
//!
//! An embedding table is a matrix of `rows × dim` (vocabulary × hidden size). Looking up
//! indices of shape `(b, s)` gives `(b, s, dim)`: output row `i` is table row `indices[i]`.
//! That equals `one_hot(indices) @ table`, done as a gather, which moves each looked-up row
//! once instead of multiplying by a matrix of zeros.
//!
//! ```text
//!  indices (b, s)        table (rows, dim)            out (b, s, dim)
//!  [[2, 0],         ×    row 0: a a a a       =       [[c c c c, a a a a],
//!   [1, 2]]              row 1: b b b b                [b b b b, c c c c]]
//!                        row 2: c c c c
//! ```
//!
//! Tables hold f32, f16 or bf16; they are owned, borrowed, or mapped from `.safetensors` and
//! `.npy` files without copying. The kernels are explicit SIMD picked at run time
//! ([`kernels::Isa`]), prefetch the rows ahead, and spread large batches over rayon's threads.
//!
//! The operations, each with PyTorch's semantics and checked against PyTorch's own outputs
//! ([`conformance`]):
//! - lookups: [`Table::lookup_into`], [`Table::lookup`] ([`ops::lookup`]);
//! - `max_norm` renorm fused with the lookup, in place or output only: [`MaxNorm`],
//!   [`Table::lookup_renorm_in_place`], [`Table::lookup_renorm_output_only`] ([`ops::renorm`]);
//! - embedding bags (sum, mean, max, weights, padding): [`Table::bag_into`] ([`ops::bag`]);
//! - gradients and sparse updates: [`EmbeddingBackward`], [`EmbeddingBagBackward`], [`Sgd`],
//!   [`RowwiseAdagrad`] ([`ops::grad`], [`ops::optim`]).
//!
//! ```
//! use embedding_lookup::{DType, Table};
//!
//! let table = Table::new_embedding(10, 4, DType::F32, Some(0), 42)?; // as nn.Embedding
//! let indices: [i64; 8] = [1, 2, 4, 5, 4, 3, 2, 9]; // shape (2, 4)
//! let out: Vec<f32> = table.lookup(&indices)?; // shape (2, 4, 4)
//! assert_eq!(&out[..4], table.row::<f32>(1)?.unwrap());
//! assert_eq!(embedding_lookup::output_shape(&[2, 4], table.dim()), [2, 4, 4]);
//! # Ok::<(), embedding_lookup::Error>(())
//! ```
#![warn(missing_docs)]
#![deny(
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]

pub mod conformance;
pub mod dtype;
pub mod error;
pub mod index;
pub mod kernels;
pub mod ops;
mod parallel;
pub mod table;
pub mod util;
pub mod workload;

/// The `half` crate, whose `f16` and `bf16` are the element types of 16-bit tables: re-exported
/// so that users name them without adding (and version-matching) the dependency themselves.
pub use half;

pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use index::Index;
pub use ops::bag::{BagMode, BagOptions, Bags};
pub use ops::grad::{CoalescedGrad, EmbeddingBackward, EmbeddingBagBackward, SparseGrad};
pub use ops::lookup::output_shape;
pub use ops::optim::{Rounding, RowwiseAdagrad, Sgd};
pub use ops::renorm::MaxNorm;
pub use table::{OpenMode, OpenOptions, StorageKind, Table};

/// The README's Rust examples, compiled and run as doctests so that they stay true to the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeExamples;

/// The name of the kernel set this process uses (`avx512`, `avx2+f16c`, `neon`, `portable`,
/// `scalar`), as benchmarks and `emb --verbose` print it.
pub fn kernel_name() -> &'static str {
    kernels::Isa::detect().name()
}
