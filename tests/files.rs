//! Tables in files: zero-copy maps, misaligned data, save and reopen, tensor selection.

use std::path::Path;

use embedding_lookup::{DType, OpenMode, OpenOptions, StorageKind, Table};

fn open(path: &Path, mode: OpenMode) -> embedding_lookup::Result<Table<'static>> {
    Table::open_with(
        path,
        &OpenOptions {
            tensor: None,
            mode,
            ..Default::default()
        },
    )
}

#[test]
fn save_and_reopen_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let table = Table::randn(33, 17, dtype, 7).unwrap();
        for ext in ["safetensors", "npy"] {
            let path = dir.path().join(format!("t_{dtype}.{ext}"));
            let saved = table.save(&path);
            if dtype == DType::BF16 && ext == "npy" {
                let e = saved.unwrap_err().to_string();
                assert!(e.contains("bf16 has no .npy dtype"), "{e}");
                assert!(!path.exists(), "a refused save must not create the file");
                continue;
            }
            saved.unwrap();
            for mode in [OpenMode::Map, OpenMode::Copy, OpenMode::MapWritable] {
                let back = open(&path, mode).unwrap();
                assert_eq!((back.rows(), back.dim(), back.dtype()), (33, 17, dtype));
                assert_eq!(back.as_bytes(), table.as_bytes(), "{ext} {mode:?}");
                assert_eq!(back.is_zero_copy(), mode != OpenMode::Copy);
            }
        }
    }
}

/// The view points into the file's pages: a change written through a writable map of the same
/// file is seen by a table opened read-only before it.
#[test]
fn mapped_tables_share_the_files_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.safetensors");
    Table::randn(8, 4, DType::F32, 1)
        .unwrap()
        .save(&path)
        .unwrap();
    let reader = open(&path, OpenMode::Map).unwrap();
    assert!(reader.is_zero_copy());
    assert_eq!(reader.storage_kind(), StorageKind::Mapped);
    let mut writer = open(&path, OpenMode::MapWritable).unwrap();
    writer.as_mut_slice::<f32>().unwrap()[5] = 1234.5;
    writer.flush().unwrap();
    assert_eq!(reader.as_slice::<f32>().unwrap()[5], 1234.5);
    let again = open(&path, OpenMode::Map).unwrap();
    assert_eq!(again.as_slice::<f32>().unwrap()[5], 1234.5);
    // A read-only map refuses writes.
    let mut ro = open(&path, OpenMode::Map).unwrap();
    assert_eq!(
        ro.as_mut_slice::<f32>().unwrap_err().kind(),
        "read_only_table"
    );
}

/// A safetensors file whose data starts at an odd offset is copied once, and still correct.
#[test]
fn misaligned_data_is_copied_and_correct() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..12).map(|v| v as f32 * 0.5).collect();
    for pad in 0..4 {
        let mut header = r#"{"w":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]}}"#.to_string();
        header.push_str(&" ".repeat(pad));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(bytemuck::cast_slice(&values));
        let path = dir.path().join(format!("mis{pad}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        let aligned = (8 + header.len()).is_multiple_of(4);
        let t = open(&path, OpenMode::Map).unwrap();
        assert_eq!(t.is_zero_copy(), aligned, "pad {pad}");
        assert_eq!(t.as_slice::<f32>().unwrap(), values.as_slice());
        let out: Vec<f32> = t.lookup(&[2i64, 0]).unwrap();
        assert_eq!(&out[..4], &values[8..12]);
        if !aligned {
            let e = open(&path, OpenMode::MapWritable).unwrap_err().to_string();
            assert!(e.contains("not aligned"), "{e}");
        }
    }
}

#[test]
fn tensor_selection_by_name_or_uniqueness() {
    use embedding_lookup::table::formats::{write_tensors, TensorDType, TensorToWrite};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.safetensors");
    let a = vec![1.0f32; 6];
    let b = vec![2.0f32; 8];
    let idx = vec![0i64; 3];
    fn t<'a>(
        name: &'a str,
        shape: Vec<usize>,
        data: &'a [u8],
        dtype: TensorDType,
    ) -> TensorToWrite<'a> {
        TensorToWrite {
            name,
            dtype,
            shape,
            data,
        }
    }
    write_tensors(
        &path,
        &[
            t(
                "emb.a",
                vec![2, 3],
                bytemuck::cast_slice(&a),
                TensorDType::Float(DType::F32),
            ),
            t(
                "emb.b",
                vec![4, 2],
                bytemuck::cast_slice(&b),
                TensorDType::Float(DType::F32),
            ),
            t("ids", vec![3], bytemuck::cast_slice(&idx), TensorDType::I64),
        ],
        &Default::default(),
    )
    .unwrap();
    let e = Table::open(&path, None).unwrap_err().to_string();
    assert!(e.contains("2 2-D tensors"), "{e}");
    assert!(
        e.contains("emb.a (f32, [2, 3])") && e.contains("emb.b (f32, [4, 2])"),
        "{e}"
    );
    let tb = Table::open(&path, Some("emb.b")).unwrap();
    assert_eq!(tb.shape(), [4, 2]);
    let e = Table::open(&path, Some("nope")).unwrap_err().to_string();
    assert!(e.contains("no tensor named \"nope\""), "{e}");
    let e = Table::open(&path, Some("ids")).unwrap_err().to_string();
    assert!(e.contains("not 2-D") || e.contains("dtype i64"), "{e}");
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.safetensors");
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    let e = Table::open(&path, None).unwrap_err().to_string();
    assert!(
        e.contains("junk.safetensors") && e.contains("not a valid safetensors file"),
        "{e}"
    );
    let e = Table::open(dir.path().join("missing.npy"), None).unwrap_err();
    assert_eq!(e.kind(), "io");
    let e = Table::open(dir.path().join("table.bin"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown file extension"), "{e}");
    // A 1-D .npy is not a table.
    let p = dir.path().join("vec.npy");
    embedding_lookup::table::formats::write_tensors(
        &p,
        &[embedding_lookup::table::formats::TensorToWrite {
            name: "",
            dtype: embedding_lookup::table::formats::TensorDType::Float(DType::F32),
            shape: vec![4],
            data: bytemuck::cast_slice(&[0.0f32; 4]),
        }],
        &Default::default(),
    )
    .unwrap();
    let e = Table::open(&p, None).unwrap_err().to_string();
    assert!(e.contains("1-D") || e.contains("2-D"), "{e}");
}

/// An npy file whose header length puts the data at an odd address is copied, and correct.
#[test]
fn misaligned_npy_is_copied() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..6).map(|v| v as f32).collect();
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }   \n";
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    assert_ne!(bytes.len() % 4, 0, "the test needs a misaligned start");
    bytes.extend_from_slice(bytemuck::cast_slice(&values));
    let path = dir.path().join("odd.npy");
    std::fs::write(&path, &bytes).unwrap();
    let t = Table::open(&path, None).unwrap();
    assert!(!t.is_zero_copy());
    assert_eq!(t.as_slice::<f32>().unwrap(), values.as_slice());
}
