//! Master nodes: one chain replicated by Raft (openraft) over encrypted node links.
//!
//! The leader orders batches of validated writes and stamps each with its time and key; a
//! batch is applied only once a quorum has logged it, and every master applies it to the
//! same chain, so every master builds byte-identical blocks (see `chain::apply`). Followers
//! forward writes to the leader and serve reads and streams from their own chain. See
//! `node-core/CLUSTER.md`.

mod clients;
pub mod cosign;
pub mod link;
mod log_store;
mod network;
mod proposer;
pub(crate) mod rpc;
mod state_machine;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use openraft::{Raft, SnapshotPolicy};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::chain::{Batch, Chain, ChainConfig, Outcome, Receipt};
use crate::error::{Error, Rejection, Result};
use crate::keys::NodeKey;
use crate::merkle::Hash;
use crate::store::Store;
use crate::tx::TxContent;

pub use link::{LINK_KEY_FILE, LinkIdentity, LinkKey, LinkTuning, PeerKey, parse_public};
pub use log_store::RAFT_LOG_FILE;

use log_store::LogStore;
use network::Network;
pub use rpc::MembershipChange;
use rpc::{ForwardError, Handler, Request, Response, WireBlock};
use state_machine::StateMachine;

/// A master's Raft id.
pub type NodeId = u64;

/// How to reach a master, as recorded in the Raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Master {
    /// `host:port` of its node link.
    pub addr: String,
    /// Its link public key (hex).
    pub link_key: String,
    /// Its node public key (hex): the key it leads blocks and signs checkpoints with.
    pub node_key: String,
}

/// What a snapshot carries: where the chain stood, and (in transit) who to fetch it from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainSnapshot {
    /// Head height.
    pub height: u64,
    /// Head hash.
    pub hash: Hash,
    /// False when the chain had no block yet.
    pub has_genesis: bool,
    /// The node that sent the snapshot and serves its blocks.
    pub source: Option<NodeId>,
}

/// A refusal that crosses node links: the ones the chain itself can decide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireRejection {
    /// See [`Rejection::DuplicateIdempotencyKey`].
    DuplicateIdempotencyKey {
        /// The repeated key.
        key: String,
        /// The transaction that used it.
        existing: String,
    },
    /// See [`Rejection::Revoked`].
    Revoked(String),
    /// See [`Rejection::Forbidden`] (always a write).
    Forbidden {
        /// The device.
        device: String,
        /// The address.
        address: String,
    },
    /// See [`Rejection::DeviceExists`].
    DeviceExists(String),
    /// See [`Rejection::NoSuchDevice`].
    NoSuchDevice(String),
    /// Anything else, as its message.
    Other(String),
    /// See [`Rejection::Ledger`].
    Ledger(crate::ledger::LedgerError),
}

impl From<Rejection> for WireRejection {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::DuplicateIdempotencyKey { key, existing } => {
                WireRejection::DuplicateIdempotencyKey { key, existing }
            }
            Rejection::Revoked(d) => WireRejection::Revoked(d),
            Rejection::Forbidden { device, address, .. } => WireRejection::Forbidden { device, address },
            Rejection::DeviceExists(d) => WireRejection::DeviceExists(d),
            Rejection::NoSuchDevice(d) => WireRejection::NoSuchDevice(d),
            Rejection::Ledger(e) => WireRejection::Ledger(e),
            other => WireRejection::Other(other.to_string()),
        }
    }
}

impl From<WireRejection> for Rejection {
    fn from(r: WireRejection) -> Self {
        match r {
            WireRejection::DuplicateIdempotencyKey { key, existing } => {
                Rejection::DuplicateIdempotencyKey { key, existing }
            }
            WireRejection::Revoked(d) => Rejection::Revoked(d),
            WireRejection::Forbidden { device, address } => Rejection::Forbidden { device, access: "write", address },
            WireRejection::DeviceExists(d) => Rejection::DeviceExists(d),
            WireRejection::NoSuchDevice(d) => Rejection::NoSuchDevice(d),
            WireRejection::Other(m) => Rejection::Malformed(m),
            WireRejection::Ledger(e) => Rejection::Ledger(e),
        }
    }
}

/// One proposal's outcome as it crosses node links.
pub type WireOutcome = std::result::Result<Vec<Receipt>, WireRejection>;

/// The state machine's answer to one log entry: one outcome per proposal of its batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApplyResponse(pub Vec<WireOutcome>);

/// An outcome as it crosses node links.
pub(crate) fn wire(o: Outcome) -> WireOutcome {
    o.map_err(WireRejection::from)
}

openraft::declare_raft_types!(
    /// Raft types of a Kalima chain.
    pub TypeConfig:
        D = Batch,
        R = ApplyResponse,
        NodeId = NodeId,
        Node = Master,
        SnapshotData = ChainSnapshot,
);

/// The cluster section of a master's configuration.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This master's id (unique in the cluster, never reused).
    pub id: NodeId,
    /// Where this master accepts node links.
    pub listen: String,
    /// The masters of a new cluster (used once, by `bootstrap`).
    pub masters: BTreeMap<NodeId, Master>,
    /// Form the cluster from `masters` when this master's Raft log is empty.
    pub bootstrap: bool,
    /// Link keys of client nodes allowed to connect.
    pub clients: Vec<PeerKey>,
    /// Raft heartbeat interval.
    pub heartbeat: Duration,
    /// Raft election timeout (randomised between this and twice this).
    pub election_timeout: Duration,
    /// A snapshot is taken after this many log entries; older entries are purged.
    pub snapshot_every: u64,
    /// Batches the leader proposes before the oldest is applied. Writes queue meanwhile and
    /// go out together: few in flight means large batches, each applied in one commit.
    pub in_flight_batches: usize,
    /// Link timing.
    pub link: LinkTuning,
    /// Largest body accepted from client nodes' devices.
    pub client_max_body: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            id: 1,
            listen: "0.0.0.0:7700".into(),
            masters: BTreeMap::new(),
            bootstrap: true,
            clients: Vec::new(),
            // openraft waits for the leader lease (the election timeout's upper bound) plus a
            // random timeout before campaigning: 150-300 ms puts a new leader ~0.5 s after a
            // crash (`kalima bench cluster`).
            heartbeat: Duration::from_millis(50),
            election_timeout: Duration::from_millis(150),
            snapshot_every: 5000,
            in_flight_batches: 2,
            link: LinkTuning::default(),
            client_max_body: crate::tx::MAX_BODY,
        }
    }
}

/// The masters recorded in the store's Raft membership (empty for a single node).
pub async fn recorded_masters(store: &Store) -> Result<BTreeMap<NodeId, Master>> {
    state_machine::recorded_masters(store).await
}

/// A running master.
pub struct Cluster {
    raft: Raft<TypeConfig>,
    me: NodeId,
    log: LogStore,
    tasks: Vec<JoinHandle<()>>,
    network: Network,
    chain: Chain,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("id", &self.me).finish()
    }
}

/// What a master reports about the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This master's id.
    pub id: NodeId,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    /// The leader this master knows, if any.
    pub leader: Option<NodeId>,
    /// Current Raft term.
    pub term: u64,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last applied entry.
    pub last_applied: Option<u64>,
    /// Voting masters.
    pub voters: Vec<NodeId>,
    /// Every master in the membership (voters and learners) with its address.
    pub members: BTreeMap<NodeId, Master>,
}

impl Cluster {
    /// Starts a master over `store`: restores the chain, opens the Raft log in `dir`, accepts
    /// node links on `config.listen`, and forms the cluster when bootstrapping. Writes go
    /// through the returned chain's usual API; the leader orders them.
    pub async fn start(
        dir: &Path,
        store: Store,
        node_key: NodeKey,
        link_key: LinkKey,
        chain_config: ChainConfig,
        config: ClusterConfig,
        genesis: Vec<TxContent>,
    ) -> Result<(Chain, Cluster)> {
        let chain_name = chain_config.chain.clone();
        let max_commit = chain_config.max_commit_txs;
        let (chain, applier, rx) = Chain::restore(store, node_key.clone(), chain_config).await?;
        let mut allow: BTreeSet<PeerKey> = config.clients.iter().copied().collect();
        for m in config.masters.values() {
            allow.insert(parse_public(&m.link_key).map_err(Error::Config)?);
        }
        let identity = LinkIdentity::new(link_key, &chain_name, allow, config.link.clone());
        let peers = Arc::new(RwLock::new(BTreeMap::new()));
        let network = Network { me: config.id, identity: identity.clone(), peers: peers.clone() };
        let sm = StateMachine::open(chain.clone(), applier, network.clone()).await?;
        // Masters of the current membership are allowed even when the config file predates them.
        for m in sm.applied().membership.membership().nodes().map(|(_, n)| n) {
            if let Ok(k) = parse_public(&m.link_key) {
                identity.allow.write().insert(k);
            }
        }
        let log = LogStore::open(dir).await?;
        let pristine = log.is_pristine().await?;

        let raft_config = openraft::Config {
            cluster_name: chain_name.clone(),
            heartbeat_interval: config.heartbeat.as_millis() as u64,
            election_timeout_min: config.election_timeout.as_millis() as u64,
            election_timeout_max: 2 * config.election_timeout.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.snapshot_every / 2,
            // openraft gives an AppendEntries one heartbeat interval to complete: a few
            // batches (about 1 MB) per request keep it within that while a follower catches up.
            max_payload_entries: 4,
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Config(format!("cluster timing: {e}")))?;
        let raft = Raft::new(config.id, Arc::new(raft_config), network.clone(), log.clone(), sm.clone())
            .await
            .map_err(|e| Error::Link(format!("starting raft: {e}")))?;

        let listener = TcpListener::bind(&config.listen).await.map_err(|e| {
            Error::Config(format!("[cluster] listen {}: {e}; set [cluster] listen to a free address", config.listen))
        })?;
        let handler: Arc<dyn Handler> = Arc::new(Service {
            raft: raft.clone(),
            chain: chain.clone(),
            me: config.id,
            key: node_key.clone(),
            client_keys: config.clients.iter().copied().collect(),
            clients: Arc::new(clients::ClientService::new(chain.clone(), config.client_max_body)),
        });
        let mut tasks = vec![tokio::spawn(rpc::serve(listener, identity.clone(), handler))];

        if pristine && config.bootstrap {
            if !config.masters.contains_key(&config.id) {
                return Err(Error::Config(format!(
                    "[cluster] id {} is not among [cluster.masters]; a bootstrapping master must be one of them",
                    config.id
                )));
            }
            match raft.initialize(config.masters.clone()).await {
                Ok(()) => tracing::info!(target: "core::cluster", masters = config.masters.len(), "Cluster formed."),
                Err(e) => tracing::info!(target: "core::cluster", error = %e, "Cluster already formed."),
            }
        }
        let me = config.id;
        let leader_key = node_key.public_hex();
        let network_handle = network.clone();
        tasks.push(tokio::spawn(proposer::run(proposer::Proposer {
            raft: raft.clone(),
            chain: chain.clone(),
            network,
            me,
            leader_key: leader_key.clone(),
            max_commit,
            in_flight: config.in_flight_batches,
            rx,
        })));
        tasks.push(tokio::spawn(proposer::genesis_when_leader(raft.clone(), chain.clone(), me, leader_key, genesis)));
        if let Some(every) = chain.config().checkpoint_interval {
            let (raft, chain, key, net) = (raft.clone(), chain.clone(), node_key.clone(), network_handle.clone());
            tasks.push(tokio::spawn(cosign::run(raft, chain, key, net, me, every)));
        }
        chain.set_ready();
        Ok((chain.clone(), Cluster { raft, me, log, tasks, network: network_handle, chain }))
    }

    /// The current view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        ClusterStatus {
            id: self.me,
            role: format!("{:?}", m.state).to_lowercase(),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            members: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        }
    }

    /// Adds or removes a master (on the leader, wherever it is called), then records the new
    /// membership on the chain under `/_kalima/cluster`.
    pub async fn change_membership(&self, change: MembershipChange) -> Result<()> {
        let leader = self.raft.metrics().borrow().current_leader;
        match leader {
            Some(l) if l == self.me => apply_membership(&self.raft, &self.chain, change).await,
            Some(l) => {
                let node = self.raft.metrics().borrow().membership_config.membership().get_node(&l).cloned();
                let peer = node
                    .and_then(|n| self.network.peer(l, &n))
                    .ok_or_else(|| Error::Unavailable(format!("the leader (master {l}) is not in the membership")))?;
                // Adding a master waits for it to catch up: allow for a long transfer.
                match peer.call(&Request::Membership(change), std::time::Duration::from_secs(600)).await {
                    Ok(Response::Membership(Ok(()))) => Ok(()),
                    Ok(Response::Membership(Err(ForwardError::Failed(m)))) => Err(Error::Unavailable(m)),
                    Ok(Response::Membership(Err(ForwardError::NotLeader(_)))) => {
                        Err(Error::Unavailable("leadership changed; retry".into()))
                    }
                    Ok(_) => Err(Error::Link(format!("master {l} answered the wrong message"))),
                    Err(e) => Err(Error::Unavailable(format!("the leader (master {l}) is unreachable: {e}"))),
                }
            }
            None => Err(Error::Unavailable("no cluster leader is elected right now; retry shortly".into())),
        }
    }

    /// Stops Raft and the node links.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
        for t in &self.tasks {
            t.abort();
        }
        self.log.close().await;
    }

    /// Resolves when Raft has stopped (shut down, or a fatal storage error).
    pub async fn stopped(&self) {
        let mut m = self.raft.metrics();
        loop {
            if m.borrow().state == openraft::ServerState::Shutdown {
                return;
            }
            if m.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Makes a membership change on the leader and records the result on the chain.
async fn apply_membership(raft: &Raft<TypeConfig>, chain: &Chain, change: MembershipChange) -> Result<()> {
    let failed = |e: String| Error::Unavailable(format!("membership change failed: {e}"));
    match &change {
        MembershipChange::Add(id, master) => {
            parse_public(&master.link_key).map_err(Error::Config)?;
            parse_public(&master.node_key).map_err(Error::Config)?;
            // Blocking: returns once the learner has caught up (logs or a snapshot).
            raft.add_learner(*id, master.clone(), true).await.map_err(|e| failed(e.to_string()))?;
            raft.change_membership(openraft::ChangeMembers::AddVoterIds([*id].into()), false)
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
        MembershipChange::Remove(id) => {
            raft.change_membership(openraft::ChangeMembers::RemoveVoters([*id].into()), false)
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
    }
    let m = raft.metrics().borrow().membership_config.membership().clone();
    let record = serde_json::json!({
        "change": match &change {
            MembershipChange::Add(id, _) => serde_json::json!({ "added": id }),
            MembershipChange::Remove(id) => serde_json::json!({ "removed": id }),
        },
        "voters": m.voter_ids().collect::<Vec<_>>(),
        "masters": m.nodes().map(|(id, n)| (id.to_string(), serde_json::json!({ "addr": n.addr, "link_key": n.link_key, "node_key": n.node_key }))).collect::<serde_json::Map<_, _>>(),
    });
    let tx = TxContent {
        device_id: crate::registry::NODE_DEVICE_ID.into(),
        address: CLUSTER_ADDRESS.into(),
        key: "members".into(),
        body: serde_json::to_vec(&record).map_err(|e| Error::Link(e.to_string()))?,
        ..TxContent::default()
    };
    chain.submit(vec![tx], None).await?;
    metrics::counter!("kalima_cluster_membership_changes_total").increment(1);
    Ok(())
}

/// Address whose `members` value records every membership change.
pub const CLUSTER_ADDRESS: &str = "/_kalima/cluster";

/// Answers other nodes' requests.
struct Service {
    raft: Raft<TypeConfig>,
    chain: Chain,
    me: NodeId,
    key: NodeKey,
    /// Link keys of client nodes: they may only sync and deliver, never take part in Raft.
    client_keys: std::collections::HashSet<PeerKey>,
    clients: clients::Clients,
}

#[async_trait::async_trait]
impl Handler for Service {
    async fn handle(&self, peer: PeerKey, req: Request) -> BoxFuture<'static, Response> {
        let raft = self.raft.clone();
        if self.client_keys.contains(&peer) && !matches!(req, Request::Watch(_) | Request::ClientWrite(_)) {
            metrics::counter!("kalima_link_refused_requests_total", "reason" => "client_node").increment(1);
            return async move { Response::Watch(Err("client nodes may only sync and deliver writes".into())) }.boxed();
        }
        match req {
            Request::Watch(w) => {
                let clients = self.clients.clone();
                async move { Response::Watch(clients.watch(peer, w).await) }.boxed()
            }
            Request::ClientWrite(w) => {
                let clients = self.clients.clone();
                async move { Response::ClientWrite(clients.write(w).await) }.boxed()
            }
            Request::Append(r) => async move { Response::Append(raft.append_entries(r).await) }.boxed(),
            Request::Vote(r) => async move { Response::Vote(raft.vote(r).await) }.boxed(),
            Request::Snapshot { vote, meta, data } => async move {
                let snapshot = openraft::Snapshot { meta, snapshot: Box::new(data) };
                Response::Snapshot(raft.install_full_snapshot(vote, snapshot).await.map_err(|e| e.to_string()))
            }
            .boxed(),
            Request::Blocks { from, limit } => {
                let store = self.chain.store().clone();
                async move { Response::Blocks(blocks_from(&store, from, limit.min(1024)).await.map_err(|e| e.to_string())) }
                    .boxed()
            }
            Request::Cosign(head) => {
                let (chain, key) = (self.chain.clone(), self.key.clone());
                async move { Response::Cosign(cosign::sign(&chain, &key, &head).await) }.boxed()
            }
            Request::Membership(change) => {
                let leader = raft.metrics().borrow().current_leader;
                if leader != Some(self.me) {
                    return async move { Response::Membership(Err(ForwardError::NotLeader(leader))) }.boxed();
                }
                let chain = self.chain.clone();
                async move {
                    Response::Membership(
                        apply_membership(&raft, &chain, change).await.map_err(|e| ForwardError::Failed(e.to_string())),
                    )
                }
                .boxed()
            }
            Request::Forward(proposals) => {
                let leader = raft.metrics().borrow().current_leader;
                if leader != Some(self.me) {
                    return async move { Response::Forward(Err(ForwardError::NotLeader(leader))) }.boxed();
                }
                // Queued here, in arrival order, before the next request of the link is read.
                match self.chain.submit_proposals(proposals).await {
                    Ok(waits) => async move {
                        let mut out = Vec::with_capacity(waits.len());
                        for w in waits {
                            match w.await {
                                Ok(receipts) => out.push(Ok(receipts)),
                                Err(Error::Rejected(r)) => out.push(Err(WireRejection::from(r))),
                                Err(e) => return Response::Forward(Err(ForwardError::Failed(e.to_string()))),
                            }
                        }
                        Response::Forward(Ok(out))
                    }
                    .boxed(),
                    Err(e) => async move { Response::Forward(Err(ForwardError::Failed(e.to_string()))) }.boxed(),
                }
            }
        }
    }
}

/// Stored blocks from `from` with their transactions' canonical bytes.
async fn blocks_from(store: &Store, from: u64, limit: u32) -> Result<Vec<WireBlock>> {
    let raws = store.raw_blocks(from, limit).await?;
    let bodies = store.raw_bodies(from, limit).await?;
    let mut by_height: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for b in &bodies {
        let txs = store.open_body(b)?;
        by_height.insert(b.height, txs.iter().map(|c| c.tx.encode()).collect());
    }
    raws.into_iter()
        .map(|r| {
            let txs = by_height.remove(&r.height).unwrap_or_default();
            Ok(WireBlock { header: r.header, txs })
        })
        .collect()
}
