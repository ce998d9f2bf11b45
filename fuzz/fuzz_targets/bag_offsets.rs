//! Arbitrary bags (offsets either way, fixed sizes), weights, modes and padding_idx: exactly
//! the naive pooling or the right error, the output untouched on error, never a panic. See
//! `src/bag.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: embedding_lookup_fuzz::bag::Input| {
    embedding_lookup_fuzz::bag::check(input);
});
