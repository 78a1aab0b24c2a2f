//! Messages between a client node and the masters, carried over node links.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::outbox::Outcome;
use crate::error::{Error, Result};
use crate::merkle::leaf_hash;
use crate::store::CommittedTx;
use crate::tx::{Transaction, TxContent};

/// A client node asks for the changes of its authorized addresses (a long poll).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WatchRequest {
    /// The client node's device id on the chain (its read grants are what it syncs).
    pub device: String,
    /// That device's token.
    pub token: String,
    /// The session the client holds (0: start one).
    pub session: u64,
    /// How long the master may wait for a change before answering with none.
    pub wait_ms: u32,
}

/// A committed transaction as sent to a client node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireTx {
    /// Canonical transaction bytes.
    pub bytes: Vec<u8>,
    /// Height of the block holding it.
    pub height: u64,
}

impl WireTx {
    pub(crate) fn from_committed(c: &CommittedTx) -> Self {
        Self { bytes: c.tx.encode(), height: c.height }
    }

    pub(crate) fn into_committed(self) -> Result<Arc<CommittedTx>> {
        let tx = Transaction::decode(&self.bytes).map_err(Error::Decode)?;
        Ok(Arc::new(CommittedTx { id: leaf_hash(&self.bytes), tx, height: self.height }))
    }
}

/// What the master answers to a [`WatchRequest`]; `head` is the master's tree size when it
/// answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum WatchUpdate {
    /// A new session: every live value under `prefixes`, then the commits seen since.
    Snapshot { session: u64, prefixes: Vec<String>, values: Vec<WireTx>, events: Vec<WireTx>, head: u64 },
    /// Commits under the session's prefixes since the last answer (possibly none).
    Events { events: Vec<WireTx>, head: u64 },
}

/// Outbox groups to commit, each as one unit, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ClientWrite {
    /// The groups.
    pub groups: Vec<Vec<TxContent>>,
    /// The tree size the client has seen (its devices and grants come from there): the
    /// master checks the groups only once it has applied that much.
    pub seen: u64,
}

/// The fate of one group of a [`ClientWrite`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum GroupResult {
    /// Final: record it.
    Done(Outcome),
    /// Not decided (another write with the same key was being ordered): send it again.
    Retry,
}
