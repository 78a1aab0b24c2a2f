//! Stored block headers: decoding never panics and is canonical.
#![no_main]

use kalima_core::block::BlockHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = BlockHeader::decode(data) {
        assert_eq!(h.encode(), data, "decoded header must re-encode identically");
    }
});
