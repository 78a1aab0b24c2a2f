//! Lightning payments for the node: data buyers pay BOLT11 invoices that the node creates and
//! watches through an LND node's REST API.
//!
//! This crate owns the payment side only: the [`InvoiceBackend`] interface and its LND
//! implementation [`LndRest`] (macaroon, TLS pinned to LND's `tls.cert`, strict parsing of
//! LND's JSON), the [`SettlementWatcher`] that hands every settled invoice to the node once and
//! in order across reconnects and restarts, the `[lightning]` configuration section, and the
//! `kalima_lightning_*` metrics. What a payment buys (feeds, access tokens) is the
//! marketplace's business. With feature `test-utils`, [`lnd_standin`] is a stand-in for LND's
//! REST API that issues real BOLT11 invoices.

pub mod backend;
pub mod config;
pub mod error;
pub mod lnd;
pub mod telemetry;
pub mod types;
pub mod watcher;

mod ndjson;
mod tls;
mod wire;

#[cfg(any(test, feature = "test-utils"))]
pub mod lnd_standin;

pub use backend::{InvoiceBackend, InvoiceStream};
pub use config::LightningSection;
pub use error::{Error, Result};
pub use lnd::{LndRest, MACAROON_HEADER, Macaroon};
pub use types::{Invoice, InvoiceState, MAX_MEMO_BYTES, NewInvoice, PaymentHash};
pub use watcher::{HandlerError, SettlementHandler, SettlementWatcher, WatcherOptions, WatcherStatus};
