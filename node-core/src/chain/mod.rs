//! The chain engine of a single node: the sequencer task that assigns sequences and the
//! leader timestamp, packs transactions into blocks of at most 16 KB, extends the global
//! Merkle tree, writes many blocks per durable commit (group commit), then updates the
//! memcache, the registry and the bus and answers the writers. Also issues TTL deletes and
//! signed checkpoints, and serves proofs.

mod apply;
mod expiries;
mod idempotency;
mod import;
mod sequencer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::block::BlockHeader;
use crate::bus::Bus;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::keys::NodeKey;
use crate::memcache::Memcache;
use crate::merkle::{CHUNK_SIZE, ConsistencyProof, Frontier, Hash, InclusionProof, MerkleError, MerkleTree};
use crate::registry::Registry;
use crate::store::{BlockRecord, CommittedTx, Store};
use crate::tx::TxContent;

pub(crate) use apply::Applier;
pub use apply::{Batch, Outcome, Proposal};
use expiries::Expiries;
use idempotency::{IdempotencyWindow, used_keys};
use sequencer::Sequencer;
pub(crate) use sequencer::{Reply, answer};

/// The chain name recorded at genesis, if the chain records one.
pub fn genesis_chain_name(memcache: &Memcache) -> Option<String> {
    let g = memcache.get(crate::registry::CHAIN_ADDRESS, "genesis")?;
    let v: serde_json::Value = serde_json::from_slice(&g.tx.content.body).ok()?;
    v.get("chain")?.as_str().map(str::to_string)
}

/// Tunables of the engine.
#[derive(Debug, Clone)]
pub struct ChainConfig {
    /// Chain name (signed into checkpoints).
    pub chain: String,
    /// Most transactions in one group commit.
    pub max_commit_txs: usize,
    /// Submissions that may wait for the sequencer before writers are held back.
    pub queue_capacity: usize,
    /// Commits a bus subscriber may fall behind before it is dropped.
    pub bus_capacity: usize,
    /// Idempotency keys remembered in memory; older ones are looked up in the store.
    pub idempotency_window: usize,
    /// Interval of automatic checkpoints; `None` disables them.
    pub checkpoint_interval: Option<Duration>,
}

impl Default for ChainConfig {
    fn default() -> Self {
        Self {
            chain: "kalima-dev".into(),
            max_commit_txs: 20_000,
            queue_capacity: 4096,
            bus_capacity: 1024,
            idempotency_window: 1_000_000,
            checkpoint_interval: Some(Duration::from_secs(60)),
        }
    }
}

/// Where a committed transaction landed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Receipt {
    /// Transaction id (leaf hash).
    pub id: Hash,
    /// Global sequence.
    pub global_sequence: u64,
    /// Per-address sequence.
    pub sequence: u64,
    /// Block height.
    pub height: u64,
}

/// A condition checked by the sequencer, atomically with the write.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Guard {
    /// The device id must not be registered yet (registration).
    DeviceAbsent(String),
    /// The device id must be registered (grants, revocation).
    DevicePresent(String),
    /// The single item is a KLX ledger instruction: the applier checks it against the
    /// ledger and appends the records it changes.
    Ledger,
}

impl Guard {
    /// True for registry changes: writes ordered after one in the same commit would be
    /// checked against the registry as it was before it, so it ends its commit. Ledger
    /// instructions see earlier ones of the same commit, so they do not.
    pub(crate) fn ends_group(guard: &Option<Guard>) -> bool {
        matches!(guard, Some(Guard::DeviceAbsent(_) | Guard::DevicePresent(_)))
    }
}

/// A proposal waiting for the sequencer, with the writer to answer.
pub(crate) struct Submission {
    pub(crate) proposal: Proposal,
    pub(crate) reply: Option<oneshot::Sender<Result<Vec<Receipt>>>>,
    pub(crate) enqueued: Instant,
}

/// The committed head: the latest block and tree size.
#[derive(Debug, Clone)]
pub struct Head {
    /// Latest block.
    pub block: BlockRecord,
}

struct Inner {
    config: ChainConfig,
    store: Store,
    node_key: NodeKey,
    memcache: Arc<Memcache>,
    registry: Arc<Registry>,
    bus: Bus,
    tree: RwLock<MerkleTree>,
    head: RwLock<Head>,
    idempotency: Mutex<IdempotencyWindow>,
    expiries: Mutex<Expiries>,
    has_genesis: std::sync::atomic::AtomicBool,
    ready: std::sync::atomic::AtomicBool,
    shutdown: tokio::sync::Notify,
}

/// Handle on the running chain; cheap to clone.
#[derive(Clone)]
pub struct Chain {
    inner: Arc<Inner>,
    // Held by handles only (not by the sequencer), so dropping every handle stops it.
    queue: mpsc::Sender<Submission>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain").field("chain", &self.inner.config.chain).finish()
    }
}

/// Wall-clock time in ms since the Unix epoch (0 before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Chain {
    /// Restores the chain from `store` (creating genesis from `genesis` when empty) and
    /// starts the sequencer. The returned task ends when every handle is dropped or on a
    /// fatal storage error.
    pub async fn open(
        store: Store,
        node_key: NodeKey,
        config: ChainConfig,
        genesis: Vec<TxContent>,
    ) -> Result<(Chain, JoinHandle<Result<()>>)> {
        let (chain, applier, rx) = Chain::restore(store, node_key, config).await?;
        let mut seq = Sequencer { applier, rx };
        if !seq.applier.has_genesis() {
            let sub = Submission {
                proposal: Proposal { items: genesis, guard: None },
                reply: None,
                enqueued: Instant::now(),
            };
            seq.commit(vec![sub], true).await?;
        }
        chain.set_ready();
        let task = tokio::spawn(seq.run());
        Ok((chain, task))
    }

    /// Marks the chain as serving (readiness).
    pub(crate) fn set_ready(&self) {
        metrics::gauge!("kalima_block_height").set(self.head().block.header.height as f64);
        tracing::info!(
            target: "core::chain",
            height = self.head().block.header.height,
            transactions = self.tree_size(),
            values = self.inner.memcache.len(),
            "Chain ready."
        );
        self.inner.ready.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Restores the chain from `store` without sequencing anything: the caller owns the
    /// applier (the single node's sequencer, or the Raft state machine) and the queue.
    pub(crate) async fn restore(
        store: Store,
        node_key: NodeKey,
        config: ChainConfig,
    ) -> Result<(Chain, Applier, mpsc::Receiver<Submission>)> {
        let started = Instant::now();
        let memcache = Arc::new(Memcache::new());
        let registry = Arc::new(Registry::new());
        let (queue, rx) = mpsc::channel(config.queue_capacity.max(1));

        // Rebuild the Merkle tree from stored leaf hashes, page by page.
        let mut tree = MerkleTree::new();
        let mut frontier = Frontier::new();
        let total = store.tx_count().await?;
        let mut from = 0u64;
        while from < total {
            let to = (from + 100_000).min(total);
            let hashes = store.leaf_hashes(from, to).await?;
            if hashes.len() as u64 != to - from {
                return Err(Error::Corrupt {
                    height: 0,
                    reason: format!("transactions missing between sequence {from} and {to}"),
                });
            }
            for h in hashes {
                tree.push(h);
                frontier.push(h);
            }
            from = to;
        }

        // Restore memcache and registry from the latest transaction of every key.
        let latest = store.latest_per_key().await?;
        let latest: Vec<Arc<CommittedTx>> = latest.into_iter().map(Arc::new).collect();
        memcache.apply(latest.iter());
        registry.rebuild(&memcache);
        // Signatures and checkpoints are bound to the chain name: running a chain under
        // another name would make every one of them fail.
        if let Some(name) = genesis_chain_name(&memcache)
            && name != config.chain
        {
            return Err(Error::Config(format!(
                "this chain was created as {name:?} but [node] chain is {:?}; set [node] chain = {name:?}",
                config.chain
            )));
        }
        let window = config.idempotency_window.max(1);
        let recent = store.recent_idempotency_keys(window as u64).await?;
        let mut idem = IdempotencyWindow::new(window);
        // A full window means older keys exist that only the store remembers.
        idem.evicted = recent.len() >= window;
        for (dev, key, id) in recent.into_iter().rev() {
            idem.insert((dev, key), id);
        }

        let head_block = store.latest_block().await?;
        let genesis_needed = head_block.is_none();
        let head = match head_block {
            Some(b) => {
                // The chain and the rebuilt tree must agree before we accept writes.
                if b.header.tree_size != tree.len() || b.header.merkle_root != tree.root() {
                    return Err(Error::Corrupt {
                        height: b.header.height,
                        reason: "stored transactions do not match the head block's Merkle root".into(),
                    });
                }
                Head { block: b }
            }
            None => Head {
                block: BlockRecord {
                    header: BlockHeader {
                        height: 0,
                        prev_hash: [0; 32],
                        timestamp_ms: 0,
                        tx_count: 0,
                        tree_size: 0,
                        merkle_root: tree.root(),
                        leader: node_key.public_hex(),
                    },
                    hash: [0; 32],
                },
            },
        };

        let config_bus_capacity = config.bus_capacity;
        let inner = Arc::new(Inner {
            config,
            store,
            node_key,
            memcache,
            registry,
            bus: Bus::new(config_bus_capacity),
            tree: RwLock::new(tree),
            head: RwLock::new(head),
            idempotency: Mutex::new(idem),
            expiries: Mutex::new(Expiries::default()),
            has_genesis: std::sync::atomic::AtomicBool::new(!genesis_needed),
            ready: std::sync::atomic::AtomicBool::new(false),
            shutdown: tokio::sync::Notify::new(),
        });
        let chain_inner = inner.clone();
        let chain = Chain { inner, queue };

        {
            let mut expiries = chain.inner.expiries.lock();
            for c in chain.inner.memcache.snapshot() {
                expiries.track(&c);
            }
        }
        tracing::info!(
            target: "core::chain",
            height = chain.head().block.header.height,
            transactions = chain.tree_size(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Chain restored."
        );
        Ok((chain, Applier { inner: chain_inner, frontier }, rx))
    }

    /// Stops the sequencer after it has committed what is already queued.
    pub fn shutdown(&self) {
        self.inner.ready.store(false, std::sync::atomic::Ordering::Release);
        self.inner.shutdown.notify_one();
    }

    /// Submits validated content and waits for the durable commit.
    pub async fn submit(&self, items: Vec<TxContent>, guard: Option<Guard>) -> Result<Vec<Receipt>> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(items, guard, Some(tx)).await?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Enqueues validated content now and returns the commit's outcome as a future, so a
    /// caller can keep several submissions in flight while their order on the chain stays
    /// the order of these calls.
    pub async fn submit_pipelined(
        &self,
        items: Vec<TxContent>,
    ) -> Result<impl std::future::Future<Output = Result<Vec<Receipt>>> + Send + 'static> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(items, None, Some(tx)).await?;
        Ok(async move { rx.await.map_err(|_| Error::ShuttingDown)? })
    }

    /// Queues proposals (forwarded by another node) in order and returns the wait for each.
    pub(crate) async fn submit_proposals(
        &self,
        proposals: Vec<Proposal>,
    ) -> Result<Vec<impl std::future::Future<Output = Result<Vec<Receipt>>> + Send + 'static>> {
        let mut waits = Vec::with_capacity(proposals.len());
        for p in proposals {
            let (tx, rx) = oneshot::channel();
            self.enqueue(p.items, p.guard, Some(tx)).await?;
            waits.push(async move { rx.await.map_err(|_| Error::ShuttingDown)? });
        }
        Ok(waits)
    }

    /// TTL deletes now due (the leader proposes them).
    pub(crate) fn expired_deletes(&self) -> Vec<Submission> {
        sequencer::expired_deletes(&self.inner)
    }

    /// True once block 0 exists.
    pub fn has_genesis(&self) -> bool {
        self.inner.has_genesis.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Submits validated content without waiting for the commit.
    pub async fn submit_nowait(&self, items: Vec<TxContent>) -> Result<()> {
        self.enqueue(items, None, None).await
    }

    async fn enqueue(
        &self,
        items: Vec<TxContent>,
        guard: Option<Guard>,
        reply: Option<oneshot::Sender<Result<Vec<Receipt>>>>,
    ) -> Result<()> {
        let sub = Submission { proposal: Proposal { items, guard }, reply, enqueued: Instant::now() };
        self.queue.send(sub).await.map_err(|_| Error::ShuttingDown)
    }

    /// The memcache.
    pub fn memcache(&self) -> &Arc<Memcache> {
        &self.inner.memcache
    }

    /// The device registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The engine configuration.
    pub fn config(&self) -> &ChainConfig {
        &self.inner.config
    }

    /// The node's public key (hex).
    pub fn node_id(&self) -> String {
        self.inner.node_key.public_hex()
    }

    /// The committed head.
    pub fn head(&self) -> Head {
        self.inner.head.read().clone()
    }

    /// Committed transactions.
    pub fn tree_size(&self) -> u64 {
        self.inner.tree.read().len()
    }

    /// True once the chain was restored and the sequencer runs.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(std::sync::atomic::Ordering::Acquire) && !self.queue.is_closed()
    }

    /// The id of the transaction that already used this idempotency key, if memory knows it.
    pub fn idempotency_hit(&self, device: &str, key: &str) -> Option<Hash> {
        if key.is_empty() {
            return None;
        }
        self.inner.idempotency.lock().get(&(device.to_string(), key.to_string()))
    }

    /// Which of `items`' idempotency keys were already used, by memory or, once memory has
    /// forgotten older keys, by the store (one query per device).
    pub async fn idempotency_used(&self, items: &[TxContent]) -> Result<HashMap<(String, String), Hash>> {
        used_keys(&self.inner, items).await
    }

    /// Runs a Merkle computation, fetching old leaf chunks from the store as it asks for them.
    async fn with_leaves<T>(
        &self,
        f: impl Fn(&MerkleTree, &HashMap<u64, Vec<Hash>>) -> std::result::Result<T, MerkleError>,
    ) -> Result<T> {
        let mut chunks: HashMap<u64, Vec<Hash>> = HashMap::new();
        // Each round fetches one chunk; RFC 6962 proofs touch at most a few.
        for _ in 0..8 {
            let res = {
                let tree = self.inner.tree.read();
                f(&tree, &chunks)
            };
            match res {
                Err(MerkleError::MissingChunk(i)) if !chunks.contains_key(&i) => {
                    let from = i * CHUNK_SIZE;
                    let leaves = self.inner.store.leaf_hashes(from, from + CHUNK_SIZE).await?;
                    // A tampered hash column would otherwise turn into a wrong proof.
                    self.inner.tree.read().check_chunk(i, &leaves)?;
                    chunks.insert(i, leaves);
                }
                other => return Ok(other?),
            }
        }
        Err(Error::Corrupt { height: 0, reason: "Merkle leaf chunks could not be loaded".into() })
    }

    /// Inclusion proof of the transaction at `index` in the tree of `size` (default: current).
    pub async fn inclusion_proof(&self, index: u64, size: Option<u64>) -> Result<InclusionProof> {
        let size = size.unwrap_or_else(|| self.tree_size());
        let (path, root) =
            self.with_leaves(|t, c| Ok((t.inclusion_proof(index, size, c)?, t.root_at(size, c)?))).await?;
        let in_memory = self.inner.tree.read().leaf_in_memory(index);
        let leaf = match in_memory {
            Some(h) => h,
            None => self
                .inner
                .store
                .leaf_hashes(index, index + 1)
                .await?
                .into_iter()
                .next()
                .ok_or(MerkleError::MissingChunk(index / CHUNK_SIZE))?,
        };
        Ok(InclusionProof {
            leaf_index: index,
            tree_size: size,
            leaf_hash: hex::encode(leaf),
            audit_path: path.iter().map(hex::encode).collect(),
            root: hex::encode(root),
        })
    }

    /// Consistency proof between two tree sizes.
    pub async fn consistency_proof(&self, first: u64, second: u64) -> Result<ConsistencyProof> {
        let proof = self.with_leaves(|t, c| t.consistency_proof(first, second, c)).await?;
        Ok(ConsistencyProof { first, second, proof: proof.iter().map(hex::encode).collect() })
    }

    /// Root of the tree at `size`.
    pub async fn root_at(&self, size: u64) -> Result<Hash> {
        self.with_leaves(|t, c| t.root_at(size, c)).await
    }

    /// Signs and stores a checkpoint of the committed head.
    pub async fn checkpoint_now(&self) -> Result<Checkpoint> {
        let (size, root, height) = {
            // Read tree and head under one tree lock so they describe the same commit.
            let tree = self.inner.tree.read();
            let head = self.inner.head.read();
            (tree.len(), tree.root(), head.block.header.height)
        };
        let cp = Checkpoint::sign(&self.inner.node_key, &self.inner.config.chain, size, root, height, now_ms());
        self.inner.store.insert_checkpoint(&cp).await?;
        metrics::counter!("kalima_checkpoints_total").increment(1);
        Ok(cp)
    }

    /// The latest stored checkpoint.
    pub async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>> {
        self.inner.store.latest_checkpoint(&self.inner.config.chain).await
    }

    /// Starts the periodic checkpoint task (no-op when disabled).
    pub fn spawn_checkpoints(&self) -> Option<JoinHandle<()>> {
        let every = self.inner.config.checkpoint_interval?;
        let chain = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let last = chain.latest_checkpoint().await.ok().flatten().map(|c| c.tree_size);
                if last == Some(chain.tree_size()) {
                    continue;
                }
                if let Err(e) = chain.checkpoint_now().await {
                    tracing::warn!(target: "core::chain", error = %e, "Checkpoint failed.");
                }
            }
        }))
    }
}
