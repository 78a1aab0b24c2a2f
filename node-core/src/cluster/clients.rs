//! What a master does for client nodes: keeps each one's memcache in sync (a snapshot of
//! the addresses its device may read, then the commits under them, by long poll) and
//! commits the groups of its outbox, each exactly once (idempotency keys), in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use parking_lot::Mutex;

use super::link::PeerKey;
use crate::bus::{CommittedBatch, Subscription};
use crate::chain::{Chain, Receipt};
use crate::client::outbox::Outcome;
use crate::client::wire::{ClientWrite, GroupResult, WatchRequest, WatchUpdate, WireTx};
use crate::error::{Error, Rejection};
use crate::ingest::{Ingest, count_rejection};
use crate::registry::{DEVICES_ADDRESS, SYSTEM_PREFIX};
use crate::tx::prefix_matches;

/// Interface label of writes delivered by client nodes.
const INTERFACE: &str = "client-node";
/// Most transactions in one watch answer.
const MAX_EVENTS: usize = 20_000;
/// A session nobody polled for this long is dropped (its client gets a new snapshot).
const SESSION_IDLE: Duration = Duration::from_secs(60);
/// Longest a delivery waits for this master to apply what the client has seen.
const CATCH_UP: Duration = Duration::from_secs(5);
/// Longest wait a client may ask for.
const MAX_WAIT: Duration = Duration::from_secs(30);

struct Session {
    peer: PeerKey,
    device: String,
    prefixes: Vec<String>,
    sub: Subscription,
    last_used: Instant,
}

/// Client sessions of one master.
pub(crate) struct ClientService {
    chain: Chain,
    ingest: Ingest,
    sessions: Mutex<HashMap<u64, Session>>,
    next: AtomicU64,
}

/// The prefixes a client node's device syncs: its read grants and the device registry
/// (the client authenticates its local devices offline).
fn prefixes_of(device: &crate::registry::Device) -> Vec<String> {
    if device.is_admin() {
        return vec!["/".into()];
    }
    let mut p: Vec<String> = vec![DEVICES_ADDRESS.into(), format!("{SYSTEM_PREFIX}/grants")];
    p.extend(device.grants.iter().filter(|g| g.read).map(|g| g.prefix.clone()));
    p.sort();
    p.dedup();
    p
}

fn matches(prefixes: &[String], address: &str) -> bool {
    prefixes.iter().any(|p| prefix_matches(p, address))
}

fn filtered(batch: &CommittedBatch, prefixes: &[String], out: &mut Vec<WireTx>) {
    out.extend(batch.iter().filter(|c| matches(prefixes, &c.tx.content.address)).map(|c| WireTx::from_committed(c)));
}

impl ClientService {
    pub(crate) fn new(chain: Chain, max_body: usize) -> Self {
        Self {
            ingest: Ingest::new(chain.clone(), max_body),
            chain,
            sessions: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// Answers a watch: a snapshot for a new (or lost, or re-scoped) session, else the
    /// commits since the last answer, waiting up to the asked time for one.
    pub(crate) async fn watch(&self, peer: PeerKey, req: WatchRequest) -> Result<WatchUpdate, String> {
        let device = self.chain.registry().authenticate(&req.token).map_err(|r| {
            count_rejection(INTERFACE, &r);
            format!("client node device: {r}")
        })?;
        if device.id != req.device {
            return Err(format!("the token is not the token of device {}", req.device));
        }
        let prefixes = prefixes_of(&device);
        let now = Instant::now();
        let existing = {
            let mut s = self.sessions.lock();
            s.retain(|_, v| now.duration_since(v.last_used) < SESSION_IDLE);
            s.remove(&req.session)
        };
        let mut session = match existing {
            Some(s) if s.peer == peer && s.device == device.id && s.prefixes == prefixes => s,
            _ => return Ok(self.snapshot(peer, device.id.clone(), prefixes)),
        };
        let mut events = Vec::new();
        let wait = Duration::from_millis(u64::from(req.wait_ms)).min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Everything already there is taken at once; then wait for the next commit.
            let next = match session.sub.next().now_or_never() {
                Some(r) => r,
                None if events.is_empty() => match tokio::time::timeout_at(deadline, session.sub.next()).await {
                    Ok(r) => r,
                    Err(_) => break,
                },
                None => break,
            };
            match next {
                Ok(batch) => filtered(&batch, &session.prefixes, &mut events),
                // Fell behind the bus: the client starts over from a snapshot.
                Err(_) => return Ok(self.snapshot(peer, device.id.clone(), prefixes)),
            }
            if events.len() >= MAX_EVENTS {
                break;
            }
        }
        session.last_used = Instant::now();
        self.sessions.lock().insert(req.session, session);
        Ok(WatchUpdate::Events { events, head: self.chain.tree_size() })
    }

    fn snapshot(&self, peer: PeerKey, device: String, prefixes: Vec<String>) -> WatchUpdate {
        // Subscribed before the values are read: a commit is then in the values, the
        // events, or both (the client keeps the newest by global sequence).
        let mut sub = self.chain.bus().subscribe();
        let memcache = self.chain.memcache();
        let mut values = Vec::new();
        for p in &prefixes {
            for a in memcache.addresses(p) {
                values.extend(memcache.values(&a).iter().map(|c| WireTx::from_committed(c)));
            }
        }
        let mut events = Vec::new();
        while let Some(Ok(batch)) = sub.next().now_or_never() {
            filtered(&batch, &prefixes, &mut events);
        }
        let session = self.next.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("kalima_client_sessions_started_total").increment(1);
        self.sessions
            .lock()
            .insert(session, Session { peer, device, prefixes: prefixes.clone(), sub, last_used: Instant::now() });
        WatchUpdate::Snapshot { session, prefixes, values, events, head: self.chain.tree_size() }
    }

    /// Commits outbox groups: a group whose every write is already on the chain is reported
    /// as such; a group failing a check is refused whole; the rest go out as one proposal.
    pub(crate) async fn write(&self, req: ClientWrite) -> Result<Vec<GroupResult>, String> {
        // The client authenticated its devices against what it synced: a device registered
        // or granted there must be known here before the checks run.
        let deadline = Instant::now() + CATCH_UP;
        while self.chain.tree_size() < req.seen {
            if Instant::now() >= deadline {
                return Err(format!(
                    "this master is behind the client (tree size {} < {}); another master may take the delivery",
                    self.chain.tree_size(),
                    req.seen
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let all: Vec<_> = req.groups.iter().flatten().cloned().collect();
        let used = self.chain.idempotency_used(&all).await.map_err(|e| e.to_string())?;
        let mut results: Vec<Option<GroupResult>> = Vec::with_capacity(req.groups.len());
        let mut submit: Vec<(usize, usize)> = Vec::new();
        let mut items = Vec::new();
        let mut batch_keys = std::collections::HashSet::new();
        for (gi, group) in req.groups.into_iter().enumerate() {
            let found: Vec<Option<[u8; 32]>> = group
                .iter()
                .map(|c| {
                    if c.idempotency_key.is_empty() {
                        None
                    } else {
                        used.get(&(c.device_id.clone(), c.idempotency_key.clone())).copied()
                    }
                })
                .collect();
            if !group.is_empty() && found.iter().all(Option::is_some) {
                let receipts = self.receipts(found.iter().flatten()).await?;
                results.push(Some(GroupResult::Done(Outcome::AlreadyCommitted(receipts))));
                continue;
            }
            let repeated = group.iter().zip(&found).find_map(|(c, f)| {
                let (device, key) = (c.device_id.clone(), c.idempotency_key.clone());
                match f {
                    Some(id) => Some((key, hex::encode(id))),
                    None if !key.is_empty() && !batch_keys.insert((device, key.clone())) => {
                        Some((key, "in an earlier group of the same delivery".into()))
                    }
                    None => None,
                }
            });
            if let Some((key, existing)) = repeated {
                let r = Rejection::DuplicateIdempotencyKey { key, existing };
                count_rejection(INTERFACE, &r);
                results.push(Some(GroupResult::Done(Outcome::Rejected(r.clone().into()))));
                continue;
            }
            match self.check(&group) {
                Ok(()) => {
                    submit.push((gi, group.len()));
                    results.push(None);
                    items.extend(group);
                }
                Err(r) => {
                    count_rejection(INTERFACE, &r);
                    results.push(Some(GroupResult::Done(Outcome::Rejected(r.clone().into()))));
                }
            }
        }
        if !items.is_empty() {
            let n = items.len() as u64;
            match self.chain.submit(items, None).await {
                Ok(receipts) => {
                    metrics::counter!("kalima_writes_accepted_total", "interface" => INTERFACE).increment(n);
                    let mut rest = receipts.into_iter();
                    for (gi, len) in submit {
                        results[gi] = Some(GroupResult::Done(Outcome::Committed(rest.by_ref().take(len).collect())));
                    }
                }
                // Ordered concurrently with an earlier delivery of the same groups: the
                // next attempt finds them committed.
                Err(Error::Rejected(Rejection::DuplicateIdempotencyKey { .. })) => {
                    for (gi, _) in submit {
                        results[gi] = Some(GroupResult::Retry);
                    }
                }
                Err(Error::Rejected(r)) => {
                    count_rejection(INTERFACE, &r);
                    for (gi, _) in submit {
                        results[gi] = Some(GroupResult::Done(Outcome::Rejected(r.clone().into())));
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(results.into_iter().map(|r| r.unwrap_or(GroupResult::Retry)).collect())
    }

    /// The checks a node runs on its own devices' writes, run again here: the client node
    /// authenticated the device, the masters decide what it may write.
    fn check(&self, group: &[crate::tx::TxContent]) -> Result<(), Rejection> {
        if group.is_empty() || group.len() > crate::ingest::MAX_BATCH {
            return Err(Rejection::BatchSize { got: group.len(), max: crate::ingest::MAX_BATCH });
        }
        let mut keys = std::collections::HashSet::new();
        for c in group {
            let device = match self.chain.registry().get(&c.device_id) {
                None => return Err(Rejection::UnknownDevice),
                Some(d) if d.record.revoked => return Err(Rejection::Revoked(d.id.clone())),
                Some(d) => d,
            };
            self.ingest.check(&device, c)?;
            if !c.idempotency_key.is_empty() && !keys.insert((c.device_id.as_str(), c.idempotency_key.as_str())) {
                return Err(Rejection::DuplicateIdempotencyKey {
                    key: c.idempotency_key.clone(),
                    existing: "in the same group".into(),
                });
            }
        }
        Ok(())
    }

    async fn receipts(&self, ids: impl Iterator<Item = &[u8; 32]>) -> Result<Vec<Receipt>, String> {
        let mut out = Vec::new();
        for id in ids {
            let c = self
                .chain
                .store()
                .tx_by_id(id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("transaction {} is indexed but not stored", hex::encode(id)))?;
            out.push(Receipt {
                id: c.id,
                global_sequence: c.tx.global_sequence,
                sequence: c.tx.sequence,
                height: c.height,
            });
        }
        Ok(out)
    }
}

/// Shared handle.
pub(crate) type Clients = Arc<ClientService>;
