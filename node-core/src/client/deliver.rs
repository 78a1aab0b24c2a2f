//! Delivering the outbox: the pending groups, in order, to one reachable master at a time.
//! One delivery is in flight at a time, so a later group can never commit before an earlier
//! one; a delivery whose answer was lost is simply sent again, and the masters recognise
//! what is already committed by its idempotency keys.

use std::sync::Arc;
use std::time::Duration;

use super::Inner;
use super::outbox::{Group, Outcome};
use super::wire::{ClientWrite, GroupResult};
use crate::cluster::rpc::{Request, Response};

/// Longest wait for a master's answer to a delivery.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Body bytes in one delivery (at least one whole group is always sent).
const DELIVERY_BYTES: usize = 2 * 1024 * 1024;

enum Round {
    Delivered(u64),
    Undecided,
    NoMaster,
}

/// The delivery loop.
pub(super) async fn run(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    let mut preferred = 0usize;
    let mut since_prune = 0u64;
    let mut idle = Duration::from_millis(250);
    loop {
        if *stop.borrow() {
            return;
        }
        metrics::gauge!("kalima_client_outbox_pending").set(inner.outbox.pending_count() as f64);
        if inner.outbox.pending_count() == 0 {
            tokio::select! {
                _ = inner.wake.notified() => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        let mut groups = match inner.outbox.pending(inner.config.delivery_max_items).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(target: "core::client", error = %e, "Reading the outbox failed.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut bytes = 0usize;
        let keep = groups
            .iter()
            .take_while(|g| {
                bytes += g.items.iter().map(|c| c.body.len() + 256).sum::<usize>();
                bytes <= DELIVERY_BYTES
            })
            .count()
            .max(1);
        groups.truncate(keep);
        match round(&inner, &groups, &mut preferred).await {
            Round::Delivered(n) => {
                idle = Duration::from_millis(250);
                since_prune += n;
                if since_prune >= 10_000 {
                    since_prune = 0;
                    if let Err(e) = inner.outbox.prune(inner.config.keep_delivered).await {
                        tracing::warn!(target: "core::client", error = %e, "Pruning the outbox failed.");
                    }
                }
            }
            Round::Undecided => tokio::time::sleep(Duration::from_millis(50)).await,
            Round::NoMaster => {
                inner.shared.lock().online = false;
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = stop.changed() => return,
                }
                // The links back off on their own (0.5 s to 30 s); this only paces the loop.
                idle = (idle * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn round(inner: &Inner, groups: &[Group], preferred: &mut usize) -> Round {
    let n = inner.masters.len();
    let seen = inner.seen.load(std::sync::atomic::Ordering::Relaxed);
    let req = Request::ClientWrite(ClientWrite { groups: groups.iter().map(|g| g.items.clone()).collect(), seen });
    for k in 0..n {
        let i = (*preferred + k) % n;
        let failure = match inner.masters[i].call(&req, DELIVERY_TIMEOUT).await {
            Ok(Response::ClientWrite(Ok(results))) if results.len() == groups.len() => {
                inner.set_master(i, Ok(()));
                *preferred = i;
                {
                    let mut sh = inner.shared.lock();
                    sh.online = true;
                    sh.delivery_error = None;
                }
                return record(inner, groups, results).await;
            }
            Ok(Response::ClientWrite(Ok(_))) => "answered for a different number of groups".to_string(),
            Ok(Response::ClientWrite(Err(msg))) => msg,
            Ok(_) => "unexpected answer".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::debug!(target: "core::client", master = %inner.masters[i].addr(), error = %failure, "Delivery failed; trying the next master.");
        // Writers stop waiting for commits now, not after every master was tried (a
        // silent master takes the whole connect timeout to give up on).
        {
            let mut sh = inner.shared.lock();
            sh.online = false;
            sh.delivery_error = Some(format!("{}: {failure}", inner.masters[i].addr()));
        }
        inner.set_master(i, Err(failure));
    }
    Round::NoMaster
}

/// Records the decided groups up to the first undecided one (order is kept: the rest is
/// sent again).
async fn record(inner: &Inner, groups: &[Group], results: Vec<GroupResult>) -> Round {
    let mut decided: Vec<(Group, Outcome)> = Vec::new();
    for (g, r) in groups.iter().zip(results) {
        match r {
            GroupResult::Done(o) => decided.push((g.clone(), o)),
            GroupResult::Retry => break,
        }
    }
    if decided.is_empty() {
        return Round::Undecided;
    }
    if let Err(e) = inner.outbox.record(&decided).await {
        // Not recorded: sent again next round, and then found committed.
        tracing::error!(target: "core::client", error = %e, "Recording delivered groups failed.");
        return Round::Undecided;
    }
    let mut entries = 0u64;
    for (g, o) in decided {
        let n = g.items.len() as u64;
        entries += n;
        let label = match &o {
            Outcome::Committed(_) => "committed",
            Outcome::AlreadyCommitted(_) => "already_committed",
            Outcome::Rejected(r) => {
                tracing::warn!(target: "core::client", group = g.id, reason = ?r, "The masters refused an outbox group.");
                "rejected"
            }
        };
        metrics::counter!("kalima_client_outbox_delivered_total", "outcome" => label).increment(n);
        if let Some(w) = inner.waiters.lock().remove(&g.id) {
            let _ = w.send(o);
        }
    }
    Round::Delivered(entries)
}
