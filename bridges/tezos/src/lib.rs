//! Anchoring Kalima checkpoints on Tezos: the anchoring contract (`contracts/anchor.tz`),
//! local forging and signing of the operation that calls it (checked byte for byte against
//! pytezos in the tests), a small Octez RPC client that simulates, injects and follows it
//! through reorgs, the [`TezosAnchorer`] the node runs, and [`read_anchor`] for verifiers.

pub mod anchor;
pub mod config;
pub mod contract;
pub mod error;
pub mod forge;
pub mod keys;
pub mod read;
pub mod rpc;

#[cfg(any(test, feature = "test-utils"))]
pub mod standin;

pub use anchor::{Confirmation, SentAnchor, TezosAnchorer};
pub use config::TezosTarget;
pub use contract::{ANCHOR_CONTRACT, AnchorParameter};
pub use error::{Error, Result};
pub use keys::TezosKey;
pub use read::{TezosAnchor, read_anchor};
pub use rpc::OctezRpc;
