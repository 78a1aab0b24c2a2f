//! Integration tests of the marketplace, one binary with a module per area, each on its own
//! chain (a fresh SQLite file): buyers' access tokens, raw and aggregated delivery with proofs,
//! how streams end, the delivery records and the catalogue with providers' reputations.
//!
//! Run: `cargo nextest run -p kalima-marketplace`.

mod common;

mod access;
mod aggregation;
mod catalogue;
mod delivery;
mod records;
mod streams;
