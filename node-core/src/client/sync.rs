//! Keeping a client node's memcache equal to the chain's latest values of its authorized
//! addresses: a long poll to one master at a time (the next one when it fails), a snapshot
//! whenever a session starts, then the commits under the synced prefixes, newest by global
//! sequence winning. The values are saved (sealed) so a restart without masters keeps them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Inner;
use super::wire::{WatchRequest, WatchUpdate, WireTx};
use crate::cluster::rpc::{Request, Response};
use crate::error::{Error, Result};
use crate::store::CommittedTx;

/// How long a master may hold a watch open without news.
const WATCH_WAIT: Duration = Duration::from_secs(10);
const SAVE_EVERY: Duration = Duration::from_secs(2);
const CACHE_AAD: &[u8] = b"kalima-client-cache-v1";

#[derive(Serialize, Deserialize)]
struct SavedCache {
    prefixes: Vec<String>,
    seen: u64,
    values: Vec<WireTx>,
}

fn decode_all(txs: Vec<WireTx>) -> Result<Vec<Arc<CommittedTx>>> {
    txs.into_iter().map(WireTx::into_committed).collect()
}

/// Applies commits that are newer than what the memcache holds for their key.
fn apply_events(inner: &Inner, events: Vec<Arc<CommittedTx>>) -> Vec<Arc<CommittedTx>> {
    let fresh: Vec<Arc<CommittedTx>> = events
        .into_iter()
        .filter(|c| {
            let content = &c.tx.content;
            inner
                .memcache
                .last(&content.address, &content.key)
                .is_none_or(|l| l.tx.global_sequence < c.tx.global_sequence)
        })
        .collect();
    inner.memcache.apply(fresh.iter());
    fresh
}

fn apply(inner: &Inner, update: WatchUpdate, session: &mut u64) -> Result<()> {
    match update {
        WatchUpdate::Snapshot { session: s, prefixes, values, events, head } => {
            inner.seen.fetch_max(head, Ordering::Relaxed);
            let values = decode_all(values)?;
            let events = decode_all(events)?;
            inner.memcache.reset(values.iter());
            let fresh = apply_events(inner, events);
            inner.registry.rebuild(&inner.memcache);
            if !fresh.is_empty() {
                inner.bus.publish(Arc::new(fresh));
            }
            *session = s;
            let mut sh = inner.shared.lock();
            sh.synced = true;
            sh.prefixes = prefixes;
            sh.snapshots += 1;
            metrics::counter!("kalima_client_snapshots_total").increment(1);
        }
        WatchUpdate::Events { events, head } => {
            inner.seen.fetch_max(head, Ordering::Relaxed);
            let fresh = apply_events(inner, decode_all(events)?);
            if !fresh.is_empty() {
                inner.registry.apply(&fresh, &inner.memcache);
                metrics::counter!("kalima_client_synced_txs_total").increment(fresh.len() as u64);
                inner.bus.publish(Arc::new(fresh));
            }
        }
    }
    inner.dirty.store(true, Ordering::Relaxed);
    metrics::gauge!("kalima_client_values").set(inner.memcache.len() as f64);
    Ok(())
}

/// The sync loop.
pub(super) async fn run(inner: Arc<Inner>) {
    let n = inner.masters.len();
    let (mut idx, mut session, mut failed_in_row) = (0usize, 0u64, 0usize);
    let mut last_refusal: Option<String> = None;
    loop {
        let req = Request::Watch(WatchRequest {
            device: inner.config.device.clone(),
            token: inner.config.token.clone(),
            session,
            wait_ms: WATCH_WAIT.as_millis() as u32,
        });
        let res = inner.masters[idx].call(&req, WATCH_WAIT + Duration::from_secs(10)).await;
        let failure = match res {
            Ok(Response::Watch(Ok(update))) => match apply(&inner, update, &mut session) {
                Ok(()) => None,
                Err(e) => Some(format!("undecodable update: {e}")),
            },
            Ok(Response::Watch(Err(msg))) => Some(msg),
            Ok(_) => Some("unexpected answer".into()),
            Err(e) => Some(e.to_string()),
        };
        match failure {
            None => {
                failed_in_row = 0;
                last_refusal = None;
                inner.set_master(idx, Ok(()));
            }
            Some(msg) => {
                // A refusal (a wrong token, a revoked device) is an operator's problem: say it
                // once, not at every retry. Unreachable masters are routine.
                let refused = !msg.starts_with("unreachable") && !msg.starts_with("timed out");
                if refused && last_refusal.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(target: "core::client", master = %inner.masters[idx].addr(), error = %msg, "A master refused to sync this client node.");
                    last_refusal = Some(msg.clone());
                }
                if msg.starts_with("undecodable") {
                    metrics::counter!("kalima_client_bad_updates_total").increment(1);
                }
                tracing::debug!(target: "core::client", master = %inner.masters[idx].addr(), error = %msg, "Sync failed; trying the next master.");
                inner.set_master(idx, Err(msg));
                // Sessions belong to one master: the next one starts with a snapshot.
                session = 0;
                idx = (idx + 1) % n;
                failed_in_row += 1;
                if failed_in_row >= n {
                    failed_in_row = 0;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
}

/// Saves the synced values every few seconds when they changed.
pub(super) async fn persist(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(SAVE_EVERY).await;
        if inner.dirty.swap(false, Ordering::Relaxed)
            && let Err(e) = save_cache(&inner)
        {
            tracing::warn!(target: "core::client", error = %e, "Saving the synced values failed.");
        }
    }
}

/// Writes the memcache, sealed with the data key.
pub(super) fn save_cache(inner: &Inner) -> Result<()> {
    let saved = SavedCache {
        prefixes: inner.shared.lock().prefixes.clone(),
        seen: inner.seen.load(Ordering::Relaxed),
        values: inner.memcache.snapshot().iter().map(|c| WireTx::from_committed(c)).collect(),
    };
    let plain = postcard::to_stdvec(&saved).map_err(|e| Error::Outbox(format!("encoding the synced values: {e}")))?;
    let (key_id, sealed) = inner.keys.seal(&plain, CACHE_AAD)?;
    let mut bytes = key_id.to_be_bytes().to_vec();
    bytes.extend_from_slice(&sealed);
    crate::keys::write_private(&inner.cache_path, &bytes)
}

/// Restores the values saved by [`save_cache`]; `None` when there is no file.
pub(super) fn load_cache(inner: &Inner) -> Result<Option<usize>> {
    let bytes = match std::fs::read(&inner.cache_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&inner.cache_path, e)),
    };
    if bytes.len() < 4 {
        return Err(Error::Outbox(format!("{}: truncated", inner.cache_path.display())));
    }
    let (id, sealed) = bytes.split_at(4);
    let key_id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
    let plain = inner.keys.open(key_id, sealed, CACHE_AAD)?;
    let saved: SavedCache =
        postcard::from_bytes(&plain).map_err(|e| Error::Outbox(format!("{}: {e}", inner.cache_path.display())))?;
    let values = decode_all(saved.values)?;
    inner.seen.fetch_max(saved.seen, Ordering::Relaxed);
    inner.memcache.reset(values.iter());
    inner.registry.rebuild(&inner.memcache);
    let mut sh = inner.shared.lock();
    sh.prefixes = saved.prefixes;
    sh.synced = true;
    Ok(Some(values.len()))
}
