//! The invoice vocabulary every payment backend speaks: payment hashes, invoice states,
//! invoices as the node sees them, and the request that creates one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// Longest memo, in bytes: a BOLT11 tagged field holds at most 1023 five-bit groups.
pub const MAX_MEMO_BYTES: usize = 639;

/// The SHA-256 of a payment preimage, which names an invoice. Shown and parsed as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PaymentHash(pub [u8; 32]);

impl PaymentHash {
    /// A hash from exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        <[u8; 32]>::try_from(bytes)
            .map(PaymentHash)
            .map_err(|_| Error::InvalidArgument(format!("a payment hash has 32 bytes, got {}", bytes.len())))
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for PaymentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PaymentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PaymentHash({self})")
    }
}

impl FromStr for PaymentHash {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.len() != 64 {
            return Err(Error::InvalidArgument(format!("a payment hash is 64 hex digits, got {} characters", s.len())));
        }
        let bytes = hex::decode(s).map_err(|e| Error::InvalidArgument(format!("payment hash: {e}")))?;
        Self::from_slice(&bytes)
    }
}

impl Serialize for PaymentHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PaymentHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where an invoice is in its life, as LND reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceState {
    /// Waiting for a payment.
    Open,
    /// A payment is held but not settled yet (hold invoices).
    Accepted,
    /// Paid: the preimage was released. Final.
    Settled,
    /// Canceled or expired unpaid. Final.
    Canceled,
}

impl InvoiceState {
    /// Whether the invoice can no longer change.
    pub fn is_final(self) -> bool {
        matches!(self, InvoiceState::Settled | InvoiceState::Canceled)
    }

    /// LND's name of the state (`OPEN`, `ACCEPTED`, `SETTLED`, `CANCELED`).
    pub fn lnd_name(self) -> &'static str {
        match self {
            InvoiceState::Open => "OPEN",
            InvoiceState::Accepted => "ACCEPTED",
            InvoiceState::Settled => "SETTLED",
            InvoiceState::Canceled => "CANCELED",
        }
    }
}

impl fmt::Display for InvoiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.lnd_name())
    }
}

/// One invoice as the payment backend holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// SHA-256 of the preimage: the invoice's key.
    pub payment_hash: PaymentHash,
    /// The BOLT11 payment request the buyer pays (empty for spontaneous keysend payments).
    pub payment_request: String,
    /// Requested amount in millisatoshis (0: any amount).
    pub value_msat: u64,
    /// The memo, which is also the BOLT11 description.
    pub memo: String,
    /// Current state.
    pub state: InvoiceState,
    /// Position in the backend's series of added invoices (from 1).
    pub add_index: u64,
    /// Position in the backend's series of settled invoices (from 1); 0 while not settled.
    pub settle_index: u64,
    /// Amount received, in millisatoshis (0 until settled).
    pub amt_paid_msat: u64,
    /// Creation time, Unix seconds (the BOLT11 timestamp).
    pub creation_date: u64,
    /// Seconds after `creation_date` at which an unpaid invoice expires.
    pub expiry_secs: u64,
    /// Settlement time, Unix seconds; 0 while not settled.
    pub settle_date: u64,
}

impl Invoice {
    /// Unix second at which the invoice expires if unpaid.
    pub fn expires_at(&self) -> u64 {
        self.creation_date.saturating_add(self.expiry_secs)
    }

    /// Whether the invoice is paid.
    pub fn is_settled(&self) -> bool {
        self.state == InvoiceState::Settled
    }
}

/// What to invoice: an amount, a memo for the buyer, and how long the invoice stays payable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewInvoice {
    /// Amount in millisatoshis; more than 0.
    pub amount_msat: u64,
    /// Memo shown to the payer (the BOLT11 description), at most [`MAX_MEMO_BYTES`] bytes.
    pub memo: String,
    /// Seconds the invoice stays payable; more than 0.
    pub expiry_secs: u64,
}

impl NewInvoice {
    /// An invoice request.
    pub fn new(amount_msat: u64, memo: impl Into<String>, expiry_secs: u64) -> Self {
        NewInvoice { amount_msat, memo: memo.into(), expiry_secs }
    }

    /// Checks the request before anything is sent.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.amount_msat == 0 {
            problems.push("amount_msat must be more than 0".to_string());
        } else if self.amount_msat > i64::MAX as u64 {
            problems.push(format!("amount_msat must be at most {}", i64::MAX));
        }
        if self.memo.len() > MAX_MEMO_BYTES {
            problems
                .push(format!("memo is {} bytes, at most {MAX_MEMO_BYTES} fit in a BOLT11 invoice", self.memo.len()));
        }
        if self.expiry_secs == 0 {
            problems.push("expiry_secs must be more than 0".to_string());
        } else if self.expiry_secs > i64::MAX as u64 {
            problems.push(format!("expiry_secs must be at most {}", i64::MAX));
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::InvalidArgument(problems.join("; "))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payment_hash_round_trips_through_hex_and_json() {
        let h = PaymentHash([0xab; 32]);
        let s = h.to_string();
        assert_eq!(s, "ab".repeat(32));
        assert_eq!(s.parse::<PaymentHash>().unwrap(), h);
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<PaymentHash>(&json).unwrap(), h);
    }

    #[test]
    fn payment_hash_refuses_bad_text() {
        for bad in ["", "ab", &"zz".repeat(32), &"ab".repeat(33)] {
            let err = bad.parse::<PaymentHash>().unwrap_err();
            assert!(err.to_string().contains("payment hash"), "{bad}: {err}");
        }
        assert!(PaymentHash::from_slice(&[0; 31]).is_err());
    }

    #[test]
    fn new_invoice_reports_every_problem_at_once() {
        assert!(NewInvoice::new(1, "ok", 1).validate().is_ok());
        let err = NewInvoice::new(0, "x".repeat(MAX_MEMO_BYTES + 1), 0).validate().unwrap_err().to_string();
        assert!(err.contains("amount_msat"), "{err}");
        assert!(err.contains("memo is 640 bytes"), "{err}");
        assert!(err.contains("expiry_secs"), "{err}");
        assert!(NewInvoice::new(u64::MAX, "", 1).validate().is_err());
    }

    #[test]
    fn states_have_lnd_names_and_finality() {
        assert_eq!(InvoiceState::Settled.to_string(), "SETTLED");
        assert!(InvoiceState::Canceled.is_final());
        assert!(!InvoiceState::Accepted.is_final());
    }
}
