//! The window of recent idempotency keys kept in memory, and the lookup that falls back to
//! the store for keys the window has forgotten.

use std::collections::{HashMap, VecDeque};

use super::Inner;
use crate::error::Result;
use crate::merkle::Hash;
use crate::tx::TxContent;

/// The most recent idempotency keys, first in first out. Older keys are still refused: ingest
/// asks the store (unique index) when this window has dropped any.
pub(super) struct IdempotencyWindow {
    map: HashMap<(String, String), Hash>,
    order: VecDeque<(String, String)>,
    capacity: usize,
    pub(super) evicted: bool,
}

impl IdempotencyWindow {
    pub(super) fn new(capacity: usize) -> Self {
        Self { map: HashMap::new(), order: VecDeque::new(), capacity, evicted: false }
    }

    pub(super) fn get(&self, k: &(String, String)) -> Option<Hash> {
        self.map.get(k).copied()
    }

    pub(super) fn insert(&mut self, k: (String, String), id: Hash) {
        if self.map.insert(k.clone(), id).is_none() {
            self.order.push_back(k);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
                self.evicted = true;
            }
        }
    }
}

/// Which of `items`' idempotency keys were already used, by memory or, once memory has
/// forgotten older keys, by the store (one query per device).
pub(super) async fn used_keys<'a>(
    inner: &Inner,
    items: impl IntoIterator<Item = &'a TxContent>,
) -> Result<HashMap<(String, String), Hash>> {
    let mut used = HashMap::new();
    let mut ask: HashMap<&str, Vec<&str>> = HashMap::new();
    {
        let w = inner.idempotency.lock();
        for c in items.into_iter().filter(|c| !c.idempotency_key.is_empty()) {
            let k = (c.device_id.clone(), c.idempotency_key.clone());
            match w.get(&k) {
                Some(h) => {
                    used.insert(k, h);
                }
                None if w.evicted => ask.entry(c.device_id.as_str()).or_default().push(c.idempotency_key.as_str()),
                None => {}
            }
        }
    }
    for (device, keys) in ask {
        for (key, h) in inner.store.idempotency_lookup(device, &keys).await? {
            used.insert((device.to_string(), key), h);
        }
    }
    Ok(used)
}
