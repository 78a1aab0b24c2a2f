//! Ingest: the one narrow interface every front door (REST, Kalima REST, and later MQTT,
//! Modbus, LoRaWAN) writes through. It runs the checks of DESIGN.md in order (device known
//! and not revoked, write grant, size, signature, idempotency key new), counts every
//! rejection by reason, and hands accepted content to the sequencer, or, on a client node,
//! to the outbox that delivers it to the masters.

use std::collections::HashMap;
use std::sync::Arc;

use crate::bus::Bus;
use crate::chain::{Chain, Receipt};
use crate::client::ClientNode;
use crate::error::{Error, Rejection, Result};
use crate::memcache::Memcache;
use crate::merkle::Hash;
use crate::registry::{Device, Registry};
use crate::tx::{TxContent, validate_address, validate_key};

/// Most transactions in one batch call.
pub const MAX_BATCH: usize = 10_000;

/// The write path shared by all interfaces.
#[derive(Debug, Clone)]
pub struct Ingest {
    backend: Backend,
    max_body: usize,
}

/// Where accepted writes go.
#[derive(Debug, Clone)]
enum Backend {
    /// This node orders them (single node or master).
    Chain(Chain),
    /// The masters order them; this node keeps them in its outbox until they do.
    Client(ClientNode),
}

/// What became of an accepted write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Durably committed on the chain; one receipt per write.
    Committed(Vec<Receipt>),
    /// Durably stored in this client node's outbox (no master answered in time); delivered
    /// in order later. The outbox sequences of the first and last write.
    Queued {
        /// Outbox sequence of the first write.
        first: u64,
        /// Outbox sequence of the last write.
        last: u64,
    },
}

impl Written {
    /// The receipts when committed; none when queued.
    pub fn receipts(&self) -> &[Receipt] {
        match self {
            Written::Committed(r) => r,
            Written::Queued { .. } => &[],
        }
    }

    /// The receipts when committed; none when queued.
    pub fn into_receipts(self) -> Vec<Receipt> {
        match self {
            Written::Committed(r) => r,
            Written::Queued { .. } => Vec::new(),
        }
    }
}

/// Counts a rejection under its reason and the interface that saw it.
pub fn count_rejection(interface: &'static str, r: &Rejection) {
    metrics::counter!("kalima_writes_rejected_total", "reason" => r.code(), "interface" => interface).increment(1);
}

impl Ingest {
    /// Ingest over `chain`, refusing bodies over `max_body` bytes.
    pub fn new(chain: Chain, max_body: usize) -> Self {
        Self { backend: Backend::Chain(chain), max_body }
    }

    /// Ingest of a client node: writes go to its outbox and on to the masters.
    pub fn client(node: ClientNode, max_body: usize) -> Self {
        Self { backend: Backend::Client(node), max_body }
    }

    /// The chain behind it, when this node holds one.
    pub fn chain(&self) -> Option<&Chain> {
        match &self.backend {
            Backend::Chain(c) => Some(c),
            Backend::Client(_) => None,
        }
    }

    /// The client node behind it, when this node is one.
    pub fn client_node(&self) -> Option<&ClientNode> {
        match &self.backend {
            Backend::Chain(_) => None,
            Backend::Client(c) => Some(c),
        }
    }

    /// The devices and grants this node knows.
    pub fn registry(&self) -> &Arc<Registry> {
        match &self.backend {
            Backend::Chain(c) => c.registry(),
            Backend::Client(c) => c.registry(),
        }
    }

    /// Committed transactions as they arrive.
    pub fn bus(&self) -> &Bus {
        match &self.backend {
            Backend::Chain(c) => c.bus(),
            Backend::Client(c) => c.bus(),
        }
    }

    /// Current values (on a client node: those of its authorized addresses).
    pub fn memcache(&self) -> &Arc<Memcache> {
        match &self.backend {
            Backend::Chain(c) => c.memcache(),
            Backend::Client(c) => c.memcache(),
        }
    }

    /// The chain's name (bound into device signatures).
    pub fn chain_name(&self) -> &str {
        match &self.backend {
            Backend::Chain(c) => &c.config().chain,
            Backend::Client(c) => c.chain_name(),
        }
    }

    fn idempotency_hit(&self, device: &str, key: &str) -> Option<Hash> {
        match &self.backend {
            Backend::Chain(c) => c.idempotency_hit(device, key),
            // The outbox refuses a repeated key itself; the masters check the chain.
            Backend::Client(_) => None,
        }
    }

    async fn idempotency_used(&self, items: &[TxContent]) -> Result<HashMap<(String, String), Hash>> {
        match &self.backend {
            Backend::Chain(c) => c.idempotency_used(items).await,
            Backend::Client(_) => Ok(HashMap::new()),
        }
    }

    /// Largest accepted body.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// The device presenting `token` (unknown and revoked devices are refused and counted).
    pub fn authenticate(&self, interface: &'static str, token: Option<&str>) -> Result<Arc<Device>, Rejection> {
        let res = match token {
            Some(t) if !t.is_empty() => self.registry().authenticate(t),
            _ => Err(Rejection::UnknownDevice),
        };
        if let Err(r) = &res {
            count_rejection(interface, r);
        }
        res
    }

    /// The device `id` for an in-process front door that writes as a configured device
    /// (an adapter); unknown and revoked devices are refused and counted like bad tokens.
    pub fn device(&self, interface: &'static str, id: &str) -> Result<Arc<Device>, Rejection> {
        let res = match self.registry().get(id) {
            None => Err(Rejection::UnknownDevice),
            Some(d) if d.record.revoked => Err(Rejection::Revoked(d.id.clone())),
            Some(d) => Ok(d),
        };
        if let Err(r) = &res {
            count_rejection(interface, r);
        }
        res
    }

    /// Runs every per-transaction check for `device` on `content`, in DESIGN.md order.
    pub fn check(&self, device: &Device, content: &TxContent) -> Result<(), Rejection> {
        validate_address(&content.address)?;
        validate_key(&content.key)?;
        if !device.can_write(&content.address) {
            return Err(Rejection::Forbidden {
                device: device.id.clone(),
                access: "write",
                address: content.address.clone(),
            });
        }
        if content.body.len() > self.max_body {
            return Err(Rejection::TooLarge { size: content.body.len(), limit: self.max_body });
        }
        content.validate(self.max_body)?;
        device.check_signature(self.chain_name(), content)?;
        if let Some(existing) = self.idempotency_hit(&device.id, &content.idempotency_key) {
            return Err(Rejection::DuplicateIdempotencyKey {
                key: content.idempotency_key.clone(),
                existing: hex::encode(existing),
            });
        }
        Ok(())
    }

    fn prepare(
        &self,
        interface: &'static str,
        device: &Device,
        mut items: Vec<TxContent>,
    ) -> Result<Vec<TxContent>, Rejection> {
        let res = (|| {
            if items.is_empty() || items.len() > MAX_BATCH {
                return Err(Rejection::BatchSize { got: items.len(), max: MAX_BATCH });
            }
            let mut keys = std::collections::HashSet::new();
            for c in &mut items {
                // The device is who authenticated, whatever the request claimed.
                c.device_id = device.id.clone();
                self.check(device, c)?;
                if !c.idempotency_key.is_empty() && !keys.insert(c.idempotency_key.clone()) {
                    return Err(Rejection::DuplicateIdempotencyKey {
                        key: c.idempotency_key.clone(),
                        existing: "in the same batch".into(),
                    });
                }
            }
            Ok(items)
        })();
        if let Err(r) = &res {
            count_rejection(interface, r);
        }
        res
    }

    /// Idempotency keys older than the in-memory window are checked against the store.
    async fn check_old_keys(&self, interface: &'static str, items: &[TxContent]) -> Result<()> {
        if items.iter().all(|c| c.idempotency_key.is_empty()) {
            return Ok(());
        }
        let used = self.idempotency_used(items).await?;
        for c in items.iter().filter(|c| !c.idempotency_key.is_empty()) {
            if let Some(existing) = used.get(&(c.device_id.clone(), c.idempotency_key.clone())) {
                let r = Rejection::DuplicateIdempotencyKey {
                    key: c.idempotency_key.clone(),
                    existing: hex::encode(existing),
                };
                count_rejection(interface, &r);
                return Err(r.into());
            }
        }
        Ok(())
    }

    /// Checks and commits `items` as one unit; answers after the durable commit (on a
    /// client node: after the masters commit, or once durably queued in the outbox when no
    /// master answers in time).
    pub async fn write(&self, interface: &'static str, device: &Device, items: Vec<TxContent>) -> Result<Written> {
        let items = self.prepare(interface, device, items)?;
        self.check_old_keys(interface, &items).await?;
        let n = items.len() as u64;
        let res = match &self.backend {
            Backend::Chain(c) => c.submit(items, None).await.map(Written::Committed),
            Backend::Client(c) => c.submit(items).await,
        };
        count_outcome(interface, n, &res);
        res
    }

    /// Checks and enqueues `items` as one unit now; the returned future resolves after the
    /// durable commit (or queueing, on a client node). Calls made one after another reach the
    /// chain in that order even when their commits are awaited later (ordered pipelining for
    /// stream front doors).
    pub async fn write_pipelined(
        &self,
        interface: &'static str,
        device: &Device,
        items: Vec<TxContent>,
    ) -> Result<impl std::future::Future<Output = Result<Written>> + Send + 'static> {
        let items = self.prepare(interface, device, items)?;
        self.check_old_keys(interface, &items).await?;
        let n = items.len() as u64;
        let pending: futures::future::BoxFuture<'static, Result<Written>> = match &self.backend {
            Backend::Chain(c) => {
                let p = c.submit_pipelined(items).await?;
                Box::pin(async move { p.await.map(Written::Committed) })
            }
            Backend::Client(c) => {
                let p = c.submit_pipelined(items).await?;
                Box::pin(p)
            }
        };
        Ok(async move {
            let res = pending.await;
            count_outcome(interface, n, &res);
            res
        })
    }

    /// Checks `items` and queues them without waiting for the commit.
    pub async fn write_nowait(&self, interface: &'static str, device: &Device, items: Vec<TxContent>) -> Result<()> {
        let items = self.prepare(interface, device, items)?;
        self.check_old_keys(interface, &items).await?;
        let n = items.len() as u64;
        match &self.backend {
            Backend::Chain(c) => c.submit_nowait(items).await?,
            // Queued means durable in the outbox here; delivery goes on in the background.
            Backend::Client(c) => {
                c.enqueue(items).await?;
            }
        }
        metrics::counter!("kalima_writes_accepted_total", "interface" => interface).increment(n);
        Ok(())
    }
}

fn count_outcome(interface: &'static str, n: u64, res: &Result<Written>) {
    match res {
        Ok(_) => metrics::counter!("kalima_writes_accepted_total", "interface" => interface).increment(n),
        Err(Error::Rejected(r)) => count_rejection(interface, r),
        Err(_) => {}
    }
}
