//! The sequencer of a single node: drains the queue into group commits, stamps each with the
//! node's time and key, and applies it (the node is its own leader).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::apply::{Applier, Batch, Proposal};
use super::{Error, Submission, now_ms};
use crate::error::Result;
use crate::registry::NODE_DEVICE_ID;
use crate::tx::TxContent;

/// The single-node sequencer task.
pub(super) struct Sequencer {
    pub(super) applier: Applier,
    pub(super) rx: mpsc::Receiver<Submission>,
}

impl Sequencer {
    pub(super) async fn run(mut self) -> Result<()> {
        let inner = self.applier.inner.clone();
        let max = inner.config.max_commit_txs;
        loop {
            let next_expiry = inner.expiries.lock().next_due();
            let sleep = match next_expiry {
                Some(t) => Duration::from_millis(u64::try_from(t - now_ms()).unwrap_or(0)),
                None => Duration::from_secs(3600),
            };
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
            let mut subs: Vec<Submission> = expired_deletes(&inner);
            let mut n: usize = subs.iter().map(|s| s.proposal.items.len()).sum();
            if let Some(s) = first {
                n += s.proposal.items.len();
                subs.push(s);
            }
            // A guarded submission (registration, grant, revocation) ends its group: writes
            // queued behind it are checked against the registry it changes.
            while n < max && subs.last().is_none_or(|s| !crate::chain::Guard::ends_group(&s.proposal.guard)) {
                match self.rx.try_recv() {
                    Ok(s) => {
                        n += s.proposal.items.len();
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

    /// Applies `subs` as one batch stamped by this node, then answers each writer.
    pub(super) async fn commit(&mut self, subs: Vec<Submission>, genesis: bool) -> Result<()> {
        let mut replies = Vec::with_capacity(subs.len());
        let mut proposals = Vec::with_capacity(subs.len());
        for s in subs {
            replies.push((s.reply, s.enqueued));
            proposals.push(s.proposal);
        }
        let batch =
            Batch { timestamp_ms: now_ms(), leader: self.applier.inner.node_key.public_hex(), genesis, proposals };
        match self.applier.apply(&batch, &[]).await {
            Ok(outcomes) => {
                answer(replies, outcomes);
                Ok(())
            }
            Err(e) => {
                let told = if matches!(e, Error::Fatal(_)) {
                    "the outcome of the write is unknown; retry with the same idempotency key"
                } else {
                    "the write was not stored"
                };
                for (reply, _) in replies {
                    if let Some(r) = reply {
                        let _ = r.send(Err(Error::CommitFailed(told.into())));
                    }
                }
                Err(e)
            }
        }
    }
}

/// Who waits for a proposal's outcome, and since when.
pub(crate) type Reply = (Option<tokio::sync::oneshot::Sender<Result<Vec<super::Receipt>>>>, Instant);

/// Sends each writer its outcome; refusals of writes nobody waits for are counted here.
pub(crate) fn answer(replies: Vec<Reply>, outcomes: Vec<super::apply::Outcome>) {
    let done = Instant::now();
    for ((reply, enqueued), outcome) in replies.into_iter().zip(outcomes) {
        match (reply, outcome) {
            (Some(r), Ok(receipts)) => {
                metrics::histogram!("kalima_commit_seconds").record(done.duration_since(enqueued).as_secs_f64());
                let _ = r.send(Ok(receipts));
            }
            (None, Ok(_)) => {
                metrics::histogram!("kalima_commit_seconds").record(done.duration_since(enqueued).as_secs_f64());
            }
            // The caller (ingest) counts it under its interface.
            (Some(r), Err(rej)) => {
                let _ = r.send(Err(rej.into()));
            }
            // Queued without a caller waiting (wait=false): count it here.
            (None, Err(rej)) => {
                metrics::counter!("kalima_writes_rejected_total", "reason" => rej.code(), "interface" => "queued")
                    .increment(1);
            }
        }
    }
}

/// Delete submissions for values whose TTL has passed (at most one commit's worth). The
/// entries stay due until the delete commits, so a failed commit retries them.
pub(super) fn expired_deletes(inner: &super::Inner) -> Vec<Submission> {
    let max = inner.config.max_commit_txs.max(1);
    let mut items = Vec::new();
    let mut expiries = inner.expiries.lock();
    for (seq, address, key) in expiries.due(now_ms(), max) {
        let current = inner.memcache.get(&address, &key);
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
            expiries.forget(&address, &key, seq);
        }
    }
    if items.is_empty() {
        return Vec::new();
    }
    metrics::counter!("kalima_ttl_deletes_total").increment(items.len() as u64);
    vec![Submission { proposal: Proposal { items, guard: None }, reply: None, enqueued: Instant::now() }]
}
