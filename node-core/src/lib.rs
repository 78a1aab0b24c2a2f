//! Kalima chain core: transactions and their canonical encoding, blocks, the global RFC 6962
//! Merkle tree and its proofs, signed checkpoints, encrypted storage (SQLite/PostgreSQL),
//! the sequencer with group commit, the memcache, the bus, devices and grants, and ingest:
//! the narrow interface every front door writes through.

pub mod anchor;
pub mod block;
pub mod bus;
pub mod chain;
pub mod checkpoint;
pub mod client;
pub mod cluster;
pub mod error;
pub mod feeds;
pub mod ingest;
pub mod keys;
pub mod ledger;
pub mod memcache;
pub mod merkle;
pub mod receipt;
pub mod registry;
pub mod store;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod tx;
pub mod verify;

pub use chain::{Chain, ChainConfig, Receipt, now_ms};
pub use error::{Error, Rejection, Result};
pub use ingest::Ingest;
pub use store::{CommittedTx, Store};
