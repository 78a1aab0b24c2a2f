//! Stored transaction bytes: decoding never panics, and whatever decodes re-encodes to exactly
//! the same bytes (the encoding is canonical, so a leaf hash has one preimage form).
#![no_main]

use kalima_core::tx::Transaction;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tx) = Transaction::decode(data) {
        assert_eq!(tx.encode(), data, "decoded bytes must re-encode identically");
    }
});
