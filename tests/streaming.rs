//! Streaming (non-temporal) stores: large outputs written past the cache give the same bits as
//! ordinary stores, and the streaming path really runs where the kernels have one.
//!
//! These tests set the process-wide streaming threshold and read a process-wide count of
//! streamed outputs, so they live in a binary of their own and take turns on one lock: no other
//! lookup runs between two readings of the count.

use std::sync::{Mutex, MutexGuard};

use embedding_lookup::kernels::{
    set_streaming_threshold, streamed_outputs, DEFAULT_STREAMING_THRESHOLD,
};
use embedding_lookup::{DType, MaxNorm, Table};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn alone() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` with every output streamed that the kernels can stream (threshold 0); returns
/// its result and how many kernel runs streamed meanwhile.
fn streaming_all<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = streamed_outputs();
    set_streaming_threshold(0);
    let result = f();
    set_streaming_threshold(DEFAULT_STREAMING_THRESHOLD);
    (result, streamed_outputs() - before)
}

fn random_indices(n: usize, rows: usize, seed: u64) -> Vec<i64> {
    let mut rng = embedding_lookup::util::Rng::new(seed);
    (0..n).map(|_| rng.below(rows as u64) as i64).collect()
}

/// The plain definition: out[i] = table[indices[i]], widened element by element.
fn naive(table: &Table<'_>, indices: &[i64]) -> Vec<f32> {
    let f32_table = table.to_dtype(DType::F32).unwrap();
    let rows = f32_table.as_slice::<f32>().unwrap();
    let dim = table.dim();
    indices
        .iter()
        .flat_map(|&i| rows[i as usize * dim..][..dim].iter().copied())
        .collect()
}

/// Which kernel levels stream a lookup's output, by the output's offset in its cache line:
/// AVX-512 and AVX2 stream a line-aligned output; AVX-512 also one 16, 32 or 48 bytes in
/// (rows joined into whole lines in registers). The others have no streaming stores.
fn lookup_streams(kernel: &str, offset_in_line: usize) -> bool {
    match kernel {
        "avx512" => offset_in_line.is_multiple_of(16),
        "avx2+f16c" => offset_in_line == 0,
        _ => false,
    }
}

/// Streaming stores give the same bits as ordinary stores, write nothing outside the output,
/// and run where the kernel level has them (and only there).
#[test]
fn streamed_lookups_match_and_really_stream() {
    let _alone = alone();
    let kernel = embedding_lookup::kernel_name();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let table = Table::randn(1000, 64, dtype, 8).unwrap();
        let idx = random_indices(5000, 1000, 9);
        let want = naive(&table, &idx);
        // An owned table is a 64-byte aligned buffer; the output starts 0, 16, 32, 48 or 4
        // bytes into it (aligned, joined into lines in registers, or not streamable).
        let mut buf = Table::zeros(5001, 64, DType::F32).unwrap();
        for skew in [0, 4, 8, 12, 1] {
            let out = &mut buf.as_mut_slice::<f32>().unwrap()[skew..skew + 5000 * 64];
            out.fill(f32::NAN);
            let (done, streamed) = streaming_all(|| table.lookup_into(&idx, out));
            done.unwrap();
            assert!(out == want.as_slice(), "{dtype}, skew {skew}");
            assert_eq!(
                streamed > 0,
                lookup_streams(kernel, skew * 4),
                "{kernel}, {dtype}, output {} bytes into a line: {streamed} streamed runs",
                skew * 4
            );
            let all = buf.as_slice::<f32>().unwrap();
            assert!(
                all[..skew].iter().all(|&x| x == 0.0),
                "written before the output"
            );
            assert!(
                all[skew + 5000 * 64..].iter().all(|&x| x == 0.0),
                "written after it"
            );
            buf.as_mut_slice::<f32>().unwrap().fill(0.0);
        }
    }
}

/// Renorm lookups give the same bits with streaming stores for the output as with ordinary
/// ones: widths with AVX-512's register-resident 2-norm rows (64, 128) and without (80),
/// output only and in place. Both stream their output on AVX-512, the only renorm kernel with
/// streaming stores, at the register-resident widths; 80 goes through the generic row loop,
/// which stores ordinarily. (In place computes the output as output-only does, then rescales
/// the table's rows.)
#[test]
fn streamed_renorm_output_matches_ordinary_stores_and_really_streams() {
    let _alone = alone();
    let kernel = embedding_lookup::kernel_name();
    let m = MaxNorm::new(1.0).unwrap();
    for dim in [64, 80, 128] {
        let table = Table::randn(1000, dim, DType::F32, 21).unwrap();
        let idx = random_indices(3000, 1000, 22);
        let n = idx.len() * dim;
        // Owned tables are 64-byte aligned buffers; the outputs start `skew` elements in
        // (0: aligned; 4: 16 bytes in, where the system allocator puts a large Vec).
        let run = |threshold: usize, skew: usize| {
            let mut out = Table::zeros(idx.len() + 1, dim, DType::F32).unwrap();
            let mut in_place_out = Table::zeros(idx.len() + 1, dim, DType::F32).unwrap();
            let mut t = table.to_dtype(DType::F32).unwrap();
            let before = streamed_outputs();
            set_streaming_threshold(threshold);
            let done = table.lookup_renorm_output_only(
                &idx,
                &mut out.as_mut_slice::<f32>().unwrap()[skew..skew + n],
                m,
            );
            let output_only_streamed = streamed_outputs() - before;
            let done = done.and_then(|()| {
                t.lookup_renorm_in_place(
                    &idx,
                    &mut in_place_out.as_mut_slice::<f32>().unwrap()[skew..skew + n],
                    m,
                )
            });
            let in_place_streamed = streamed_outputs() - before - output_only_streamed;
            set_streaming_threshold(DEFAULT_STREAMING_THRESHOLD);
            done.unwrap();
            let (start, end) = (skew * 4, skew * 4 + n * 4);
            let outside_is_zero = |b: &[u8]| b[..start].iter().chain(&b[end..]).all(|&x| x == 0);
            assert!(
                outside_is_zero(out.as_bytes()),
                "dim {dim}: written outside"
            );
            assert!(
                outside_is_zero(in_place_out.as_bytes()),
                "dim {dim}: written outside"
            );
            (
                (
                    out.as_bytes()[start..end].to_vec(),
                    in_place_out.as_bytes()[start..end].to_vec(),
                    t.as_bytes().to_vec(),
                ),
                (output_only_streamed, in_place_streamed),
            )
        };
        let (streamed, streamed_runs) = run(0, 0);
        let (ordinary, ordinary_runs) = run(usize::MAX, 0);
        let (skewed, skewed_runs) = run(0, 4);
        assert!(streamed == ordinary, "dim {dim}");
        assert!(skewed == ordinary, "dim {dim}, output 16 bytes in");
        assert_eq!(
            ordinary_runs,
            (0, 0),
            "dim {dim}: streamed below the threshold"
        );
        let streams = kernel == "avx512" && dim != 80;
        for (runs, what) in [(streamed_runs, "aligned"), (skewed_runs, "16 bytes in")] {
            assert_eq!(
                runs.0 > 0,
                streams,
                "{kernel}, dim {dim}, {what}, output only"
            );
            assert_eq!(runs.1 > 0, streams, "{kernel}, dim {dim}, {what}, in place");
        }
        // The rows were rescaled, so the check covers the scaled stores, not only copies.
        let plain: Vec<f32> = table.lookup(&idx).unwrap();
        assert!(
            streamed.0 != bytemuck::cast_slice::<f32, u8>(&plain),
            "dim {dim}"
        );
    }
}
