//! Arbitrary tables, indices, max_norm and norm_type: output only leaves the table alone, in
//! place gives the same output and renorms the referenced rows as the definition does, never
//! a panic. See `src/renorm.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: embedding_lookup_fuzz::renorm::Input| {
    embedding_lookup_fuzz::renorm::check(input);
});
