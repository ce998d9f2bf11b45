//! The lookup API: index types, dtypes, errors, padding_idx, threads, the one-hot identity.

use embedding_lookup::util::Rng;
use embedding_lookup::{DType, Element, Error, Index, Table};
use half::{bf16, f16};

/// The plain definition: out[i] = table[indices[i]], widened or copied element by element.
fn naive<I: Index, O: Element>(table: &Table<'_>, indices: &[I]) -> Vec<O> {
    let dim = table.dim();
    let mut out = Vec::with_capacity(indices.len() * dim);
    for &i in indices {
        let r = i.as_i128() as usize;
        match table.dtype() {
            DType::F32 => out.extend(row::<f32>(table, r, dim).map(O::from_f32)),
            DType::F16 if O::DTYPE == DType::F16 => out.extend(bytemuck::cast_slice::<f16, O>(
                table.row::<f16>(r).unwrap().unwrap(),
            )),
            DType::BF16 if O::DTYPE == DType::BF16 => out.extend(bytemuck::cast_slice::<bf16, O>(
                table.row::<bf16>(r).unwrap().unwrap(),
            )),
            DType::F16 => out.extend(row::<f16>(table, r, dim).map(O::from_f32)),
            DType::BF16 => out.extend(row::<bf16>(table, r, dim).map(O::from_f32)),
        }
    }
    out
}

fn row<'t, T: Element>(
    table: &'t Table<'_>,
    r: usize,
    _dim: usize,
) -> impl Iterator<Item = f32> + 't {
    table
        .row::<T>(r)
        .unwrap()
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
}

fn random_indices(n: usize, rows: usize, seed: u64) -> Vec<i64> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(rows as u64) as i64).collect()
}

fn check_all_index_types<O: Element + PartialEq + std::fmt::Debug>(table: &Table<'_>, idx: &[i64]) {
    let want: Vec<O> = naive(table, idx);
    let as_i32: Vec<i32> = idx.iter().map(|&i| i as i32).collect();
    let as_u32: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let as_u64: Vec<u64> = idx.iter().map(|&i| i as u64).collect();
    let as_usize: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
    let bits = |v: Vec<O>| -> Vec<u8> { bytemuck::cast_slice(&v).to_vec() };
    let want = bits(want);
    assert_eq!(bits(table.lookup::<_, O>(idx).unwrap()), want);
    assert_eq!(bits(table.lookup::<_, O>(&as_i32).unwrap()), want);
    assert_eq!(bits(table.lookup::<_, O>(&as_u32).unwrap()), want);
    assert_eq!(bits(table.lookup::<_, O>(&as_u64).unwrap()), want);
    assert_eq!(bits(table.lookup::<_, O>(&as_usize).unwrap()), want);
}

#[test]
fn every_dtype_index_type_and_width() {
    for dim in [0, 1, 3, 8, 15, 16, 17, 31, 32, 33, 64, 65, 100, 257] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let table = Table::randn(37, dim, dtype, dim as u64).unwrap();
            for n in [0, 1, 2, 17, 300, 1000] {
                let idx = random_indices(n, 37, n as u64);
                check_all_index_types::<f32>(&table, &idx);
                match dtype {
                    DType::F32 => {}
                    DType::F16 => check_all_index_types::<f16>(&table, &idx),
                    DType::BF16 => check_all_index_types::<bf16>(&table, &idx),
                }
            }
        }
    }
}

#[test]
fn out_of_range_index_names_index_position_rows_and_leaves_output_untouched() {
    let table = Table::randn(10, 4, DType::F32, 1).unwrap();
    let mut out = vec![7.0f32; 3 * 4];
    let err = table.lookup_into(&[1i64, 10, -1], &mut out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "index 10 at position 1 is out of range for a table of 10 rows"
    );
    assert_eq!(err.kind(), "index_out_of_range");
    assert!(out.iter().all(|&v| v == 7.0), "output was written");
    let err = table.lookup_into(&[1i32, 2, -1], &mut out).unwrap_err();
    assert!(matches!(
        err,
        Error::IndexOutOfRange {
            index: -1,
            position: 2,
            rows: 10
        }
    ));
    assert!(out.iter().all(|&v| v == 7.0));
}

#[test]
fn refuses_wrong_output_length_and_dtype() {
    let table = Table::randn(10, 4, DType::F16, 1).unwrap();
    let mut short = vec![0.0f32; 7];
    assert!(matches!(
        table.lookup_into(&[1i64, 2], &mut short),
        Err(Error::OutputLength {
            expected: 8,
            actual: 7
        })
    ));
    let mut wrong = vec![bf16::ZERO; 8];
    assert!(matches!(
        table.lookup_into(&[1i64, 2], &mut wrong),
        Err(Error::DTypeMismatch { .. })
    ));
    let f32_table = Table::randn(10, 4, DType::F32, 1).unwrap();
    let mut narrow = vec![f16::ZERO; 8];
    assert!(f32_table.lookup_into(&[1i64, 2], &mut narrow).is_err());
}

#[test]
fn padding_idx_follows_pytorch() {
    // A fresh table zeroes the padding row, as nn.Embedding(padding_idx=p) does.
    let table = Table::new_embedding(10, 5, DType::F32, Some(-2), 3).unwrap();
    assert_eq!(table.padding_idx(), Some(8));
    assert!(table
        .row::<f32>(8)
        .unwrap()
        .unwrap()
        .iter()
        .all(|&v| v == 0.0));
    assert!(table
        .row::<f32>(7)
        .unwrap()
        .unwrap()
        .iter()
        .any(|&v| v != 0.0));
    // Forward returns the stored row, even when it is not zero.
    let data: Vec<f32> = (0..20).map(|v| v as f32).collect();
    let t = Table::borrowed(&data, 4, 5)
        .unwrap()
        .with_padding_idx(0)
        .unwrap();
    let out: Vec<f32> = t.lookup(&[0i64]).unwrap();
    assert_eq!(out, [0.0, 1.0, 2.0, 3.0, 4.0]);
    let t = Table::borrowed(&data, 4, 5)
        .unwrap()
        .with_padding_idx(-1)
        .unwrap();
    assert_eq!(t.lookup::<_, f32>(&[3i64]).unwrap(), &data[15..]);
    for bad in [4, -5, i64::MAX, i64::MIN] {
        let e = Table::borrowed(&data, 4, 5)
            .unwrap()
            .with_padding_idx(bad)
            .unwrap_err();
        assert_eq!(e.kind(), "padding_idx_out_of_range");
        assert!(e.to_string().contains(&bad.to_string()));
    }
    assert!(Table::new_embedding(4, 5, DType::F32, Some(4), 0).is_err());
}

/// lookup(indices) == one_hot(indices) @ table, computed as a real matrix product.
#[test]
fn equals_one_hot_matmul() {
    let mut rng = Rng::new(9);
    for (rows, dim, n) in [(1, 1, 1), (7, 3, 8), (20, 17, 33), (50, 64, 100)] {
        let table = Table::randn(rows, dim, DType::F32, rng.next_u64()).unwrap();
        let w = table.as_slice::<f32>().unwrap();
        let idx = random_indices(n, rows, rng.next_u64());
        let mut one_hot = vec![0.0f32; n * rows];
        for (i, &r) in idx.iter().enumerate() {
            one_hot[i * rows + r as usize] = 1.0;
        }
        let mut product = vec![0.0f32; n * dim];
        for i in 0..n {
            for k in 0..rows {
                for j in 0..dim {
                    product[i * dim + j] += one_hot[i * rows + k] * w[k * dim + j];
                }
            }
        }
        let out: Vec<f32> = table.lookup(&idx).unwrap();
        assert_eq!(out, product, "{rows} × {dim}, {n} indices");
    }
}

/// Large batches run in parallel; the result is the same whatever the thread count, and
/// calling from inside the caller's own pool works.
#[test]
fn identical_across_thread_counts() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let table = Table::randn(5000, 64, dtype, 4).unwrap();
        let idx = random_indices(200_000, 5000, 5);
        let want: Vec<f32> = naive(&table, &idx);
        for threads in [1, 2, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got: Vec<f32> = pool.install(|| table.lookup(&idx)).unwrap();
            assert!(got == want, "{dtype} with {threads} threads");
            // Nested: a lookup from inside a task of the caller's pool.
            let nested: Vec<Vec<f32>> = pool.install(|| {
                use rayon::prelude::*;
                (0..4)
                    .into_par_iter()
                    .map(|_| table.lookup(&idx).unwrap())
                    .collect()
            });
            assert!(nested.iter().all(|g| *g == want));
        }
    }
}

#[test]
fn conversion_rounds_to_nearest_even() {
    let vals: Vec<f32> = vec![
        1.0,
        1.0 + f32::EPSILON,
        65504.0,
        70000.0,
        1e-8,
        -1.23457,
        0.1,
    ];
    let t = Table::from_slice(&vals, 7, 1).unwrap();
    let h = t.to_dtype(DType::F16).unwrap();
    let b = t.to_dtype(DType::BF16).unwrap();
    for (i, &v) in vals.iter().enumerate() {
        assert_eq!(h.as_slice::<f16>().unwrap()[i], f16::from_f32(v));
        assert_eq!(b.as_slice::<bf16>().unwrap()[i], bf16::from_f32(v));
    }
    // Widening back is exact.
    let back = h.to_dtype(DType::F32).unwrap();
    for (i, v) in back.as_slice::<f32>().unwrap().iter().enumerate() {
        assert_eq!(*v, f16::from_f32(vals[i]).to_f32());
    }
}

#[test]
fn borrowed_tables_check_their_shape() {
    let data = vec![0.0f32; 12];
    assert!(Table::borrowed(&data, 3, 4).is_ok());
    let e = Table::borrowed(&data, 5, 4).unwrap_err();
    assert!(e
        .to_string()
        .contains("12 elements cannot form a 5 × 4 table"));
    let mut m = data.clone();
    let mut t = Table::borrowed_mut(&mut m, 4, 3).unwrap();
    t.as_mut_slice::<f32>().unwrap()[0] = 1.0;
    let ro = Table::borrowed(&data, 3, 4).unwrap();
    assert!(ro.storage_kind() == embedding_lookup::StorageKind::Borrowed);
}
