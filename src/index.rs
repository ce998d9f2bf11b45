//! Index types, index validation and `padding_idx` normalisation.
//!
//! Every index is checked before any output byte is written: the kernels receive only indices
//! this module has accepted, which is what makes their unchecked row addressing sound.

use crate::error::{Error, Result};

mod sealed {
    pub trait Sealed {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
    impl Sealed for usize {}
}

/// An integer type that can index table rows: `i32`, `i64`, `u32`, `u64` or `usize`.
pub trait Index: sealed::Sealed + Copy + Send + Sync + std::fmt::Debug + 'static {
    /// The value as u64, negative values wrapping to values above `i64::MAX`, so that
    /// `as_wrapped_u64() < rows` is the whole range check for `rows <= i64::MAX` (tables never
    /// exceed `isize::MAX` rows; [`validate`] checks larger counts exactly).
    fn as_wrapped_u64(self) -> u64;
    /// The exact value, for error messages.
    fn as_i128(self) -> i128;
}

macro_rules! impl_index {
    ($($t:ty),*) => {$(
        impl Index for $t {
            #[inline(always)]
            fn as_wrapped_u64(self) -> u64 {
                // Signed types sign-extend first, so -1 becomes u64::MAX, never a valid row.
                self as i128 as u64
            }
            #[inline(always)]
            fn as_i128(self) -> i128 {
                self as i128
            }
        }
    )*};
}
impl_index!(i32, i64, u32, u64, usize);

/// Check that every index is in `0..rows`. On failure the error names the first bad index and
/// its position.
#[inline]
pub fn validate<I: Index>(indices: &[I], rows: usize) -> Result<()> {
    // A few valid indices are checked inline: a small lookup's whole cost is a few
    // nanoseconds, and a feature check with an indirect call would add one.
    if indices.len() <= 64 && rows as u64 <= i64::MAX as u64 && all_below(indices, rows as u64) {
        return Ok(());
    }
    validate_any(indices, rows)
}

/// [`validate`] for any length, with the error search.
fn validate_any<I: Index>(indices: &[I], rows: usize) -> Result<()> {
    if rows as u64 > i64::MAX as u64 {
        // Beyond any table (rows fit an isize), but exact all the same: above i64::MAX a
        // negative index, wrapped, could compare below `rows`.
        let r = rows as i128;
        return match indices.iter().position(|i| !(0..r).contains(&i.as_i128())) {
            Some(position) => Err(Error::IndexOutOfRange {
                index: indices[position].as_i128(),
                position,
                rows,
            }),
            None => Ok(()),
        };
    }
    let rows64 = rows as u64;
    // A branch-free pass over blocks vectorises; the slow search runs only on failure.
    const BLOCK: usize = 256;
    let all_below = all_below_fn::<I>();
    for (block_no, block) in indices.chunks(BLOCK).enumerate() {
        // SAFETY: `all_below_fn` picks a version this CPU can run.
        if !unsafe { all_below(block, rows64) } {
            let (offset, &bad) = block
                .iter()
                .enumerate()
                .find(|(_, &i)| i.as_wrapped_u64() >= rows64)
                .expect("a failing block holds a bad index");
            return Err(Error::IndexOutOfRange {
                index: bad.as_i128(),
                position: block_no * BLOCK + offset,
                rows,
            });
        }
    }
    Ok(())
}

/// Whether every index of `block`, wrapped to u64, is below `rows64`.
#[inline(always)]
fn all_below<I: Index>(block: &[I], rows64: u64) -> bool {
    block
        .iter()
        .fold(true, |ok, &i| ok & (i.as_wrapped_u64() < rows64))
}

/// [`all_below`] compiled for AVX-512, whose unsigned 64-bit compares make it eight indices
/// per instruction (x86_64's baseline has no 64-bit vector compare: one index at a time).
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn all_below_avx512<I: Index>(block: &[I], rows64: u64) -> bool {
    all_below(block, rows64)
}

/// [`all_below`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn all_below_avx2<I: Index>(block: &[I], rows64: u64) -> bool {
    all_below(block, rows64)
}

/// A version of [`all_below`].
type AllBelowFn<I> = unsafe fn(&[I], u64) -> bool;

/// The best version of [`all_below`] this CPU runs (std caches the feature checks).
#[inline]
fn all_below_fn<I: Index>() -> AllBelowFn<I> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return all_below_avx512::<I>;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return all_below_avx2::<I>;
        }
    }
    all_below::<I>
}

/// Normalise a PyTorch `padding_idx`: `-rows <= p < rows`, negative values count from the end.
pub fn normalize_padding_idx(padding_idx: i64, rows: usize) -> Result<usize> {
    let r = rows as i128;
    let p = padding_idx as i128;
    if p >= r || p < -r {
        return Err(Error::PaddingIdxOutOfRange { padding_idx, rows });
    }
    Ok(if p < 0 { (p + r) as usize } else { p as usize })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_in_range_for_every_type() {
        validate(&[0i32, 4], 5).unwrap();
        validate(&[0i64, 4], 5).unwrap();
        validate(&[0u32, 4], 5).unwrap();
        validate(&[0u64, 4], 5).unwrap();
        validate(&[0usize, 4], 5).unwrap();
        validate::<i64>(&[], 0).unwrap();
    }

    #[test]
    fn names_first_bad_index_and_position() {
        let mut idx = vec![1i64; 1000];
        idx[700] = -1;
        idx[900] = 5;
        match validate(&idx, 5) {
            Err(Error::IndexOutOfRange {
                index,
                position,
                rows,
            }) => assert_eq!((index, position, rows), (-1, 700, 5)),
            other => panic!("unexpected {other:?}"),
        }
        let e = validate(&[0u64, u64::MAX], 5).unwrap_err();
        assert_eq!(
            e.to_string(),
            "index 18446744073709551615 at position 1 is out of range for a table of 5 rows"
        );
        assert!(validate(&[i32::MIN], 5).is_err());
        assert!(validate(&[0usize], 0).is_err());
    }

    /// Every compiled version of the range check against the plain one: each index type,
    /// blocks of every length up to 70, one bad index at every position or none.
    #[test]
    fn all_below_versions_agree() {
        fn check<I: Index>(make: impl Fn(u64) -> I, bad: I) {
            let mut versions: Vec<(&str, AllBelowFn<I>)> = vec![("plain", all_below::<I>)];
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    versions.push(("avx2", all_below_avx2::<I>));
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    versions.push(("avx512", all_below_avx512::<I>));
                }
            }
            let mut rng = crate::util::Rng::new(5);
            for len in 0..70 {
                let block: Vec<I> = (0..len).map(|_| make(rng.below(100))).collect();
                for bad_at in (0..len).map(Some).chain([None]) {
                    let mut b = block.clone();
                    if let Some(p) = bad_at {
                        b[p] = bad;
                    }
                    for (name, f) in &versions {
                        // SAFETY: each version was checked to run on this CPU.
                        let ok = unsafe { f(&b, 100) };
                        assert_eq!(ok, bad_at.is_none(), "{name}, len {len}, bad at {bad_at:?}");
                    }
                }
            }
        }
        check(|v| v as i32, -1);
        check(|v| v as i64, 100);
        check(|v| v as u32, u32::MAX);
        check(|v| v, 1 << 40);
        check(|v| v as usize, 100);
    }

    #[test]
    fn negative_indices_fail_whatever_the_row_count() {
        // Regression: with rows above i64::MAX, -2 wrapped to u64::MAX - 1 and passed.
        for rows in [usize::MAX, i64::MAX as usize + 1, i64::MAX as usize] {
            let e = validate(&[0i64, -2], rows).unwrap_err();
            assert_eq!(e.kind(), "index_out_of_range");
            assert!(e.to_string().contains("index -2 at position 1"), "{e}");
            validate(&[0u64, rows as u64 - 1], rows).unwrap();
            assert!(validate(&[rows as u64], rows).is_err());
        }
    }

    #[test]
    fn padding_idx_normalisation() {
        assert_eq!(normalize_padding_idx(-1, 10).unwrap(), 9);
        assert_eq!(normalize_padding_idx(-10, 10).unwrap(), 0);
        assert_eq!(normalize_padding_idx(9, 10).unwrap(), 9);
        assert!(normalize_padding_idx(10, 10).is_err());
        assert!(normalize_padding_idx(-11, 10).is_err());
        assert!(normalize_padding_idx(i64::MIN, 10).is_err());
        assert!(normalize_padding_idx(0, 0).is_err());
    }
}
