//! The oracle marketplace: the catalogue of feeds with each provider's reputation, buyers'
//! access tokens, and delivery of a feed's readings (raw or aggregated per window), each
//! with its inclusion proof, with every delivery batch recorded on the chain. The rules of
//! listing and paying (and the records they write) are the ledger's, in
//! `kalima_core::ledger::market`, so every master applies them identically.

pub mod access;
pub mod catalogue;
pub mod delivery;
mod error;
pub mod lightning;
pub mod webhook;

pub use access::{Access, MarketGate, authorize, new_token};
pub use catalogue::{FeedFilter, FeedView, Reputation, catalogue, feed_view};
pub use delivery::{Delivered, DeliveryRecord, FeedStream, Source, follow};
pub use error::{Error, Result};
pub use webhook::{MarketplaceSection, Webhook, WebhookOptions, WebhookService};
