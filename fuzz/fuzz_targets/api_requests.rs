//! Request bodies of every write path (REST single, batch, move, devices, grants, and
//! Kalima's POST /transaction): parsing and field validation never panic, and whatever
//! validates stays within the size limits the encoding relies on.
#![no_main]

use kalima_core::tx::{MAX_BODY, TxContent};
use kalima_gateway::api::compat::post_content;
use kalima_gateway::api::devices::{GrantJson, NewDevice};
use kalima_gateway::api::model::TxRequest;
use kalima_gateway::api::tx::{BatchRequest, MoveRequest};
use libfuzzer_sys::fuzz_target;

fn check(c: &TxContent) {
    if c.validate(MAX_BODY).is_ok() {
        assert!(c.body.len() <= MAX_BODY);
        let _ = c.signing_bytes("fuzz");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<TxRequest>(data) {
        if let Ok(c) = r.into_content("fuzzer") {
            check(&c);
        }
    }
    if let Ok(b) = serde_json::from_slice::<BatchRequest>(data) {
        for r in b.transactions {
            if let Ok(c) = r.into_content("fuzzer") {
                check(&c);
            }
        }
    }
    let _ = serde_json::from_slice::<MoveRequest>(data);
    let _ = serde_json::from_slice::<NewDevice>(data);
    let _ = serde_json::from_slice::<GrantJson>(data);
    if let Ok(mut c) = post_content(data) {
        c.device_id = "fuzzer".into();
        check(&c);
    }
});
