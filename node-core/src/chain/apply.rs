//! Applying a batch to the chain: the deterministic half of a commit. Given the same chain
//! and the same batch (content, leader timestamp, leader key), every node builds the same
//! transactions and byte-identical blocks, which is what lets Raft replicate batches rather
//! than blocks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::idempotency::used_keys;
use super::{Error, Guard, Inner, Receipt};
use crate::block::{BlockHeader, MAX_BLOCK_TX_BYTES};
use crate::error::{Rejection, Result};
use crate::ledger::{LedgerContext, Overlay};
use crate::merkle::{Frontier, Hash, leaf_hash};
use crate::registry::{DEVICES_ADDRESS, NODE_DEVICE_ID, is_system_address};
use crate::store::{BlockRecord, CommittedTx, PendingTx};
use crate::tx::{Transaction, TxContent};

/// One writer's all-or-nothing group of transactions, with the condition it needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proposal {
    /// Validated transaction content, in order.
    pub items: Vec<TxContent>,
    /// Registry condition checked atomically with the write.
    pub guard: Option<Guard>,
}

/// What the sequencer (a single node, or the Raft leader) orders for one commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    /// Leader time in ms since the Unix epoch; blocks never go back in time.
    pub timestamp_ms: i64,
    /// Public key (hex) of the node that ordered the batch, recorded in every block.
    pub leader: String,
    /// True for the batch that creates block 0; ignored once the chain has it.
    pub genesis: bool,
    /// The writers' proposals, in order.
    pub proposals: Vec<Proposal>,
}

/// The result of one proposal: its receipts, or why the chain refused it.
pub type Outcome = std::result::Result<Vec<Receipt>, Rejection>;

/// A transaction being built for a commit.
struct Building {
    tx: Transaction,
    bytes: Vec<u8>,
    id: Hash,
}

/// Owner of the uncommitted chain state (the Merkle frontier): only one applier runs.
pub(crate) struct Applier {
    pub(super) inner: Arc<Inner>,
    pub(super) frontier: Frontier,
}

impl Applier {
    /// True once block 0 exists.
    pub(crate) fn has_genesis(&self) -> bool {
        self.inner.has_genesis.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Checks, sequences, packs and durably writes `batch`, then publishes the new state.
    /// `state` rows are written in the same database transaction (Raft's applied position).
    /// Returns one outcome per proposal; an `Err` means nothing was stored.
    pub(crate) async fn apply(&mut self, batch: &Batch, state: &[(&str, Vec<u8>)]) -> Result<Vec<Outcome>> {
        let inner = self.inner.clone();
        let genesis = batch.genesis;
        if genesis == self.has_genesis() {
            // A second genesis (two leaders both found the chain empty), or writes before the
            // first: refused the same way on every node.
            let why =
                if genesis { "the chain already has a genesis block" } else { "the chain has no genesis block yet" };
            if !state.is_empty() {
                inner.store.put_node_state(state).await?;
            }
            return Ok(batch.proposals.iter().map(|_| Err(Rejection::Malformed(why.into()))).collect());
        }
        let head = inner.head.read().clone();
        let timestamp_ms = batch.timestamp_ms.max(head.block.header.timestamp_ms);
        let mut next_seq = self.frontier.len();
        let mut addr_seq: HashMap<String, u64> = HashMap::new();
        let mut last_id: HashMap<(String, String), Hash> = HashMap::new();
        let mut new_idem: HashSet<(String, String)> = HashSet::new();
        let mut new_devices: HashSet<String> = HashSet::new();
        let mut building: Vec<Building> = Vec::new();
        let mut outcomes: Vec<std::result::Result<std::ops::Range<usize>, Rejection>> = Vec::new();
        // Keys used before, as memory or (for keys it has forgotten) the store knows them: a
        // duplicate that reached the unique index would fail the whole group commit.
        let used = used_keys(&inner, batch.proposals.iter().flat_map(|s| s.items.iter())).await?;

        let mut ledger = Overlay::default();
        for sub in &batch.proposals {
            if let Err(rej) = self.check_proposal(sub, &used, &new_idem, &new_devices) {
                outcomes.push(Err(rej));
                continue;
            }
            let expanded;
            let items: &[TxContent] = if matches!(sub.guard, Some(Guard::Ledger)) {
                match self.expand_ledger(sub, timestamp_ms, &mut ledger) {
                    Ok(v) => {
                        expanded = v;
                        &expanded
                    }
                    Err(rej) => {
                        outcomes.push(Err(rej));
                        continue;
                    }
                }
            } else {
                &sub.items
            };
            let start = building.len();
            for c in items {
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
            outcomes.push(Ok(start..building.len()));
        }
        if building.is_empty() && !genesis {
            if !state.is_empty() {
                inner.store.put_node_state(state).await?;
            }
            return Ok(outcomes.into_iter().map(|o| o.map(|_| Vec::new())).collect());
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
                leader: batch.leader.clone(),
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

        let committed = self.write_and_publish(&head, blocks, pending, frontier, state).await?;
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.map(|range| {
                    committed[range]
                        .iter()
                        .map(|c| Receipt {
                            id: c.id,
                            global_sequence: c.tx.global_sequence,
                            sequence: c.tx.sequence,
                            height: c.height,
                        })
                        .collect()
                })
            })
            .collect())
    }

    /// Writes blocks durably, then publishes them: tree, head, memcache, registry,
    /// idempotency window, expiries and bus. `head` is the head the blocks extend.
    pub(super) async fn write_and_publish(
        &mut self,
        head: &super::Head,
        blocks: Vec<BlockRecord>,
        pending: Vec<PendingTx>,
        frontier: Frontier,
        state: &[(&str, Vec<u8>)],
    ) -> Result<Arc<Vec<Arc<CommittedTx>>>> {
        let inner = self.inner.clone();
        let genesis = !self.has_genesis();
        let write_started = Instant::now();
        let written = inner.store.append_with_state(&blocks, &pending, state).await;
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
        inner.has_genesis.store(true, std::sync::atomic::Ordering::Release);
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
        {
            let mut expiries = inner.expiries.lock();
            for c in &committed {
                expiries.track(c);
            }
        }
        let committed = Arc::new(committed);
        // Publish before answering: a client that subscribes after its ack must not see it twice.
        inner.bus.publish(committed.clone());
        let height = blocks.last().map(|b| b.header.height).unwrap_or(0);
        metrics::counter!("kalima_tx_committed_total").increment(committed.len() as u64);
        metrics::counter!("kalima_blocks_committed_total").increment(blocks.len() as u64);
        metrics::histogram!("kalima_commit_batch_transactions").record(committed.len() as f64);
        metrics::gauge!("kalima_block_height").set(height as f64);
        Ok(committed)
    }

    /// A ledger instruction followed by the records it changes, checked against the ledger
    /// as of this point of the batch.
    fn expand_ledger(
        &self,
        sub: &Proposal,
        timestamp_ms: i64,
        overlay: &mut Overlay,
    ) -> std::result::Result<Vec<TxContent>, Rejection> {
        let [instr] = sub.items.as_slice() else {
            return Err(Rejection::Malformed("a ledger proposal holds exactly one instruction".into()));
        };
        let ctx = LedgerContext {
            chain: &self.inner.config.chain,
            timestamp_ms,
            registry: &self.inner.registry,
            cache: &self.inner.memcache,
        };
        crate::ledger::expand(instr, &ctx, overlay)
    }

    /// Checks that must be atomic with the write: idempotency and registry guards.
    fn check_proposal(
        &self,
        sub: &Proposal,
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
