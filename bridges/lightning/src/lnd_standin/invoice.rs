//! One invoice as the stand-in stores it, and its two views: the crate's [`Invoice`] and the
//! JSON LND answers with (proto field names, every field present, 64-bit integers as strings,
//! bytes as base64).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::types::{Invoice, InvoiceState, PaymentHash};

/// `min_final_cltv_expiry_delta` of the invoices, LND's default for Bitcoin.
pub(super) const CLTV_EXPIRY_DELTA: u64 = 80;

/// One invoice as the stand-in stores it.
#[derive(Debug, Clone)]
pub(super) struct Stored {
    pub(super) hash: [u8; 32],
    pub(super) preimage: [u8; 32],
    pub(super) payment_addr: [u8; 32],
    pub(super) payment_request: String,
    pub(super) value_msat: u64,
    pub(super) memo: String,
    pub(super) state: InvoiceState,
    pub(super) add_index: u64,
    pub(super) settle_index: u64,
    pub(super) amt_paid_msat: u64,
    /// Creation time since the Unix epoch, on the stand-in's clock; the BOLT11 timestamp is its
    /// whole seconds.
    pub(super) created: Duration,
    pub(super) expiry_secs: u64,
    pub(super) settle_date: u64,
}

impl Stored {
    pub(super) fn to_invoice(&self) -> Invoice {
        Invoice {
            payment_hash: PaymentHash(self.hash),
            payment_request: self.payment_request.clone(),
            value_msat: self.value_msat,
            memo: self.memo.clone(),
            state: self.state,
            add_index: self.add_index,
            settle_index: self.settle_index,
            amt_paid_msat: self.amt_paid_msat,
            creation_date: self.created.as_secs(),
            expiry_secs: self.expiry_secs,
            settle_date: self.settle_date,
        }
    }

    pub(super) fn deadline(&self) -> Duration {
        Duration::from_secs(self.created.as_secs()).saturating_add(Duration::from_secs(self.expiry_secs))
    }

    /// The invoice in LND's JSON: proto field names, every field present.
    pub(super) fn to_json(&self) -> Value {
        json!({
            "memo": self.memo,
            "r_preimage": STANDARD.encode(self.preimage),
            "r_hash": STANDARD.encode(self.hash),
            "value": (self.value_msat / 1000).to_string(),
            "value_msat": self.value_msat.to_string(),
            "settled": self.state == InvoiceState::Settled,
            "creation_date": self.created.as_secs().to_string(),
            "settle_date": self.settle_date.to_string(),
            "payment_request": self.payment_request,
            "description_hash": "",
            "expiry": self.expiry_secs.to_string(),
            "fallback_addr": "",
            "cltv_expiry": CLTV_EXPIRY_DELTA.to_string(),
            "route_hints": [],
            "private": false,
            "add_index": self.add_index.to_string(),
            "settle_index": self.settle_index.to_string(),
            "amt_paid": self.amt_paid_msat.to_string(),
            "amt_paid_sat": (self.amt_paid_msat / 1000).to_string(),
            "amt_paid_msat": self.amt_paid_msat.to_string(),
            "state": self.state.lnd_name(),
            "htlcs": [],
            "features": {
                "8": {"name": "tlv-onion", "is_required": true, "is_known": true},
                "14": {"name": "payment-addr", "is_required": true, "is_known": true},
                "17": {"name": "multi-path-payments", "is_required": false, "is_known": true}
            },
            "is_keysend": false,
            "payment_addr": STANDARD.encode(self.payment_addr),
            "is_amp": false,
            "amp_invoice_state": {}
        })
    }
}
