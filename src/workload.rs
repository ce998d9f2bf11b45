//! Benchmark workloads, shared by `emb bench` and the criterion suite: tables of random
//! values built fast, uniform and Zipf-distributed indices, and the baselines every figure is
//! quoted against (a memcpy of the same thread count, a naive gather loop).

use rayon::prelude::*;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::table::Table;
use crate::util::Rng;

/// A table of `rows × dim` values uniform in `[-1, 1)`, filled in parallel (much faster than
/// [`Table::randn`] for gigabyte tables; the values do not matter for speed).
pub fn random_table(rows: usize, dim: usize, dtype: DType, seed: u64) -> Result<Table<'static>> {
    let mut t = Table::zeros(rows, dim, dtype)?;
    let bytes = t.bytes_mut()?;
    const CHUNK: usize = 1 << 20;
    bytes
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = Rng::new(seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            match dtype {
                DType::F32 => chunk.chunks_exact_mut(4).for_each(|e| {
                    e.copy_from_slice(&unit(&mut rng).to_le_bytes());
                }),
                DType::F16 => chunk.chunks_exact_mut(2).for_each(|e| {
                    e.copy_from_slice(&half::f16::from_f32(unit(&mut rng)).to_le_bytes());
                }),
                DType::BF16 => chunk.chunks_exact_mut(2).for_each(|e| {
                    e.copy_from_slice(&half::bf16::from_f32(unit(&mut rng)).to_le_bytes());
                }),
            }
        });
    Ok(t)
}

fn unit(rng: &mut Rng) -> f32 {
    (rng.next_u64() >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0
}

/// How indices are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distribution {
    /// Every row equally likely.
    Uniform,
    /// Zipf with exponent `s`: the k-th most popular row has weight `1 / k^s`. Popular rows are
    /// scattered over the table, not clustered at its start.
    Zipf(f64),
}

impl std::str::FromStr for Distribution {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "uniform" {
            return Ok(Distribution::Uniform);
        }
        if let Some(e) = s.strip_prefix("zipf:") {
            if let Ok(v) = e.parse::<f64>() {
                if v > 0.0 && v.is_finite() {
                    return Ok(Distribution::Zipf(v));
                }
            }
        }
        Err(Error::InvalidArgument(format!(
            "unknown distribution {s:?} (expected uniform or zipf:S with S > 0)"
        )))
    }
}

/// `n` indices into `rows` rows drawn from `dist`, as i64 (PyTorch's index type).
pub fn indices(n: usize, rows: usize, dist: Distribution, seed: u64) -> Vec<i64> {
    let mut rng = Rng::new(seed);
    match dist {
        Distribution::Uniform => (0..n).map(|_| rng.below(rows as u64) as i64).collect(),
        Distribution::Zipf(s) => {
            // Inverse-CDF sampling over the cumulative weights of the ranks.
            let mut cdf = Vec::with_capacity(rows);
            let mut acc = 0.0f64;
            for k in 1..=rows {
                acc += (k as f64).powf(-s);
                cdf.push(acc);
            }
            (0..n)
                .map(|_| {
                    let u = rng.uniform() * acc;
                    let rank = cdf.partition_point(|&c| c < u).min(rows - 1);
                    // Scatter ranks over the table so hot rows are not neighbours.
                    ((rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % rows as u64) as i64
                })
                .collect()
        }
    }
}

/// Copy `src` to `dst` split evenly over rayon's current threads: the bandwidth baseline.
pub fn parallel_memcpy(src: &[u8], dst: &mut [u8]) {
    memcpy_in_tasks(src, dst, rayon::current_num_threads());
}

/// Copy `src` to `dst` in `tasks` even pieces, the first on the calling thread: 1 copies on
/// this thread alone, without asking rayon anything.
pub fn memcpy_in_tasks(src: &[u8], dst: &mut [u8], tasks: usize) {
    if tasks <= 1 {
        dst.copy_from_slice(src);
        return;
    }
    let chunk = src.len().div_ceil(tasks).max(1);
    dst.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Into how many tasks the engine splits a job of `items` rows, each moving `bytes_per_item`
/// (read + written): 1 where it stays on the calling thread. A baseline split the same way
/// runs on the threads the engine runs on, no more and no fewer.
pub fn engine_task_count(items: usize, bytes_per_item: usize) -> usize {
    crate::parallel::task_count(items, bytes_per_item)
}

/// The naive gather a user would write: `copy_from_slice` per row, no prefetch, split over
/// rayon's threads into as many tasks as the engine would split the lookup into (on the
/// calling thread alone where the engine stays there). Indices must be valid.
pub fn naive_lookup(table: &[f32], dim: usize, indices: &[i64], out: &mut [f32]) {
    if dim == 0 || indices.is_empty() {
        return;
    }
    let gather = |out: &mut [f32], idx: &[i64]| {
        for (o, &i) in out.chunks_exact_mut(dim).zip(idx) {
            let r = i as usize;
            o.copy_from_slice(&table[r * dim..(r + 1) * dim]);
        }
    };
    let tasks = engine_task_count(indices.len(), 2 * dim * 4);
    if tasks <= 1 {
        return gather(out, indices);
    }
    let rows_per_task = indices.len().div_ceil(tasks);
    out.par_chunks_mut(rows_per_task * dim)
        .zip(indices.par_chunks(rows_per_task))
        .for_each(|(out, idx)| gather(out, idx));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_in_range_and_zipf_is_skewed() {
        let u = indices(10_000, 1000, Distribution::Uniform, 1);
        assert!(u.iter().all(|&i| (0..1000).contains(&i)));
        let z = indices(10_000, 1000, Distribution::Zipf(1.1), 1);
        assert!(z.iter().all(|&i| (0..1000).contains(&i)));
        let mut counts = vec![0usize; 1000];
        z.iter().for_each(|&i| counts[i as usize] += 1);
        counts.sort_unstable();
        // The most popular row of a Zipf(1.1) over 1000 ranks takes about 1/7 of the draws.
        assert!(counts[999] > 1000, "top count {}", counts[999]);
        assert!("zipf:0".parse::<Distribution>().is_err());
        assert_eq!(
            "zipf:1.5".parse::<Distribution>().unwrap(),
            Distribution::Zipf(1.5)
        );
    }

    #[test]
    fn naive_lookup_and_random_table_agree_with_the_engine() {
        let t = random_table(300, 17, DType::F32, 3).unwrap();
        let idx = indices(5000, 300, Distribution::Uniform, 4);
        let mut naive = vec![0.0f32; 5000 * 17];
        naive_lookup(t.as_slice().unwrap(), 17, &idx, &mut naive);
        let fast: Vec<f32> = t.lookup(&idx).unwrap();
        assert_eq!(naive, fast);
        assert!(naive.iter().all(|v| (-1.0..1.0).contains(v)));
        let mut dst = vec![0u8; 12345];
        let src: Vec<u8> = (0..12345).map(|i| i as u8).collect();
        parallel_memcpy(&src, &mut dst);
        assert_eq!(src, dst);
    }
}
