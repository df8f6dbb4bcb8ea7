//! Opens fuzzed bytes as an image (header, extensions, tables, snapshot table) and
//! reports on it, read-only: the parsing paths alone, fast.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::open_only(data);
});
