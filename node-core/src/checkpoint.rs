//! Signed checkpoints: a tree head `(chain, tree_size, root, height, timestamp)` signed with
//! the node's Ed25519 key over a small text form that anyone can rebuild.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

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

/// JSON form served by the API (and, co-signed by a quorum of masters, recorded on the chain).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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

    /// True when `signature` (hex) by `signer` (hex) verifies over this tree head's text.
    pub fn verify_text(text: &str, signer: &str, signature: &str) -> bool {
        let (mut pk, mut sig) = ([0u8; 32], [0u8; 64]);
        if hex::decode_to_slice(signer, &mut pk).is_err() || hex::decode_to_slice(signature, &mut sig).is_err() {
            return false;
        }
        VerifyingKey::from_bytes(&pk).is_ok_and(|k| k.verify(text.as_bytes(), &Signature::from_bytes(&sig)).is_ok())
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

impl CheckpointJson {
    /// The signers whose signature verifies over `signed_text`, which must be the text of
    /// the fields (so a signature cannot be moved to other fields).
    pub fn valid_signers(&self) -> Vec<String> {
        let mut root = [0u8; 32];
        if hex::decode_to_slice(&self.root, &mut root).is_err()
            || self.signed_text
                != Checkpoint::signed_text(&self.chain, self.tree_size, &root, self.height, self.timestamp_ms)
        {
            return Vec::new();
        }
        let mut out: Vec<String> = self
            .signatures
            .iter()
            .filter(|s| Checkpoint::verify_text(&self.signed_text, &s.signer, &s.signature))
            .map(|s| s.signer.to_lowercase())
            .collect();
        out.sort();
        out.dedup();
        out
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
