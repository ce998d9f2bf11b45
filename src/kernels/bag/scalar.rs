//! The reference: one output element at a time, entries in bag order, bounds-checked, no
//! prefetch. Every other bag kernel must produce the same bits.

use half::f16;

use super::{f32_to_bf16_bits, BagBlock, Pool};
use crate::kernels::gather::scalar::bf16_to_f32;

/// # Safety
/// None beyond [`PoolF32Fn`](super::PoolF32Fn)'s contract; this reference checks bounds.
pub(crate) unsafe fn pool_f32(
    table: &[f32],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    pool_rows(table, dim, block, pool, out, |v| v, |v| v);
}

/// # Safety
/// None beyond [`PoolHalfToF32Fn`](super::PoolHalfToF32Fn)'s contract.
pub(crate) unsafe fn pool_f16_to_f32(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    pool_rows(table, dim, block, pool, out, f16_bits_to_f32, |v| v);
}

/// # Safety
/// None beyond [`PoolHalfToF32Fn`](super::PoolHalfToF32Fn)'s contract.
pub(crate) unsafe fn pool_bf16_to_f32(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [f32],
) {
    pool_rows(table, dim, block, pool, out, bf16_to_f32, |v| v);
}

/// # Safety
/// None beyond [`PoolHalfFn`](super::PoolHalfFn)'s contract.
pub(crate) unsafe fn pool_f16(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [u16],
) {
    pool_rows(table, dim, block, pool, out, f16_bits_to_f32, |v| {
        f16::from_f32(v).to_bits()
    });
}

/// # Safety
/// None beyond [`PoolHalfFn`](super::PoolHalfFn)'s contract.
pub(crate) unsafe fn pool_bf16(
    table: &[u16],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [u16],
) {
    pool_rows(table, dim, block, pool, out, bf16_to_f32, f32_to_bf16_bits);
}

fn f16_bits_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// The definition, element by element.
fn pool_rows<T: Copy, O>(
    table: &[T],
    dim: usize,
    block: &BagBlock<'_>,
    pool: Pool,
    out: &mut [O],
    load: impl Fn(T) -> f32,
    store: impl Fn(f32) -> O,
) {
    for b in 0..block.bags() {
        let entries = block.bounds[b]..block.bounds[b + 1];
        for j in 0..dim {
            let value = |i: usize| load(table[block.rows[i] * dim + j]);
            let v = match pool {
                Pool::Sum | Pool::Mean => {
                    let mut acc = 0.0f32;
                    for i in entries.clone() {
                        acc = match block.weights {
                            Some(w) => value(i).mul_add(w[i], acc),
                            None => acc + value(i),
                        };
                    }
                    if pool == Pool::Mean {
                        acc / entries.len().max(1) as f32
                    } else {
                        acc
                    }
                }
                Pool::Max => {
                    let mut acc = 0.0f32;
                    for i in entries.clone() {
                        let x = value(i);
                        if i == entries.start || x > acc {
                            acc = x;
                        }
                    }
                    acc
                }
            };
            out[b * dim + j] = store(v);
        }
    }
}
