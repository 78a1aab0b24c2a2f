//! Anchoring checkpoints on Ethereum or Polygon: the latest signed checkpoint (chain name,
//! tree size, root, height) goes into a `KlxAnchor` event, is confirmed after N blocks (sent
//! again if a reorg drops it), and the anchor is recorded on this chain under
//! `/_kalima/anchors`, so `GET /api/v1/anchors` and anyone reading the chain find it.

use std::time::Duration;

use alloy::primitives::{Address, B256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use kalima_core::checkpoint::Checkpoint;
use kalima_core::registry::NODE_DEVICE_ID;
use kalima_core::tx::TxContent;
use kalima_core::{Chain, Error as CoreError, Rejection};
use serde::{Deserialize, Serialize};

use crate::contracts::KlxAnchor;
use crate::error::{Error, Result};

/// Address of anchor records (key = anchoring target, e.g. `ethereum`; history = every anchor).
pub const ANCHORS_ADDRESS: &str = "/_kalima/anchors";

/// One checkpoint anchored on a public chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AnchorRecord {
    /// Where: the target's name (`ethereum`, `polygon`).
    pub target: String,
    /// Its EVM chain id.
    pub chain_id: u64,
    /// The `KlxAnchor` contract.
    pub contract: String,
    /// This chain's name, as in the checkpoint.
    pub chain: String,
    /// Transactions covered.
    pub tree_size: u64,
    /// Merkle root (hex) at that size.
    pub root: String,
    /// Block height of the checkpoint.
    pub height: u64,
    /// The anchoring transaction.
    pub tx_hash: String,
    /// Its block, confirmed.
    pub block_number: u64,
}

/// Anchors checkpoints through one `KlxAnchor` contract.
pub struct Anchorer {
    chain: Chain,
    target: String,
    provider: DynProvider,
    contract: Address,
    confirmations: u64,
    poll: Duration,
}

/// How a sent anchor ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// In the chain with `confirmations` blocks on top, at this block.
    Confirmed(u64),
    /// Dropped by a reorg before it was confirmed.
    Dropped,
}

impl Anchorer {
    /// An anchorer sending from `key` to `contract` on `rpc_url`, confirming after
    /// `confirmations` blocks.
    pub fn new(
        chain: Chain,
        target: &str,
        rpc_url: &str,
        contract: &str,
        key: PrivateKeySigner,
        confirmations: u64,
    ) -> Result<Self> {
        let url = rpc_url.parse().map_err(|e| Error::Config(format!("anchor {target}: rpc_url {rpc_url}: {e}")))?;
        let contract =
            contract.parse().map_err(|e| Error::Config(format!("anchor {target}: contract {contract}: {e}")))?;
        let provider = ProviderBuilder::new()
            .disable_recommended_fillers()
            .with_gas_estimation()
            .with_simple_nonce_management()
            .fetch_chain_id()
            .wallet(key)
            .connect_http(url)
            .erased();
        Ok(Self {
            chain,
            target: target.to_string(),
            provider,
            contract,
            confirmations,
            poll: Duration::from_millis(200),
        })
    }

    /// Sends the anchoring transaction of `cp`; returns its hash once mined.
    pub async fn submit(&self, cp: &Checkpoint) -> Result<B256> {
        let t = &self.target;
        let anchor = KlxAnchor::new(self.contract, self.provider.clone());
        let pending = anchor
            .anchor(cp.chain.clone(), cp.tree_size, B256::from(cp.root), cp.height)
            .send()
            .await
            .map_err(|e| Error::rpc(t, format!("anchoring tree size {}: {e}", cp.tree_size)))?;
        let receipt = tokio::time::timeout(Duration::from_secs(120), pending.get_receipt())
            .await
            .map_err(|_| Error::rpc(t, "the anchor was not mined within 120 s"))?
            .map_err(|e| Error::rpc(t, e))?;
        if !receipt.status() {
            return Err(Error::rpc(t, format!("the anchor transaction {} reverted", receipt.transaction_hash)));
        }
        Ok(receipt.transaction_hash)
    }

    /// Waits until `tx` has `confirmations` blocks on top, or is gone.
    pub async fn confirm(&self, tx: B256) -> Result<Confirmation> {
        let t = &self.target;
        loop {
            let receipt = self.provider.get_transaction_receipt(tx).await.map_err(|e| Error::rpc(t, e))?;
            let Some(block) = receipt.and_then(|r| r.block_number) else {
                return Ok(Confirmation::Dropped);
            };
            let latest = self.provider.get_block_number().await.map_err(|e| Error::rpc(t, e))?;
            if latest >= block + self.confirmations {
                // Read again at the end: a reorg between the two reads shows here.
                let again = self.provider.get_transaction_receipt(tx).await.map_err(|e| Error::rpc(t, e))?;
                return Ok(match again.and_then(|r| r.block_number) {
                    Some(b) if latest >= b + self.confirmations => Confirmation::Confirmed(b),
                    Some(_) => continue,
                    None => Confirmation::Dropped,
                });
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// The latest anchor recorded on this chain for this target.
    pub fn latest(&self) -> Option<AnchorRecord> {
        let c = self.chain.memcache().get(ANCHORS_ADDRESS, &self.target)?;
        serde_json::from_slice(&c.tx.content.body).ok()
    }

    /// Anchors the latest checkpoint unless it is already anchored: sends it, confirms it
    /// (sending again after a reorg), and records it. `None` when there was nothing new.
    pub async fn anchor_latest(&self) -> Result<Option<AnchorRecord>> {
        let Some(cp) = self.chain.latest_checkpoint().await? else { return Ok(None) };
        if self.latest().is_some_and(|a| a.tree_size >= cp.tree_size) {
            return Ok(None);
        }
        let (tx, block) = loop {
            let tx = self.submit(&cp).await?;
            match self.confirm(tx).await? {
                Confirmation::Confirmed(block) => break (tx, block),
                Confirmation::Dropped => {
                    metrics::counter!("kalima_anchor_reorged_total", "target" => self.target.clone()).increment(1);
                    tracing::warn!(target: "bridge::ethereum", anchor = %self.target, tx = %tx, "Anchor dropped by a reorg; sending it again.");
                }
            }
        };
        let chain_id = self.provider.get_chain_id().await.map_err(|e| Error::rpc(&self.target, e))?;
        let record = AnchorRecord {
            target: self.target.clone(),
            chain_id,
            contract: format!("{:#x}", self.contract),
            chain: cp.chain.clone(),
            tree_size: cp.tree_size,
            root: hex::encode(cp.root),
            height: cp.height,
            tx_hash: format!("{tx:#x}"),
            block_number: block,
        };
        let content = TxContent {
            device_id: NODE_DEVICE_ID.into(),
            address: ANCHORS_ADDRESS.into(),
            key: self.target.clone(),
            body: serde_json::to_vec(&record).unwrap_or_default(),
            idempotency_key: format!("anchor:{}:{}", self.target, cp.tree_size),
            ..TxContent::default()
        };
        match self.chain.submit(vec![content], None).await {
            Ok(_) | Err(CoreError::Rejected(Rejection::DuplicateIdempotencyKey { .. })) => {}
            Err(e) => return Err(e.into()),
        }
        metrics::counter!("kalima_anchors_total", "target" => self.target.clone()).increment(1);
        tracing::info!(target: "bridge::ethereum", anchor = %self.target, tree_size = cp.tree_size, tx = %tx, block, "Checkpoint anchored.");
        Ok(Some(record))
    }
}

/// Finds the `Anchored` event of `tx` on `rpc_url`: what a verifier checks, with nothing
/// but RPC access to the public chain. Returns (chain name, tree size, root, height, anchorer).
pub async fn read_anchor(rpc_url: &str, contract: &str, tx: &str) -> Result<Option<(String, u64, B256, u64, Address)>> {
    let url = rpc_url.parse().map_err(|e| Error::Config(format!("rpc_url {rpc_url}: {e}")))?;
    let contract: Address = contract.parse().map_err(|e| Error::Config(format!("contract {contract}: {e}")))?;
    let tx: B256 = tx.parse().map_err(|e| Error::Config(format!("transaction {tx}: {e}")))?;
    let provider = ProviderBuilder::new().connect_http(url).erased();
    let Some(receipt) = provider.get_transaction_receipt(tx).await.map_err(|e| Error::rpc("anchor", e))? else {
        return Ok(None);
    };
    for log in receipt.inner.logs() {
        if log.address() != contract || log.topic0() != Some(&KlxAnchor::Anchored::SIGNATURE_HASH) {
            continue;
        }
        if let Ok(e) = log.log_decode::<KlxAnchor::Anchored>() {
            let a = e.inner.data;
            return Ok(Some((a.chain, a.treeSize, a.root, a.height, a.anchorer)));
        }
    }
    Ok(None)
}

/// The anchorers of `[anchor]`, each anchoring on its schedule and on demand.
pub struct AnchorService {
    /// One per target: `notify_one` keeps a permit, so a request made while a target is busy
    /// anchoring is served right after.
    now: Vec<std::sync::Arc<tokio::sync::Notify>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The configured targets.
    pub targets: Vec<String>,
}

impl AnchorService {
    /// Starts one task per target of `section` (keys relative to `dir`); `None` when none.
    pub fn start(chain: Chain, section: &crate::config::AnchorSection, dir: &std::path::Path) -> Result<Option<Self>> {
        if section.targets.is_empty() {
            return Ok(None);
        }
        let mut nows = Vec::new();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for t in &section.targets {
            let key = crate::identity::load_or_create_eth_key(&dir.join(&t.key_file))?;
            tracing::info!(target: "bridge::ethereum", anchor = %t.name, from = %key.address(), contract = %t.contract, "Anchoring checkpoints.");
            let a = Anchorer::new(chain.clone(), &t.name, &t.rpc_url, &t.contract, key, t.confirmations)?;
            let now = std::sync::Arc::new(tokio::sync::Notify::new());
            nows.push(now.clone());
            let (mut rx, every) = (rx.clone(), Duration::from_secs(t.interval_secs));
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = now.notified() => {}
                        _ = rx.changed() => return,
                    }
                    if let Err(e) = a.anchor_latest().await {
                        metrics::counter!("kalima_anchor_errors_total", "target" => a.target.clone()).increment(1);
                        tracing::warn!(target: "bridge::ethereum", anchor = %a.target, error = %format!("{e:#}"), "Anchoring failed; retrying at the next turn.");
                    }
                }
            }));
        }
        let targets = section.targets.iter().map(|t| t.name.clone()).collect();
        Ok(Some(Self { now: nows, stop, tasks: parking_lot::Mutex::new(tasks), targets }))
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
