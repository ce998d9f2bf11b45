//! The operations: each validates its inputs completely, then plans the work, then runs kernels.

pub mod bag;
pub mod grad;
pub mod lookup;
pub mod optim;
pub mod renorm;
