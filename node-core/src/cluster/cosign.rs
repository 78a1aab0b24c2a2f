//! Checkpoints co-signed by a quorum of masters. The leader proposes a tree head of its
//! chain; each master signs it only after checking it against its own chain (same root at
//! that size, same block at that height); once a majority of voters signed, the leader
//! records the checkpoint with every signature on the chain (`/_kalima/checkpoints`, key
//! `latest`), so each master serves it and `kalima verify` checks it. Each signature is an
//! ordinary Ed25519 signature over the checkpoint text, checkable on its own.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use openraft::Raft;

use super::network::Network;
use super::rpc::{Request, Response};
use super::{NodeId, TypeConfig};
use crate::chain::Chain;
use crate::checkpoint::{Checkpoint, CheckpointJson, SignatureJson};
use crate::keys::NodeKey;
use crate::tx::TxContent;

/// Address whose `latest` value is the latest co-signed checkpoint.
pub const CHECKPOINTS_ADDRESS: &str = "/_kalima/checkpoints";

/// A tree head for masters to sign.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct TreeHead {
    pub(crate) tree_size: u64,
    pub(crate) root: crate::merkle::Hash,
    pub(crate) height: u64,
    pub(crate) timestamp_ms: i64,
}

/// Signs `head` with this master's key if its own chain agrees, waiting (briefly) for its
/// chain to reach that height.
pub(crate) async fn sign(chain: &Chain, key: &NodeKey, head: &TreeHead) -> Result<SignatureJson, String> {
    let started = Instant::now();
    while chain.head().block.header.height < head.height {
        if started.elapsed() > Duration::from_secs(5) {
            return Err(format!("this master has not reached height {} yet", head.height));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let block = chain.store().block(head.height).await.map_err(|e| e.to_string())?;
    let ok = block.is_some_and(|b| b.header.tree_size == head.tree_size && b.header.merkle_root == head.root);
    if !ok {
        metrics::counter!("kalima_checkpoint_cosign_refused_total").increment(1);
        return Err(format!("block {} here does not have this tree size and root", head.height));
    }
    let text =
        Checkpoint::signed_text(&chain.config().chain, head.tree_size, &head.root, head.height, head.timestamp_ms);
    Ok(SignatureJson { signer: key.public_hex(), signature: hex::encode(key.sign(text.as_bytes())) })
}

/// On the leader, every `every`: a co-signed checkpoint of the applied head, when it grew.
pub(crate) async fn run(
    raft: Raft<TypeConfig>,
    chain: Chain,
    key: NodeKey,
    network: Network,
    me: NodeId,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_size = 0u64;
    loop {
        tick.tick().await;
        if raft.metrics().borrow().current_leader != Some(me) || !chain.has_genesis() {
            continue;
        }
        match once(&raft, &chain, &key, &network, last_size).await {
            Ok(Some(size)) => last_size = size,
            Ok(None) => {}
            Err(e) => tracing::warn!(target: "core::cluster", error = %e, "Co-signed checkpoint failed."),
        }
    }
}

/// One round; returns the tree size recorded, if any.
async fn once(
    raft: &Raft<TypeConfig>,
    chain: &Chain,
    key: &NodeKey,
    network: &Network,
    last_size: u64,
) -> Result<Option<u64>, String> {
    let block = chain.head().block;
    if block.header.tree_size <= last_size {
        return Ok(None);
    }
    let head = TreeHead {
        tree_size: block.header.tree_size,
        root: block.header.merkle_root,
        height: block.header.height,
        timestamp_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
    };
    let membership = raft.metrics().borrow().membership_config.membership().clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let quorum = voters.len() / 2 + 1;
    let mut signatures = vec![sign(chain, key, &head).await?];
    let mut asks = Vec::new();
    for id in voters.iter().filter(|id| **id != raft.metrics().borrow().id) {
        let Some(node) = membership.get_node(id) else { continue };
        let Some(peer) = network.peer(*id, node) else { continue };
        let req = Request::Cosign(head.clone());
        asks.push(async move { peer.call(&req, Duration::from_secs(8)).await });
    }
    for answer in futures::future::join_all(asks).await {
        if let Ok(Response::Cosign(Ok(sig))) = answer {
            signatures.push(sig);
        }
    }
    let cp = CheckpointJson {
        chain: chain.config().chain.clone(),
        tree_size: head.tree_size,
        height: head.height,
        timestamp_ms: head.timestamp_ms,
        root: hex::encode(head.root),
        signed_text: Checkpoint::signed_text(
            &chain.config().chain,
            head.tree_size,
            &head.root,
            head.height,
            head.timestamp_ms,
        ),
        signatures,
    };
    let signers = cp.valid_signers();
    if signers.len() < quorum {
        return Err(format!("{} of {} masters signed; a quorum is {quorum}", signers.len(), voters.len()));
    }
    let tx = TxContent {
        device_id: crate::registry::NODE_DEVICE_ID.into(),
        address: CHECKPOINTS_ADDRESS.into(),
        key: "latest".into(),
        body: serde_json::to_vec(&cp).map_err(|e| e.to_string())?,
        ..TxContent::default()
    };
    chain.submit(vec![tx], None).await.map_err(|e| e.to_string())?;
    metrics::counter!("kalima_checkpoints_cosigned_total").increment(1);
    Ok(Some(head.tree_size))
}

/// The latest co-signed checkpoint recorded on `chain`, if any.
pub fn latest(chain: &Chain) -> Option<CheckpointJson> {
    let c = chain.memcache().get(CHECKPOINTS_ADDRESS, "latest")?;
    serde_json::from_slice(&c.tx.content.body).ok()
}
