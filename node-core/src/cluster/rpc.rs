//! Requests between nodes over encrypted links: the messages, a client handle per peer that
//! keeps one link open (reconnecting with backoff from 0.5 s to 30 s), and the server loop
//! that answers requests on accepted links.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{SnapshotMeta, Vote};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::link::{self, LinkIdentity, PeerKey};
use super::{ChainSnapshot, Master, NodeId, TypeConfig, WireOutcome};
use crate::chain::Proposal;
use crate::error::Error;

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Raft log replication.
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft election.
    Vote(VoteRequest<NodeId>),
    /// Raft snapshot: the receiver fetches the blocks it lacks, then installs it.
    Snapshot { vote: Vote<NodeId>, meta: SnapshotMeta<NodeId, Master>, data: ChainSnapshot },
    /// Writes for the leader to order (from a follower or a client node).
    Forward(Vec<Proposal>),
    /// Stored blocks from `from`, for a node catching up: header bytes and transaction bytes.
    Blocks { from: u64, limit: u32 },
    /// A membership change for the leader to make.
    Membership(MembershipChange),
    /// A tree head to co-sign after checking it against the local chain.
    Cosign(super::cosign::TreeHead),
    /// A client node keeping its memcache in sync.
    Watch(crate::client::wire::WatchRequest),
    /// A client node delivering its outbox.
    ClientWrite(crate::client::wire::ClientWrite),
}

/// A change of the set of masters (admin API).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add a master: it catches up as a learner, then votes.
    Add(NodeId, Master),
    /// Remove a master.
    Remove(NodeId),
}

/// Why a forwarded write was not ordered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardError {
    /// This node is not the leader; try the one named, if known.
    NotLeader(Option<NodeId>),
    /// The write failed; the text says why.
    Failed(String),
}

/// One stored block as sent to a node catching up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireBlock {
    /// Canonical header bytes.
    pub header: Vec<u8>,
    /// Canonical transaction bytes, in order.
    pub txs: Vec<Vec<u8>>,
}

/// The answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Response {
    Append(std::result::Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(std::result::Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(std::result::Result<SnapshotResponse<NodeId>, String>),
    Forward(std::result::Result<Vec<WireOutcome>, ForwardError>),
    Blocks(std::result::Result<Vec<WireBlock>, String>),
    Membership(std::result::Result<(), ForwardError>),
    Cosign(std::result::Result<crate::checkpoint::SignatureJson, String>),
    Watch(std::result::Result<crate::client::wire::WatchUpdate, String>),
    ClientWrite(std::result::Result<Vec<crate::client::wire::GroupResult>, String>),
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    id: u64,
    body: T,
}

/// Serves requests on one node.
#[async_trait::async_trait]
pub(crate) trait Handler: Send + Sync + 'static {
    /// Starts answering `req` from the node whose link key is `peer`: what must happen in
    /// arrival order (queueing a forwarded write) happens before this returns; the answer
    /// comes from the returned future.
    async fn handle(&self, peer: PeerKey, req: Request) -> BoxFuture<'static, Response>;
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

struct Conn {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    pending: Pending,
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
}

/// First wait of the reconnection backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest wait between masters: a healed partition must rejoin within a few heartbeats.
pub(crate) const MASTER_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The next wait after `failures` consecutive failed connection attempts.
pub(crate) fn backoff_after(failures: u32, max: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    (BACKOFF_MIN * factor).min(max)
}

/// A handle on one remote node; requests share one link.
pub(crate) struct Peer {
    addr: String,
    expect: PeerKey,
    max_backoff: Duration,
    id: LinkIdentity,
    conn: tokio::sync::Mutex<Option<Conn>>,
    backoff: Mutex<Backoff>,
    next_id: AtomicU64,
}

/// A request that did not get an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No link to the peer (connection refused, backoff in progress, closed link).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The peer did not answer in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl Peer {
    /// A peer at `addr` whose link key must be `expect`.
    pub(crate) fn new(addr: String, expect: PeerKey, id: LinkIdentity, max_backoff: Duration) -> Self {
        Self {
            addr,
            expect,
            max_backoff,
            id,
            conn: tokio::sync::Mutex::new(None),
            backoff: Mutex::new(Backoff::default()),
            next_id: AtomicU64::new(1),
        }
    }

    /// The address dialled.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// The link key the peer must present.
    pub(crate) fn key(&self) -> PeerKey {
        self.expect
    }

    async fn link(&self) -> std::result::Result<(tokio::sync::mpsc::Sender<Vec<u8>>, Pending), CallError> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref()
            && !c.tx.is_closed()
        {
            return Ok((c.tx.clone(), c.pending.clone()));
        }
        *conn = None;
        if let Some(at) = self.backoff.lock().retry_at
            && Instant::now() < at
        {
            return Err(CallError::Unreachable(format!("{}: waiting before reconnecting", self.addr)));
        }
        let opened = link::connect(&self.id, &self.addr).await.and_then(|l| {
            if l.peer == self.expect {
                Ok(l)
            } else {
                Err(Error::Link(format!("{} answered with link key {}", self.addr, hex::encode(l.peer))))
            }
        });
        let l = match opened {
            Ok(l) => l,
            Err(e) => {
                let mut b = self.backoff.lock();
                b.failures = b.failures.saturating_add(1);
                b.retry_at = Some(Instant::now() + backoff_after(b.failures, self.max_backoff));
                metrics::counter!("kalima_link_connect_failures_total").increment(1);
                return Err(CallError::Unreachable(format!("{e}")));
            }
        };
        *self.backoff.lock() = Backoff::default();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let reader_pending = pending.clone();
        let mut rx = l.rx;
        tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                let Ok(env) = postcard::from_bytes::<Envelope<Response>>(&bytes) else {
                    metrics::counter!("kalima_link_bad_messages_total").increment(1);
                    break;
                };
                if let Some(tx) = reader_pending.lock().remove(&env.id) {
                    let _ = tx.send(env.body);
                }
            }
            // Dropping the senders fails every request still waiting on this link.
            reader_pending.lock().clear();
        });
        *conn = Some(Conn { tx: l.tx.clone(), pending: pending.clone() });
        Ok((l.tx, pending))
    }

    /// Sends `req` and waits up to `timeout` for the answer.
    pub(crate) async fn call(&self, req: &Request, timeout: Duration) -> std::result::Result<Response, CallError> {
        self.start(req, timeout).await?.await
    }

    /// Sends `req` now (requests started one after another arrive in that order) and
    /// returns the wait for its answer.
    pub(crate) async fn start(
        &self,
        req: &Request,
        timeout: Duration,
    ) -> std::result::Result<impl Future<Output = std::result::Result<Response, CallError>> + Send + 'static, CallError>
    {
        let (tx, pending) = self.link().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = postcard::to_stdvec(&Envelope { id, body: req })
            .map_err(|e| CallError::Unreachable(format!("encoding the request: {e}")))?;
        let (done, wait) = oneshot::channel();
        pending.lock().insert(id, done);
        if tx.send(bytes).await.is_err() {
            pending.lock().remove(&id);
            return Err(CallError::Unreachable(format!("{}: link closed", self.addr)));
        }
        let addr = self.addr.clone();
        Ok(async move {
            match tokio::time::timeout(timeout, wait).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(_)) => Err(CallError::Unreachable(format!("{addr}: link closed"))),
                Err(_) => {
                    pending.lock().remove(&id);
                    Err(CallError::Timeout(timeout))
                }
            }
        })
    }
}

/// Accepts links on `listener` and answers their requests with `handler` until aborted.
pub(crate) async fn serve(listener: TcpListener, id: LinkIdentity, handler: Arc<dyn Handler>) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(target: "core::cluster", error = %e, "Accepting a node link failed.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = id.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let link = match link::accept(&id, stream).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::info!(target: "core::cluster", %from, error = %e, "Refused a node link.");
                    return;
                }
            };
            let peer = link.peer;
            let tx = link.tx;
            let mut rx = link.rx;
            while let Some(bytes) = rx.recv().await {
                let env = match postcard::from_bytes::<Envelope<Request>>(&bytes) {
                    Ok(e) => e,
                    Err(e) => {
                        metrics::counter!("kalima_link_bad_messages_total").increment(1);
                        tracing::warn!(target: "core::cluster", %from, error = %e, "Undecodable request; closing the link.");
                        break;
                    }
                };
                let answer = handler.handle(peer, env.body).await;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let body = answer.await;
                    match postcard::to_stdvec(&Envelope { id: env.id, body }) {
                        Ok(bytes) => {
                            let _ = tx.send(bytes).await;
                        }
                        Err(e) => tracing::error!(target: "core::cluster", error = %e, "Encoding a response failed."),
                    }
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_half_a_second_to_thirty() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff_after(n, Duration::from_secs(30)).as_millis() as u64).collect();
        assert_eq!(waits, vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        assert_eq!(backoff_after(5, MASTER_BACKOFF_MAX), MASTER_BACKOFF_MAX);
    }
}
