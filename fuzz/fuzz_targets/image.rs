//! Opens a fuzzed image held in memory and runs a fuzzed script of operations on it:
//! reads, writes, zeroes, discards, compressed writes, snapshots, block status,
//! flush, check and reopen. Nothing may panic, hang or allocate without bound.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::run(data);
});
