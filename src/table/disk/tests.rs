//! Read errors during read-ahead, injected behind the reader trait: every operation returns
//! them as errors naming the file and offset, before touching the page.

use std::fs::File;
use std::io;

use super::reader::{PageError, PageReader};
use crate::table::{OpenMode, OpenOptions, Residency, Table};
use crate::{BagMode, BagOptions, Bags, Error, MaxNorm};

/// Fails every page at or past `FAIL_FROM` with EIO, reads the others for real.
struct FailingReader;

const FAIL_FROM: u64 = 8 * 4096;

impl PageReader for FailingReader {
    fn read_pages(&mut self, file: &File, offsets: &[u64]) -> Result<(), PageError> {
        use std::os::unix::fs::FileExt;
        let mut byte = [0u8];
        for &o in offsets {
            if o >= FAIL_FROM {
                return Err((o, io::Error::from_raw_os_error(libc::EIO)));
            }
            file.read_at(&mut byte, o).map_err(|e| (o, e))?;
        }
        Ok(())
    }
    fn name(&self) -> &'static str {
        "failing"
    }
}

fn failing() -> Box<dyn PageReader> {
    Box::new(FailingReader)
}

/// A 4096 × 64 f32 table (1 MiB, 256 pages) opened out of core with the failing reader, and
/// the same table in memory.
fn tables(dir: &std::path::Path, mode: OpenMode) -> (Table<'static>, Table<'static>) {
    let path = dir.join("t.npy");
    let mem = crate::workload::random_table(4096, 64, crate::DType::F32, 3).unwrap();
    mem.save(&path).unwrap();
    let mut t = Table::open_with(
        &path,
        &OpenOptions {
            mode,
            residency: Residency::OutOfCore,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(t.residency(), Residency::OutOfCore);
    t.disk_mut().unwrap().set_reader(failing);
    (t, mem)
}

fn assert_disk_error(e: Error, path_end: &str) {
    match e {
        Error::DiskRead {
            path,
            offset,
            source,
        } => {
            assert!(path.ends_with(path_end), "{}", path.display());
            assert!(offset >= FAIL_FROM && offset % 4096 == 0, "{offset}");
            assert_eq!(source.raw_os_error(), Some(libc::EIO));
        }
        other => panic!("expected a disk read error, got {other:?}"),
    }
}

#[test]
fn a_failed_read_is_an_error_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (t, mem) = tables(dir.path(), OpenMode::Map);
    // Rows 0..100 lie in the first 8 pages (the .npy header is 128 bytes): they read fine.
    let good: Vec<i64> = (0..100).rev().collect();
    let mut out = vec![0.0f32; good.len() * 64];
    t.lookup_into(&good, &mut out).unwrap();
    let mut expected = vec![0.0f32; good.len() * 64];
    mem.lookup_into(&good, &mut expected).unwrap();
    assert_eq!(out, expected);

    // Row 4000 needs page 250: every operation fails, naming the file and page, output untouched.
    let bad: Vec<i64> = vec![1, 2, 4000, 3];
    let sentinel = -7.5f32;
    let mut out = vec![sentinel; bad.len() * 64];
    assert_disk_error(t.lookup_into(&bad, &mut out).unwrap_err(), "t.npy");
    assert_disk_error(t.lookup::<i64, f32>(&bad).unwrap_err(), "t.npy");
    let m = MaxNorm::new(1.0).unwrap();
    assert_disk_error(
        t.lookup_renorm_output_only(&bad, &mut out, m).unwrap_err(),
        "t.npy",
    );
    let mut pooled = vec![sentinel; 2 * 64];
    for mode in [BagMode::Sum, BagMode::Mean, BagMode::Max] {
        let e = t
            .bag_into(&bad, Bags::fixed(2), &BagOptions::mode(mode), &mut pooled)
            .unwrap_err();
        assert_disk_error(e, "t.npy");
    }
    assert!(out.iter().chain(&pooled).all(|&v| v == sentinel));
}

#[test]
fn a_pipelined_lookup_stops_before_the_window_that_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (t, _) = tables(dir.path(), OpenMode::Map);
    // Three windows: the first two read rows below 100 only, the third needs row 4000.
    let n = 2 * super::WINDOW + 10;
    let mut ids: Vec<i64> = (0..n as i64).map(|i| i % 100).collect();
    ids[2 * super::WINDOW + 5] = 4000;
    let sentinel = -7.5f32;
    let mut out = vec![sentinel; n * 64];
    assert_disk_error(t.lookup_into(&ids, &mut out).unwrap_err(), "t.npy");
    let (written, untouched) = out.split_at(2 * super::WINDOW * 64);
    assert!(written.iter().all(|&v| v != sentinel));
    assert!(untouched.iter().all(|&v| v == sentinel));
}

#[test]
fn writes_to_an_out_of_core_table_stop_before_any_row_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, mem) = tables(dir.path(), OpenMode::MapWritable);
    let m = MaxNorm::new(0.5).unwrap();
    let mut out = vec![0.0f32; 4 * 64];
    let bad: Vec<i64> = vec![1, 2, 4000, 3];
    assert_disk_error(
        t.lookup_renorm_in_place(&bad, &mut out, m).unwrap_err(),
        "t.npy",
    );
    assert_disk_error(t.renorm_in_place(&bad, m).unwrap_err(), "t.npy");
    let opts = BagOptions {
        mode: BagMode::Sum,
        max_norm: Some(m),
        ..Default::default()
    };
    let mut pooled = vec![0.0f32; 2 * 64];
    assert_disk_error(
        t.bag_renorm_in_place(&bad, Bags::fixed(2), &opts, &mut pooled)
            .unwrap_err(),
        "t.npy",
    );
    let grad = crate::CoalescedGrad::new(4096, 64, vec![2, 4000], vec![1.0; 2 * 64]).unwrap();
    let e = crate::Sgd::new(0.1)
        .unwrap()
        .step(&mut t, &grad)
        .unwrap_err();
    assert_disk_error(e, "t.npy");
    assert_eq!(t.as_bytes(), mem.as_bytes(), "the table was written");
}
