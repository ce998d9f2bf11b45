//! Parsers and lookups on in-memory data only: no files, no maps, small sizes, so that Miri
//! (`cargo +nightly miri test --test in_memory`, run by `.ci/run`) can check them for undefined
//! behaviour. Mutated files stand in for a fuzzer where Miri is too slow for one.

use embedding_lookup::table::formats::{self, Format};
use embedding_lookup::util::Rng;
use embedding_lookup::{DType, Element, Error, Index, Table};
use half::{bf16, f16};

/// Mutations per file: few under Miri, which runs a thousand times slower.
const MUTATIONS: usize = if cfg!(miri) { 40 } else { 4000 };

fn safetensors_file() -> Vec<u8> {
    let header = br#"{"__metadata__":{"k":"v"},"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"weight":{"dtype":"F16","shape":[3,2],"data_offsets":[16,28]}}"#;
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(&[
        1, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255,
    ]);
    v.extend((0..6u16).flat_map(|i| f16::from_f32(i as f32).to_le_bytes()));
    v
}

fn npy_file() -> Vec<u8> {
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }            \n";
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend_from_slice(&(header.len() as u16).to_le_bytes());
    v.extend_from_slice(header.as_bytes());
    v.extend((0..6).flat_map(|i| (i as f32).to_le_bytes()));
    v
}

/// Flip, overwrite, insert, delete and truncate bytes, with numbers that matter to parsers
/// (0, 0xff, digits, quotes, brackets) likely.
fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = base.to_vec();
    let interesting = b"\x00\xff0123456789-'\"{}[](),:LeE \x7f\x80";
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() as u64 + 1) as usize;
        let byte = if rng.below(2) == 0 {
            interesting[rng.below(interesting.len() as u64) as usize]
        } else {
            rng.next_u64() as u8
        };
        match rng.below(5) {
            0 if at < v.len() => v[at] ^= 1 << rng.below(8),
            1 if at < v.len() => v[at] = byte,
            2 => v.insert(at, byte),
            3 if at < v.len() => {
                v.remove(at);
            }
            _ => v.truncate(at),
        }
    }
    v
}

/// Whatever the bytes, parsing gives an error or entries whose byte ranges lie in the buffer
/// and match their dtype and shape.
fn check_parse(bytes: &[u8], format: Format) -> bool {
    match formats::parse(bytes, format) {
        Ok(parsed) => {
            for e in &parsed.entries {
                assert!(
                    e.data.start <= e.data.end && e.data.end <= bytes.len(),
                    "{e:?}"
                );
                if let Some(size) = e.dtype.size() {
                    let elems = e.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                    if let Some(n) = elems.and_then(|n| n.checked_mul(size)) {
                        assert_eq!(n, e.data.len(), "{e:?}");
                    } else {
                        assert!(e.shape.contains(&0), "{e:?}");
                    }
                }
            }
            true
        }
        Err(e) => {
            assert_eq!(e.kind(), "format", "{e}");
            false
        }
    }
}

#[test]
fn parsers_survive_mutated_files() {
    let mut rng = Rng::new(17);
    for (base, format) in [
        (safetensors_file(), Format::SafeTensors),
        (npy_file(), Format::Npy),
    ] {
        assert!(check_parse(&base, format), "the base file parses");
        let mut accepted = 0;
        for _ in 0..MUTATIONS {
            accepted += check_parse(&mutate(&base, &mut rng), format) as usize;
        }
        // Some mutations (inside data bytes, whitespace) keep the file valid.
        assert!(accepted > 0, "{format:?}: no mutation parsed");
    }
}

#[test]
fn parsers_refuse_lying_sizes() {
    let st = |header: &str, data: &[u8]| {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    };
    let cases: Vec<(Vec<u8>, Format)> = vec![
        (u64::MAX.to_le_bytes().to_vec(), Format::SafeTensors),
        ((1u64 << 40).to_le_bytes().to_vec(), Format::SafeTensors),
        (
            st(
                r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,18446744073709551615]}}"#,
                &[0; 16],
            ),
            Format::SafeTensors,
        ),
        (
            st(
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#,
                &[0; 16],
            ),
            Format::SafeTensors,
        ),
        (
            st(
                r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}}"#,
                &[0; 24],
            ),
            Format::SafeTensors,
        ),
        (b"\x93NUMPY\x02\x00\xff\xff\xff\xff{".to_vec(), Format::Npy),
        (b"\x93NUMPY\x01\x00\x05\x00{}".to_vec(), Format::Npy),
        (
            [
                &b"\x93NUMPY\x01\x00\x46\x00"[..],
                b"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 1), }",
            ]
            .concat(),
            Format::Npy,
        ),
    ];
    for (i, (bytes, format)) in cases.iter().enumerate() {
        let e = formats::parse(bytes, *format).unwrap_err();
        assert_eq!(e.kind(), "format", "case {i}: {e}");
    }
}

/// The plain definition, element by element.
fn naive<I: Index, T: Element>(data: &[T], dim: usize, indices: &[I]) -> Vec<f32> {
    indices
        .iter()
        .flat_map(|i| {
            let r = i.as_i128() as usize;
            data[r * dim..(r + 1) * dim].iter().map(|v| v.to_f32())
        })
        .collect()
}

fn lookups_for<T: Element, I: Index>(indices: &[I], bad: I) {
    let (rows, dim) = (5, 3);
    let mut rng = Rng::new(3);
    let mut data: Vec<T> = (0..rows * dim).map(|_| T::from_f32(rng.normal())).collect();
    let want = naive(&data, dim, indices);
    let owned = Table::from_slice(&data, rows, dim).unwrap();
    let borrowed = Table::borrowed(&data, rows, dim).unwrap();
    for t in [&owned, &borrowed] {
        let wide: Vec<f32> = t.lookup(indices).unwrap();
        assert_eq!(wide, want);
        let native: Vec<T> = t.lookup(indices).unwrap();
        assert_eq!(native.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), want);
        let mut with_bad = indices.to_vec();
        with_bad.push(bad);
        let mut out = vec![T::from_f32(7.0); with_bad.len() * dim];
        match t.lookup_into(&with_bad, &mut out) {
            Err(Error::IndexOutOfRange { position, .. }) => assert_eq!(position, indices.len()),
            other => panic!("{other:?}"),
        }
        assert!(
            out.iter().all(|v| v.to_f32() == 7.0),
            "written before the error"
        );
    }
    let mut t = Table::borrowed_mut(&mut data, rows, dim).unwrap();
    t.as_mut_slice::<T>().unwrap()[0] = T::from_f32(1.0);
    let t = t.with_padding_idx(-1).unwrap();
    assert_eq!(t.padding_idx(), Some(rows - 1));
    assert_eq!(t.lookup::<I, f32>(indices).unwrap().len(), want.len());
}

#[test]
fn lookups_every_dtype_and_index_type() {
    fn all<T: Element>() {
        lookups_for::<T, i32>(&[4, 0, 2, 2, 1], -1);
        lookups_for::<T, i64>(&[0, 4, 4], 5);
        lookups_for::<T, u32>(&[3, 1], u32::MAX);
        lookups_for::<T, u64>(&[2], 1 << 40);
        lookups_for::<T, usize>(&[1, 0, 3], usize::MAX);
    }
    all::<f32>();
    all::<f16>();
    all::<bf16>();
}

#[test]
fn conversions_round_trip_exactly_where_they_widen() {
    // Every value here is exact in f16 and in bf16 (±0, ±inf, small dyadic fractions, a
    // power of two near each format's smallest normal), so narrowing and widening again must
    // give back the original bits; NaN must stay NaN. The widening lookup agrees.
    let values: Vec<f32> = vec![
        0.0,
        -0.0,
        1.5,
        -2.25,
        0.375,
        -96.0,
        // 2^-14, f16's smallest normal, as bits: Miri perturbs `powi` by an ulp.
        f32::from_bits(0x3880_0000),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    let n = values.len();
    let ids: Vec<u32> = (0..n as u32).collect();
    for dtype in [DType::F16, DType::BF16] {
        let t = Table::from_slice(&values, n, 1).unwrap();
        let narrow = t.to_dtype(dtype).unwrap();
        let back = narrow.to_dtype(DType::F32).unwrap();
        let back = back.as_slice::<f32>().unwrap();
        for (i, (&v, &b)) in values.iter().zip(back).enumerate() {
            if v.is_nan() {
                assert!(b.is_nan(), "{dtype} element {i}: {b}");
            } else {
                assert_eq!(
                    b.to_bits(),
                    v.to_bits(),
                    "{dtype} element {i}: {v} came back {b}"
                );
            }
        }
        let widened: Vec<f32> = narrow.lookup(&ids).unwrap();
        let same = widened
            .iter()
            .zip(back)
            .all(|(w, b)| w.to_bits() == b.to_bits());
        assert!(same, "{dtype}: {widened:?} against {back:?}");
    }
}

/// Past the few-rows path and across the 256-row blocks of the kernels, with the prefetch
/// lookahead running over each block's end: every row as the plain definition gives it.
#[test]
fn lookups_across_kernel_blocks() {
    let (rows, dim) = (37, 5);
    let mut rng = Rng::new(8);
    let data: Vec<f32> = (0..rows * dim).map(|_| rng.normal()).collect();
    let indices: Vec<u32> = (0..600).map(|_| rng.below(rows as u64) as u32).collect();
    let want = naive(&data, dim, &indices);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = Table::from_slice(&data, rows, dim)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let f32_table = t.to_dtype(DType::F32).unwrap();
        let exact = naive(f32_table.as_slice::<f32>().unwrap(), dim, &indices);
        let got: Vec<f32> = t.lookup(&indices).unwrap();
        assert_eq!(got, exact, "{dtype}");
        if dtype == DType::F32 {
            assert_eq!(got, want);
        }
        let native: Vec<u8> = match dtype {
            DType::F32 => {
                bytemuck::cast_slice::<_, u8>(&t.lookup::<u32, f32>(&indices).unwrap()).to_vec()
            }
            DType::F16 => {
                bytemuck::cast_slice::<_, u8>(&t.lookup::<u32, f16>(&indices).unwrap()).to_vec()
            }
            DType::BF16 => {
                bytemuck::cast_slice::<_, u8>(&t.lookup::<u32, bf16>(&indices).unwrap()).to_vec()
            }
        };
        let want_native: Vec<u8> = indices
            .iter()
            .flat_map(|&i| {
                let rb = t.row_bytes();
                t.as_bytes()[i as usize * rb..(i as usize + 1) * rb].to_vec()
            })
            .collect();
        assert_eq!(native, want_native, "{dtype}");
    }
}
