//! Arbitrary tables, indices and padding_idx: exactly the naive reference's rows or the right
//! error, the output untouched on error, never a panic. See `src/lookup.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: embedding_lookup_fuzz::lookup::Input| {
    embedding_lookup_fuzz::lookup::check(input);
});
