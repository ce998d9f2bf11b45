//! A failed `emb` command never leaves a partial or corrupted output or table file: writes are
//! made to fail (a file-size limit, a missing or read-only directory, a directory in the way)
//! and the original output must be intact with no temporary file left beside it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use embedding_lookup::table::formats::{write_tensors, TensorDType, TensorToWrite};
use embedding_lookup::{DType, Table};

const EMB: &str = env!("CARGO_BIN_EXE_emb");
const PREVIOUS: &[u8] = b"previous contents, not a tensor file";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    /// A table of `rows × 64` f32 (256 bytes a row) and 20 000 indices into it.
    fn with_inputs(rows: usize) -> Dir {
        let dir = Dir {
            dir: tempfile::tempdir().unwrap(),
        };
        Table::randn(rows, 64, DType::F32, 9)
            .unwrap()
            .save(dir.p("table.npy"))
            .unwrap();
        let idx: Vec<i64> = (0..20_000).map(|i| (i * 31 % rows) as i64).collect();
        write_tensors(
            &dir.p("idx.npy"),
            &[TensorToWrite {
                name: "",
                dtype: TensorDType::I64,
                shape: vec![idx.len()],
                data: bytemuck::cast_slice(&idx),
            }],
            &Default::default(),
        )
        .unwrap();
        dir
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Names in the directory that look like temporary files.
    fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect()
    }
}

/// Run `emb` under `ulimit -f` (in 512-byte blocks, POSIX `sh`), so any write past
/// `limit_blocks * 512` bytes fails. No signal is trapped: emb must cope with the default
/// disposition of SIGXFSZ on its own.
fn emb_with_file_limit(limit_blocks: u64, args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -f {limit_blocks} && exec \"$0\" \"$@\""))
        .arg(EMB)
        .args(args)
        .output()
        .expect("sh runs")
}

fn assert_failed_cleanly(o: &Output, dir: &Dir, out: &Path, what: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{what}: emb must fail with an error, not die by a signal: {:?} {stderr}",
        o.status
    );
    assert!(stderr.starts_with("error: "), "{what}: {stderr}");
    assert!(
        stderr.contains(out.file_name().unwrap().to_str().unwrap()),
        "{what}: the error names the output: {stderr}"
    );
    assert_eq!(
        std::fs::read(out).unwrap(),
        PREVIOUS,
        "{what}: the original output must be intact"
    );
    assert!(
        dir.leftovers().is_empty(),
        "{what}: temporary files left: {:?}",
        dir.leftovers()
    );
}

/// Outputs larger than the write buffer fail in a write; small ones when the buffer is
/// flushed at commit. Both must clean up.
#[test]
fn lookup_output_past_the_file_size_limit_leaves_the_original() {
    // 20 000 rows of 256 bytes = 5 MB (fails in a write); 2 000 rows = 512 KB (fails when the
    // 1 MiB buffer is flushed at commit).
    let d = Dir::with_inputs(100);
    let few: Vec<i64> = (0..2_000).map(|i| i % 100).collect();
    write_tensors(
        &d.p("few.npy"),
        &[TensorToWrite {
            name: "",
            dtype: TensorDType::I64,
            shape: vec![few.len()],
            data: bytemuck::cast_slice(&few),
        }],
        &Default::default(),
    )
    .unwrap();
    for (indices, out) in [
        ("idx.npy", "out.npy"),
        ("few.npy", "out.npy"),
        ("idx.npy", "out.safetensors"),
    ] {
        let out = d.p(out);
        std::fs::write(&out, PREVIOUS).unwrap();
        let o = emb_with_file_limit(
            200, // 100 KiB
            &[
                "lookup",
                "--table",
                s(&d.p("table.npy")),
                "--indices",
                s(&d.p(indices)),
                "--out",
                s(&out),
            ],
        );
        assert_failed_cleanly(&o, &d, &out, indices);
    }
    // The same command without the limit succeeds, so the limit was the only fault.
    let out = d.p("out.npy");
    let o = Command::new(EMB)
        .args([
            "lookup",
            "--table",
            s(&d.p("table.npy")),
            "--indices",
            s(&d.p("idx.npy")),
            "--out",
            s(&out),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 128 + 20_000 * 256);
}

/// `emb convert` writing a table: the same guarantee for table files.
#[test]
fn convert_past_the_file_size_limit_leaves_the_original_table() {
    let d = Dir::with_inputs(4000); // 1 MiB of f32, 512 KiB as f16
    for out in ["t16.safetensors", "t16.npy"] {
        let out = d.p(out);
        std::fs::write(&out, PREVIOUS).unwrap();
        let o = emb_with_file_limit(
            200,
            &["convert", s(&d.p("table.npy")), s(&out), "--dtype", "f16"],
        );
        assert_failed_cleanly(&o, &d, &out, "convert");
    }
    // Converting a table onto its own path under the limit leaves it as it was.
    let table = d.p("table.npy");
    let before = std::fs::read(&table).unwrap();
    let o = emb_with_file_limit(200, &["convert", s(&table), s(&table), "--dtype", "f16"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(std::fs::read(&table).unwrap(), before);
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
}

/// Converting a table onto its own path (no limit) is refused and leaves it as it was: the
/// output would replace the input (for a safetensors file, every other tensor with it).
#[test]
fn convert_onto_its_own_path_is_refused() {
    let d = Dir::with_inputs(50);
    let table = d.p("table.npy");
    let before = std::fs::read(&table).unwrap();
    let o = Command::new(EMB)
        .args(["convert", s(&table), s(&table), "--dtype", "f16"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is the input"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read(&table).unwrap(), before);
    assert!(d.leftovers().is_empty());
}

/// An output whose directory is missing, or whose name is taken by a directory, fails with
/// the path named and nothing created.
#[test]
fn unwritable_output_paths_fail_and_create_nothing() {
    let d = Dir::with_inputs(10);
    std::fs::create_dir(d.p("taken.npy")).unwrap();
    for out in [d.p("missing/out.npy"), d.p("taken.npy")] {
        let o = Command::new(EMB)
            .args([
                "lookup",
                "--table",
                s(&d.p("table.npy")),
                "--indices",
                s(&d.p("idx.npy")),
                "--out",
                s(&out),
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(s(&out)), "{stderr}");
        assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
    }
    assert!(!d.p("missing").exists());
    assert!(d.p("taken.npy").is_dir());
}

/// A read-only directory refuses the temporary file, so nothing is written. Root ignores
/// directory permissions; run as root, the test writes into /proc instead, which refuses
/// new files to everyone.
#[cfg(unix)]
#[test]
fn read_only_directory() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::with_inputs(10);
    let ro = d.p("ro");
    std::fs::create_dir(&ro).unwrap();
    let out = ro.join("out.npy");
    std::fs::write(&out, PREVIOUS).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let root = std::fs::write(ro.join("probe"), b"").is_ok();
    let o = Command::new(EMB)
        .args([
            "lookup",
            "--table",
            s(&d.p("table.npy")),
            "--indices",
            s(&d.p("idx.npy")),
            "--out",
            s(&out),
        ])
        .output()
        .unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    if root {
        // Root ignores directory permissions, so that run wrote; /proc refuses new files to
        // everyone, root included, and stands in for the read-only directory.
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = Path::new("/proc/emb-read-only-directory-test.npy");
        let o = Command::new(EMB)
            .args([
                "lookup",
                "--table",
                s(&d.p("table.npy")),
                "--indices",
                s(&d.p("idx.npy")),
                "--out",
                s(out),
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("emb-read-only-directory-test.npy"),
            "{stderr}"
        );
        assert!(!out.exists());
        return;
    }
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("out.npy"), "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), PREVIOUS);
    let names: Vec<_> = std::fs::read_dir(&ro).unwrap().collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// A temporary file left by an earlier run that was killed (SIGKILL, power loss) may carry the
/// name a new run picks: the same process id is common in containers. Regression: the new run
/// failed with "File exists". It must pick another name and leave the stale file alone.
#[cfg(unix)]
#[test]
fn a_stale_temporary_file_with_the_same_name_does_not_block_writing() {
    let d = Dir::with_inputs(10);
    let out = d.p("out.npy");
    // `exec` keeps the shell's process id, so `$$` is the id emb will run with; its first
    // temporary file is number 0.
    let o = Command::new("sh")
        .arg("-c")
        .arg("printf stale > \"$(dirname \"$0\")/.out.npy.tmp-$$-0\" && exec \"$@\"")
        .arg(&out)
        .arg(EMB)
        .args([
            "lookup",
            "--table",
            s(&d.p("table.npy")),
            "--indices",
            s(&d.p("idx.npy")),
            "--out",
            s(&out),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 128 + 20_000 * 256);
    let stale = d.leftovers();
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert_eq!(std::fs::read(d.p(&stale[0])).unwrap(), b"stale");
}
