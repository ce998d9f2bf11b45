//! Robustness: hostile arguments and files, files changed under a table, and many threads
//! sharing one table. Every failure must be an `Error` naming what is wrong, never a panic.

use embedding_lookup::{Error, Table};
use half::{bf16, f16};

// ---------------------------------------------------------------------------------------------
// Hostile arguments

#[test]
fn empty_rowed_slices_cannot_claim_more_rows_than_an_isize() {
    // Regression: `borrowed(&[], usize::MAX, 0)` made a table whose negative indices passed
    // validation (wrapped below the row count).
    for rows in [usize::MAX, isize::MAX as usize + 1] {
        let e = Table::borrowed::<f32>(&[], rows, 0).unwrap_err();
        assert_eq!(e.kind(), "shape_mismatch", "{e}");
        assert!(e.to_string().contains(&rows.to_string()), "{e}");
        assert!(Table::borrowed_mut::<f16>(&mut [], rows, 0).is_err());
        assert!(Table::from_slice::<bf16>(&[], rows, 0).is_err());
    }
    let t = Table::borrowed::<f32>(&[], isize::MAX as usize, 0).unwrap();
    match t.lookup::<i64, f32>(&[0, -2]) {
        Err(Error::IndexOutOfRange {
            index: -2,
            position: 1,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn row_past_the_end_is_none_for_any_row_number() {
    // Regression: `row(usize::MAX)` overflowed `(row + 1) * dim` (a panic in debug builds).
    let t = Table::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2).unwrap();
    for r in [3, 4, usize::MAX / 2 + 1, usize::MAX - 1, usize::MAX] {
        assert_eq!(t.row::<f32>(r).unwrap(), None, "row {r}");
    }
    assert_eq!(t.row::<f32>(2).unwrap(), Some(&[5.0f32, 6.0][..]));
    let empty = Table::borrowed::<f32>(&[], 1 << 40, 0).unwrap();
    assert_eq!(empty.row::<f32>(usize::MAX).unwrap(), None);
    assert_eq!(empty.row::<f32>((1 << 40) - 1).unwrap(), Some(&[][..]));
}
