//! The operations: each validates its inputs completely, then plans the work, then runs kernels.

pub mod grad;
pub mod lookup;
pub mod optim;
