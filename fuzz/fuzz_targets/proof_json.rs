//! Proofs handed to verifiers as JSON: verification never panics on any shape or size.
#![no_main]

use kalima_core::merkle::{ConsistencyProof, InclusionProof};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = serde_json::from_slice::<InclusionProof>(data) {
        let _ = p.verify();
    }
    if let Ok(p) = serde_json::from_slice::<ConsistencyProof>(data) {
        let _ = p.verify(&[0; 32], &[1; 32]);
    }
});
