//! The sequencer task: drains the queue into group commits, assigns sequences and the leader
//! timestamp, packs blocks, writes them durably, then publishes the new state.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::expiries::Expiries;
use super::idempotency::used_keys;
use super::{Error, Guard, Inner, Receipt, Submission, now_ms};
use crate::block::{BlockHeader, MAX_BLOCK_TX_BYTES};
use crate::error::{Rejection, Result};
use crate::merkle::{Frontier, Hash, leaf_hash};
use crate::registry::{DEVICES_ADDRESS, NODE_DEVICE_ID, is_system_address};
use crate::store::{BlockRecord, CommittedTx, PendingTx};
use crate::tx::{Transaction, TxContent};

/// Sequencer-owned state: the uncommitted view used while building a commit.
pub(super) struct Sequencer {
    pub(super) inner: Arc<Inner>,
    pub(super) rx: mpsc::Receiver<Submission>,
    pub(super) frontier: Frontier,
    pub(super) expiries: Expiries,
}

/// A transaction being built for a commit.
struct Building {
    tx: Transaction,
    bytes: Vec<u8>,
    id: Hash,
}

impl Sequencer {
    pub(super) async fn run(mut self) -> Result<()> {
        let max = self.inner.config.max_commit_txs;
        loop {
            let next_expiry = self.expiries.next_due();
            let sleep = match next_expiry {
                Some(t) => Duration::from_millis(u64::try_from(t - now_ms()).unwrap_or(0)),
                None => Duration::from_secs(3600),
            };
            let inner = self.inner.clone();
            let first = tokio::select! {
                s = self.rx.recv() => match s {
                    Some(s) => Some(s),
                    None => return Ok(()),
                },
                _ = tokio::time::sleep(sleep) => None,
                _ = inner.shutdown.notified() => {
                    self.rx.close();
                    let mut rest = Vec::new();
                    while let Some(s) = self.rx.recv().await {
                        rest.push(s);
                    }
                    if !rest.is_empty() {
                        self.commit(rest, false).await?;
                    }
                    tracing::info!(target: "core::chain", "Sequencer stopped.");
                    return Ok(());
                }
            };
            let mut subs: Vec<Submission> = self.expired_deletes();
            let mut n: usize = subs.iter().map(|s| s.items.len()).sum();
            if let Some(s) = first {
                n += s.items.len();
                subs.push(s);
            }
            // A guarded submission (registration, grant, revocation) ends its group: writes
            // queued behind it are checked against the registry it changes.
            while n < max && subs.last().is_none_or(|s| s.guard.is_none()) {
                match self.rx.try_recv() {
                    Ok(s) => {
                        n += s.items.len();
                        subs.push(s);
                    }
                    Err(_) => break,
                }
            }
            if subs.is_empty() {
                continue;
            }
            match self.commit(subs, false).await {
                Ok(()) => {}
                // The outcome of the write is unknown: in-memory state may no longer match
                // the store, so stop and let the node restart from what is stored.
                Err(e @ Error::Fatal(_)) => {
                    tracing::error!(target: "core::chain", error = %format!("{e:#}"), "Sequencer stopped.");
                    metrics::counter!("kalima_commit_failures_total").increment(1);
                    return Err(e);
                }
                Err(e) => {
                    // The database rolled back and writers got the error; pending TTL deletes
                    // stay due and are retried. Back off so a failing store is not hammered.
                    tracing::error!(target: "core::chain", error = %format!("{e:#}"), "Commit failed.");
                    metrics::counter!("kalima_commit_failures_total").increment(1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    pub(super) fn track_expiry(&mut self, c: &CommittedTx) {
        self.expiries.track(c);
    }

    /// Delete submissions for values whose TTL has passed (at most one commit's worth). The
    /// entries stay due until the delete commits, so a failed commit retries them.
    fn expired_deletes(&mut self) -> Vec<Submission> {
        let max = self.inner.config.max_commit_txs.max(1);
        let mut items = Vec::new();
        for (seq, address, key) in self.expiries.due(now_ms(), max) {
            let current = self.inner.memcache.get(&address, &key);
            if current.is_some_and(|c| c.tx.global_sequence == seq) {
                items.push(TxContent {
                    device_id: NODE_DEVICE_ID.into(),
                    address,
                    key,
                    props: [("reason".to_string(), "ttl".to_string()), ("expired".to_string(), seq.to_string())].into(),
                    ..TxContent::default()
                });
            } else {
                // Not the live value any more; nothing to delete.
                self.expiries.forget(&address, &key, seq);
            }
        }
        if items.is_empty() {
            return Vec::new();
        }
        metrics::counter!("kalima_ttl_deletes_total").increment(items.len() as u64);
        vec![Submission { items, guard: None, reply: None, enqueued: Instant::now() }]
    }

    pub(super) async fn commit(&mut self, subs: Vec<Submission>, genesis: bool) -> Result<()> {
        let inner = self.inner.clone();
        let head = inner.head.read().clone();
        let timestamp_ms = now_ms().max(head.block.header.timestamp_ms);
        let mut next_seq = self.frontier.len();
        let mut addr_seq: HashMap<String, u64> = HashMap::new();
        let mut last_id: HashMap<(String, String), Hash> = HashMap::new();
        let mut new_idem: HashSet<(String, String)> = HashSet::new();
        let mut new_devices: HashSet<String> = HashSet::new();
        let mut building: Vec<Building> = Vec::new();
        let mut accepted: Vec<(Submission, std::ops::Range<usize>)> = Vec::new();
        // Keys used before, as memory or (for keys it has forgotten) the store knows them: a
        // duplicate that reached the unique index would fail the whole group commit.
        let used = used_keys(&inner, subs.iter().flat_map(|s| s.items.iter())).await?;

        for sub in subs {
            if let Err(rej) = self.check_submission(&sub, &used, &new_idem, &new_devices) {
                match sub.reply {
                    // The caller (ingest) counts it under its interface.
                    Some(r) => {
                        let _ = r.send(Err(rej.into()));
                    }
                    // Queued without a caller waiting (wait=false): count it here.
                    None => {
                        metrics::counter!("kalima_writes_rejected_total", "reason" => rej.code(), "interface" => "queued")
                            .increment(1);
                    }
                }
                continue;
            }
            let start = building.len();
            for c in &sub.items {
                if !c.idempotency_key.is_empty() {
                    new_idem.insert((c.device_id.clone(), c.idempotency_key.clone()));
                }
                if c.address == DEVICES_ADDRESS {
                    new_devices.insert(c.key.clone());
                }
                let a = addr_seq.entry(c.address.clone()).or_insert_with(|| inner.memcache.sequence(&c.address));
                *a += 1;
                let k = (c.address.clone(), c.key.clone());
                let previous = match last_id.get(&k) {
                    Some(h) => *h,
                    None => inner.memcache.last(&c.address, &c.key).map(|t| t.id).unwrap_or([0; 32]),
                };
                let tx =
                    Transaction { global_sequence: next_seq, sequence: *a, timestamp_ms, previous, content: c.clone() };
                next_seq += 1;
                let bytes = tx.encode();
                let id = leaf_hash(&bytes);
                last_id.insert(k, id);
                building.push(Building { tx, bytes, id });
            }
            accepted.push((sub, start..building.len()));
        }
        if building.is_empty() && !genesis {
            return Ok(());
        }

        // Pack into blocks of at most 16 KB of canonical transaction bytes, extending a copy
        // of the frontier so a failed write leaves the committed state untouched.
        let mut frontier = self.frontier.clone();
        let mut blocks: Vec<BlockRecord> = Vec::new();
        let mut heights: Vec<u64> = Vec::with_capacity(building.len());
        let mut prev_hash = head.block.hash;
        let mut height = if genesis { 0 } else { head.block.header.height + 1 };
        let mut i = 0;
        loop {
            let mut size = 0usize;
            let start = i;
            while i < building.len() && (i == start || size + building[i].bytes.len() <= MAX_BLOCK_TX_BYTES) {
                size += building[i].bytes.len();
                frontier.push(building[i].id);
                heights.push(height);
                i += 1;
            }
            let header = BlockHeader {
                height,
                prev_hash,
                timestamp_ms,
                tx_count: (i - start) as u32,
                tree_size: frontier.len(),
                merkle_root: frontier.root(),
                leader: inner.node_key.public_hex(),
            };
            let hash = header.hash();
            blocks.push(BlockRecord { header, hash });
            prev_hash = hash;
            height += 1;
            if i >= building.len() {
                break;
            }
        }

        let pending: Vec<PendingTx> = building
            .into_iter()
            .zip(heights)
            .map(|(b, h)| PendingTx {
                committed: Arc::new(CommittedTx { tx: b.tx, id: b.id, height: h }),
                bytes: b.bytes,
            })
            .collect();

        let write_started = Instant::now();
        let written = inner.store.append(&blocks, &pending).await;
        if let Err(e) = written {
            // An error can come back from a COMMIT that did land (a connection lost during
            // it): the stored head tells which.
            let built = blocks.last().map(|b| b.hash);
            let before = (!genesis).then_some(head.block.hash);
            let outcome = match inner.store.latest_block().await {
                Ok(latest) if latest.as_ref().map(|b| b.hash) == built => None,
                Ok(latest) if latest.as_ref().map(|b| b.hash) == before => Some(Error::CommitFailed(format!("{e:#}"))),
                Ok(_) => Some(Error::Fatal(format!("the stored head moved unexpectedly after: {e:#}"))),
                Err(e2) => Some(Error::Fatal(format!("{e:#}; the stored head cannot be read: {e2:#}"))),
            };
            if let Some(err) = outcome {
                let told = if matches!(err, Error::Fatal(_)) {
                    "the outcome of the write is unknown; retry with the same idempotency key"
                } else {
                    "the write was not stored"
                };
                for (sub, _) in accepted {
                    if let Some(r) = sub.reply {
                        let _ = r.send(Err(Error::CommitFailed(told.into())));
                    }
                }
                return Err(err);
            }
            tracing::warn!(target: "core::chain", error = %format!("{e:#}"), "The store reported an error, but the commit is durable.");
        }
        metrics::histogram!("kalima_store_write_seconds").record(write_started.elapsed().as_secs_f64());

        // Durable: publish the new state.
        self.frontier = frontier;
        let committed: Vec<Arc<CommittedTx>> = pending.iter().map(|p| p.committed.clone()).collect();
        {
            let mut tree = inner.tree.write();
            for c in &committed {
                tree.push(c.id);
            }
            let mut h = inner.head.write();
            if let Some(last) = blocks.last() {
                h.block = last.clone();
            }
        }
        inner.memcache.apply(committed.iter());
        if committed.iter().any(|c| is_system_address(&c.tx.content.address)) {
            inner.registry.apply(&committed, &inner.memcache);
        }
        {
            let mut idem = inner.idempotency.lock();
            for c in &committed {
                if !c.tx.content.idempotency_key.is_empty() {
                    idem.insert((c.tx.content.device_id.clone(), c.tx.content.idempotency_key.clone()), c.id);
                }
            }
        }
        for c in &committed {
            self.track_expiry(c);
        }
        let committed = Arc::new(committed);
        // Publish before answering: a client that subscribes after its ack must not see it twice.
        inner.bus.publish(committed.clone());
        let done = Instant::now();
        for (sub, range) in accepted {
            metrics::histogram!("kalima_commit_seconds").record(done.duration_since(sub.enqueued).as_secs_f64());
            if let Some(r) = sub.reply {
                let receipts = committed[range]
                    .iter()
                    .map(|c| Receipt {
                        id: c.id,
                        global_sequence: c.tx.global_sequence,
                        sequence: c.tx.sequence,
                        height: c.height,
                    })
                    .collect();
                let _ = r.send(Ok(receipts));
            }
        }
        metrics::counter!("kalima_tx_committed_total").increment(committed.len() as u64);
        metrics::counter!("kalima_blocks_committed_total").increment(blocks.len() as u64);
        metrics::histogram!("kalima_commit_batch_transactions").record(committed.len() as f64);
        metrics::gauge!("kalima_block_height").set(height.saturating_sub(1) as f64);
        Ok(())
    }

    /// Checks that must be atomic with the write: idempotency and registry guards.
    fn check_submission(
        &self,
        sub: &Submission,
        used: &HashMap<(String, String), Hash>,
        new_idem: &HashSet<(String, String)>,
        new_devices: &HashSet<String>,
    ) -> std::result::Result<(), Rejection> {
        let mut local: HashSet<(String, String)> = HashSet::new();
        for c in &sub.items {
            if c.idempotency_key.is_empty() {
                continue;
            }
            let k = (c.device_id.clone(), c.idempotency_key.clone());
            let existing = used.get(&k).copied();
            if existing.is_some() || new_idem.contains(&k) || !local.insert(k) {
                return Err(Rejection::DuplicateIdempotencyKey {
                    key: c.idempotency_key.clone(),
                    existing: existing.map(hex::encode).unwrap_or_else(|| "in the same commit".into()),
                });
            }
        }
        // Grants and revocation may have changed since ingest checked this write (it may have
        // waited in the queue): check again against the registry as of this commit.
        if sub.guard.is_none() {
            for c in &sub.items {
                // System addresses are written only by the node and the admin API, never
                // through ingest, so there is no device grant to re-check.
                if c.device_id == NODE_DEVICE_ID || is_system_address(&c.address) {
                    continue;
                }
                match self.inner.registry.get(&c.device_id) {
                    Some(d) if d.record.revoked => return Err(Rejection::Revoked(d.id.clone())),
                    Some(d) if d.can_write(&c.address) => {}
                    _ => {
                        return Err(Rejection::Forbidden {
                            device: c.device_id.clone(),
                            access: "write",
                            address: c.address.clone(),
                        });
                    }
                }
            }
        }
        let registered = |id: &str| new_devices.contains(id) || self.inner.registry.get(id).is_some();
        match &sub.guard {
            Some(Guard::DeviceAbsent(id)) if registered(id) => Err(Rejection::DeviceExists(id.clone())),
            Some(Guard::DevicePresent(id)) if !registered(id) => Err(Rejection::NoSuchDevice(id.clone())),
            _ => Ok(()),
        }
    }
}
