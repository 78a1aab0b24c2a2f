//! The Raft state machine of a master: the chain itself. Applying an entry applies its batch
//! (every master builds byte-identical blocks); the applied log position is written in the
//! same database transaction as the blocks, so a crash never applies an entry twice. The
//! chain is always persistent, so a snapshot is only a pointer to its head: a master that
//! receives one fetches the blocks it lacks from the leader and checks each.

// openraft's storage traits return its `StorageError`, whose size is not ours to choose.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use parking_lot::RwLock;
use tokio::sync::Mutex;

use super::network::Network;
use super::rpc::{Request, Response};
use super::{ApplyResponse, ChainSnapshot, Master, NodeId, TypeConfig, wire};
use crate::chain::{Applier, Chain};

const APPLIED: &str = "raft_applied";
const MEMBERSHIP: &str = "raft_membership";
/// Blocks asked for per request while catching up.
const CATCH_UP_PAGE: u32 = 256;

/// The masters of the membership stored beside the chain.
pub(crate) async fn recorded_masters(store: &crate::Store) -> crate::Result<BTreeMap<NodeId, Master>> {
    let Some(b) = store.node_state(MEMBERSHIP).await? else { return Ok(BTreeMap::new()) };
    let m: StoredMembership<NodeId, Master> =
        postcard::from_bytes(&b).map_err(|e| crate::Error::Link(format!("raft state: {e}")))?;
    Ok(m.membership().nodes().map(|(id, n)| (*id, n.clone())).collect())
}

/// Applied position and membership, as last written.
#[derive(Debug, Clone, Default)]
pub(crate) struct Applied {
    pub(crate) log_id: Option<LogId<NodeId>>,
    pub(crate) membership: StoredMembership<NodeId, Master>,
}

/// The state machine; clones share it.
#[derive(Clone)]
pub(crate) struct StateMachine {
    chain: Chain,
    applier: Arc<Mutex<Applier>>,
    applied: Arc<RwLock<Applied>>,
    network: Network,
}

fn sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e)).into()
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StorageError<NodeId>> {
    postcard::to_stdvec(v).map_err(sm_err)
}

impl StateMachine {
    /// Restores the applied position stored beside the chain.
    pub(crate) async fn open(chain: Chain, applier: Applier, network: Network) -> crate::Result<Self> {
        let store = chain.store().clone();
        let bad = |e: postcard::Error| crate::Error::Link(format!("raft state: {e}"));
        let log_id = match store.node_state(APPLIED).await? {
            Some(b) => postcard::from_bytes(&b).map_err(bad)?,
            None => None,
        };
        let membership = match store.node_state(MEMBERSHIP).await? {
            Some(b) => postcard::from_bytes(&b).map_err(bad)?,
            None => StoredMembership::default(),
        };
        Ok(Self {
            chain,
            applier: Arc::new(Mutex::new(applier)),
            applied: Arc::new(RwLock::new(Applied { log_id, membership })),
            network,
        })
    }

    /// The last applied log id.
    pub(crate) fn applied(&self) -> Applied {
        self.applied.read().clone()
    }

    fn snapshot_now(&self) -> Option<Snapshot<TypeConfig>> {
        let applied = self.applied.read().clone();
        let last = applied.log_id?;
        let head = self.chain.head();
        let data = ChainSnapshot {
            height: head.block.header.height,
            hash: head.block.hash,
            has_genesis: self.chain.has_genesis(),
            source: None,
        };
        Some(Snapshot {
            meta: SnapshotMeta {
                last_log_id: Some(last),
                last_membership: applied.membership,
                snapshot_id: format!("{}-{}-{}", last.leader_id.term, last.index, data.height),
            },
            snapshot: Box::new(data),
        })
    }

    /// Fetches and imports blocks up to `target` from `source`.
    async fn catch_up(
        &self,
        applier: &mut Applier,
        target: &ChainSnapshot,
        meta: &SnapshotMeta<NodeId, Master>,
        state: &[(&str, Vec<u8>)],
    ) -> crate::Result<()> {
        let source = target.source.ok_or_else(|| crate::Error::Link("snapshot names no source node".into()))?;
        let node = meta
            .last_membership
            .membership()
            .get_node(&source)
            .cloned()
            .ok_or_else(|| crate::Error::Link(format!("snapshot source node {source} is not in its membership")))?;
        let peer = self
            .network
            .peer(source, &node)
            .ok_or_else(|| crate::Error::Link(format!("snapshot source node {source} has an invalid link key")))?;
        loop {
            let (from, done) = if applier.has_genesis() {
                let h = self.chain.head().block.header.height;
                (h + 1, h >= target.height)
            } else {
                (0, !target.has_genesis)
            };
            if done {
                break;
            }
            let req = Request::Blocks { from, limit: CATCH_UP_PAGE };
            let blocks = match peer.call(&req, Duration::from_secs(30)).await {
                Ok(Response::Blocks(Ok(b))) => b,
                Ok(Response::Blocks(Err(e))) => return Err(crate::Error::Link(format!("node {source}: {e}"))),
                Ok(_) => return Err(crate::Error::Link(format!("node {source} answered the wrong message"))),
                Err(e) => return Err(crate::Error::Link(format!("fetching blocks from node {source}: {e}"))),
            };
            if blocks.is_empty() {
                return Err(crate::Error::Link(format!("node {source} has no block {from}")));
            }
            // Pages hold consecutive heights from `from` (import checks each header): keep
            // those up to the snapshot's head.
            let wanted: Vec<(Vec<u8>, Vec<Vec<u8>>)> = blocks
                .into_iter()
                .take(usize::try_from(target.height + 1 - from).unwrap_or(usize::MAX))
                .map(|b| (b.header, b.txs))
                .collect();
            let finishing = from + wanted.len() as u64 > target.height;
            applier.import(&wanted, if finishing { state } else { &[] }).await?;
        }
        let head = self.chain.head();
        if target.has_genesis && (head.block.header.height != target.height || head.block.hash != target.hash) {
            return Err(crate::Error::Corrupt {
                height: target.height,
                reason: "the local chain differs from the snapshot's head (a fork)".into(),
            });
        }
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // The chain is durable as applied; the snapshot records where it stands.
        let _guard = self.applier.lock().await;
        self.snapshot_now().ok_or_else(|| sm_err("nothing applied yet"))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Master>), StorageError<NodeId>> {
        let a = self.applied.read().clone();
        Ok((a.log_id, a.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResponse>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut applier = self.applier.lock().await;
        let mut out = Vec::new();
        for entry in entries {
            let log_id = Some(entry.log_id);
            let mut state = vec![(APPLIED, encode(&log_id)?)];
            let response = match entry.payload {
                EntryPayload::Blank => {
                    self.chain.store().put_node_state(&state).await.map_err(sm_err)?;
                    ApplyResponse(Vec::new())
                }
                EntryPayload::Membership(m) => {
                    // Masters of the membership may link to this one from now on.
                    for (_, n) in m.nodes() {
                        if let Ok(k) = super::link::parse_public(&n.link_key) {
                            self.network.identity.allow.write().insert(k);
                        }
                    }
                    let stored = StoredMembership::new(log_id, m);
                    state.push((MEMBERSHIP, encode(&stored)?));
                    self.chain.store().put_node_state(&state).await.map_err(sm_err)?;
                    self.applied.write().membership = stored;
                    ApplyResponse(Vec::new())
                }
                EntryPayload::Normal(batch) => {
                    let outcomes = applier.apply(&batch, &state).await.map_err(sm_err)?;
                    ApplyResponse(outcomes.into_iter().map(wire).collect())
                }
            };
            self.applied.write().log_id = log_id;
            out.push(response);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<ChainSnapshot>, StorageError<NodeId>> {
        Ok(Box::new(ChainSnapshot::default()))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Master>,
        snapshot: Box<ChainSnapshot>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut applier = self.applier.lock().await;
        let state = vec![(APPLIED, encode(&meta.last_log_id)?), (MEMBERSHIP, encode(&meta.last_membership)?)];
        tracing::info!(target: "core::cluster", height = snapshot.height, last_log = ?meta.last_log_id, "Installing a snapshot: fetching missing blocks.");
        self.catch_up(&mut applier, &snapshot, meta, &state).await.map_err(sm_err)?;
        metrics::counter!("kalima_cluster_snapshots_installed_total").increment(1);
        // Blocks may all have been present already: the position must still move.
        self.chain.store().put_node_state(&state).await.map_err(sm_err)?;
        let mut a = self.applied.write();
        a.log_id = meta.last_log_id;
        a.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let _guard = self.applier.lock().await;
        Ok(self.snapshot_now())
    }
}
