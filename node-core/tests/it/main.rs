//! Integration tests of kalima-core, one binary with a module per area. Every scenario is an
//! `async fn(TestDb)` declared with `backend_tests!`, which makes one test per backend:
//! `<area>::sqlite::<scenario>` (a fresh SQLite file in a temp dir) and
//! `<area>::postgres::<scenario>` (a fresh database on the server named by
//! `KALIMA_TEST_PG_URL`; the test fails, never skips, when it is unset).
//!
//! Run: `eval "$(scripts/peers/postgres start)"` then `cargo nextest run -p kalima-core`.

// A panic is how a test reports a failure; clippy's `allow-unwrap-in-tests` covers `#[test]`
// functions only, not the scenario functions they run.
#![allow(clippy::unwrap_used)]

mod common;

mod bus;
mod chain;
mod encryption;
mod immutability;
mod index;
mod ingest;
mod ledger;
mod link;
mod market;
mod outbox;
mod proofs;
mod receipt;
mod restart;
mod store;
mod upgrade;
mod verify;
