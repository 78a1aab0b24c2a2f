//! openraft's network over node links: one [`Peer`] per master.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{AnyError, Snapshot, Vote};
use parking_lot::RwLock;

use super::link::{LinkIdentity, parse_public};
use super::rpc::{CallError, MASTER_BACKOFF_MAX, Peer, Request, Response, backoff_after};
use super::{Master, NodeId, TypeConfig};

/// Creates (and caches) the peer handles of masters.
#[derive(Clone)]
pub(crate) struct Network {
    pub(crate) me: NodeId,
    pub(crate) identity: LinkIdentity,
    pub(crate) peers: Arc<RwLock<BTreeMap<NodeId, Arc<Peer>>>>,
}

impl Network {
    /// The peer handle of `target` at `node`, replacing a cached one whose address or key
    /// changed (a master re-added elsewhere).
    pub(crate) fn peer(&self, target: NodeId, node: &Master) -> Option<Arc<Peer>> {
        let key = parse_public(&node.link_key).ok()?;
        if let Some(p) = self.peers.read().get(&target)
            && p.addr() == node.addr
            && p.key() == key
        {
            return Some(p.clone());
        }
        self.identity.allow.write().insert(key);
        let p = Arc::new(Peer::new(node.addr.clone(), key, self.identity.clone(), MASTER_BACKOFF_MAX));
        self.peers.write().insert(target, p.clone());
        Some(p)
    }
}

/// The connection to one target, as openraft sees it.
pub(crate) struct Connection {
    target: NodeId,
    me: NodeId,
    peer: Option<Arc<Peer>>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Master) -> Connection {
        Connection { target, me: self.me, peer: self.peer(target, node) }
    }
}

fn unreachable(msg: String) -> Unreachable {
    Unreachable::new(&AnyError::error(msg))
}

impl Connection {
    async fn call<E: std::error::Error>(
        &self,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, RPCError<NodeId, Master, E>> {
        let Some(peer) = &self.peer else {
            return Err(RPCError::Unreachable(unreachable(format!("node {} has an invalid link key", self.target))));
        };
        peer.call(&req, timeout).await.map_err(|e| match e {
            CallError::Unreachable(m) => RPCError::Unreachable(unreachable(m)),
            CallError::Timeout(_) => RPCError::Timeout(Timeout {
                action: openraft::network::RPCTypes::AppendEntries,
                id: self.me,
                target: self.target,
                timeout,
            }),
        })
    }

    fn unexpected<E: std::error::Error>(&self) -> RPCError<NodeId, Master, E> {
        RPCError::Network(NetworkError::new(&AnyError::error(format!(
            "node {} answered the wrong message",
            self.target
        ))))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Master, RaftError<NodeId>>> {
        match self.call(Request::Append(rpc), option.hard_ttl()).await? {
            Response::Append(Ok(r)) => Ok(r),
            Response::Append(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(self.unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Master, RaftError<NodeId>>> {
        match self.call(Request::Vote(rpc), option.hard_ttl()).await? {
            Response::Vote(Ok(r)) => Ok(r),
            Response::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(self.unexpected()),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let mut data = *snapshot.snapshot;
        data.source = Some(self.me);
        let req = Request::Snapshot { vote, meta: snapshot.meta, data };
        // The receiver fetches every block it lacks before answering.
        let resp = self.call::<Fatal<NodeId>>(req, Duration::from_secs(600)).await.map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Timeout(t) => StreamingError::Timeout(t),
            other => StreamingError::Network(NetworkError::new(&other)),
        })?;
        match resp {
            Response::Snapshot(Ok(r)) => Ok(r),
            Response::Snapshot(Err(e)) => Err(StreamingError::Network(NetworkError::new(&AnyError::error(e)))),
            _ => Err(StreamingError::Network(NetworkError::new(&AnyError::error("wrong answer to a snapshot")))),
        }
    }

    fn backoff(&self) -> Backoff {
        // Between masters: from 0.5 s to 2 s, so a healed partition rejoins quickly.
        Backoff::new((1..).map(|n| backoff_after(n, MASTER_BACKOFF_MAX)))
    }
}
