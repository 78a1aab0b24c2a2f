//! Ingest: the one narrow interface every front door (REST, Kalima REST, and later MQTT,
//! Modbus, LoRaWAN) writes through. It runs the checks of DESIGN.md in order (device known
//! and not revoked, write grant, size, signature, idempotency key new), counts every
//! rejection by reason, and hands accepted content to the sequencer.

use std::sync::Arc;

use crate::chain::{Chain, Receipt};
use crate::error::{Error, Rejection, Result};
use crate::registry::Device;
use crate::tx::{TxContent, validate_address, validate_key};

/// Most transactions in one batch call.
pub const MAX_BATCH: usize = 10_000;

/// The write path shared by all interfaces.
#[derive(Debug, Clone)]
pub struct Ingest {
    chain: Chain,
    max_body: usize,
}

/// Counts a rejection under its reason and the interface that saw it.
pub fn count_rejection(interface: &'static str, r: &Rejection) {
    metrics::counter!("kalima_writes_rejected_total", "reason" => r.code(), "interface" => interface).increment(1);
}

impl Ingest {
    /// Ingest over `chain`, refusing bodies over `max_body` bytes.
    pub fn new(chain: Chain, max_body: usize) -> Self {
        Self { chain, max_body }
    }

    /// The chain behind it.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Largest accepted body.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// The device presenting `token` (unknown and revoked devices are refused and counted).
    pub fn authenticate(&self, interface: &'static str, token: Option<&str>) -> Result<Arc<Device>, Rejection> {
        let res = match token {
            Some(t) if !t.is_empty() => self.chain.registry().authenticate(t),
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
        let res = match self.chain.registry().get(id) {
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
        device.check_signature(&self.chain.config().chain, content)?;
        if let Some(existing) = self.chain.idempotency_hit(&device.id, &content.idempotency_key) {
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
        let used = self.chain.idempotency_used(items).await?;
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

    /// Checks and commits `items` as one unit; answers after the durable commit.
    pub async fn write(&self, interface: &'static str, device: &Device, items: Vec<TxContent>) -> Result<Vec<Receipt>> {
        let items = self.prepare(interface, device, items)?;
        self.check_old_keys(interface, &items).await?;
        let n = items.len() as u64;
        let res = self.chain.submit(items, None).await;
        match &res {
            Ok(_) => metrics::counter!("kalima_writes_accepted_total", "interface" => interface).increment(n),
            Err(Error::Rejected(r)) => count_rejection(interface, r),
            Err(_) => {}
        }
        res
    }

    /// Checks and enqueues `items` as one unit now; the returned future resolves after the
    /// durable commit. Calls made one after another reach the chain in that order even when
    /// their commits are awaited later (ordered pipelining for stream front doors).
    pub async fn write_pipelined(
        &self,
        interface: &'static str,
        device: &Device,
        items: Vec<TxContent>,
    ) -> Result<impl std::future::Future<Output = Result<Vec<Receipt>>> + Send + 'static> {
        let items = self.prepare(interface, device, items)?;
        self.check_old_keys(interface, &items).await?;
        let n = items.len() as u64;
        let pending = self.chain.submit_pipelined(items).await?;
        Ok(async move {
            let res = pending.await;
            match &res {
                Ok(_) => metrics::counter!("kalima_writes_accepted_total", "interface" => interface).increment(n),
                Err(Error::Rejected(r)) => count_rejection(interface, r),
                Err(_) => {}
            }
            res
        })
    }

    /// Checks `items` and queues them without waiting for the commit.
    pub async fn write_nowait(&self, interface: &'static str, device: &Device, items: Vec<TxContent>) -> Result<()> {
        let items = self.prepare(interface, device, items)?;
        self.check_old_keys(interface, &items).await?;
        let n = items.len() as u64;
        self.chain.submit_nowait(items).await?;
        metrics::counter!("kalima_writes_accepted_total", "interface" => interface).increment(n);
        Ok(())
    }
}
