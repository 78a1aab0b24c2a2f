//! The memcache: address -> key -> current transaction, plus the per-address sequence.
//! Only the sequencer writes it (after a durable commit); readers take a short read lock.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::store::CommittedTx;
use crate::tx::{TxKind, prefix_matches};

/// One address: its last sequence and its live values.
#[derive(Debug, Clone, Default)]
pub struct AddressEntry {
    /// Highest per-address sequence committed.
    pub sequence: u64,
    /// Live values by key (deleted keys are absent).
    pub values: BTreeMap<String, Arc<CommittedTx>>,
    /// Last transaction (put or delete) by key, for the `previous` link.
    pub last: BTreeMap<String, Arc<CommittedTx>>,
}

/// Address -> key -> current transaction.
#[derive(Debug, Default)]
pub struct Memcache {
    inner: RwLock<BTreeMap<String, AddressEntry>>,
}

impl Memcache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies committed transactions in order.
    pub fn apply<'a>(&self, txs: impl IntoIterator<Item = &'a Arc<CommittedTx>>) {
        let mut map = self.inner.write();
        for c in txs {
            let content = &c.tx.content;
            let entry = map.entry(content.address.clone()).or_default();
            entry.sequence = entry.sequence.max(c.tx.sequence);
            entry.last.insert(content.key.clone(), c.clone());
            match content.kind() {
                TxKind::Put => {
                    entry.values.insert(content.key.clone(), c.clone());
                }
                TxKind::Delete => {
                    entry.values.remove(&content.key);
                }
            }
        }
    }

    /// Replaces the whole content with `txs` (a client node's snapshot from a master).
    pub fn reset<'a>(&self, txs: impl IntoIterator<Item = &'a Arc<CommittedTx>>) {
        let fresh = Memcache::new();
        fresh.apply(txs);
        *self.inner.write() = fresh.inner.into_inner();
    }

    /// Current value of one key.
    pub fn get(&self, address: &str, key: &str) -> Option<Arc<CommittedTx>> {
        self.inner.read().get(address).and_then(|e| e.values.get(key).cloned())
    }

    /// Last transaction (put or delete) of one key.
    pub fn last(&self, address: &str, key: &str) -> Option<Arc<CommittedTx>> {
        self.inner.read().get(address).and_then(|e| e.last.get(key).cloned())
    }

    /// Current values of an address, by key.
    pub fn values(&self, address: &str) -> Vec<Arc<CommittedTx>> {
        self.inner.read().get(address).map(|e| e.values.values().cloned().collect()).unwrap_or_default()
    }

    /// Keys holding a value at an address.
    pub fn keys(&self, address: &str) -> Vec<String> {
        self.inner.read().get(address).map(|e| e.values.keys().cloned().collect()).unwrap_or_default()
    }

    /// Highest per-address sequence (0 when the address was never written).
    pub fn sequence(&self, address: &str) -> u64 {
        self.inner.read().get(address).map(|e| e.sequence).unwrap_or(0)
    }

    /// Addresses under `prefix` that hold at least one value.
    pub fn addresses(&self, prefix: &str) -> Vec<String> {
        let map = self.inner.read();
        map.iter().filter(|(a, e)| !e.values.is_empty() && prefix_matches(prefix, a)).map(|(a, _)| a.clone()).collect()
    }

    /// Every live value, in address then key order (for verification against the chain).
    pub fn snapshot(&self) -> Vec<Arc<CommittedTx>> {
        let map = self.inner.read();
        map.values().flat_map(|e| e.values.values().cloned()).collect()
    }

    /// Number of live values.
    pub fn len(&self) -> usize {
        self.inner.read().values().map(|e| e.values.len()).sum()
    }

    /// True when no value is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
