//! The chain engine of a single node: the sequencer task that assigns sequences and the
//! leader timestamp, packs transactions into blocks of at most 16 KB, extends the global
//! Merkle tree, writes many blocks per durable commit (group commit), then updates the
//! memcache, the registry and the bus and answers the writers. Also issues TTL deletes and
//! signed checkpoints, and serves proofs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::block::{BlockHeader, MAX_BLOCK_TX_BYTES};
use crate::bus::Bus;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Rejection, Result};
use crate::keys::NodeKey;
use crate::memcache::Memcache;
use crate::merkle::{CHUNK_SIZE, ConsistencyProof, Frontier, Hash, InclusionProof, MerkleError, MerkleTree, leaf_hash};
use crate::registry::{DEVICES_ADDRESS, NODE_DEVICE_ID, Registry, is_system_address};
use crate::store::{BlockRecord, CommittedTx, PendingTx, Store};
use crate::tx::{Transaction, TxContent};

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone)]
pub enum Guard {
    /// The device id must not be registered yet (registration).
    DeviceAbsent(String),
    /// The device id must be registered (grants, revocation).
    DevicePresent(String),
}

struct Submission {
    items: Vec<TxContent>,
    guard: Option<Guard>,
    reply: Option<oneshot::Sender<Result<Vec<Receipt>>>>,
    enqueued: Instant,
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

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Sequencer-owned state: the uncommitted view used while building a commit.
struct Sequencer {
    inner: Arc<Inner>,
    rx: mpsc::Receiver<Submission>,
    frontier: Frontier,
    expiries: Expiries,
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
            ready: std::sync::atomic::AtomicBool::new(false),
            shutdown: tokio::sync::Notify::new(),
        });
        let chain = Chain { inner, queue };

        let mut seq = Sequencer { inner: chain.inner.clone(), rx, frontier, expiries: Expiries::default() };
        for c in chain.inner.memcache.snapshot() {
            seq.track_expiry(&c);
        }
        if genesis_needed {
            seq.commit(vec![Submission { items: genesis, guard: None, reply: None, enqueued: Instant::now() }], true)
                .await?;
        }
        metrics::gauge!("kalima_block_height").set(chain.head().block.header.height as f64);
        tracing::info!(
            target: "core::chain",
            height = chain.head().block.header.height,
            transactions = chain.tree_size(),
            values = chain.inner.memcache.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Chain restored."
        );
        chain.inner.ready.store(true, std::sync::atomic::Ordering::Release);
        let task = tokio::spawn(seq.run());
        Ok((chain, task))
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
        let sub = Submission { items, guard, reply, enqueued: Instant::now() };
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

/// The most recent idempotency keys, first in first out. Older keys are still refused: ingest
/// asks the store (unique index) when this window has dropped any.
struct IdempotencyWindow {
    map: HashMap<(String, String), Hash>,
    order: std::collections::VecDeque<(String, String)>,
    capacity: usize,
    evicted: bool,
}

impl IdempotencyWindow {
    fn new(capacity: usize) -> Self {
        Self { map: HashMap::new(), order: std::collections::VecDeque::new(), capacity, evicted: false }
    }

    fn get(&self, k: &(String, String)) -> Option<Hash> {
        self.map.get(k).copied()
    }

    fn insert(&mut self, k: (String, String), id: Hash) {
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
async fn used_keys(inner: &Inner, items: &[TxContent]) -> Result<HashMap<(String, String), Hash>> {
    let mut used = HashMap::new();
    let mut ask: HashMap<&str, Vec<&str>> = HashMap::new();
    {
        let w = inner.idempotency.lock();
        for c in items.iter().filter(|c| !c.idempotency_key.is_empty()) {
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

/// Pending TTL deletes: at most one per (address, key), ordered by due time, so memory is
/// bounded by the number of live values with a TTL however often they are rewritten.
#[derive(Default)]
struct Expiries {
    by_key: HashMap<(String, String), (i64, u64)>,
    order: BTreeSet<(i64, u64, String, String)>,
}

impl Expiries {
    /// Records a commit on a key: any pending expiry of the key is replaced (or dropped).
    fn track(&mut self, c: &CommittedTx) {
        let k = (c.tx.content.address.clone(), c.tx.content.key.clone());
        if let Some((at, seq)) = self.by_key.remove(&k) {
            self.order.remove(&(at, seq, k.0.clone(), k.1.clone()));
        }
        if let Some(at) = c.tx.expires_at_ms() {
            self.order.insert((at, c.tx.global_sequence, k.0.clone(), k.1.clone()));
            self.by_key.insert(k, (at, c.tx.global_sequence));
        }
    }

    fn forget(&mut self, address: &str, key: &str, seq: u64) {
        let k = (address.to_string(), key.to_string());
        if let Some((at, s)) = self.by_key.get(&k).copied()
            && s == seq
        {
            self.by_key.remove(&k);
            self.order.remove(&(at, s, k.0, k.1));
        }
    }

    fn next_due(&self) -> Option<i64> {
        self.order.first().map(|(at, ..)| *at)
    }

    /// Up to `max` entries due at `now`, oldest first; they stay pending.
    fn due(&self, now: i64, max: usize) -> Vec<(u64, String, String)> {
        self.order
            .iter()
            .take_while(|(at, ..)| *at <= now)
            .take(max)
            .map(|(_, s, a, k)| (*s, a.clone(), k.clone()))
            .collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_key.len()
    }
}

/// A transaction being built for a commit.
struct Building {
    tx: Transaction,
    bytes: Vec<u8>,
    id: Hash,
}

impl Sequencer {
    async fn run(mut self) -> Result<()> {
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

    fn track_expiry(&mut self, c: &CommittedTx) {
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

    async fn commit(&mut self, subs: Vec<Submission>, genesis: bool) -> Result<()> {
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
        let keyed: Vec<TxContent> =
            subs.iter().flat_map(|s| s.items.iter()).filter(|c| !c.idempotency_key.is_empty()).cloned().collect();
        let used = if keyed.is_empty() { HashMap::new() } else { used_keys(&inner, &keyed).await? };

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

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(seq: u64, key: &str, ttl: u32, body: &[u8]) -> CommittedTx {
        let tx = Transaction {
            global_sequence: seq,
            sequence: seq,
            timestamp_ms: 1_000,
            previous: [0; 32],
            content: TxContent {
                address: "/a".into(),
                key: key.into(),
                body: body.to_vec(),
                ttl_secs: ttl,
                ..TxContent::default()
            },
        };
        CommittedTx { id: tx.id(), tx, height: 1 }
    }

    #[test]
    fn one_pending_expiry_per_key_however_often_it_is_rewritten() {
        let mut e = Expiries::default();
        for seq in 0..10_000 {
            e.track(&committed(seq, "temp", 60, b"1"));
        }
        assert_eq!(e.len(), 1);
        assert_eq!(e.due(i64::MAX, 10), vec![(9_999, "/a".to_string(), "temp".to_string())]);
        // A put without TTL, or a delete, clears it.
        e.track(&committed(10_000, "temp", 0, b"2"));
        assert_eq!((e.len(), e.next_due()), (0, None));
    }

    #[test]
    fn due_entries_come_oldest_first_capped_and_stay_until_committed() {
        let mut e = Expiries::default();
        e.track(&committed(1, "b", 2, b"1"));
        e.track(&committed(2, "a", 1, b"1"));
        e.track(&committed(3, "c", 100, b"1"));
        assert_eq!(e.next_due(), Some(2_000));
        let due: Vec<_> = e.due(5_000, 10).into_iter().map(|(s, _, k)| (s, k)).collect();
        assert_eq!(due, vec![(2, "a".to_string()), (1, "b".to_string())]);
        assert_eq!(e.due(5_000, 1).len(), 1, "capped");
        assert_eq!(e.len(), 3, "still pending until the delete commits");
        e.forget("/a", "a", 99);
        assert_eq!(e.len(), 3, "a different sequence is not forgotten");
        e.forget("/a", "a", 2);
        assert_eq!(e.len(), 2);
    }
}
