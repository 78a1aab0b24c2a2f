//! Buying a feed over Lightning: an invoice is issued through the payment backend for the
//! feed's sats price and recorded on the chain with what it buys; when the backend reports it
//! settled, the node records the settlement, which the ledger applies once per payment hash
//! (extending the subscription). The backend's settle index is kept per node, so a restart
//! resumes the settlement stream where it stopped; an invoice that expires or is cancelled is
//! never settled, so it grants nothing.

use std::sync::Arc;

use kalima_bridge_lightning::{HandlerError, Invoice, InvoiceBackend, NewInvoice, SettlementWatcher, WatcherOptions};
use kalima_core::chain::Guard;
use kalima_core::ledger::market::{
    Currency, FEEDS_ADDRESS, Feed, INVOICES_ADDRESS, InvoiceRecord, InvoiceSettled, LIGHTNING_BUYER_PREFIX,
    MAX_PERIODS, Period, subscription_id, validate_buyer_id,
};
use kalima_core::ledger::{LedgerError, LedgerOp};
use kalima_core::now_ms;
use kalima_core::registry::NODE_DEVICE_ID;
use kalima_core::tx::TxContent;
use kalima_core::{Chain, Error as CoreError, Rejection};

/// Where this node keeps the last settle index it handled.
pub const SETTLE_INDEX_STATE: &str = "market/lightning/settle_index";

/// What a buyer asks an invoice for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceRequest {
    /// Feed id.
    pub feed: String,
    /// Period bought.
    pub period: Period,
    /// Number of periods.
    pub count: u32,
    /// The buyer's chosen id (its subscription is `ln:<id>`'s).
    pub buyer: String,
    /// SHA-256 (hex) of the access token the buyer chose.
    pub token_hash: String,
}

/// Why no invoice was issued.
#[derive(Debug, thiserror::Error)]
pub enum InvoiceError {
    /// The request is wrong (the message says how).
    #[error("{0}")]
    Invalid(String),
    /// No listed feed of that id.
    #[error("no listed feed {0}")]
    UnknownFeed(String),
    /// The payment backend failed.
    #[error("the Lightning backend: {0}")]
    Backend(#[from] kalima_bridge_lightning::Error),
    /// Recording the invoice failed.
    #[error(transparent)]
    Chain(#[from] CoreError),
}

/// Issues an invoice for `req` through `backend` and records it on the chain.
pub async fn open_invoice(
    chain: &Chain,
    backend: &dyn InvoiceBackend,
    req: &InvoiceRequest,
    expiry_secs: u64,
) -> Result<InvoiceRecord, InvoiceError> {
    validate_buyer_id(&req.buyer).map_err(|e| InvoiceError::Invalid(e.to_string()))?;
    if req.count == 0 || req.count > MAX_PERIODS {
        return Err(InvoiceError::Invalid(format!("count must be 1..={MAX_PERIODS}")));
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&req.token_hash, &mut hash)
        .map_err(|_| InvoiceError::Invalid("token_hash must be 64 hex characters (SHA-256 of the token)".into()))?;
    let feed: Feed = chain
        .memcache()
        .get(FEEDS_ADDRESS, &req.feed)
        .and_then(|c| serde_json::from_slice(&c.tx.content.body).ok())
        .filter(|f: &Feed| f.listed)
        .ok_or_else(|| InvoiceError::UnknownFeed(req.feed.clone()))?;
    let sats = feed
        .price(req.period, Currency::Sats)
        .ok_or_else(|| InvoiceError::Invalid(format!("feed {} has no sats price per {:?}", req.feed, req.period)))?;
    let amount_msat = sats
        .checked_mul(u128::from(req.count))
        .and_then(|s| s.checked_mul(1000))
        .and_then(|m| u64::try_from(m).ok())
        .ok_or_else(|| InvoiceError::Invalid("the price in msat does not fit an invoice".into()))?;
    let buyer = format!("{LIGHTNING_BUYER_PREFIX}{}", req.buyer);
    let memo = format!("Kalima feed {} x{} {:?}", req.feed, req.count, req.period).to_lowercase();
    let invoice = backend.create_invoice(NewInvoice::new(amount_msat, memo, expiry_secs)).await?;
    let record = InvoiceRecord {
        payment_hash: invoice.payment_hash.to_string(),
        payment_request: invoice.payment_request.clone(),
        feed: req.feed.clone(),
        period: req.period,
        count: req.count,
        buyer,
        token_hash: hex::encode(hash),
        amount_msat,
        expires_at_ms: i64::try_from(invoice.expires_at()).unwrap_or(i64::MAX / 1000).saturating_mul(1000),
        settled: None,
    };
    let content = TxContent {
        device_id: NODE_DEVICE_ID.into(),
        address: INVOICES_ADDRESS.into(),
        key: record.payment_hash.clone(),
        body: serde_json::to_vec(&record).map_err(|e| InvoiceError::Invalid(e.to_string()))?,
        // An unpaid invoice leaves memory a day after it expires (its history stays).
        ttl_secs: u32::try_from(expiry_secs.saturating_add(86_400)).unwrap_or(u32::MAX),
        ..TxContent::default()
    };
    chain.submit(vec![content], None).await?;
    metrics::counter!("kalima_market_invoices_total").increment(1);
    Ok(record)
}

/// The subscription id an invoice request extends.
pub fn invoice_subscription(req: &InvoiceRequest) -> String {
    subscription_id(&req.feed, &format!("{LIGHTNING_BUYER_PREFIX}{}", req.buyer))
}

/// Records one settled invoice; `Ok` when it is recorded now or was already, or when the
/// node never issued it for a purchase (other payments to the same wallet).
async fn settle(chain: &Chain, invoice: &Invoice) -> Result<(), HandlerError> {
    let hash = invoice.payment_hash.to_string();
    if chain.memcache().get(INVOICES_ADDRESS, &hash).is_none() {
        tracing::debug!(target: "bridge::marketplace", payment_hash = %hash, "A settled invoice that is not a purchase.");
    } else {
        let op = LedgerOp::SettleInvoice(InvoiceSettled {
            payment_hash: hash.clone(),
            settle_index: invoice.settle_index,
            amt_paid_msat: invoice.amt_paid_msat,
        });
        match chain.submit(vec![op.instruction(NODE_DEVICE_ID, format!("settle:{hash}"))], Some(Guard::Ledger)).await {
            Ok(_) => {
                metrics::counter!("kalima_market_settlements_total", "outcome" => "granted").increment(1);
                tracing::info!(target: "bridge::marketplace", payment_hash = %hash, "Lightning purchase settled.");
            }
            Err(CoreError::Rejected(Rejection::Ledger(LedgerError::AlreadySettled(_))))
            | Err(CoreError::Rejected(Rejection::DuplicateIdempotencyKey { .. })) => {
                metrics::counter!("kalima_market_settlements_total", "outcome" => "repeat").increment(1);
            }
            // A refusal (underpaid, unknown feed) will not change on a retry: count and go on.
            Err(CoreError::Rejected(r)) => {
                metrics::counter!("kalima_market_settlements_total", "outcome" => "refused").increment(1);
                tracing::warn!(target: "bridge::marketplace", payment_hash = %hash, reason = %r, "Settlement refused.");
            }
            Err(e) => return Err(Box::new(e)),
        }
    }
    chain.store().put_node_state(&[(SETTLE_INDEX_STATE, invoice.settle_index.to_be_bytes().to_vec())]).await?;
    Ok(())
}

/// Follows the backend's settlements from the settle index this node kept, recording each.
pub async fn watch_settlements(
    chain: Chain,
    backend: Arc<dyn InvoiceBackend>,
    options: WatcherOptions,
) -> kalima_core::Result<SettlementWatcher> {
    let from = match chain.store().node_state(SETTLE_INDEX_STATE).await? {
        Some(v) => v.try_into().map(u64::from_be_bytes).unwrap_or(0),
        None => 0,
    };
    tracing::info!(target: "bridge::marketplace", from, "Following Lightning settlements.");
    let handler = move |invoice: Invoice| {
        let chain = chain.clone();
        async move { settle(&chain, &invoice).await }
    };
    Ok(SettlementWatcher::spawn(backend, from, handler, options))
}

/// The current time, for callers that report an invoice's state.
pub fn is_expired(record: &InvoiceRecord) -> bool {
    record.settled.is_none() && record.expires_at_ms <= now_ms()
}
