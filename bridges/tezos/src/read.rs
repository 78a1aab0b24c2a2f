//! Reading an anchor back from Tezos with nothing but RPC access: the applied call of an
//! anchoring contract's `%anchor` entrypoint in a given block, and the checkpoint it carries.
//! This is what an offline receipt verifier checks an `AnchorRecord` of kind `tezos` against.

use serde_json::Value;
use tezos_crypto_rs::hash::{HashTrait, OperationHash};

use crate::contract::{AnchorParameter, ENTRYPOINT, EVENT_TAG};
use crate::error::{Error, Result};
use crate::forge::Micheline;
use crate::rpc::{OctezRpc, content_results};

/// A checkpoint found on Tezos.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TezosAnchor {
    /// The Kalima chain's name.
    pub chain: String,
    /// Transactions covered.
    pub tree_size: u64,
    /// Merkle root at that size.
    pub root: [u8; 32],
    /// The chain's block height at that size.
    pub height: u64,
    /// The contract called (`KT1...`): compare it with the expected anchoring contract.
    pub contract: String,
    /// The account that called it (`tz1...`).
    pub source: String,
    /// The Tezos chain id the block reports (`NetX...`).
    pub network: String,
}

/// Finds operation `op_hash` among the manager operations of the block at `level` and reads
/// the anchor it made. `Ok(None)` when the block does not hold that operation; an error when
/// it does but the operation did not apply or is not a call of an anchoring contract's
/// `%anchor` entrypoint (whose `%anchored` event must carry the same checkpoint).
pub async fn read_anchor(rpc_url: &str, op_hash: &str, level: u64) -> Result<Option<TezosAnchor>> {
    OperationHash::from_b58check(op_hash)
        .map_err(|e| Error::Config(format!("{op_hash:?} is not an operation hash: {e}")))?;
    let rpc = OctezRpc::new(rpc_url)?;
    let ops = rpc.manager_operations(level).await?;
    match ops.iter().find(|o| o.get("hash").and_then(Value::as_str) == Some(op_hash)) {
        None => Ok(None),
        Some(op) => anchor_of_operation(op_hash, op).map(Some),
    }
}

/// The anchor made by `op` (one element of `GET /chains/main/blocks/{level}/operations/3`).
pub fn anchor_of_operation(op_hash: &str, op: &Value) -> Result<TezosAnchor> {
    let not = |reason: String| Error::NotAnchor { op: op_hash.to_string(), reason };
    let contents = op.get("contents").and_then(Value::as_array).ok_or_else(|| not("it has no contents".into()))?;
    let results = content_results(contents).map_err(|e| not(format!("its receipt is unreadable: {e}")))?;
    if let Some(r) = results.iter().find(|r| r.status != "applied") {
        return Err(not(format!("it did not apply (a {} of it is {})", r.kind, r.status)));
    }
    let network = op.get("chain_id").and_then(Value::as_str).unwrap_or_default().to_string();
    let mut reasons = Vec::new();
    for c in contents {
        if c.get("kind").and_then(Value::as_str) != Some("transaction") {
            continue;
        }
        match anchor_of_transaction(c) {
            Ok(mut a) => {
                a.network = network;
                return Ok(a);
            }
            Err(reason) => reasons.push(reason),
        }
    }
    if reasons.is_empty() {
        reasons.push("it holds no transaction".into());
    }
    Err(not(reasons.join("; ")))
}

fn anchor_of_transaction(c: &Value) -> std::result::Result<TezosAnchor, String> {
    let field = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let (source, contract) = (field("source"), field("destination"));
    if !contract.starts_with("KT1") {
        return Err(format!("a transaction to {contract:?}, not to a contract"));
    }
    let params = c.get("parameters").ok_or_else(|| format!("a transfer to {contract} without parameters"))?;
    let entrypoint = params.get("entrypoint").and_then(Value::as_str).unwrap_or_default();
    if entrypoint != ENTRYPOINT {
        return Err(format!("a call of {contract}%{entrypoint}, not %{ENTRYPOINT}"));
    }
    let value = params.get("value").ok_or("a call without a parameter value")?;
    let value = Micheline::from_json(value).map_err(|e| format!("its parameter: {e}"))?;
    let p = AnchorParameter::from_micheline(&value).map_err(|e| format!("its parameter: {e}"))?;
    // The contract must have emitted the same checkpoint: an anchoring contract does.
    let events = c
        .pointer("/metadata/internal_operation_results")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let emitted = events.iter().any(|e| {
        e.get("kind").and_then(Value::as_str) == Some("event")
            && e.get("tag").and_then(Value::as_str) == Some(EVENT_TAG)
            && e.get("source").and_then(Value::as_str) == Some(contract.as_str())
            && e.get("payload")
                .and_then(|v| Micheline::from_json(v).ok())
                .and_then(|m| AnchorParameter::from_micheline(&m).ok())
                .is_some_and(|emitted| emitted == p)
    });
    if !emitted {
        return Err(format!("{contract} emitted no %{EVENT_TAG} event with this checkpoint"));
    }
    Ok(TezosAnchor {
        chain: p.chain,
        tree_size: p.tree_size,
        root: p.root,
        height: p.height,
        contract,
        source,
        network: String::new(),
    })
}
