//! Every renorm kernel against the scalar reference, bit for bit: all three dtypes, widths
//! 0..=65 (every vector boundary of 8 and 16 lanes crossed), p = 1, 2, 3.5, ∞, output as the
//! table's dtype, widened to f32 or absent, in place or not, duplicate rows across blocks,
//! special values (NaN, ±∞, subnormals, -0).

use half::{bf16, f16};

use super::*;
use crate::kernels::DEFAULT_PREFETCH_DISTANCE;
use crate::util::Rng;

const MAX_DIM: usize = 2 * 32 + 1;

/// Every width up to [`MAX_DIM`], then the wider rows with kernels of their own (AVX-512's
/// register-resident 2-norm rows of 96 and 128) and one beyond them.
fn widths() -> impl Iterator<Item = usize> {
    (0..=MAX_DIM).chain([96, 128, 144])
}

const ROWS: usize = 9;

/// A table whose rows have norms on both sides of 1: row `r` is normal noise times a factor
/// from 0 to 2; rows 7 and 8 carry special values.
fn table<T: Element>(dim: usize, rng: &mut Rng) -> Vec<T> {
    let mut v: Vec<T> = (0..ROWS * dim)
        .map(|i| {
            let factor = [0.0, 0.05, 0.2, 0.5, 1.0, 2.0, 0.3, 1.0, 1.0][i / dim.max(1)];
            T::from_f32(rng.normal() * factor)
        })
        .collect();
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        1e-40,
        -3e-39,
        6e-8,
    ];
    if dim > 0 {
        // Row 7: one special value; row 8: subnormals and -0 only.
        v[7 * dim + (dim / 2)] = T::from_f32(specials[dim % 3]);
        for j in 0..dim {
            v[8 * dim + j] = T::from_f32(specials[3 + j % 4]);
        }
    }
    v
}

fn bytes_of<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// What one kernel run does.
#[derive(Clone, Copy, Debug)]
struct Setup {
    norm: NormKind,
    write_back: bool,
    /// None: no output; Some(true): f32 output; Some(false): the table's dtype.
    out_kind: Option<bool>,
    max_norm: f64,
    /// Streaming stores for the output (only where output rows are whole cache lines).
    stream_out: bool,
    /// Bytes from a 64-byte boundary to the output: 0, or 16, 32, 48 with slots in order.
    out_skew: usize,
}

impl Setup {
    /// Ordinary stores into an aligned output.
    fn plain(norm: NormKind, write_back: bool, out_kind: Option<bool>, max_norm: f64) -> Setup {
        Setup {
            norm,
            write_back,
            out_kind,
            max_norm,
            stream_out: false,
            out_skew: 0,
        }
    }
}

/// Run one kernel over `rows` with a fresh copy of `table`; return (table after, output).
fn run<T: Element>(
    kernel: RenormRowsFn,
    table: &[T],
    dim: usize,
    rows: &[usize],
    count: usize,
    setup: Setup,
) -> (Vec<u8>, Vec<u8>) {
    let mut t = table.to_vec();
    let out_size = match setup.out_kind {
        Some(true) => 4,
        _ => std::mem::size_of::<T>(),
    };
    // Slots in reverse order, to show that output rows need not be consecutive; in order for
    // a misaligned output (streamed as joined lines, which needs them so).
    let slots: Vec<usize> = if setup.out_skew == 0 {
        (0..count).rev().collect()
    } else {
        (0..count).collect()
    };
    let out_len = count * dim * out_size;
    // 64-byte aligned storage for the output bytes (streaming stores need it), filled with a
    // pattern no kernel writes.
    let mut out_words = vec![0xA5A5_A5A5u32; out_len.div_ceil(4) + 32];
    let align = out_words.as_ptr().align_offset(64) + setup.out_skew / 4;
    let (guard, out_words) = out_words.split_at_mut(align);
    let (out_words, after) = out_words.split_at_mut(out_len.div_ceil(4));
    let job = RenormJob {
        table: t.as_mut_ptr() as *mut u8,
        dim,
        write_back: setup.write_back,
        out: match setup.out_kind {
            None => std::ptr::null_mut(),
            Some(_) => out_words.as_mut_ptr() as *mut u8,
        },
        out_f32: setup.out_kind == Some(true),
        stream_out: setup.stream_out,
        norm: setup.norm,
        max_norm: setup.max_norm,
        prefetch: DEFAULT_PREFETCH_DISTANCE,
        rescaled: std::ptr::null_mut(),
    };
    if setup.write_back {
        // In place, rows must be distinct within a call.
        let mut seen = rows[..count].to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), count);
    }
    // SAFETY: rows below ROWS, slots distinct and inside `out_words`, one thread.
    unsafe { kernel(&job, rows, &slots, count) };
    let untouched = |w: &[u32]| w.iter().all(|&w| w == 0xA5A5_A5A5);
    assert!(
        untouched(guard) && untouched(after),
        "written outside the output"
    );
    let out = match setup.out_kind {
        Some(_) => bytemuck::cast_slice::<u32, u8>(out_words)[..out_len].to_vec(),
        None => Vec::new(),
    };
    (bytes_of(&t), out)
}

fn check_dtype<T: Element>(pick: fn(&RenormKernels) -> RenormRowsFn) {
    let mut rng = Rng::new(7);
    let reference = RenormKernels::for_isa(Isa::Scalar).unwrap();
    for isa in Isa::all_available() {
        let k = RenormKernels::for_isa(isa).unwrap();
        for dim in widths() {
            let table = table::<T>(dim, &mut rng);
            // Duplicates allowed out of place; a permutation (plus lookahead) in place.
            let dup_rows: Vec<usize> = (0..ROWS * 2 + DEFAULT_PREFETCH_DISTANCE)
                .map(|_| rng.below(ROWS as u64) as usize)
                .collect();
            let mut perm: Vec<usize> = (0..ROWS).rev().collect();
            perm.extend(std::iter::repeat_n(0, DEFAULT_PREFETCH_DISTANCE));
            // Rows 0..7 have finite norms: with the largest max_norm none is rescaled.
            let finite_rows: Vec<usize> = (0..ROWS * 2 + DEFAULT_PREFETCH_DISTANCE)
                .map(|_| rng.below(7) as usize)
                .collect();
            for norm in [NormKind::L1, NormKind::L2, NormKind::Inf, NormKind::P(3.5)] {
                for out_kind in [None, Some(false), Some(true)] {
                    for (write_back, max_norm, rows, count) in [
                        (false, 1.0, &dup_rows, ROWS * 2),
                        (true, 1.0, &perm, ROWS),
                        (false, 1.0, &perm, 0),
                        (false, f64::MAX, &finite_rows, ROWS * 2),
                    ] {
                        let setup = Setup::plain(norm, write_back, out_kind, max_norm);
                        let want = run(pick(&reference), &table, dim, rows, count, setup);
                        let got = run(pick(&k), &table, dim, rows, count, setup);
                        assert_eq!(
                            got,
                            want,
                            "{} {:?}, dim {dim}, {setup:?}",
                            k.name(),
                            T::DTYPE
                        );
                        let out_row_bytes = match out_kind {
                            Some(true) => 4 * dim,
                            _ => dim * std::mem::size_of::<T>(),
                        };
                        for out_skew in [0, 16, 32, 48] {
                            if out_kind.is_none() || out_row_bytes % 64 != 0 {
                                break;
                            }
                            let plain = Setup { out_skew, ..setup };
                            let want = run(pick(&reference), &table, dim, rows, count, plain);
                            let setup = Setup {
                                stream_out: true,
                                ..plain
                            };
                            let streamed = run(pick(&k), &table, dim, rows, count, setup);
                            assert_eq!(
                                streamed,
                                want,
                                "{} {:?}, dim {dim}, {setup:?}",
                                k.name(),
                                T::DTYPE
                            );
                        }
                        if !write_back {
                            assert_eq!(got.0, bytes_of(&table), "table written out of place");
                        }
                        if max_norm == f64::MAX && out_kind.is_some() {
                            // Nothing rescaled: the output is the gather, as is or widened.
                            let plain: Vec<u8> = rows[..count]
                                .iter()
                                .rev()
                                .flat_map(|&r| {
                                    let row = &table[r * dim..(r + 1) * dim];
                                    if out_kind == Some(true) {
                                        let w: Vec<f32> = row.iter().map(|x| x.to_f32()).collect();
                                        bytes_of(&w)
                                    } else {
                                        bytes_of(row)
                                    }
                                })
                                .collect();
                            assert_eq!(got.1, plain, "{} nothing rescaled, dim {dim}", k.name());
                        }
                    }
                }
            }
        }
    }
}

/// Rounding ties: a scale of 0.75 makes `x * scale = 3x/4`, which lies exactly halfway
/// between two neighbours of the dtype for a quarter of all `x` (those whose last significand
/// bits are `10`), so the kernels' round-to-nearest-even is checked on exact ties, not only
/// on random products where ties are rare.
fn check_ties<T: Element>(pick: fn(&RenormKernels) -> RenormRowsFn) {
    let mut rng = Rng::new(11);
    let reference = RenormKernels::for_isa(Isa::Scalar).unwrap();
    let scale = 0.75;
    let mut changed = 0;
    for dim in 1..=MAX_DIM {
        let row: Vec<T> = (0..dim)
            .map(|j| match j % 3 {
                0 => T::from_f32(2f32.powi((j % 7) as i32 - 3)),
                1 => T::from_f32(-(2f32.powi(-((j % 5) as i32)))),
                _ => T::from_f32(rng.normal()),
            })
            .collect();
        let norm = scalar::norm(&row, NormKind::L2);
        let rounded = T::from_f32(norm).to_f32() as f64;
        let max_norm = scale * (rounded + 1e-7);
        assert_eq!(
            row_scale::<T>(norm, max_norm),
            Some(scale as f32),
            "dim {dim}"
        );
        let rows: Vec<usize> = std::iter::repeat_n(0, 1 + DEFAULT_PREFETCH_DISTANCE).collect();
        for isa in Isa::all_available() {
            let k = RenormKernels::for_isa(isa).unwrap();
            for out_kind in [None, Some(false), Some(true)] {
                let setup = Setup::plain(NormKind::L2, true, out_kind, max_norm);
                let want = run(pick(&reference), &row, dim, &rows, 1, setup);
                let got = run(pick(&k), &row, dim, &rows, 1, setup);
                assert_eq!(got, want, "{} {:?} ties, dim {dim}", k.name(), T::DTYPE);
                changed += usize::from(got.0 != bytes_of(&row));
            }
        }
    }
    assert!(changed > 0, "no row was rescaled");
}

#[test]
fn f16_and_bf16_ties_round_to_even_like_the_reference() {
    check_ties::<f16>(|k| k.f16);
    check_ties::<bf16>(|k| k.bf16);
}

/// The shared driver (`drive`: its raw-pointer rows, lookahead and output slots) in place
/// and out of place, on widths either side of a vector, every dtype: small enough for Miri,
/// which CI runs it under on the portable and scalar kernels.
#[test]
fn driver_matches_scalar_in_place_and_out_of_place() {
    fn check<T: Element>(pick: fn(&RenormKernels) -> RenormRowsFn) {
        let mut rng = Rng::new(5);
        let reference = RenormKernels::for_isa(Isa::Scalar).unwrap();
        for dim in [1, 17] {
            let table = table::<T>(dim, &mut rng);
            let dup_rows: Vec<usize> = (0..ROWS + DEFAULT_PREFETCH_DISTANCE)
                .map(|_| rng.below(ROWS as u64) as usize)
                .collect();
            let mut perm: Vec<usize> = (0..ROWS).rev().collect();
            perm.extend(std::iter::repeat_n(0, DEFAULT_PREFETCH_DISTANCE));
            for (norm, write_back, out_kind, rows) in [
                (NormKind::L2, true, Some(true), &perm),
                (NormKind::P(3.5), false, Some(false), &dup_rows),
            ] {
                let setup = Setup::plain(norm, write_back, out_kind, 1.0);
                let want = run(pick(&reference), &table, dim, rows, ROWS, setup);
                for isa in Isa::all_available() {
                    let k = RenormKernels::for_isa(isa).unwrap();
                    let got = run(pick(&k), &table, dim, rows, ROWS, setup);
                    assert_eq!(got, want, "{} {:?} dim {dim} {setup:?}", k.name(), T::DTYPE);
                }
            }
        }
    }
    check::<f32>(|k| k.f32);
    check::<f16>(|k| k.f16);
    check::<bf16>(|k| k.bf16);
}

#[test]
fn f32_kernels_match_scalar() {
    check_dtype::<f32>(|k| k.f32);
}

#[test]
fn f16_kernels_match_scalar() {
    check_dtype::<f16>(|k| k.f16);
}

#[test]
fn bf16_kernels_match_scalar() {
    check_dtype::<bf16>(|k| k.bf16);
}

#[test]
fn scalar_reference_is_the_plain_definition() {
    // ||(3, -4)||: 7, 5, 4; the general p agrees with p = 2 and with a direct formula.
    let row = [3.0f32, -4.0];
    assert_eq!(scalar::norm(&row, NormKind::L1), 7.0);
    assert_eq!(scalar::norm(&row, NormKind::L2), 5.0);
    assert_eq!(scalar::norm(&row, NormKind::Inf), 4.0);
    assert!((scalar::norm(&row, NormKind::P(2.0)) - 5.0).abs() < 1e-6);
    let p = 3.5f32;
    let direct = (3f32.powf(p) + 4f32.powf(p)).powf(1.0 / p);
    assert!((scalar::norm(&row, NormKind::P(p)) - direct).abs() <= 1e-6 * direct);
    // NaN propagates through every norm; p = ∞ of an all-zero row is 0.
    for kind in [NormKind::L1, NormKind::L2, NormKind::Inf, NormKind::P(3.5)] {
        assert!(
            scalar::norm(&[1.0f32, f32::NAN, 9.0], kind).is_nan(),
            "{kind:?}"
        );
    }
    assert_eq!(scalar::norm(&[0.0f32; 5], NormKind::Inf), 0.0);

    // Strictly greater: a norm equal to max_norm is left alone.
    assert_eq!(row_scale::<f32>(5.0, 5.0), None);
    assert_eq!(row_scale::<f32>(f32::NAN, 5.0), None);
    assert_eq!(
        row_scale::<f32>(5.0, 1.0),
        Some((1.0f64 / (5.0 + 1e-7)) as f32)
    );
    // f16: the norm is rounded to f16 first (1.00049 rounds to 1.0, not above 1.0).
    assert_eq!(row_scale::<f16>(1.000_2, 1.0), None);
    assert!(row_scale::<f32>(1.000_2, 1.0).is_some());
    // An infinite norm scales by zero.
    assert_eq!(row_scale::<f32>(f32::INFINITY, 1.0), Some(0.0));

    // The reference kernel on a (2, 2) table: row 1 = (3, 4) is scaled to norm ~1, row 0 kept.
    let mut t = [0.5f32, 0.5, 3.0, 4.0];
    let mut out = [0.0f32; 4];
    let job = RenormJob {
        table: t.as_mut_ptr() as *mut u8,
        dim: 2,
        write_back: true,
        out: out.as_mut_ptr() as *mut u8,
        out_f32: true,
        stream_out: false,
        norm: NormKind::L2,
        max_norm: 1.0,
        prefetch: DEFAULT_PREFETCH_DISTANCE,
        rescaled: std::ptr::null_mut(),
    };
    // SAFETY: rows 1 and 0 of a 2-row table, distinct; slots 0 and 1 inside `out`.
    unsafe { scalar::renorm_rows::<f32>(&job, &[1, 0], &[0, 1], 2) };
    let s = (1.0f64 / (5.0 + 1e-7)) as f32;
    assert_eq!(out, [3.0 * s, 4.0 * s, 0.5, 0.5]);
    assert_eq!(t, [0.5, 0.5, 3.0 * s, 4.0 * s]);
}

#[test]
fn reduce16_is_the_documented_tree() {
    let v: [f32; 16] = std::array::from_fn(|i| (i as f32 + 1.0) * 0.1);
    let mut s8 = [0.0f32; 8];
    for l in 0..8 {
        s8[l] = v[l] + v[l + 8];
    }
    let s4: [f32; 4] = std::array::from_fn(|l| s8[l] + s8[l + 4]);
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    assert_eq!(reduce16(v).to_bits(), (s2[0] + s2[1]).to_bits());
}

/// A row holding a signalling NaN has a NaN norm, so it is never rescaled: every kernel must
/// give its stored bits back, widened bf16 with its payload and its quiet bit still clear (as
/// PyTorch's `c10::BFloat16` widens), not a NaN quieted by a round trip through arithmetic or
/// a conversion. The rows beside it are rescaled, and agree with the reference. f16 widens
/// through the F16C conversion, which quiets signalling NaNs on every path alike: there the
/// kernels must agree with the reference.
#[test]
fn rows_with_signalling_nans_come_out_bit_for_bit() {
    fn check<T: Element>(pick: fn(&RenormKernels) -> RenormRowsFn, nans: [T; 2], exact: bool) {
        let mut rng = Rng::new(19);
        let reference = RenormKernels::for_isa(Isa::Scalar).unwrap();
        let widen = |x: T| -> u32 {
            let b = bytes_of(&[x]);
            match b.len() {
                4 => u32::from_le_bytes(b.try_into().unwrap()),
                _ => (u16::from_le_bytes(b.try_into().unwrap()) as u32) << 16,
            }
        };
        for dim in widths().filter(|&d| d > 0) {
            for pos in [0, dim / 2, dim - 1] {
                // Rows of norm well above 1, rescaled with max_norm 1; rows 0 and 1 each carry
                // one signalling NaN (negative and positive, different payloads).
                let mut table: Vec<T> = (0..ROWS * dim)
                    .map(|_| T::from_f32(4.0 * rng.normal()))
                    .collect();
                table[pos] = nans[0];
                table[dim + pos] = nans[1];
                let mut rows: Vec<usize> = (0..ROWS).rev().collect();
                rows.extend(std::iter::repeat_n(0, DEFAULT_PREFETCH_DISTANCE));
                for isa in Isa::all_available() {
                    let k = RenormKernels::for_isa(isa).unwrap();
                    for norm in [NormKind::L1, NormKind::L2, NormKind::Inf, NormKind::P(3.5)] {
                        for out_kind in [Some(false), Some(true)] {
                            for write_back in [false, true] {
                                let setup = Setup::plain(norm, write_back, out_kind, 1.0);
                                let what = format!(
                                    "{} {:?}, dim {dim}, NaN at {pos}, {setup:?}",
                                    k.name(),
                                    T::DTYPE
                                );
                                let got = run(pick(&k), &table, dim, &rows, ROWS, setup);
                                let want = run(pick(&reference), &table, dim, &rows, ROWS, setup);
                                assert_eq!(got, want, "{what}");
                                if write_back {
                                    assert_ne!(got.0, bytes_of(&table), "nothing rescaled: {what}");
                                }
                                // Entry k (row ROWS-1-k) went to slot ROWS-1-k: row r to slot r.
                                let size = std::mem::size_of::<T>();
                                for r in [0, 1] {
                                    let stored = &table[r * dim..(r + 1) * dim];
                                    assert_eq!(
                                        &got.0[r * dim * size..(r + 1) * dim * size],
                                        &bytes_of(stored)[..],
                                        "table row {r} changed: {what}"
                                    );
                                    let expect: Vec<u8> = if out_kind == Some(true) {
                                        stored
                                            .iter()
                                            .flat_map(|&x| widen(x).to_le_bytes())
                                            .collect()
                                    } else {
                                        bytes_of(stored)
                                    };
                                    let out_row = match out_kind {
                                        Some(true) => 4 * dim,
                                        _ => size * dim,
                                    };
                                    let got_row = &got.1[r * out_row..(r + 1) * out_row];
                                    if exact || out_kind == Some(false) {
                                        assert_eq!(got_row, &expect[..], "output row {r}: {what}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let snan_bf16 = [bf16::from_bits(0xff8d), bf16::from_bits(0x7f81)];
    check::<bf16>(|k| k.bf16, snan_bf16, true);
    let snan_f32 = [f32::from_bits(0xff80_0001), f32::from_bits(0x7fa0_0000)];
    check::<f32>(|k| k.f32, snan_f32, true);
    let snan_f16 = [f16::from_bits(0xfc01), f16::from_bits(0x7d00)];
    check::<f16>(|k| k.f16, snan_f16, false);
}
