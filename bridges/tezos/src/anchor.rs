//! Anchoring checkpoints on Tezos: a call of the anchoring contract's `%anchor` entrypoint,
//! forged and signed here, simulated by the Octez node to size its gas, storage and fees,
//! injected, then followed block by block until `confirmations` blocks are on top. An
//! operation that leaves its block (a reorg) or never reaches one is sent again.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use kalima_core::anchor::{AnchorKind, AnchorRecord, Anchorer};
use kalima_core::checkpoint::CheckpointJson;
use tezos_crypto_rs::hash::{BlockHash, ContractKt1Hash, HashTrait};

use crate::config::TezosTarget;
use crate::contract::{AnchorParameter, ENTRYPOINT};
use crate::error::{Error, Result};
use crate::forge::{Content, ManagerFields, OperationGroup, Parameters};
use crate::keys::TezosKey;
use crate::rpc::{OctezRpc, SimulatedContent, describe_octez_error};

/// Gas units added to what the simulation used (octez-client adds the same).
pub const GAS_MARGIN: u64 = 100;
/// Storage bytes allowed above what the simulation paid for.
pub const STORAGE_MARGIN: u64 = 20;
/// The node's minimal fee: 100 mutez per operation...
pub const MINIMAL_FEE_MUTEZ: u64 = 100;
/// ... plus 1 mutez per byte ...
pub const FEE_MUTEZ_PER_BYTE: u64 = 1;
/// ... plus 0.1 mutez per gas unit (1 mutez per 10 units).
pub const GAS_UNITS_PER_MUTEZ: u64 = 10;
/// Sends of one checkpoint (the first and the resends after drops) before giving up.
pub const MAX_SENDS: usize = 5;
/// Failed RPC calls in a row tolerated while waiting for confirmations.
const MAX_RPC_FAILURES: u32 = 20;

/// An anchor handed to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentAnchor {
    /// Operation hash (`o...`).
    pub hash: String,
    /// Level of its branch: it cannot be in a block at or below it.
    pub branch_level: u64,
    /// The chain id (`NetX...`).
    pub network: String,
    /// The transaction's counter.
    pub counter: u64,
    /// Fees paid by the group, in mutez.
    pub fee_mutez: u64,
    /// Whether the group revealed the key.
    pub revealed: bool,
}

/// How a sent anchor ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// In the block at `level` with the configured confirmations on top.
    Confirmed {
        /// The operation (one of those sent).
        hash: String,
        /// Its level.
        level: u64,
    },
    /// Left its block in a reorg, or not in a block after `max_wait_blocks`.
    Dropped,
}

/// Anchors checkpoints through one anchoring contract on one Tezos network.
pub struct TezosAnchorer {
    target: TezosTarget,
    key: TezosKey,
    rpc: OctezRpc,
    contract: ContractKt1Hash,
}

impl std::fmt::Debug for TezosAnchorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TezosAnchorer")
            .field("target", &self.target.name)
            .field("rpc", &self.rpc.url())
            .field("contract", &self.target.contract)
            .field("account", &self.key.address_b58())
            .finish()
    }
}

impl TezosAnchorer {
    /// The anchorer of `target`, its key file read (or created) relative to `dir`.
    pub fn new(target: &TezosTarget, dir: &Path) -> Result<Self> {
        let key = TezosKey::load_or_create(&dir.join(&target.key_file))?;
        Self::with_key(target, key)
    }

    /// The anchorer of `target` sending from `key`.
    pub fn with_key(target: &TezosTarget, key: TezosKey) -> Result<Self> {
        let errors = target.validate();
        if !errors.is_empty() {
            return Err(Error::Config(errors.join("; ")));
        }
        let contract = ContractKt1Hash::from_b58check(&target.contract)
            .map_err(|e| Error::Config(format!("contract {:?}: {e}", target.contract)))?;
        let rpc = OctezRpc::new(&target.rpc_url)?;
        tracing::info!(target: "bridge::tezos", anchor = %target.name, account = %key.address_b58(), contract = %target.contract, "Anchoring checkpoints on Tezos.");
        Ok(Self { target: target.clone(), key, rpc, contract })
    }

    /// The anchoring account (`tz1...`): the contract's admin, to fund.
    pub fn address(&self) -> String {
        self.key.address_b58()
    }

    /// Its configuration.
    pub fn config(&self) -> &TezosTarget {
        &self.target
    }

    fn poll(&self) -> Duration {
        Duration::from_millis(self.target.poll_interval_ms.max(1))
    }

    /// Sends one anchoring operation for `p`: reads the head, the counter and whether the key
    /// is revealed; simulates the call (with a reveal first when needed); sizes gas, storage
    /// and fees from the simulation; signs and injects.
    pub async fn send(&self, p: &AnchorParameter) -> Result<SentAnchor> {
        // The branch is two blocks deep, final under Tenderbake: the operation stays valid
        // when the last block is replaced.
        let branch_header = self.rpc.header("head~2").await?;
        let branch = BlockHash::from_b58check(&branch_header.hash)
            .map_err(|e| Error::rpc("GET head~2 header", format!("block hash {:?}: {e}", branch_header.hash)))?;
        let source = self.key.address().clone();
        let address = self.key.address_b58();
        let counter = self.rpc.counter(&address).await?;
        let revealed = match self.rpc.manager_key(&address).await? {
            None => false,
            Some(pk) if pk == self.key.public_key_b58() => true,
            Some(pk) => {
                return Err(Error::Config(format!("the account {address} has revealed {pk}, not this key")));
            }
        };
        let constants = self.rpc.constants().await?;

        let manager =
            |counter: u64| ManagerFields { source: source.clone(), fee: 0, counter, gas_limit: 0, storage_limit: 0 };
        let mut contents = Vec::with_capacity(2);
        let mut next = counter.checked_add(1).ok_or_else(|| Error::encoding("counter overflow"))?;
        if !revealed {
            contents.push(Content::Reveal { manager: manager(next), public_key: self.key.public_key().clone() });
            next += 1;
        }
        contents.push(Content::Transaction {
            manager: manager(next),
            amount: 0,
            destination: self.contract.clone(),
            parameters: Some(Parameters { entrypoint: ENTRYPOINT.into(), value: p.to_micheline() }),
        });

        // Simulate with the most each content may use (the block's gas split between them).
        let n = contents.len() as u64;
        let sim_gas = constants.hard_gas_limit_per_operation.min(constants.hard_gas_limit_per_block / n);
        for c in &mut contents {
            let is_tx = matches!(c, Content::Transaction { .. });
            let m = c.manager_mut();
            m.gas_limit = sim_gas;
            m.storage_limit = if is_tx { constants.hard_storage_limit_per_operation } else { 0 };
        }
        let mut group = OperationGroup { branch, contents };
        let simulated = self.key.sign(group.clone())?;
        let results = self.rpc.run_operation(&simulated.to_json(), &branch_header.chain_id).await?;
        check_applied(&group, &results)?;

        for (c, r) in group.contents.iter_mut().zip(&results) {
            let is_tx = matches!(c, Content::Transaction { .. });
            let m = c.manager_mut();
            m.gas_limit = (r.consumed_milligas.div_ceil(1000) + GAS_MARGIN).min(constants.hard_gas_limit_per_operation);
            m.storage_limit = if is_tx {
                (r.paid_storage_size_diff + STORAGE_MARGIN).min(constants.hard_storage_limit_per_operation)
            } else {
                0
            };
        }
        let fee = set_fees(&mut group)?;
        if fee > self.target.fee_cap_mutez {
            return Err(Error::FeeCap { fee, cap: self.target.fee_cap_mutez });
        }

        let signed = self.key.sign(group)?;
        let hash = signed.hash().to_b58check();
        let named = self.rpc.inject(&signed.hex()).await?;
        if named != hash {
            return Err(Error::Injection(format!(
                "the node names the operation {named}, but its bytes hash to {hash}: it read them differently"
            )));
        }
        tracing::debug!(target: "bridge::tezos", anchor = %self.target.name, op = %hash, counter = next, fee, tree_size = p.tree_size, "Anchor injected.");
        Ok(SentAnchor {
            hash,
            branch_level: branch_header.level,
            network: branch_header.chain_id,
            counter: next,
            fee_mutez: fee,
            revealed: !revealed,
        })
    }

    /// Follows the operations of `sent` (all for the same checkpoint, any of which may land)
    /// until one has `confirmations` blocks on top, leaves its block, or none shows within
    /// `max_wait_blocks`.
    pub async fn confirm(&self, sent: &[SentAnchor]) -> Result<Confirmation> {
        let hashes: HashSet<&str> = sent.iter().map(|s| s.hash.as_str()).collect();
        let Some(first) = sent.iter().map(|s| s.branch_level + 1).min() else { return Ok(Confirmation::Dropped) };
        let deadline = sent.iter().map(|s| s.branch_level).max().unwrap_or(0) + self.target.max_wait_blocks;
        let mut next = first;
        let mut found: Option<(String, u64)> = None;
        let mut failures = 0u32;
        loop {
            match self.confirm_step(&hashes, &mut next, &mut found, deadline).await {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures >= MAX_RPC_FAILURES {
                        return Err(e);
                    }
                    tracing::debug!(target: "bridge::tezos", anchor = %self.target.name, error = %e, "Node call failed while confirming; trying again.");
                }
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    /// One look at the node; `Some` when the anchor is settled either way.
    async fn confirm_step(
        &self,
        hashes: &HashSet<&str>,
        next: &mut u64,
        found: &mut Option<(String, u64)>,
        deadline: u64,
    ) -> Result<Option<Confirmation>> {
        let head = self.rpc.header("head").await?.level;
        if found.is_none() {
            while *next <= head {
                let ops = self.rpc.manager_operation_hashes(*next).await?;
                if let Some(h) = ops.iter().find(|h| hashes.contains(h.as_str())) {
                    tracing::debug!(target: "bridge::tezos", anchor = %self.target.name, op = %h, level = *next, "Anchor in a block.");
                    *found = Some((h.clone(), *next));
                    break;
                }
                *next += 1;
            }
        }
        match found {
            None if head > deadline => Ok(Some(Confirmation::Dropped)),
            None => Ok(None),
            Some((hash, level)) => {
                // Read after the head: a reorg between the two reads shows here.
                let ops = self.rpc.manager_operation_hashes(*level).await?;
                if !ops.contains(hash) {
                    Ok(Some(Confirmation::Dropped))
                } else if head >= *level + self.target.confirmations {
                    Ok(Some(Confirmation::Confirmed { hash: hash.clone(), level: *level }))
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Anchors `cp`: sends it, confirms it, sends it again when dropped (up to [`MAX_SENDS`]
    /// times), and returns the record to keep (its `checkpoint` left for the caller).
    pub async fn anchor_checkpoint(&self, cp: &CheckpointJson) -> Result<AnchorRecord> {
        let root: [u8; 32] = hex::decode(&cp.root)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| Error::Config(format!("checkpoint root {:?} is not 32 bytes of hex", cp.root)))?;
        let p = AnchorParameter { chain: cp.chain.clone(), tree_size: cp.tree_size, root, height: cp.height };
        let mut sent: Vec<SentAnchor> = Vec::new();
        for _ in 0..MAX_SENDS {
            match self.send(&p).await {
                Ok(s) => sent.push(s),
                // After a drop the earlier operation may be back in a block, or in the mempool
                // holding the counter: then the new one cannot go, and the old one is watched.
                Err(e @ (Error::Simulation(_) | Error::Injection(_))) if !sent.is_empty() => {
                    tracing::debug!(target: "bridge::tezos", anchor = %self.target.name, error = %e, "Could not send the anchor again; watching the earlier one.");
                }
                Err(e) => return Err(e),
            }
            match self.confirm(&sent).await? {
                Confirmation::Confirmed { hash, level } => {
                    let network = sent.iter().find(|s| s.hash == hash).map(|s| s.network.clone()).unwrap_or_default();
                    return Ok(AnchorRecord {
                        target: self.target.name.clone(),
                        kind: AnchorKind::Tezos,
                        network,
                        contract: self.target.contract.clone(),
                        chain: cp.chain.clone(),
                        tree_size: cp.tree_size,
                        root: hex::encode(root),
                        height: cp.height,
                        tx_hash: hash,
                        block_number: level,
                        checkpoint: None,
                    });
                }
                Confirmation::Dropped => {
                    metrics::counter!("kalima_anchor_reorged_total", "target" => self.target.name.clone()).increment(1);
                    let ops: Vec<&str> = sent.iter().map(|s| s.hash.as_str()).collect();
                    tracing::warn!(target: "bridge::tezos", anchor = %self.target.name, ops = ?ops, tree_size = cp.tree_size, "Anchor dropped (reorg, or not in a block in time); sending it again.");
                }
            }
        }
        let ops: Vec<&str> = sent.iter().map(|s| s.hash.as_str()).collect();
        Err(Error::NotConfirmed(format!(
            "anchor of tree size {} not confirmed after {MAX_SENDS} sends (operations {})",
            cp.tree_size,
            ops.join(", ")
        )))
    }
}

#[async_trait::async_trait]
impl Anchorer for TezosAnchorer {
    fn target(&self) -> &str {
        &self.target.name
    }

    async fn anchor(&self, checkpoint: &CheckpointJson) -> std::result::Result<AnchorRecord, String> {
        self.anchor_checkpoint(checkpoint).await.map_err(|e| format!("{e:#}"))
    }
}

/// Fails with the node's words unless every content applied.
fn check_applied(group: &OperationGroup, results: &[SimulatedContent]) -> Result<()> {
    let failures: Vec<String> = group
        .contents
        .iter()
        .zip(results)
        .filter(|(_, r)| r.status != "applied")
        .map(|(c, r)| {
            let errors: Vec<String> = r.errors.iter().map(describe_octez_error).collect();
            let what = format!("{} (counter {})", c.kind(), c.manager().counter);
            if errors.is_empty() {
                format!("{what} {}", r.status)
            } else {
                format!("{what} {}: {}", r.status, errors.join("; "))
            }
        })
        .collect();
    if failures.is_empty() { Ok(()) } else { Err(Error::Simulation(failures.join(" / "))) }
}

/// The minimal fee of a content of `bytes` bytes and `gas_limit` gas units.
pub fn minimal_fee(bytes: u64, gas_limit: u64) -> u64 {
    MINIMAL_FEE_MUTEZ + FEE_MUTEZ_PER_BYTE * bytes + gas_limit.div_ceil(GAS_UNITS_PER_MUTEZ)
}

/// Sets each content's fee to its minimal fee plus 10 %, counting the branch and the
/// signature with the last content, until the sizes (which grow with the fees) settle.
/// Returns the group's total fee.
pub fn set_fees(group: &mut OperationGroup) -> Result<u64> {
    for _ in 0..8 {
        let mut changed = false;
        let last = group.contents.len().saturating_sub(1);
        for i in 0..group.contents.len() {
            let mut bytes = group.contents[i].forge()?.len() as u64;
            if i == last {
                bytes += 32 + 64;
            }
            let gas = group.contents[i].manager().gas_limit;
            let min = minimal_fee(bytes, gas);
            let fee = min + min.div_ceil(10);
            let m = group.contents[i].manager_mut();
            if m.fee != fee {
                m.fee = fee;
                changed = true;
            }
        }
        if !changed {
            return Ok(group.contents.iter().map(|c| c.manager().fee).sum());
        }
    }
    Err(Error::encoding("fees did not settle"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fees_cover_the_minimum_with_margin() {
        let key = TezosKey::from_seed([7; 32]);
        let contract = ContractKt1Hash::from_b58check("KT1BEqzn5Wx8uJrZNvuS9DVHmLvG9td3fDLi").unwrap();
        let p = AnchorParameter { chain: "dev".into(), tree_size: 10, root: [1; 32], height: 3 };
        let m = |counter| ManagerFields {
            source: key.address().clone(),
            fee: 0,
            counter,
            gas_limit: 1_500,
            storage_limit: 100,
        };
        let mut group = OperationGroup {
            branch: BlockHash::try_from_bytes(&[5; 32]).unwrap(),
            contents: vec![
                Content::Reveal { manager: m(1), public_key: key.public_key().clone() },
                Content::Transaction {
                    manager: m(2),
                    amount: 0,
                    destination: contract,
                    parameters: Some(Parameters { entrypoint: "anchor".into(), value: p.to_micheline() }),
                },
            ],
        };
        let total = set_fees(&mut group).unwrap();
        let size = group.forge().unwrap().len() as u64 + 64;
        let gas: u64 = group.contents.iter().map(|c| c.manager().gas_limit).sum();
        // The node's batch rule: 100 mutez + 1 mutez/byte + 0.1 mutez/gas unit.
        assert!(total >= 100 + size + gas / 10, "{total} for {size} bytes and {gas} gas");
        for (i, c) in group.contents.iter().enumerate() {
            let mut bytes = c.forge().unwrap().len() as u64;
            if i == 1 {
                bytes += 96;
            }
            assert!(c.manager().fee >= minimal_fee(bytes, c.manager().gas_limit) * 11 / 10);
        }
    }
}
