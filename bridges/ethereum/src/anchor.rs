//! Anchoring checkpoints on Ethereum or Polygon: a checkpoint (chain name, tree size, root,
//! height) goes into a `KlxAnchor` event and is confirmed after N blocks, sent again if a
//! reorg drops it. Scheduling and recording are `kalima_core::anchor`'s.

use std::time::Duration;

use alloy::primitives::{Address, B256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use kalima_core::anchor::{AnchorKind, AnchorRecord};
use kalima_core::checkpoint::CheckpointJson;

use crate::contracts::KlxAnchor;
use crate::error::{Error, Result};

/// Anchors checkpoints through one `KlxAnchor` contract.
pub struct Anchorer {
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
    pub fn new(target: &str, rpc_url: &str, contract: &str, key: PrivateKeySigner, confirmations: u64) -> Result<Self> {
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
        Ok(Self { target: target.to_string(), provider, contract, confirmations, poll: Duration::from_millis(200) })
    }

    /// Sends the anchoring transaction of `cp`; returns its hash once mined.
    pub async fn submit(&self, chain: &str, tree_size: u64, root: B256, height: u64) -> Result<B256> {
        let t = &self.target;
        let anchor = KlxAnchor::new(self.contract, self.provider.clone());
        let pending = anchor
            .anchor(chain.to_string(), tree_size, root, height)
            .send()
            .await
            .map_err(|e| Error::rpc(t, format!("anchoring tree size {tree_size}: {e}")))?;
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
}

#[async_trait::async_trait]
impl kalima_core::anchor::Anchorer for Anchorer {
    fn target(&self) -> &str {
        &self.target
    }

    async fn anchor(&self, cp: &CheckpointJson) -> std::result::Result<AnchorRecord, String> {
        let root: B256 = format!("0x{}", cp.root).parse().map_err(|e| format!("checkpoint root {}: {e}", cp.root))?;
        let (tx, block) = loop {
            let tx = self.submit(&cp.chain, cp.tree_size, root, cp.height).await.map_err(|e| format!("{e:#}"))?;
            match self.confirm(tx).await.map_err(|e| format!("{e:#}"))? {
                Confirmation::Confirmed(block) => break (tx, block),
                Confirmation::Dropped => {
                    metrics::counter!("kalima_anchor_reorged_total", "target" => self.target.clone()).increment(1);
                    tracing::warn!(target: "bridge::ethereum", anchor = %self.target, tx = %tx, "Anchor dropped by a reorg; sending it again.");
                }
            }
        };
        let chain_id = self.provider.get_chain_id().await.map_err(|e| format!("{:#}", Error::rpc(&self.target, e)))?;
        Ok(AnchorRecord {
            target: self.target.clone(),
            kind: AnchorKind::Ethereum,
            network: chain_id.to_string(),
            contract: format!("{:#x}", self.contract),
            chain: cp.chain.clone(),
            tree_size: cp.tree_size,
            root: cp.root.clone(),
            height: cp.height,
            tx_hash: format!("{tx:#x}"),
            block_number: block,
            checkpoint: None,
        })
    }
}

/// An `Anchored` event as read back from the public chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnChainAnchor {
    /// The chain name in the event.
    pub chain: String,
    /// Tree size in the event.
    pub tree_size: u64,
    /// Root in the event.
    pub root: B256,
    /// Checkpoint height in the event.
    pub height: u64,
    /// Who anchored it.
    pub anchorer: Address,
    /// The block holding the transaction.
    pub block_number: u64,
    /// Blocks on top of it (0 when it is the latest).
    pub confirmations: u64,
    /// The RPC endpoint's chain id.
    pub chain_id: u64,
}

/// Finds the `Anchored` event of `tx` emitted by `contract` on `rpc_url`: what a verifier
/// checks with nothing but RPC access to the public chain. `None` when the transaction is
/// unknown there or holds no such event.
pub async fn read_anchor(rpc_url: &str, contract: &str, tx: &str) -> Result<Option<OnChainAnchor>> {
    let url = rpc_url.parse().map_err(|e| Error::Config(format!("rpc_url {rpc_url}: {e}")))?;
    let contract: Address = contract.parse().map_err(|e| Error::Config(format!("contract {contract}: {e}")))?;
    let tx: B256 = tx.parse().map_err(|e| Error::Config(format!("transaction {tx}: {e}")))?;
    let provider = ProviderBuilder::new().connect_http(url).erased();
    let Some(receipt) = provider.get_transaction_receipt(tx).await.map_err(|e| Error::rpc("anchor", e))? else {
        return Ok(None);
    };
    let (Some(block_number), true) = (receipt.block_number, receipt.status()) else { return Ok(None) };
    let latest = provider.get_block_number().await.map_err(|e| Error::rpc("anchor", e))?;
    let chain_id = provider.get_chain_id().await.map_err(|e| Error::rpc("anchor", e))?;
    for log in receipt.inner.logs() {
        if log.address() != contract || log.topic0() != Some(&KlxAnchor::Anchored::SIGNATURE_HASH) {
            continue;
        }
        if let Ok(e) = log.log_decode::<KlxAnchor::Anchored>() {
            let a = e.inner.data;
            return Ok(Some(OnChainAnchor {
                chain: a.chain,
                tree_size: a.treeSize,
                root: a.root,
                height: a.height,
                anchorer: a.anchorer,
                block_number,
                confirmations: latest.saturating_sub(block_number),
                chain_id,
            }));
        }
    }
    Ok(None)
}

/// The anchorers of `[[anchor.targets]]` (keys relative to `dir`), each with its interval.
pub fn anchorers(
    section: &crate::config::AnchorSection,
    dir: &std::path::Path,
) -> Result<Vec<(std::sync::Arc<dyn kalima_core::anchor::Anchorer>, Duration)>> {
    let mut out: Vec<(std::sync::Arc<dyn kalima_core::anchor::Anchorer>, Duration)> = Vec::new();
    for t in &section.targets {
        let key = crate::identity::load_or_create_eth_key(&dir.join(&t.key_file))?;
        tracing::info!(target: "bridge::ethereum", anchor = %t.name, from = %key.address(), contract = %t.contract, "Anchoring checkpoints.");
        let a = Anchorer::new(&t.name, &t.rpc_url, &t.contract, key, t.confirmations)?;
        out.push((std::sync::Arc::new(a), Duration::from_secs(t.interval_secs)));
    }
    Ok(out)
}
