//! A client node: an edge gateway that holds no chain. It links to every configured master
//! (Noise links, reconnecting with backoff from 0.5 s to 30 s), keeps a local memcache of
//! the addresses its device may read (and the device registry, so its local devices are
//! authenticated even offline), and sends every local write through an on-disk,
//! hash-chained outbox that is delivered to the masters in order, each group exactly once
//! (idempotency keys), whenever one of them is reachable.

mod deliver;
pub mod outbox;
mod sync;
pub(crate) mod wire;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

use crate::bus::Bus;
use crate::cluster::link::{LinkIdentity, LinkKey, LinkTuning, PeerKey};
use crate::cluster::rpc::Peer;
use crate::error::{Error, Result};
use crate::ingest::Written;
use crate::keys::DataKeys;
use crate::memcache::Memcache;
use crate::registry::Registry;
use crate::tx::TxContent;
use outbox::{Outbox, OutboxCounts, Outcome};

/// File holding the last synced values (sealed), so a client restarted while the masters
/// are out of reach still knows its devices.
pub const CLIENT_CACHE_FILE: &str = "client-cache.bin";

/// Longest wait between reconnection attempts of a client node.
pub const CLIENT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Settings of a client node.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The chain's name (bound into link handshakes and signatures).
    pub chain: String,
    /// This client's device id on the chain; its read grants are the addresses it syncs.
    pub device: String,
    /// That device's token.
    pub token: String,
    /// The masters: link address and link public key.
    pub masters: Vec<(String, PeerKey)>,
    /// Link timing.
    pub link: LinkTuning,
    /// How long a local write waits for the masters' commit before it is answered as queued.
    pub ack_wait: Duration,
    /// Most outbox entries sent to a master in one delivery.
    pub delivery_max_items: usize,
    /// Delivered entries kept in the outbox (older ones are pruned).
    pub keep_delivered: u64,
    /// Commits a local bus subscriber may fall behind.
    pub bus_capacity: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            chain: "kalima-dev".into(),
            device: String::new(),
            token: String::new(),
            masters: Vec::new(),
            link: LinkTuning::default(),
            ack_wait: Duration::from_secs(5),
            delivery_max_items: 2000,
            keep_delivered: 100_000,
            bus_capacity: 1024,
        }
    }
}

/// One master as the client sees it.
#[derive(Debug, Clone, Serialize)]
pub struct MasterStatus {
    /// Link address.
    pub addr: String,
    /// Whether the last request to it was answered (`None`: not contacted yet).
    pub reachable: Option<bool>,
    /// Why the last request failed, if it did.
    pub last_error: Option<String>,
}

/// What a client node reports.
#[derive(Debug, Clone, Serialize)]
pub struct ClientStatus {
    /// This client's device id.
    pub device: String,
    /// The masters.
    pub masters: Vec<MasterStatus>,
    /// A master took the last delivery (writes are answered after commit).
    pub online: bool,
    /// Why the last delivery attempt failed, until one succeeds.
    pub delivery_error: Option<String>,
    /// The memcache was synced from a master at least once since start.
    pub synced: bool,
    /// Address prefixes being synced.
    pub prefixes: Vec<String>,
    /// Live values in the local memcache.
    pub values: usize,
    /// Snapshots received (the first, and one after each lost session).
    pub snapshots: u64,
    /// The outbox.
    pub outbox: OutboxCounts,
}

#[derive(Debug, Default)]
struct Shared {
    masters: Vec<MasterStatus>,
    online: bool,
    delivery_error: Option<String>,
    synced: bool,
    prefixes: Vec<String>,
    snapshots: u64,
}

pub(crate) struct Inner {
    config: ClientConfig,
    outbox: Outbox,
    keys: Arc<DataKeys>,
    memcache: Arc<Memcache>,
    registry: Arc<Registry>,
    bus: Bus,
    masters: Vec<Arc<Peer>>,
    shared: Mutex<Shared>,
    waiters: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    /// Wakes the deliverer when the outbox grows.
    wake: Notify,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    cache_path: std::path::PathBuf,
    /// The memcache changed since it was last saved.
    dirty: std::sync::atomic::AtomicBool,
    /// The highest master tree size synced from: deliveries are checked from there on.
    seen: std::sync::atomic::AtomicU64,
}

/// Handle on a running client node; cheap to clone.
#[derive(Clone)]
pub struct ClientNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClientNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientNode").field("device", &self.inner.config.device).finish()
    }
}

impl ClientNode {
    /// Opens the outbox in `dir` (checking its hash chain), restores the last synced values,
    /// and starts syncing and delivering.
    pub async fn start(dir: &Path, link_key: LinkKey, keys: Arc<DataKeys>, config: ClientConfig) -> Result<Self> {
        if config.masters.is_empty() {
            return Err(Error::Config("a client node needs at least one master".into()));
        }
        let outbox = Outbox::open(dir, keys.clone()).await?;
        let identity =
            LinkIdentity::new(link_key, &config.chain, config.masters.iter().map(|(_, k)| *k), config.link.clone());
        let masters: Vec<Arc<Peer>> = config
            .masters
            .iter()
            .map(|(addr, key)| Arc::new(Peer::new(addr.clone(), *key, identity.clone(), CLIENT_BACKOFF_MAX)))
            .collect();
        let shared = Shared {
            masters: config
                .masters
                .iter()
                .map(|(addr, _)| MasterStatus { addr: addr.clone(), reachable: None, last_error: None })
                .collect(),
            // Writers wait for commits until a delivery fails.
            online: true,
            ..Shared::default()
        };
        let inner = Arc::new(Inner {
            bus: Bus::new(config.bus_capacity),
            config,
            outbox,
            keys,
            memcache: Arc::new(Memcache::new()),
            registry: Arc::new(Registry::new()),
            masters,
            shared: Mutex::new(shared),
            waiters: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            stop: tokio::sync::watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
            cache_path: dir.join(CLIENT_CACHE_FILE),
            dirty: std::sync::atomic::AtomicBool::new(false),
            seen: std::sync::atomic::AtomicU64::new(0),
        });
        let node = ClientNode { inner };
        node.restore_cache();
        let tasks = vec![
            tokio::spawn(sync::run(node.inner.clone())),
            tokio::spawn(deliver::run(node.inner.clone())),
            tokio::spawn(sync::persist(node.inner.clone())),
        ];
        node.inner.tasks.lock().extend(tasks);
        Ok(node)
    }

    fn restore_cache(&self) {
        match sync::load_cache(&self.inner) {
            Ok(Some(n)) => tracing::info!(target: "core::client", values = n, "Restored the last synced values."),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(target: "core::client", error = %e, "The saved values are unreadable; waiting for a master.")
            }
        }
    }

    /// The devices and grants last synced from the masters.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// Commits under the synced addresses, as they arrive from the masters.
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// Latest values of the synced addresses.
    pub fn memcache(&self) -> &Arc<Memcache> {
        &self.inner.memcache
    }

    /// The chain's name.
    pub fn chain_name(&self) -> &str {
        &self.inner.config.chain
    }

    /// The outbox.
    pub fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    /// Appends checked writes to the outbox as one group; resolves once durable.
    pub async fn enqueue(&self, mut items: Vec<TxContent>) -> Result<(u64, u64)> {
        // Every write carries an idempotency key, so a delivery repeated after a lost answer
        // is recognised by the masters instead of committed twice.
        for c in &mut items {
            if c.idempotency_key.is_empty() {
                c.idempotency_key = format!("kc-{}", hex::encode(rand::random::<[u8; 16]>()));
            }
        }
        let (first, last) = self.inner.outbox.append(items).await?;
        self.inner.wake.notify_one();
        Ok((first, last))
    }

    /// Appends `items` as one group and waits for the masters' commit, up to the configured
    /// time while a master is reachable.
    pub async fn submit(&self, items: Vec<TxContent>) -> Result<Written> {
        self.submit_pipelined(items).await?.await
    }

    /// Appends `items` now (calls made one after another are delivered in that order) and
    /// returns the wait for their commit.
    pub async fn submit_pipelined(
        &self,
        items: Vec<TxContent>,
    ) -> Result<impl std::future::Future<Output = Result<Written>> + Send + 'static> {
        let (first, last) = self.enqueue(items).await?;
        let (tx, rx) = oneshot::channel();
        self.inner.waiters.lock().insert(first, tx);
        let inner = self.inner.clone();
        Ok(async move {
            // Recorded before the waiter was in place: read it back.
            if inner.outbox.delivered_seq() >= last {
                inner.waiters.lock().remove(&first);
                if let Some(o) = inner.outbox.outcome(first).await? {
                    return written(o);
                }
            }
            let online = inner.shared.lock().online;
            let wait = if online { inner.config.ack_wait } else { Duration::ZERO };
            match tokio::time::timeout(wait, rx).await {
                Ok(Ok(o)) => written(o),
                _ => {
                    inner.waiters.lock().remove(&first);
                    Ok(Written::Queued { first, last })
                }
            }
        })
    }

    /// What the client node reports.
    pub async fn status(&self) -> Result<ClientStatus> {
        let outbox = self.inner.outbox.counts().await?;
        let s = self.inner.shared.lock();
        Ok(ClientStatus {
            device: self.inner.config.device.clone(),
            masters: s.masters.clone(),
            online: s.online,
            delivery_error: s.delivery_error.clone(),
            synced: s.synced,
            prefixes: s.prefixes.clone(),
            values: self.inner.memcache.len(),
            snapshots: s.snapshots,
            outbox,
        })
    }

    /// Address prefixes being synced (from the masters, or restored at start).
    pub fn prefixes(&self) -> Vec<String> {
        self.inner.shared.lock().prefixes.clone()
    }

    /// True once the memcache holds values from a master (now or before a restart).
    pub fn is_synced(&self) -> bool {
        self.inner.shared.lock().synced
    }

    /// Stops syncing and delivering, saves the synced values and closes the outbox.
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let tasks: Vec<_> = self.inner.tasks.lock().drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        if let Err(e) = sync::save_cache(&self.inner) {
            tracing::warn!(target: "core::client", error = %e, "Saving the synced values failed.");
        }
        self.inner.outbox.close().await;
    }
}

impl Inner {
    fn set_master(&self, i: usize, res: std::result::Result<(), String>) {
        let mut s = self.shared.lock();
        if let Some(m) = s.masters.get_mut(i) {
            m.reachable = Some(res.is_ok());
            m.last_error = res.err();
        }
        let up = s.masters.iter().filter(|m| m.reachable == Some(true)).count();
        metrics::gauge!("kalima_client_masters_reachable").set(up as f64);
    }
}

fn written(o: Outcome) -> Result<Written> {
    match o {
        Outcome::Committed(r) | Outcome::AlreadyCommitted(r) => Ok(Written::Committed(r)),
        Outcome::Rejected(r) => Err(Error::Rejected(r.into())),
    }
}
