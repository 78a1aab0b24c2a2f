//! Self-contained receipts: one transaction's canonical bytes, its inclusion proof, a
//! consistency proof to a signed (and, when the node anchors, anchored) checkpoint, that
//! checkpoint's signatures and the anchors that hold it on public chains. A receipt is
//! checked with no node running: [`Receipt::verify`] checks everything but the public
//! chains, which a verifier reads back with nothing but RPC access. The format is documented
//! in `openapi/RECEIPT.md`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::anchor::{ANCHORS_ADDRESS, AnchorRecord};
use crate::checkpoint::CheckpointJson;
use crate::merkle::{ConsistencyProof, Hash, InclusionProof, leaf_hash};
use crate::tx::Transaction;
use crate::{Chain, Error};

/// The format tag of this version of receipts.
pub const RECEIPT_FORMAT: &str = "kalima-receipt-v1";

/// A transaction with everything needed to check it against an anchored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// Always [`RECEIPT_FORMAT`].
    pub format: String,
    /// The transaction id (hex): SHA-256(0x00 || canonical bytes).
    pub id: String,
    /// Canonical transaction bytes (base64), as in `openapi/ENCODING.md`.
    pub tx_bytes: String,
    /// Inclusion proof of the transaction in the tree of `inclusion.tree_size` leaves.
    pub inclusion: InclusionProof,
    /// Consistency proof from `inclusion.tree_size` to `checkpoint.tree_size`.
    pub consistency: ConsistencyProof,
    /// The signed checkpoint the proofs lead to.
    pub checkpoint: CheckpointJson,
    /// The anchors of that checkpoint on public chains (none when it is not anchored).
    pub anchors: Vec<AnchorRecord>,
}

/// What a receipt establishes once [`Receipt::verify`] passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedReceipt {
    /// The transaction, decoded from the receipt's bytes.
    pub tx: Transaction,
    /// The chain named by the checkpoint.
    pub chain: String,
    /// The checkpoint's tree size.
    pub tree_size: u64,
    /// The checkpoint's root.
    pub root: Hash,
    /// Public keys (hex, lowercase) whose signature on the checkpoint verifies.
    pub signers: Vec<String>,
}

/// Why a receipt does not verify; each names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// The receipt is not of a format this verifier knows.
    #[error("format {0:?} is not {RECEIPT_FORMAT}")]
    Format(String),
    /// A field cannot be decoded.
    #[error("{field}: {reason}")]
    Malformed {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A check failed.
    #[error("{0}")]
    Mismatch(String),
}

fn malformed(field: &'static str, reason: impl Into<String>) -> ReceiptError {
    ReceiptError::Malformed { field, reason: reason.into() }
}

fn mismatch(reason: impl Into<String>) -> ReceiptError {
    ReceiptError::Mismatch(reason.into())
}

fn hash_hex(field: &'static str, text: &str) -> Result<Hash, ReceiptError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).map_err(|e| malformed(field, format!("not 64 hex digits: {e}")))?;
    Ok(out)
}

impl Receipt {
    /// Checks the receipt on its own: the bytes hash to the id and to the proven leaf, the
    /// inclusion proof leads to a root that the consistency proof joins to the checkpoint's
    /// root, the checkpoint carries at least one valid signature, and every anchor names
    /// exactly that checkpoint. Which signers to trust, and whether the anchors are on their
    /// public chains, is the caller's to check.
    pub fn verify(&self) -> Result<VerifiedReceipt, ReceiptError> {
        if self.format != RECEIPT_FORMAT {
            return Err(ReceiptError::Format(self.format.clone()));
        }
        let bytes = B64.decode(&self.tx_bytes).map_err(|e| malformed("tx_bytes", format!("not base64: {e}")))?;
        let tx = Transaction::decode(&bytes).map_err(|e| malformed("tx_bytes", e.0))?;
        let leaf = leaf_hash(&bytes);
        if hash_hex("id", &self.id)? != leaf {
            return Err(mismatch(format!("id {} is not the hash of tx_bytes ({})", self.id, hex::encode(leaf))));
        }
        let inc = &self.inclusion;
        if hash_hex("inclusion.leaf_hash", &inc.leaf_hash)? != leaf {
            return Err(mismatch("inclusion.leaf_hash is not the hash of tx_bytes"));
        }
        if inc.leaf_index != tx.global_sequence {
            return Err(mismatch(format!(
                "inclusion.leaf_index {} is not the transaction's global sequence {}",
                inc.leaf_index, tx.global_sequence
            )));
        }
        if !inc.verify() {
            return Err(mismatch(format!(
                "the inclusion proof does not lead to root {} at size {}",
                inc.root, inc.tree_size
            )));
        }
        let first_root = hash_hex("inclusion.root", &inc.root)?;
        let cp = &self.checkpoint;
        let cp_root = hash_hex("checkpoint.root", &cp.root)?;
        let c = &self.consistency;
        if (c.first, c.second) != (inc.tree_size, cp.tree_size) {
            return Err(mismatch(format!(
                "the consistency proof is from {} to {}, not from the inclusion's size {} to the checkpoint's {}",
                c.first, c.second, inc.tree_size, cp.tree_size
            )));
        }
        if !c.verify(&first_root, &cp_root) {
            return Err(mismatch(format!(
                "the consistency proof does not join root {} (size {}) to the checkpoint's root {} (size {})",
                inc.root, inc.tree_size, cp.root, cp.tree_size
            )));
        }
        let signers = cp.valid_signers();
        if signers.is_empty() {
            return Err(mismatch("no signature on the checkpoint verifies over its fields"));
        }
        for a in &self.anchors {
            let root = hash_hex("anchors[].root", &a.root)?;
            if (a.chain.as_str(), a.tree_size, root, a.height) != (cp.chain.as_str(), cp.tree_size, cp_root, cp.height)
            {
                return Err(mismatch(format!(
                    "anchor {} ({}) names chain {} size {} height {}, not the checkpoint",
                    a.target, a.tx_hash, a.chain, a.tree_size, a.height
                )));
            }
        }
        Ok(VerifiedReceipt { tx, chain: cp.chain.clone(), tree_size: cp.tree_size, root: cp_root, signers })
    }
}

/// Why no receipt can be built (yet).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// No transaction has that id.
    #[error("no transaction {0}")]
    NotFound(String),
    /// The requested inclusion size does not hold the transaction or is past the checkpoint.
    #[error("{0}")]
    BadSize(String),
    /// No checkpoint covers the transaction yet.
    #[error("{0}")]
    NotCheckpointed(String),
    /// The chain failed.
    #[error(transparent)]
    Chain(#[from] Error),
}

/// The checkpoint a receipt for leaf `index` is built on, and its anchors: the checkpoint
/// anchored on the most targets among the targets' latest anchors that cover the leaf (the
/// larger tree size on a tie); without one, the latest checkpoint, unanchored.
async fn checkpoint_for(chain: &Chain, index: u64) -> Result<(CheckpointJson, Vec<AnchorRecord>), BuildError> {
    let mut anchored: std::collections::BTreeMap<u64, (CheckpointJson, Vec<AnchorRecord>)> = Default::default();
    for c in chain.memcache().values(ANCHORS_ADDRESS) {
        let Ok(mut a) = serde_json::from_slice::<AnchorRecord>(&c.tx.content.body) else { continue };
        let Some(cp) = a.checkpoint.take() else { continue };
        if a.tree_size <= index || cp.tree_size != a.tree_size {
            continue;
        }
        anchored.entry(a.tree_size).or_insert_with(|| (cp, Vec::new())).1.push(a);
    }
    if let Some((_, best)) = anchored.into_iter().max_by_key(|(size, (_, a))| (a.len(), *size)) {
        return Ok(best);
    }
    let cp = crate::anchor::checkpoint_to_anchor(chain).await?;
    match cp {
        Some(cp) if cp.tree_size > index => Ok((cp, Vec::new())),
        _ => Err(BuildError::NotCheckpointed(format!(
            "no checkpoint covers leaf {index} yet; checkpoints are signed periodically (or by POST /api/v1/checkpoints)"
        ))),
    }
}

/// Builds the receipt of transaction `id`, its inclusion proven in the tree of `size`
/// leaves (default: the smallest tree that holds it, the one it was committed into).
pub async fn build(chain: &Chain, id: &Hash, size: Option<u64>) -> Result<Receipt, BuildError> {
    let c = chain.store().tx_by_id(id).await?.ok_or_else(|| BuildError::NotFound(hex::encode(id)))?;
    let index = c.tx.global_sequence;
    let (checkpoint, anchors) = checkpoint_for(chain, index).await?;
    let size = size.unwrap_or(index + 1);
    if size <= index || size > checkpoint.tree_size {
        return Err(BuildError::BadSize(format!(
            "tree_size must hold leaf {index} and be at most the checkpoint's {} (got {size})",
            checkpoint.tree_size
        )));
    }
    let inclusion = chain.inclusion_proof(index, Some(size)).await?;
    let consistency = chain.consistency_proof(size, checkpoint.tree_size).await?;
    Ok(Receipt {
        format: RECEIPT_FORMAT.into(),
        id: hex::encode(c.id),
        tx_bytes: B64.encode(c.tx.encode()),
        inclusion,
        consistency,
        checkpoint,
        anchors,
    })
}
