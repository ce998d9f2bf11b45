//! Arbitrary bytes as a `.npy` file: an error or a correct table, never a panic.
//! See `src/files.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    embedding_lookup_fuzz::files::check(bytes, "npy");
});
