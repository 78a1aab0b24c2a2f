//! The crate's metric names, and the functions that count errors under a bounded `reason`.

use crate::error::Error;

/// Invoices created through LND.
pub const INVOICES_CREATED: &str = "kalima_lightning_invoices_created_total";
/// Settled invoices the settlement handler accepted.
pub const SETTLEMENTS: &str = "kalima_lightning_settlements_total";
/// Subscriptions opened again by the settlement watcher after a stream ended or failed.
pub const STREAM_RECONNECTS: &str = "kalima_lightning_stream_reconnects_total";
/// Errors, labelled `reason` (one of [`Error::REASONS`]).
pub const ERRORS: &str = "kalima_lightning_errors_total";

/// Describes the metrics and sets every counter to 0, so that they show before the first event.
pub fn register() {
    metrics::describe_counter!(INVOICES_CREATED, "Invoices created through LND.");
    metrics::describe_counter!(SETTLEMENTS, "Settled invoices handled by the settlement watcher.");
    metrics::describe_counter!(STREAM_RECONNECTS, "Invoice subscriptions reopened after a stream ended or failed.");
    metrics::describe_counter!(ERRORS, "Lightning bridge errors, by reason.");
    metrics::counter!(INVOICES_CREATED).increment(0);
    metrics::counter!(SETTLEMENTS).increment(0);
    metrics::counter!(STREAM_RECONNECTS).increment(0);
    for reason in Error::REASONS {
        metrics::counter!(ERRORS, "reason" => reason).increment(0);
    }
}

/// Counts one error under its reason.
pub(crate) fn error(err: &Error) {
    metrics::counter!(ERRORS, "reason" => err.reason()).increment(1);
}
