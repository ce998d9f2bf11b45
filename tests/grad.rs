//! Gradients and optimizer steps against plain scalar references written here from PyTorch's
//! definitions, bit for bit; errors; determinism across thread counts.

use embedding_lookup::ops::grad::{CoalescedGrad, EmbeddingBackward, EmbeddingBagBackward};
use embedding_lookup::ops::optim::{Rounding, RowwiseAdagrad, Sgd};
use embedding_lookup::util::Rng;
use embedding_lookup::{BagMode, Bags, DType, Error, OpenMode, OpenOptions, Table};
use half::{bf16, f16};

// ----------------------------------------------------------------------------------------------
// Scalar references

/// PyTorch's `embedding_dense_backward_cpu`: zeros, then for every position in order,
/// `grad_weight[k].add_(grad[i], scale)` with `scale = 1 / count[k]` (f64, rounded to f32),
/// which runs as a fused multiply-add.
fn ref_dense(
    idx: &[i64],
    go: &[f32],
    rows: usize,
    dim: usize,
    pad: Option<usize>,
    freq: bool,
) -> Vec<f32> {
    let mut counts = vec![0usize; rows];
    for &i in idx {
        counts[i as usize] += 1;
    }
    let mut gw = vec![0.0f32; rows * dim];
    for (p, &i) in idx.iter().enumerate() {
        let k = i as usize;
        if Some(k) == pad {
            continue;
        }
        let s = if freq {
            (1.0 / counts[k] as f64) as f32
        } else {
            1.0
        };
        for j in 0..dim {
            gw[k * dim + j] = s.mul_add(go[p * dim + j], gw[k * dim + j]);
        }
    }
    gw
}

/// Bags as (start, end) ranges.
fn bag_ranges(n: usize, layout: &Bags<'_>, bags_from_go: usize) -> Vec<(usize, usize)> {
    match *layout {
        Bags::Fixed(bag_size) => (0..bags_from_go)
            .map(|b| (b * bag_size, (b + 1) * bag_size))
            .collect(),
        Bags::Offsets {
            offsets,
            include_last_offset,
        } => {
            let bags = offsets.len() - usize::from(include_last_offset);
            (0..bags)
                .map(|b| {
                    let end = offsets.get(b + 1).map_or(n, |&e| e as usize);
                    (offsets[b] as usize, end)
                })
                .collect()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Sum,
    Mean,
    Max,
}

/// PyTorch's `_embedding_bag_dense_backward_cpu_sum_mean` (an `axpy` per entry: fused
/// multiply-adds) / `_max` (`index_add_`: plain adds), written plainly.
#[allow(clippy::too_many_arguments)]
fn ref_bag_dense(
    idx: &[i64],
    ranges: &[(usize, usize)],
    mode: Mode,
    max_indices: &[i64],
    psw: Option<&[f32]>,
    go: &[f32],
    rows: usize,
    dim: usize,
    pad: Option<usize>,
    freq: bool,
) -> Vec<f32> {
    let mut gw = vec![0.0f32; rows * dim];
    let size = |&(s, e): &(usize, usize)| {
        idx[s..e]
            .iter()
            .filter(|&&i| Some(i as usize) != pad)
            .count()
    };
    if mode == Mode::Max {
        for (b, r) in ranges.iter().enumerate() {
            if size(r) == 0 {
                continue;
            }
            for c in 0..dim {
                gw[max_indices[b * dim + c] as usize * dim + c] += go[b * dim + c];
            }
        }
        return gw;
    }
    let mut counts = vec![0usize; rows];
    for r in ranges {
        for &i in &idx[r.0..r.1] {
            counts[i as usize] += 1;
        }
    }
    // Contributions of a row in entry order (PyTorch sorts indices stably).
    for (p, &i) in idx.iter().enumerate() {
        let k = i as usize;
        let Some(b) = ranges.iter().position(|&(s, e)| s <= p && p < e) else {
            continue;
        };
        if Some(k) == pad {
            continue;
        }
        let mut w = psw.map_or(1.0, |w| w[p] as f64);
        if freq {
            w /= counts[k] as f64;
        }
        if mode == Mode::Mean {
            w /= size(&ranges[b]) as f64;
        }
        let w = w as f32;
        for j in 0..dim {
            gw[k * dim + j] = w.mul_add(go[b * dim + j], gw[k * dim + j]);
        }
    }
    gw
}

/// A bag forward in max mode, to make `max_indices` as PyTorch's forward does: the first
/// entry wins, a later one replaces it only when strictly greater; padding skipped; 0 for
/// empty bags.
fn ref_max_indices(
    table: &[f32],
    idx: &[i64],
    ranges: &[(usize, usize)],
    dim: usize,
    pad: Option<usize>,
) -> Vec<i64> {
    let mut out = vec![0i64; ranges.len() * dim];
    for (b, &(s, e)) in ranges.iter().enumerate() {
        for c in 0..dim {
            let mut best: Option<(f32, i64)> = None;
            for &i in &idx[s..e] {
                if Some(i as usize) == pad {
                    continue;
                }
                let v = table[i as usize * dim + c];
                if best.is_none_or(|(bv, _)| v > bv) {
                    best = Some((v, i));
                }
            }
            out[b * dim + c] = best.map_or(0, |(_, i)| i);
        }
    }
    out
}

fn randn(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

fn indices(n: usize, rows: usize, rng: &mut Rng) -> Vec<i64> {
    // Skewed: half the lookups hit the first few rows, so rows repeat a lot.
    (0..n)
        .map(|_| {
            if rng.below(2) == 0 {
                rng.below(rows.min(4) as u64) as i64
            } else {
                rng.below(rows as u64) as i64
            }
        })
        .collect()
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {k}: {g} vs {w}");
    }
}

// ----------------------------------------------------------------------------------------------
// Lookup gradients

#[test]
fn dense_gradient_matches_the_reference() {
    let mut rng = Rng::new(11);
    for dim in [0usize, 1, 3, 8, 17, 64, 100] {
        for (n, rows) in [(0usize, 5usize), (1, 1), (37, 6), (500, 40), (5000, 3000)] {
            let idx = indices(n, rows, &mut rng);
            let go = randn(n * dim, &mut rng);
            for pad in [None, Some(0i64), Some(-1)] {
                for freq in [false, true] {
                    let padn = pad.map(|p| {
                        if p < 0 {
                            (rows as i64 + p) as usize
                        } else {
                            p as usize
                        }
                    });
                    let want = ref_dense(&idx, &go, rows, dim, padn, freq);
                    let bw = EmbeddingBackward::new(&idx)
                        .padding_idx(pad)
                        .scale_grad_by_freq(freq);
                    let got = bw.dense(&go, rows, dim).unwrap();
                    let what = format!("dense dim {dim} n {n} rows {rows} pad {pad:?} freq {freq}");
                    assert_bits(&got, &want, &what);
                    // The coalesced form holds the same rows: the non-padding looked-up ones.
                    let co = bw.coalesced(&go, rows, dim).unwrap();
                    let mut want_rows: Vec<usize> = idx
                        .iter()
                        .map(|&i| i as usize)
                        .filter(|&r| Some(r) != padn)
                        .collect();
                    want_rows.sort();
                    want_rows.dedup();
                    assert_eq!(co.rows(), want_rows, "{what}");
                    assert_bits(&co.to_dense(), &want, &format!("coalesced {what}"));
                }
            }
        }
    }
}

#[test]
fn every_index_type_gives_the_same_gradient() {
    let mut rng = Rng::new(12);
    let (n, rows, dim) = (300, 20, 5);
    let idx = indices(n, rows, &mut rng);
    let go = randn(n * dim, &mut rng);
    let want = EmbeddingBackward::new(&idx).dense(&go, rows, dim).unwrap();
    let i32s: Vec<i32> = idx.iter().map(|&i| i as i32).collect();
    let u64s: Vec<u64> = idx.iter().map(|&i| i as u64).collect();
    let us: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
    assert_bits(
        &EmbeddingBackward::new(&i32s).dense(&go, rows, dim).unwrap(),
        &want,
        "i32",
    );
    assert_bits(
        &EmbeddingBackward::new(&u64s).dense(&go, rows, dim).unwrap(),
        &want,
        "u64",
    );
    assert_bits(
        &EmbeddingBackward::new(&us).dense(&go, rows, dim).unwrap(),
        &want,
        "usize",
    );
}

#[test]
fn sparse_gradient_is_pytorchs_uncoalesced_coo() {
    let mut rng = Rng::new(13);
    let (n, rows, dim) = (200, 10, 7);
    let idx = indices(n, rows, &mut rng);
    let go = randn(n * dim, &mut rng);
    for pad in [None, Some(2i64)] {
        let bw = EmbeddingBackward::new(&idx).padding_idx(pad);
        let sp = bw.sparse(&go, rows, dim).unwrap();
        let keep: Vec<usize> = (0..n).filter(|&p| Some(idx[p]) != pad).collect();
        assert_eq!(sp.len(), keep.len());
        assert_eq!(
            sp.indices(),
            keep.iter().map(|&p| idx[p]).collect::<Vec<_>>()
        );
        let want: Vec<f32> = keep
            .iter()
            .flat_map(|&p| go[p * dim..(p + 1) * dim].to_vec())
            .collect();
        assert_bits(sp.values(), &want, "values");
        // Coalescing the pairs gives the coalesced gradient.
        assert_eq!(sp.coalesce(), bw.coalesced(&go, rows, dim).unwrap());
    }
    // All padding: no pairs at all.
    let all_pad = [3i64; 4];
    let sp = EmbeddingBackward::new(&all_pad)
        .padding_idx(Some(3))
        .sparse(&[1.0; 8], 5, 2)
        .unwrap();
    assert!(sp.is_empty());
    assert_eq!(sp.to_dense(), vec![0.0; 10]);
}

#[test]
fn gradient_errors_name_what_is_wrong() {
    let idx = [0i64, 4, 2];
    let go = [1.0f32; 6];
    let bw = EmbeddingBackward::new(&idx);
    match bw.dense(&go, 4, 2) {
        Err(Error::IndexOutOfRange {
            index: 4,
            position: 1,
            rows: 4,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        bw.padding_idx(Some(5)).dense(&go, 5, 2),
        Err(Error::PaddingIdxOutOfRange {
            padding_idx: 5,
            rows: 5
        })
    ));
    let e = bw.dense(&go[..5], 5, 2).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch(_)), "{e}");
    assert!(e.to_string().contains("grad_output"), "{e}");
    // The output buffer is checked and left untouched on error.
    let mut gw = vec![7.0f32; 9];
    assert!(matches!(
        bw.dense_into(&go, 5, 2, &mut gw),
        Err(Error::OutputLength {
            expected: 10,
            actual: 9
        })
    ));
    let mut gw = vec![7.0f32; 8];
    assert!(bw.dense_into(&go, 4, 2, &mut gw).is_err());
    assert_eq!(gw, vec![7.0; 8]);
    // Sparse with scale_grad_by_freq is refused, as in PyTorch; coalesced accepts it.
    let e = bw.scale_grad_by_freq(true).sparse(&go, 5, 2).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("scale_grad_by_freq"));
    assert!(bw.scale_grad_by_freq(true).coalesced(&go, 5, 2).is_ok());
    // Hand-made coalesced gradients are checked.
    assert!(CoalescedGrad::new(5, 1, vec![1, 1], vec![0.0; 2]).is_err());
    assert!(CoalescedGrad::new(5, 1, vec![1, 5], vec![0.0; 2]).is_err());
    assert!(CoalescedGrad::new(5, 2, vec![1, 2], vec![0.0; 3]).is_err());
    assert!(CoalescedGrad::new(5, 2, vec![1, 4], vec![0.0; 4]).is_ok());
}

// ----------------------------------------------------------------------------------------------
// Bag gradients

struct BagCase {
    idx: Vec<i64>,
    offsets: Vec<i64>,
    include_last: bool,
}

fn bag_case(n: usize, bags: usize, rows: usize, include_last: bool, rng: &mut Rng) -> BagCase {
    let idx = indices(n, rows, rng);
    // Random non-decreasing offsets starting at 0, empty bags included.
    let mut offsets: Vec<i64> = (0..bags).map(|_| rng.below(n as u64 + 1) as i64).collect();
    offsets.sort();
    if let Some(o) = offsets.first_mut() {
        *o = 0;
    }
    if include_last {
        // The last offset closes the last bag; leave some entries after it now and then.
        offsets.push(if rng.below(3) == 0 {
            n as i64 - (n as i64).min(2)
        } else {
            n as i64
        });
        offsets.sort();
    }
    BagCase {
        idx,
        offsets,
        include_last,
    }
}

#[test]
fn bag_gradients_match_the_reference() {
    let mut rng = Rng::new(21);
    for dim in [1usize, 5, 16, 33, 64] {
        for (n, bags, rows) in [
            (0usize, 1usize, 3usize),
            (10, 3, 4),
            (200, 17, 30),
            (3000, 400, 500),
        ] {
            for include_last in [false, true] {
                let c = bag_case(n, bags, rows, include_last, &mut rng);
                let layout = Bags::Offsets {
                    offsets: &c.offsets,
                    include_last_offset: c.include_last,
                };
                let nbags = c.offsets.len() - usize::from(include_last);
                let ranges = bag_ranges(n, &layout, nbags);
                let go = randn(nbags * dim, &mut rng);
                let table = randn(rows * dim, &mut rng);
                let psw = randn(n, &mut rng);
                for pad in [None, Some(1i64)] {
                    let padn = pad.map(|p| p as usize);
                    let max_indices = ref_max_indices(&table, &c.idx, &ranges, dim, padn);
                    for (mode, m, winners) in [
                        (Mode::Sum, BagMode::Sum, None),
                        (Mode::Mean, BagMode::Mean, None),
                        (Mode::Max, BagMode::Max, Some(&max_indices[..])),
                    ] {
                        for freq in [false, true] {
                            for weights in [None, Some(&psw[..])] {
                                if weights.is_some() && mode != Mode::Sum {
                                    continue;
                                }
                                let what = format!(
                                    "{mode:?} dim {dim} n {n} bags {nbags} last {include_last} \
                                     pad {pad:?} freq {freq} psw {}",
                                    weights.is_some()
                                );
                                let want = ref_bag_dense(
                                    &c.idx,
                                    &ranges,
                                    mode,
                                    &max_indices,
                                    weights,
                                    &go,
                                    rows,
                                    dim,
                                    padn,
                                    freq,
                                );
                                let bw = EmbeddingBagBackward::new(&c.idx, layout, m)
                                    .max_indices(winners)
                                    .per_sample_weights(weights)
                                    .padding_idx(pad)
                                    .scale_grad_by_freq(freq);
                                let got = bw.dense(&go, rows, dim).unwrap();
                                assert_bits(&got, &want, &what);
                                let co = bw.coalesced(&go, rows, dim).unwrap();
                                assert_bits(&co.to_dense(), &want, &format!("coalesced {what}"));
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn fixed_size_bags_equal_offsets_bags() {
    let mut rng = Rng::new(22);
    let (bags, size, rows, dim) = (50, 4, 30, 9);
    let idx = indices(bags * size, rows, &mut rng);
    let offsets: Vec<i64> = (0..bags).map(|b| (b * size) as i64).collect();
    let go = randn(bags * dim, &mut rng);
    for mode in [BagMode::Sum, BagMode::Mean] {
        let fixed = EmbeddingBagBackward::new(&idx, Bags::fixed(size), mode)
            .padding_idx(Some(0))
            .dense(&go, rows, dim)
            .unwrap();
        let with_offsets = EmbeddingBagBackward::new(
            &idx,
            Bags::Offsets {
                offsets: &offsets,
                include_last_offset: false,
            },
            mode,
        )
        .padding_idx(Some(0))
        .dense(&go, rows, dim)
        .unwrap();
        assert_bits(&fixed, &with_offsets, &format!("{mode:?}"));
    }
}

#[test]
fn sparse_bag_gradient_is_pytorchs() {
    let mut rng = Rng::new(23);
    let (n, rows, dim) = (120, 15, 6);
    let c = bag_case(n, 20, rows, false, &mut rng);
    let layout = Bags::Offsets {
        offsets: &c.offsets,
        include_last_offset: false,
    };
    let ranges = bag_ranges(n, &layout, c.offsets.len());
    let go = randn(ranges.len() * dim, &mut rng);
    let psw = randn(n, &mut rng);
    let pad = Some(2usize);
    for (mode, weights) in [
        (BagMode::Sum, None),
        (BagMode::Sum, Some(&psw[..])),
        (BagMode::Mean, None),
    ] {
        let sp = EmbeddingBagBackward::new(&c.idx, layout, mode)
            .per_sample_weights(weights)
            .padding_idx(Some(2))
            .sparse(&go, rows, dim)
            .unwrap();
        let mut want_idx = Vec::new();
        let mut want_val = Vec::new();
        for (b, &(s, e)) in ranges.iter().enumerate() {
            let size = c.idx[s..e]
                .iter()
                .filter(|&&i| Some(i as usize) != pad)
                .count();
            for p in s..e {
                if Some(c.idx[p] as usize) == pad {
                    continue;
                }
                want_idx.push(c.idx[p]);
                for j in 0..dim {
                    let g = go[b * dim + j];
                    want_val.push(match (mode, weights) {
                        (BagMode::Mean, _) => g * (1.0f32 / size as f32),
                        (_, Some(w)) => g * w[p],
                        _ => g,
                    });
                }
            }
        }
        assert_eq!(sp.indices(), want_idx);
        assert_bits(sp.values(), &want_val, &format!("{mode:?}"));
    }
}

#[test]
fn bag_gradient_errors() {
    let idx = [0i64, 1, 2, 3];
    let go = [1.0f32; 4];
    let off = |o: &'static [i64]| Bags::Offsets {
        offsets: o,
        include_last_offset: false,
    };
    let kind = |r: Result<Vec<f32>, Error>| r.unwrap_err().kind();
    let sum = BagMode::Sum;
    assert_eq!(
        kind(EmbeddingBagBackward::new(&idx, off(&[1, 2]), sum).dense(&go, 4, 2)),
        "bad_offsets"
    );
    assert_eq!(
        kind(EmbeddingBagBackward::new(&idx, off(&[0, 3, 2]), sum).dense(&[1.0; 6], 4, 2)),
        "bad_offsets"
    );
    assert_eq!(
        kind(EmbeddingBagBackward::new(&idx, off(&[0, 5]), sum).dense(&go, 4, 2)),
        "bad_offsets"
    );
    let last: Bags<'_, i64> = Bags::Offsets {
        offsets: &[],
        include_last_offset: true,
    };
    assert_eq!(
        kind(EmbeddingBagBackward::new(&idx, last, sum).dense(&[], 4, 2)),
        "bad_offsets"
    );
    // grad_output must be bags × dim.
    assert_eq!(
        kind(EmbeddingBagBackward::new(&idx, off(&[0, 2]), sum).dense(&go[..3], 4, 2)),
        "shape_mismatch"
    );
    assert_eq!(
        kind(EmbeddingBagBackward::new(&idx, Bags::fixed(3), sum).dense(&go, 4, 2)),
        "shape_mismatch"
    );
    // per_sample_weights: sum only, one per index.
    let w = [1.0f32; 4];
    assert_eq!(
        kind(
            EmbeddingBagBackward::new(&idx, off(&[0, 2]), BagMode::Mean)
                .per_sample_weights(Some(&w))
                .dense(&go, 4, 2)
        ),
        "per_sample_weights_mode"
    );
    assert_eq!(
        kind(
            EmbeddingBagBackward::new(&idx, off(&[0, 2]), sum)
                .per_sample_weights(Some(&w[..3]))
                .dense(&go, 4, 2)
        ),
        "per_sample_weights_mode"
    );
    // Indices and max_indices are range-checked.
    assert_eq!(
        kind(EmbeddingBagBackward::new(&[0i64, 4], off(&[0]), sum).dense(&go[..2], 4, 2)),
        "index_out_of_range"
    );
    let bad_max = [0i64, 9, 1, 1];
    let e = EmbeddingBagBackward::new(&idx, off(&[0, 2]), BagMode::Max)
        .max_indices(Some(&bad_max))
        .dense(&go, 4, 2)
        .unwrap_err();
    assert!(e.to_string().contains("max_indices[0, 1] = 9"), "{e}");
    // Max mode needs max_indices; the other modes refuse them.
    assert_eq!(
        kind(EmbeddingBagBackward::new(&idx, off(&[0, 2]), BagMode::Max).dense(&go, 4, 2)),
        "invalid_argument"
    );
    assert_eq!(
        kind(
            EmbeddingBagBackward::new(&idx, off(&[0, 2]), sum)
                .max_indices(Some(&bad_max))
                .dense(&go, 4, 2)
        ),
        "invalid_argument"
    );
    // Sparse: max and scale_grad_by_freq are refused, as in PyTorch.
    let max = [0i64, 0, 2, 2];
    assert!(EmbeddingBagBackward::new(&idx, off(&[0, 2]), BagMode::Max)
        .max_indices(Some(&max))
        .sparse(&go, 4, 2)
        .is_err());
    assert!(EmbeddingBagBackward::new(&idx, off(&[0, 2]), sum)
        .scale_grad_by_freq(true)
        .sparse(&go, 4, 2)
        .is_err());
}

// ----------------------------------------------------------------------------------------------
// Determinism

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn results_are_bit_identical_across_thread_counts() {
    let mut rng = Rng::new(31);
    // Large enough that the work is split (several MiB of gradient rows, and more lookups
    // than the counting sort handles on one thread).
    let (n, rows, dim) = (70_000usize, 20_000usize, 40usize);
    let idx = indices(n, rows, &mut rng);
    let go = randn(n * dim, &mut rng);
    let offsets: Vec<i64> = (0..n / 3).map(|b| (b * 3) as i64).collect();
    let bag_go = randn(offsets.len() * dim, &mut rng);
    let run = || {
        let bw = EmbeddingBackward::new(&idx)
            .padding_idx(Some(1))
            .scale_grad_by_freq(true);
        let dense = bw.dense(&go, rows, dim).unwrap();
        let co = bw.coalesced(&go, rows, dim).unwrap();
        let bag = EmbeddingBagBackward::new(
            &idx,
            Bags::Offsets {
                offsets: &offsets,
                include_last_offset: false,
            },
            BagMode::Mean,
        )
        .dense(&bag_go, rows, dim)
        .unwrap();
        let mut t = Table::randn(rows, dim, DType::BF16, 5).unwrap();
        let mut opt = RowwiseAdagrad::new(rows, 0.1, 1e-8)
            .unwrap()
            .with_rounding(Rounding::Stochastic { seed: 9 });
        opt.step(&mut t, &co).unwrap();
        opt.step(&mut t, &co).unwrap();
        (dense, co, bag, t.as_bytes().to_vec(), opt.state().to_vec())
    };
    let one = in_pool(1, run);
    for threads in [2, 8] {
        let other = in_pool(threads, run);
        assert_bits(&other.0, &one.0, &format!("dense, {threads} threads"));
        assert_eq!(other.1, one.1, "coalesced, {threads} threads");
        assert_bits(&other.2, &one.2, &format!("bag, {threads} threads"));
        assert_eq!(other.3, one.3, "table after adagrad, {threads} threads");
        assert_bits(
            &other.4,
            &one.4,
            &format!("adagrad state, {threads} threads"),
        );
    }
}

// ----------------------------------------------------------------------------------------------
// Optimizers

fn grad_for(rows: usize, dim: usize, rng: &mut Rng) -> CoalescedGrad {
    let idx = indices(rows * 2, rows, rng);
    let go = randn(idx.len() * dim, rng);
    EmbeddingBackward::new(&idx)
        .padding_idx(Some(0))
        .coalesced(&go, rows, dim)
        .unwrap()
}

#[test]
fn sgd_updates_only_the_gradients_rows() {
    let mut rng = Rng::new(41);
    let (rows, dim, lr) = (50, 13, 0.25f32);
    let grad = grad_for(rows, dim, &mut rng);
    assert!(!grad.rows().contains(&0), "padding row has no gradient");
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut table = Table::randn(rows, dim, dtype, 3).unwrap();
        let before: Vec<f32> = table.lookup(&(0..rows).collect::<Vec<_>>()).unwrap();
        Sgd::new(lr).unwrap().step(&mut table, &grad).unwrap();
        let after: Vec<f32> = table.lookup(&(0..rows).collect::<Vec<_>>()).unwrap();
        let mut want = before.clone();
        for (k, &r) in grad.rows().iter().enumerate() {
            for j in 0..dim {
                let v = before[r * dim + j] - lr * grad.row(k)[j];
                // One rounding from f32 to the table's dtype, to nearest even.
                want[r * dim + j] = match dtype {
                    DType::F32 => v,
                    DType::F16 => f16::from_f32(v).to_f32(),
                    DType::BF16 => bf16::from_f32(v).to_f32(),
                };
            }
        }
        assert_bits(&after, &want, &format!("sgd {dtype}"));
    }
}

#[test]
fn rowwise_adagrad_matches_the_reference() {
    let mut rng = Rng::new(42);
    let (rows, dim, lr, eps) = (40, 19, 0.5f32, 1e-6f32);
    let mut table = Table::randn(rows, dim, DType::F32, 4).unwrap();
    let mut w: Vec<f32> = table.as_slice::<f32>().unwrap().to_vec();
    let mut state = vec![0.0f32; rows];
    let mut opt = RowwiseAdagrad::new(rows, lr, eps).unwrap();
    for _ in 0..3 {
        let grad = grad_for(rows, dim, &mut rng);
        opt.step(&mut table, &grad).unwrap();
        for (k, &r) in grad.rows().iter().enumerate() {
            let g = grad.row(k);
            let mean = g.iter().map(|v| (v * v) as f64).sum::<f64>() / dim as f64;
            state[r] += mean as f32;
            let rate = lr / (state[r].sqrt() + eps);
            for j in 0..dim {
                w[r * dim + j] -= rate * g[j];
            }
        }
    }
    // The optimizer sums g² in its own fixed order: equal up to rounding of that sum.
    for (r, (&got, &want)) in opt.state().iter().zip(&state).enumerate() {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "state {r}: {got} vs {want}"
        );
    }
    for (k, (&got, &want)) in table.as_slice::<f32>().unwrap().iter().zip(&w).enumerate() {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "weight {k}: {got} vs {want}"
        );
    }
    // Rows never in a gradient keep a zero accumulator.
    assert_eq!(opt.state()[0], 0.0);
}

#[test]
fn stochastic_rounding_is_seeded_and_lands_on_neighbours() {
    let mut rng = Rng::new(43);
    let (rows, dim) = (30, 24);
    let grad = grad_for(rows, dim, &mut rng);
    for dtype in [DType::F16, DType::BF16] {
        let start = Table::randn(rows, dim, dtype, 6).unwrap();
        let stepped = |seed: u64| {
            let mut t = start.to_dtype(dtype).unwrap();
            let mut sgd = Sgd::new(1e-3)
                .unwrap()
                .with_rounding(Rounding::Stochastic { seed });
            sgd.step(&mut t, &grad).unwrap();
            t
        };
        let a = stepped(1);
        assert_eq!(a.as_bytes(), stepped(1).as_bytes(), "same seed, same bits");
        assert_ne!(
            a.as_bytes(),
            stepped(2).as_bytes(),
            "another seed, other bits"
        );
        // Every value is one of the two neighbours of the exact f32 result.
        let before: Vec<f32> = start.lookup(&(0..rows).collect::<Vec<_>>()).unwrap();
        let after: Vec<f32> = a.lookup(&(0..rows).collect::<Vec<_>>()).unwrap();
        for (k, &r) in grad.rows().iter().enumerate() {
            for j in 0..dim {
                let exact = before[r * dim + j] - 1e-3 * grad.row(k)[j];
                let got = after[r * dim + j];
                let ulp = match dtype {
                    DType::F16 => (f16::from_f32(exact).to_f32() - exact)
                        .abs()
                        .max(f16::EPSILON.to_f32() * exact.abs()),
                    _ => (bf16::from_f32(exact).to_f32() - exact)
                        .abs()
                        .max(bf16::EPSILON.to_f32() * exact.abs()),
                };
                assert!(
                    (got - exact).abs() <= ulp * 1.01 + 1e-7,
                    "{dtype}: {got} vs {exact}"
                );
            }
        }
    }
}

#[test]
fn optimizers_refuse_read_only_tables_and_wrong_shapes() {
    let mut rng = Rng::new(44);
    let grad = grad_for(8, 4, &mut rng);
    let data = vec![0.0f32; 32];
    let mut borrowed = Table::borrowed(&data, 8, 4).unwrap();
    assert!(matches!(
        Sgd::new(0.1).unwrap().step(&mut borrowed, &grad),
        Err(Error::ReadOnlyTable)
    ));
    let mut adagrad = RowwiseAdagrad::new(8, 0.1, 1e-8).unwrap();
    assert!(matches!(
        adagrad.step(&mut borrowed, &grad),
        Err(Error::ReadOnlyTable)
    ));
    // A read-only file map.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    Table::zeros(8, 4, DType::F32).unwrap().save(&path).unwrap();
    let mut mapped = Table::open(&path, None).unwrap();
    assert!(matches!(
        Sgd::new(0.1).unwrap().step(&mut mapped, &grad),
        Err(Error::ReadOnlyTable)
    ));
    // Shapes.
    let mut other = Table::zeros(9, 4, DType::F32).unwrap();
    assert_eq!(
        Sgd::new(0.1)
            .unwrap()
            .step(&mut other, &grad)
            .unwrap_err()
            .kind(),
        "shape_mismatch"
    );
    let mut table = Table::zeros(8, 4, DType::F32).unwrap();
    let mut small = RowwiseAdagrad::new(7, 0.1, 1e-8).unwrap();
    assert_eq!(
        small.step(&mut table, &grad).unwrap_err().kind(),
        "shape_mismatch"
    );
    assert_eq!(
        table.as_slice::<f32>().unwrap(),
        &[0.0; 32][..],
        "nothing written"
    );
    // Arguments.
    assert!(Sgd::new(f32::NAN).is_err());
    assert!(RowwiseAdagrad::new(8, 0.1, 0.0).is_err());
    assert!(RowwiseAdagrad::with_initial_accumulator(8, 0.1, 1e-8, -1.0).is_err());
}

#[test]
fn optimizer_steps_reach_a_writable_file_map() {
    let mut rng = Rng::new(45);
    let (rows, dim) = (64, 8);
    let grad = grad_for(rows, dim, &mut rng);
    for (dtype, ext) in [
        (DType::F32, "safetensors"),
        (DType::F16, "npy"),
        (DType::BF16, "safetensors"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("t.{ext}"));
        let mut owned = Table::randn(rows, dim, dtype, 8).unwrap();
        owned.save(&path).unwrap();
        let mut mapped = Table::open_with(
            &path,
            &OpenOptions {
                tensor: None,
                mode: OpenMode::MapWritable,
                ..Default::default()
            },
        )
        .unwrap();
        let mut a = RowwiseAdagrad::new(rows, 0.1, 1e-8).unwrap();
        let mut b = RowwiseAdagrad::new(rows, 0.1, 1e-8).unwrap();
        a.step(&mut owned, &grad).unwrap();
        b.step(&mut mapped, &grad).unwrap();
        mapped.flush().unwrap();
        drop(mapped);
        let reopened = Table::open_with(
            &path,
            &OpenOptions {
                tensor: None,
                mode: OpenMode::Copy,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(reopened.as_bytes(), owned.as_bytes(), "{dtype}");
    }
}

// ----------------------------------------------------------------------------------------------
// PyTorch's own gradients

#[test]
fn pytorch_gradient_cases_pass() {
    use embedding_lookup::conformance::{case_files, run_case, Case, Outcome};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch");
    let mut seen = 0;
    for file in case_files(&dir).unwrap() {
        let case = Case::load(&file).unwrap();
        if case.meta("op").as_deref() != Some("embedding_backward") {
            continue;
        }
        seen += 1;
        let report = run_case(&case);
        assert_eq!(report.outcome, Outcome::Passed, "{}", case.name);
        let produced: Vec<&str> = report.produced.iter().map(|(n, _)| n.as_str()).collect();
        if case.meta_bool("sparse").unwrap() {
            assert_eq!(
                produced,
                ["grad_weight", "grad_indices", "grad_values"],
                "{}",
                case.name
            );
        } else {
            assert_eq!(produced, ["grad_weight"], "{}", case.name);
        }
    }
    assert_eq!(
        seen, 6,
        "dense with/without padding and scaling, sparse with/without padding"
    );
}

#[test]
fn coalesced_gradient_of_a_huge_table_matches_the_reference() {
    // Rows far beyond the lookups: the coalesced form sorts (row, position) keys by radix
    // instead of counting per row. Reference: per-row sums in position order.
    let mut rng = Rng::new(51);
    let (n, rows, dim) = (30_000usize, 1usize << 26, 5usize);
    let idx: Vec<i64> = (0..n)
        .map(|_| {
            // Many repeats among a few hot rows, the rest spread over the table.
            if rng.below(3) == 0 {
                (rng.below(50) * 1_000_003) as i64
            } else {
                rng.below(rows as u64) as i64
            }
        })
        .collect();
    let go = randn(n * dim, &mut rng);
    for freq in [false, true] {
        let mut want: std::collections::BTreeMap<i64, (usize, Vec<f32>)> = Default::default();
        for &i in &idx {
            want.entry(i).or_insert((0, vec![0.0; dim])).0 += 1;
        }
        for (p, &i) in idx.iter().enumerate() {
            let (count, acc) = want.get_mut(&i).unwrap();
            let s = if freq {
                (1.0 / *count as f64) as f32
            } else {
                1.0
            };
            for j in 0..dim {
                acc[j] = s.mul_add(go[p * dim + j], acc[j]);
            }
        }
        let bw = EmbeddingBackward::new(&idx).scale_grad_by_freq(freq);
        let run = || bw.coalesced(&go, rows, dim).unwrap();
        let got = in_pool(1, run);
        assert_eq!(
            got.rows(),
            want.keys().map(|&r| r as usize).collect::<Vec<_>>()
        );
        let want_values: Vec<f32> = want.values().flat_map(|(_, v)| v.clone()).collect();
        assert_bits(got.values(), &want_values, &format!("freq {freq}"));
        for threads in [2, 8] {
            assert_eq!(in_pool(threads, run), got, "{threads} threads");
        }
        if !freq {
            // The uncoalesced pairs coalesce to the same thing.
            assert_eq!(bw.sparse(&go, rows, dim).unwrap().coalesce(), got);
        }
    }
    // Hand-made pairs are checked, then coalesce the same way.
    use embedding_lookup::SparseGrad;
    assert!(SparseGrad::new(4, 2, vec![0, 4], vec![0.0; 4]).is_err());
    assert!(SparseGrad::new(4, 2, vec![0, 3], vec![0.0; 3]).is_err());
    let sp = SparseGrad::new(4, 1, vec![3, 0, 3], vec![1.0, 2.0, 4.0]).unwrap();
    let co = sp.coalesce();
    assert_eq!(
        (co.rows(), co.values()),
        (&[0usize, 3][..], &[2.0f32, 5.0][..])
    );
}

#[test]
fn into_variants_reuse_buffers_and_match_fresh_results() {
    let mut rng = Rng::new(61);
    let mut co = CoalescedGrad::empty();
    let mut sp = embedding_lookup::SparseGrad::empty();
    // Shapes shrink and grow between calls: leftovers must never show.
    for (n, rows, dim) in [(500usize, 40usize, 9usize), (20, 7, 3), (900, 100, 16)] {
        let idx = indices(n, rows, &mut rng);
        let go = randn(n * dim, &mut rng);
        let bw = EmbeddingBackward::new(&idx).padding_idx(Some(1));
        bw.coalesced_into(&go, rows, dim, &mut co).unwrap();
        assert_eq!(co, bw.coalesced(&go, rows, dim).unwrap());
        bw.sparse_into(&go, rows, dim, &mut sp).unwrap();
        assert_eq!(sp, bw.sparse(&go, rows, dim).unwrap());
        let offsets: Vec<i64> = (0..n / 4).map(|b| (b * 4) as i64).collect();
        let layout = Bags::Offsets {
            offsets: &offsets,
            include_last_offset: false,
        };
        let bag_go = randn(offsets.len() * dim, &mut rng);
        let bag = EmbeddingBagBackward::new(&idx, layout, BagMode::Mean);
        bag.coalesced_into(&bag_go, rows, dim, &mut co).unwrap();
        assert_eq!(co, bag.coalesced(&bag_go, rows, dim).unwrap());
    }
    // On error the buffers keep what they held.
    let before = (co.clone(), sp.clone());
    let bad = [0i64, 999];
    assert!(EmbeddingBackward::new(&bad)
        .coalesced_into(&[0.0; 32], 100, 16, &mut co)
        .is_err());
    assert!(EmbeddingBackward::new(&bad)
        .sparse_into(&[0.0; 32], 100, 16, &mut sp)
        .is_err());
    assert_eq!((co, sp), before);
}

#[test]
fn bag_gradient_is_the_adjoint_of_the_bag_forward() {
    // Sum and mean bags are linear in the table: out = A·W. The backward must be Aᵀ, so for
    // any table W and upstream gradient G: <G, bag(W)> = <backward(G), W>. This ties the
    // backward to the library's own forward (padding, weights, CSR offsets included).
    use embedding_lookup::BagOptions;
    let mut rng = Rng::new(71);
    let (rows, dim) = (40usize, 7usize);
    for include_last in [false, true] {
        let c = bag_case(300, 25, rows, include_last, &mut rng);
        let bags = Bags::Offsets {
            offsets: &c.offsets[..],
            include_last_offset: include_last,
        };
        let nbags = c.offsets.len() - usize::from(include_last);
        let table = Table::randn(rows, dim, DType::F32, 72)
            .unwrap()
            .with_padding_idx(3)
            .unwrap();
        let w = table.as_slice::<f32>().unwrap();
        let g = randn(nbags * dim, &mut rng);
        let psw = randn(c.idx.len(), &mut rng);
        for (mode, weights) in [
            (BagMode::Sum, None),
            (BagMode::Sum, Some(&psw[..])),
            (BagMode::Mean, None),
        ] {
            let options = BagOptions {
                per_sample_weights: weights,
                ..BagOptions::mode(mode)
            };
            let out: Vec<f32> = table.bag(&c.idx, bags, &options).unwrap();
            let grad = EmbeddingBagBackward::new(&c.idx, bags, mode)
                .per_sample_weights(weights)
                .padding_idx(Some(3))
                .dense(&g, rows, dim)
                .unwrap();
            let dot = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| *x as f64 * *y as f64)
                    .sum::<f64>()
            };
            let scale = g.iter().map(|v| v.abs() as f64).sum::<f64>() * 10.0;
            let (lhs, rhs) = (dot(&g, &out), dot(&grad, w));
            assert!(
                (lhs - rhs).abs() <= 1e-5 * scale,
                "{mode} weights {} last {include_last}: {lhs} vs {rhs}",
                weights.is_some()
            );
        }
    }
}
