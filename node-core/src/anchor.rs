//! Anchoring checkpoints on public chains: the record an anchor leaves on this chain (under
//! `/_kalima/anchors`, so `GET /api/v1/anchors`, receipts and anyone reading the chain find
//! it), the interface each public chain's anchorer implements, and the service that runs
//! every anchorer on its schedule and on demand.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointJson;
use crate::registry::NODE_DEVICE_ID;
use crate::tx::TxContent;
use crate::{Chain, Error, Rejection};

/// Address of anchor records (key = anchoring target, e.g. `ethereum`; history = every anchor).
pub const ANCHORS_ADDRESS: &str = "/_kalima/anchors";

/// Which kind of public chain holds an anchor (how a verifier reads it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AnchorKind {
    /// An EVM chain (Ethereum, Polygon): an `Anchored` event of the `KlxAnchor` contract.
    Ethereum,
    /// Tezos: a call of the anchoring contract, its parameter holding the checkpoint.
    Tezos,
}

/// One checkpoint anchored on a public chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AnchorRecord {
    /// Where: the target's name from the config (`ethereum`, `polygon`, `tezos`).
    pub target: String,
    /// Kind of public chain.
    pub kind: AnchorKind,
    /// The public chain's id: the EVM chain id in decimal, or the Tezos chain id (`NetX...`).
    pub network: String,
    /// The anchoring contract (`0x...` or `KT1...`).
    pub contract: String,
    /// This chain's name, as in the checkpoint.
    pub chain: String,
    /// Transactions covered.
    pub tree_size: u64,
    /// Merkle root (hex) at that size.
    pub root: String,
    /// Block height of the checkpoint.
    pub height: u64,
    /// The anchoring transaction (EVM transaction hash or Tezos operation hash).
    pub tx_hash: String,
    /// The block (EVM block number or Tezos level) that holds it, confirmed.
    pub block_number: u64,
    /// The anchored checkpoint with its signatures, so a receipt can carry them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub checkpoint: Option<CheckpointJson>,
}

/// A public chain on which checkpoints are anchored.
#[async_trait::async_trait]
pub trait Anchorer: Send + Sync + 'static {
    /// The target's name (key of its anchor records).
    fn target(&self) -> &str;

    /// Anchors `checkpoint` unless already done: sends it, waits for it to be confirmed
    /// (sending again if a reorg drops it), and returns what to record. The error text is
    /// logged and counted; the next turn tries again.
    async fn anchor(&self, checkpoint: &CheckpointJson) -> Result<AnchorRecord, String>;
}

/// The checkpoint to anchor: the latest co-signed by a quorum of masters when the chain has
/// one (a cluster), otherwise the node's own latest.
pub async fn checkpoint_to_anchor(chain: &Chain) -> crate::Result<Option<CheckpointJson>> {
    if let Some(c) = crate::cluster::cosign::latest(chain) {
        return Ok(Some(c));
    }
    Ok(chain.latest_checkpoint().await?.map(|c| c.to_json()))
}

/// The latest anchor recorded on `chain` for `target`.
pub fn latest_anchor(chain: &Chain, target: &str) -> Option<AnchorRecord> {
    let c = chain.memcache().get(ANCHORS_ADDRESS, target)?;
    serde_json::from_slice(&c.tx.content.body).ok()
}

/// Records `record` on `chain` (once per target and tree size).
pub async fn record_anchor(chain: &Chain, record: &AnchorRecord) -> crate::Result<()> {
    let content = TxContent {
        device_id: NODE_DEVICE_ID.into(),
        address: ANCHORS_ADDRESS.into(),
        key: record.target.clone(),
        body: serde_json::to_vec(record).map_err(|e| Error::Fatal(format!("anchor record: {e}")))?,
        idempotency_key: format!("anchor:{}:{}", record.target, record.tree_size),
        ..TxContent::default()
    };
    match chain.submit(vec![content], None).await {
        Ok(_) | Err(Error::Rejected(Rejection::DuplicateIdempotencyKey { .. })) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Anchors the latest checkpoint on `anchorer` and records it, unless that target already
/// holds an anchor of it or a newer one. `None` when there was nothing new.
pub async fn anchor_latest(chain: &Chain, anchorer: &dyn Anchorer) -> Result<Option<AnchorRecord>, String> {
    let Some(cp) = checkpoint_to_anchor(chain).await.map_err(|e| format!("{e:#}"))? else { return Ok(None) };
    if latest_anchor(chain, anchorer.target()).is_some_and(|a| a.tree_size >= cp.tree_size) {
        return Ok(None);
    }
    let mut record = anchorer.anchor(&cp).await?;
    record.checkpoint = Some(cp);
    record_anchor(chain, &record).await.map_err(|e| format!("recording the anchor: {e:#}"))?;
    metrics::counter!("kalima_anchors_total", "target" => record.target.clone()).increment(1);
    tracing::info!(target: "core::anchor", anchor = %record.target, tree_size = record.tree_size, tx = %record.tx_hash, block = record.block_number, "Checkpoint anchored.");
    Ok(Some(record))
}

/// Runs every anchorer on its schedule and on demand.
pub struct AnchorService {
    /// One per target: `notify_one` keeps a permit, so a request made while a target is busy
    /// anchoring is served right after.
    now: Vec<Arc<tokio::sync::Notify>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The targets' names.
    pub targets: Vec<String>,
}

impl AnchorService {
    /// Starts one task per anchorer, each anchoring every `interval` (and on demand).
    pub fn start(chain: Chain, anchorers: Vec<(Arc<dyn Anchorer>, Duration)>) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let (mut nows, mut tasks, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        for (a, every) in anchorers {
            let now = Arc::new(tokio::sync::Notify::new());
            nows.push(now.clone());
            targets.push(a.target().to_string());
            let (mut rx, chain) = (rx.clone(), chain.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = now.notified() => {}
                        _ = rx.changed() => return,
                    }
                    if let Err(e) = anchor_latest(&chain, a.as_ref()).await {
                        metrics::counter!("kalima_anchor_errors_total", "target" => a.target().to_string()).increment(1);
                        tracing::warn!(target: "core::anchor", anchor = %a.target(), error = %e, "Anchoring failed; retrying at the next turn.");
                    }
                }
            }));
        }
        Self { now: nows, stop, tasks: parking_lot::Mutex::new(tasks), targets }
    }

    /// Anchors the latest checkpoint on every target now (in the background).
    pub fn anchor_now(&self) {
        for n in &self.now {
            n.notify_one();
        }
    }

    /// Stops the tasks.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
    }
}
