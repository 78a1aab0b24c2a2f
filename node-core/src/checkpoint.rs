//! Signed checkpoints: a tree head `(chain, tree_size, root, height, timestamp)` signed with
//! the node's Ed25519 key over a small text form that anyone can rebuild.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::Serialize;

use crate::keys::NodeKey;
use crate::merkle::Hash;

/// A signed tree head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Chain name from the config.
    pub chain: String,
    /// Number of transactions covered.
    pub tree_size: u64,
    /// Block height at which the tree had that size.
    pub height: u64,
    /// When the checkpoint was signed (ms since the Unix epoch).
    pub timestamp_ms: i64,
    /// Merkle root at `tree_size`.
    pub root: Hash,
    /// Signer's public key (hex).
    pub signer: String,
    /// Ed25519 signature over [`Checkpoint::signed_text`].
    pub signature: [u8; 64],
}

/// JSON form served by the API.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointJson {
    /// Chain name.
    pub chain: String,
    /// Transactions covered.
    pub tree_size: u64,
    /// Block height.
    pub height: u64,
    /// Signing time (ms).
    pub timestamp_ms: i64,
    /// Root (hex).
    pub root: String,
    /// The exact text that was signed.
    pub signed_text: String,
    /// Signatures (one per signing node).
    pub signatures: Vec<SignatureJson>,
}

/// One signature on a checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureJson {
    /// Public key (hex).
    pub signer: String,
    /// Signature (hex).
    pub signature: String,
}

impl Checkpoint {
    /// The text that is signed, one field per line.
    pub fn signed_text(chain: &str, tree_size: u64, root: &Hash, height: u64, timestamp_ms: i64) -> String {
        format!("kalima-checkpoint-v1\n{chain}\n{tree_size}\n{}\n{height}\n{timestamp_ms}\n", hex::encode(root))
    }

    /// Signs a tree head.
    pub fn sign(key: &NodeKey, chain: &str, tree_size: u64, root: Hash, height: u64, timestamp_ms: i64) -> Self {
        let text = Self::signed_text(chain, tree_size, &root, height, timestamp_ms);
        Checkpoint {
            chain: chain.to_string(),
            tree_size,
            height,
            timestamp_ms,
            root,
            signer: key.public_hex(),
            signature: key.sign(text.as_bytes()),
        }
    }

    /// True when the signature verifies against `signer`.
    pub fn verify(&self) -> bool {
        let mut pk = [0u8; 32];
        if hex::decode_to_slice(&self.signer, &mut pk).is_err() {
            return false;
        }
        let Ok(key) = VerifyingKey::from_bytes(&pk) else {
            return false;
        };
        let text = Self::signed_text(&self.chain, self.tree_size, &self.root, self.height, self.timestamp_ms);
        key.verify(text.as_bytes(), &Signature::from_bytes(&self.signature)).is_ok()
    }

    /// The API's JSON form.
    pub fn to_json(&self) -> CheckpointJson {
        CheckpointJson {
            chain: self.chain.clone(),
            tree_size: self.tree_size,
            height: self.height,
            timestamp_ms: self.timestamp_ms,
            root: hex::encode(self.root),
            signed_text: Self::signed_text(&self.chain, self.tree_size, &self.root, self.height, self.timestamp_ms),
            signatures: vec![SignatureJson { signer: self.signer.clone(), signature: hex::encode(self.signature) }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_covers_every_field() {
        let key = NodeKey::from_seed([1; 32]);
        let cp = Checkpoint::sign(&key, "dev", 10, [2; 32], 3, 1000);
        assert!(cp.verify());
        let mut bad = cp.clone();
        bad.tree_size = 11;
        assert!(!bad.verify());
        let mut bad = cp.clone();
        bad.root[0] ^= 1;
        assert!(!bad.verify());
        let mut bad = cp;
        bad.chain = "other".into();
        assert!(!bad.verify());
    }
}
