//! Gather kernels: copy table rows to consecutive output rows, as-is or widened to f32.
//!
//! Every kernel takes the row numbers of one block: the first `count` are gathered, the
//! entries after them (up to `prefetch` of them) are only prefetched, so prefetching runs
//! ahead across block boundaries. While copying row `i` a kernel prefetches row `i + prefetch`.

mod portable;
pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use super::Isa;

/// Copy whole rows of `row_bytes` bytes.
///
/// # Safety
/// Every `rows[i]` (all of them, not just the first `count`) satisfies
/// `(rows[i] + 1) * row_bytes <= table.len()`, `count <= rows.len()` and
/// `out.len() >= count * row_bytes`; the CPU supports the kernel's instruction set.
pub type CopyRowsFn = unsafe fn(
    table: &[u8],
    row_bytes: usize,
    rows: &[usize],
    count: usize,
    out: &mut [u8],
    prefetch: usize,
);

/// Widen rows of `dim` 16-bit floats (f16 or bf16 bit patterns) to f32.
///
/// # Safety
/// Every `rows[i]` satisfies `(rows[i] + 1) * dim <= table.len()`, `count <= rows.len()` and
/// `out.len() >= count * dim`; the CPU supports the kernel's instruction set.
pub type WidenRowsFn = unsafe fn(
    table: &[u16],
    dim: usize,
    rows: &[usize],
    count: usize,
    out: &mut [f32],
    prefetch: usize,
);

/// A kernel in two store flavours: ordinary stores (the output stays in cache for a consumer
/// that reads it next) and streaming stores (a large output bypasses the cache and skips the
/// read-for-ownership of each line). Levels without streaming stores use one function twice.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stores<F> {
    pub(crate) cached: F,
    pub(crate) streaming: F,
}

impl<F: Copy> Stores<F> {
    #[inline]
    pub(crate) fn pick(&self, stream: bool) -> F {
        if stream {
            self.streaming
        } else {
            self.cached
        }
    }

    fn same(f: F) -> Stores<F> {
        Stores {
            cached: f,
            streaming: f,
        }
    }
}

/// The gather kernels of one instruction-set level.
#[derive(Clone, Copy, Debug)]
pub struct GatherKernels {
    isa: Isa,
    pub(crate) copy: Stores<CopyRowsFn>,
    pub(crate) f16_to_f32: Stores<WidenRowsFn>,
    pub(crate) bf16_to_f32: Stores<WidenRowsFn>,
}

impl GatherKernels {
    /// The kernels in use on this CPU ([`Isa::detect`]), chosen once per process.
    #[inline]
    pub fn detect() -> &'static GatherKernels {
        static CHOSEN: std::sync::OnceLock<GatherKernels> = std::sync::OnceLock::new();
        CHOSEN.get_or_init(|| Self::for_isa(Isa::detect()).expect("the detected ISA is available"))
    }

    /// The kernels of one level, or `None` if the CPU cannot run it.
    pub fn for_isa(isa: Isa) -> Option<GatherKernels> {
        if !isa.is_available() {
            return None;
        }
        Some(match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => GatherKernels {
                isa,
                copy: Stores {
                    cached: avx512::copy_rows::<false>,
                    streaming: avx512::copy_rows::<true>,
                },
                f16_to_f32: Stores {
                    cached: avx512::f16_rows_to_f32::<false>,
                    streaming: avx512::f16_rows_to_f32::<true>,
                },
                bf16_to_f32: Stores {
                    cached: avx512::bf16_rows_to_f32::<false>,
                    streaming: avx512::bf16_rows_to_f32::<true>,
                },
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => GatherKernels {
                isa,
                copy: Stores {
                    cached: avx2::copy_rows::<false>,
                    streaming: avx2::copy_rows::<true>,
                },
                f16_to_f32: Stores {
                    cached: avx2::f16_rows_to_f32::<false>,
                    streaming: avx2::f16_rows_to_f32::<true>,
                },
                bf16_to_f32: Stores {
                    cached: avx2::bf16_rows_to_f32::<false>,
                    streaming: avx2::bf16_rows_to_f32::<true>,
                },
            },
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => GatherKernels {
                isa,
                copy: Stores::same(neon::copy_rows),
                f16_to_f32: Stores::same(portable::f16_rows_to_f32),
                bf16_to_f32: Stores::same(neon::bf16_rows_to_f32),
            },
            Isa::Portable => GatherKernels {
                isa,
                copy: Stores::same(portable::copy_rows),
                f16_to_f32: Stores::same(portable::f16_rows_to_f32),
                bf16_to_f32: Stores::same(portable::bf16_rows_to_f32),
            },
            Isa::Scalar => GatherKernels {
                isa,
                copy: Stores::same(scalar::copy_rows),
                f16_to_f32: Stores::same(scalar::f16_rows_to_f32),
                bf16_to_f32: Stores::same(scalar::bf16_rows_to_f32),
            },
            #[allow(unreachable_patterns)]
            _ => return None,
        })
    }

    /// The instruction-set level.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Whether the streaming kernels join rows into whole lines when the output is 16-byte
    /// aligned but not 64 (AVX-512's `Realign`); the others stream aligned outputs only.
    pub(crate) fn realign_streams(&self) -> bool {
        self.isa == Isa::Avx512
    }

    /// The kernel's name (`avx512`, `avx2+f16c`, `neon`, `portable`, `scalar`).
    pub fn name(&self) -> &'static str {
        self.isa.name()
    }
}

#[cfg(test)]
mod tests {
    //! Every kernel against the scalar reference: all widths up to two of the widest vectors
    //! plus one, blocks with duplicates, lookahead entries, empty blocks, special values.
    use super::*;
    use crate::util::Rng;

    /// Widest vector: 64 bytes = 32 sixteen-bit lanes; test every width up to 2 × that + 1.
    const MAX_DIM: usize = 2 * 32 + 1;

    fn special_u16() -> Vec<u16> {
        // ±0, smallest/largest subnormal f16, ±1, max f16, ±inf, quiet and signalling NaNs,
        // and their bf16 counterparts by bit pattern.
        vec![
            0x0000, 0x8000, 0x0001, 0x03ff, 0x3c00, 0xbc00, 0x7bff, 0x7c00, 0xfc00, 0x7e00, 0x7d00,
            0xfd01, 0x7f80, 0xff80, 0x7fc0, 0x7f81, 0x0080, 0x3f80,
        ]
    }

    fn table_u16(rows: usize, dim: usize, rng: &mut Rng) -> Vec<u16> {
        let specials = special_u16();
        (0..rows * dim)
            .map(|i| {
                if i % 7 == 0 {
                    specials[i / 7 % specials.len()]
                } else {
                    rng.next_u64() as u16
                }
            })
            .collect()
    }

    fn rows_with_lookahead(n: usize, rows: usize, rng: &mut Rng) -> Vec<usize> {
        // Duplicates on purpose: draw from a small range.
        (0..n + crate::kernels::DEFAULT_PREFETCH_DISTANCE)
            .map(|_| rng.below(rows as u64) as usize)
            .collect()
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len()
    }

    #[test]
    fn copy_matches_scalar() {
        let mut rng = Rng::new(1);
        let reference = GatherKernels::for_isa(Isa::Scalar).unwrap().copy.cached;
        for isa in Isa::all_available() {
            let k = GatherKernels::for_isa(isa).unwrap();
            for (row_bytes, stream) in (0..=MAX_DIM * 4 + 3).flat_map(|r| [(r, false), (r, true)]) {
                let kernel = k.copy.pick(stream);
                let rows = 7;
                let table: Vec<u8> = (0..rows * row_bytes)
                    .map(|_| rng.next_u64() as u8)
                    .collect();
                for count in [0, 1, 5, 33] {
                    let idx = rows_with_lookahead(count, rows, &mut rng);
                    // Output offsets from a 64-byte boundary: aligned, 16-byte aligned (the
                    // 16-byte streaming stores) and unaligned.
                    for offset in [0, 1, 13, 16, 32, 48, 63] {
                        let n = count * row_bytes;
                        let mut want_buf = vec![0xAAu8; n + 128];
                        let mut got_buf = want_buf.clone();
                        let (wa, ga) = (
                            want_buf.as_ptr().align_offset(64),
                            got_buf.as_ptr().align_offset(64),
                        );
                        let want = &mut want_buf[wa..][..n + 64];
                        let got = &mut got_buf[ga..][..n + 64];
                        // SAFETY: rows drawn below `rows`, buffers sized for `count` rows.
                        unsafe {
                            reference(
                                &table,
                                row_bytes,
                                &idx,
                                count,
                                &mut want[offset..offset + n],
                                count % 17, // any distance, past the lookahead too
                            );
                            kernel(
                                &table,
                                row_bytes,
                                &idx,
                                count,
                                &mut got[offset..offset + n],
                                count % 17,
                            );
                        }
                        assert_eq!(
                            got,
                            want,
                            "{} copy (stream {stream}), row_bytes {row_bytes}, offset {offset}",
                            k.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn widen_matches_scalar() {
        let mut rng = Rng::new(2);
        let reference = GatherKernels::for_isa(Isa::Scalar).unwrap();
        for isa in Isa::all_available() {
            let k = GatherKernels::for_isa(isa).unwrap();
            for (dim, stream) in (0..=MAX_DIM).flat_map(|d| [(d, false), (d, true)]) {
                let rows = 5;
                // Slack so the table view and the output can start at odd element offsets.
                let table = table_u16(rows * dim + 16, 1, &mut rng);
                // Output offsets in elements from a 64-byte boundary (the table slice moves
                // with them): 4, 8 and 12 are 16-byte aligned.
                for offset in [0, 1, 4, 5, 8, 12, 15] {
                    let t = &table[offset..offset + rows * dim];
                    for count in [0, 1, 3, 40] {
                        let idx = rows_with_lookahead(count, rows, &mut rng);
                        let n = count * dim;
                        let mut want_buf = vec![f32::from_bits(0xdead); n + 48];
                        let mut got_buf = want_buf.clone();
                        let (wa, ga) = (
                            want_buf.as_ptr().align_offset(64),
                            got_buf.as_ptr().align_offset(64),
                        );
                        let want = &mut want_buf[wa..][..n + 16];
                        let got = &mut got_buf[ga..][..n + 16];
                        for (name, r, f) in [
                            (
                                "f16",
                                reference.f16_to_f32.cached,
                                k.f16_to_f32.pick(stream),
                            ),
                            (
                                "bf16",
                                reference.bf16_to_f32.cached,
                                k.bf16_to_f32.pick(stream),
                            ),
                        ] {
                            // SAFETY: rows drawn below `rows`, buffers sized for `count` rows.
                            unsafe {
                                r(
                                    t,
                                    dim,
                                    &idx,
                                    count,
                                    &mut want[offset..offset + n],
                                    count % 17,
                                );
                                f(
                                    t,
                                    dim,
                                    &idx,
                                    count,
                                    &mut got[offset..offset + n],
                                    count % 17,
                                );
                            }
                            assert!(
                                same_bits(got, want),
                                "{} {name} (stream {stream}), dim {dim}, offset {offset}, count {count}",
                                k.name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn scalar_reference_is_the_plain_definition() {
        let f16_table: Vec<u16> = vec![0x3c00, 0xc000, 0x4000, 0x3800]; // [[1, -2], [2, 0.5]]
        let mut out = vec![0.0f32; 4];
        // SAFETY: rows 1 and 0 of a 2 × 2 table; out holds 2 rows.
        unsafe { scalar::f16_rows_to_f32(&f16_table, 2, &[1, 0], 2, &mut out, 0) };
        assert_eq!(out, [2.0, 0.5, 1.0, -2.0]);
        let bf16_table: Vec<u16> = vec![0x3f80, 0xc000, 0x4000, 0x3f00]; // [[1, -2], [2, 0.5]]
                                                                         // SAFETY: as above.
        unsafe { scalar::bf16_rows_to_f32(&bf16_table, 2, &[1, 0], 2, &mut out, 0) };
        assert_eq!(out, [2.0, 0.5, 1.0, -2.0]);
    }
}
