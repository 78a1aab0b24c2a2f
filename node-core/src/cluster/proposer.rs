//! The write path of a master: writes queued on this node are gathered into batches; the
//! leader proposes each batch to Raft (several in flight, in order), a follower forwards it
//! to the leader over its link. Either way the writer is answered with its own outcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::Raft;
use tokio::sync::{Semaphore, mpsc};

use super::network::Network;
use super::rpc::{ForwardError, Request, Response};
use super::{NodeId, TypeConfig, WireOutcome};
use crate::chain::{Batch, Chain, Outcome, Proposal, Reply, Submission, answer};
use crate::error::Error;
use crate::tx::TxContent;

/// Longest wait for a forwarded batch's outcome.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub(super) struct Proposer {
    pub(super) raft: Raft<TypeConfig>,
    pub(super) chain: Chain,
    pub(super) network: Network,
    pub(super) me: NodeId,
    pub(super) leader_key: String,
    pub(super) max_commit: usize,
    pub(super) in_flight: usize,
    pub(super) rx: mpsc::Receiver<Submission>,
}

fn fail(replies: Vec<Reply>, why: &str) {
    for (reply, _) in replies {
        if let Some(r) = reply {
            let _ = r.send(Err(Error::Unavailable(why.to_string())));
        }
    }
}

fn outcomes(wire: Vec<WireOutcome>) -> Vec<Outcome> {
    wire.into_iter().map(|o| o.map_err(Into::into)).collect()
}

const UNKNOWN: &str =
    "the cluster did not confirm this write in time; it may still commit: retry with the same idempotency key";

pub(super) async fn run(mut p: Proposer) {
    let in_flight = Arc::new(Semaphore::new(p.in_flight.max(1)));
    let ttl_busy = Arc::new(AtomicBool::new(false));
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            s = p.rx.recv() => match s {
                Some(s) => Some(s),
                None => return,
            },
            _ = tick.tick() => None,
        };
        let leader = p.raft.metrics().borrow().current_leader;
        let mut subs = Vec::new();
        let mut ttl = false;
        if leader == Some(p.me) && !ttl_busy.load(Ordering::Acquire) {
            subs = p.chain.expired_deletes();
            ttl = !subs.is_empty();
        }
        let mut n: usize = subs.iter().map(|s| s.proposal.items.len()).sum();
        if let Some(s) = first {
            n += s.proposal.items.len();
            subs.push(s);
        }
        // A guarded submission ends its group, as on a single node.
        while n < p.max_commit && subs.last().is_none_or(|s| !crate::chain::Guard::ends_group(&s.proposal.guard)) {
            match p.rx.try_recv() {
                Ok(s) => {
                    n += s.proposal.items.len();
                    subs.push(s);
                }
                Err(_) => break,
            }
        }
        // A writer that stopped waiting (its request timed out or was cancelled) is told
        // nothing more: ordering its write now, perhaps long after, would surprise it.
        let before = subs.len();
        subs.retain(|s| s.reply.as_ref().is_none_or(|r| !r.is_closed()));
        if subs.len() < before {
            metrics::counter!("kalima_writes_abandoned_total").increment((before - subs.len()) as u64);
        }
        if subs.is_empty() {
            continue;
        }
        let mut replies: Vec<Reply> = Vec::with_capacity(subs.len());
        let mut proposals: Vec<Proposal> = Vec::with_capacity(subs.len());
        for s in subs {
            replies.push((s.reply, s.enqueued));
            proposals.push(s.proposal);
        }
        match leader {
            Some(l) if l == p.me => {
                // Waiting for a slot must not outlast the leadership: a leader cut off from the
                // majority never sees its batches applied.
                let mut watch = p.raft.metrics();
                let permit = loop {
                    tokio::select! {
                        permit = in_flight.clone().acquire_owned() => match permit {
                            Ok(permit) => break Some(permit),
                            Err(_) => return,
                        },
                        changed = watch.changed() => {
                            if changed.is_err() || watch.borrow().current_leader != Some(p.me) {
                                break None;
                            }
                        }
                    }
                };
                let Some(permit) = permit else {
                    fail(replies, "leadership changed before the write was ordered; retry");
                    continue;
                };
                let batch = Batch { timestamp_ms: now_ms(), leader: p.leader_key.clone(), genesis: false, proposals };
                if ttl {
                    ttl_busy.store(true, Ordering::Release);
                }
                let ttl_flag = ttl.then(|| ttl_busy.clone());
                match p.raft.client_write_ff(batch).await {
                    Ok(wait) => {
                        tokio::spawn(async move {
                            match wait.await {
                                Ok(Ok(resp)) => answer(replies, outcomes(resp.data.0)),
                                Ok(Err(e)) => fail(
                                    replies,
                                    &format!("leadership changed before the write was ordered ({e}); retry"),
                                ),
                                Err(_) => fail(replies, UNKNOWN),
                            }
                            if let Some(f) = ttl_flag {
                                f.store(false, Ordering::Release);
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        fail(replies, &format!("this master is stopping ({e})"));
                        if let Some(f) = ttl_flag {
                            f.store(false, Ordering::Release);
                        }
                    }
                }
            }
            Some(l) => forward(&p, l, proposals, replies).await,
            None => fail(replies, "no cluster leader is elected right now; retry shortly"),
        }
    }
}

/// Sends proposals to leader `l`; they are queued there in the order sent.
async fn forward(p: &Proposer, l: NodeId, proposals: Vec<Proposal>, replies: Vec<Reply>) {
    let node = p.raft.metrics().borrow().membership_config.membership().get_node(&l).cloned();
    let Some(peer) = node.and_then(|n| p.network.peer(l, &n)) else {
        return fail(replies, &format!("the leader (master {l}) is not in this master's membership; retry"));
    };
    let started = Instant::now();
    let chain = p.chain.clone();
    match peer.start(&Request::Forward(proposals), FORWARD_TIMEOUT).await {
        Ok(wait) => {
            tokio::spawn(async move {
                match wait.await {
                    Ok(Response::Forward(Ok(o))) => {
                        // A writer that reads back from this master must see its write: answer
                        // once this master has applied the blocks holding it, too.
                        let height = o.iter().flatten().flatten().map(|r| r.height).max();
                        if let Some(h) = height {
                            let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
                            // Subscribed before the head is read: the head moves before each
                            // publication, so no wake-up is missed.
                            let mut sub = chain.bus().subscribe();
                            while chain.head().block.header.height < h {
                                match tokio::time::timeout_at(deadline, sub.next()).await {
                                    Ok(Ok(_)) => {}
                                    Ok(Err(crate::bus::SubscriptionEnd::Lagged)) => sub = chain.bus().subscribe(),
                                    Ok(Err(crate::bus::SubscriptionEnd::Closed)) | Err(_) => break,
                                }
                            }
                        }
                        answer(replies, outcomes(o))
                    }
                    Ok(Response::Forward(Err(ForwardError::NotLeader(_)))) => {
                        fail(replies, "leadership changed before the write was ordered; retry")
                    }
                    Ok(Response::Forward(Err(ForwardError::Failed(m)))) => fail(replies, &m),
                    Ok(_) => fail(replies, UNKNOWN),
                    Err(_) => fail(replies, UNKNOWN),
                }
                metrics::histogram!("kalima_forward_seconds").record(started.elapsed().as_secs_f64());
            });
        }
        Err(e) => fail(replies, &format!("the leader (master {l}) is unreachable: {e}; retry")),
    }
}

/// Creates block 0 once this master leads a cluster whose chain has none.
pub(super) async fn genesis_when_leader(
    raft: Raft<TypeConfig>,
    chain: Chain,
    me: NodeId,
    leader_key: String,
    genesis: Vec<TxContent>,
) {
    loop {
        if chain.has_genesis() {
            return;
        }
        let leader = raft.metrics().borrow().current_leader;
        // The read barrier waits until everything committed before this term is applied,
        // so a genesis already ordered by an earlier leader is seen.
        if leader == Some(me) && raft.ensure_linearizable().await.is_ok() && !chain.has_genesis() {
            let batch = Batch {
                timestamp_ms: now_ms(),
                leader: leader_key.clone(),
                genesis: true,
                proposals: vec![Proposal { items: genesis.clone(), guard: None }],
            };
            match raft.client_write(batch).await {
                Ok(_) => tracing::info!(target: "core::cluster", "Genesis block ordered."),
                Err(e) => {
                    tracing::warn!(target: "core::cluster", error = %e, "Ordering the genesis block failed; retrying.")
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
