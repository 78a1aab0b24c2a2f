//! The interface a payment backend implements: create and look up invoices, follow one
//! invoice, and follow every settlement in order. [`crate::LndRest`] implements it over LND's
//! REST API; the marketplace and the [`crate::SettlementWatcher`] only see this trait.

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::Result;
use crate::types::{Invoice, NewInvoice, PaymentHash};

/// A stream of invoice updates. It yields at most one `Err`, as its last item; it also ends
/// (`None`) when the backend closes it. Either way the caller subscribes again to go on.
pub type InvoiceStream = BoxStream<'static, Result<Invoice>>;

/// A Lightning payment backend that issues BOLT11 invoices and reports their settlement.
#[async_trait]
pub trait InvoiceBackend: Send + Sync {
    /// Creates an invoice and returns it as the backend stored it (state `Open`).
    async fn create_invoice(&self, req: NewInvoice) -> Result<Invoice>;

    /// The invoice with this payment hash, or `None` when the backend has none.
    async fn lookup_invoice(&self, payment_hash: &PaymentHash) -> Result<Option<Invoice>>;

    /// Follows one invoice: its current state first (once it exists), then every change; the
    /// stream ends after a final state (`Settled` or `Canceled`).
    async fn subscribe_invoice(&self, payment_hash: &PaymentHash) -> Result<InvoiceStream>;

    /// Every invoice settled with a settle index above `after_settle_index`: those already
    /// settled first, then live ones, in increasing settle index, each once. Pass the last
    /// index handled (0 at first) to resume without a gap.
    async fn subscribe_settled(&self, after_settle_index: u64) -> Result<InvoiceStream>;
}
