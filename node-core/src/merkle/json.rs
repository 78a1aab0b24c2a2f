//! JSON shapes of proofs in the public contract, hex-encoded.

use serde::{Deserialize, Serialize};

use super::{Hash, verify_consistency, verify_inclusion};

pub(super) fn parse_hash(text: &str) -> Option<Hash> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

fn parse_hashes(texts: &[String]) -> Option<Vec<Hash>> {
    texts.iter().map(|t| parse_hash(t)).collect()
}

/// JSON shape of an inclusion proof (hex-encoded hashes, lowercase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    /// Zero-based index of the leaf.
    pub leaf_index: u64,
    /// Size of the tree the proof is for.
    pub tree_size: u64,
    /// Leaf hash, hex.
    pub leaf_hash: String,
    /// RFC 6962 audit path, hex, bottom-up.
    pub audit_path: Vec<String>,
    /// Tree root at `tree_size`, hex.
    pub root: String,
}

impl InclusionProof {
    /// Builds the JSON shape from binary hashes.
    pub fn new(leaf_index: u64, tree_size: u64, leaf: &Hash, path: &[Hash], root: &Hash) -> Self {
        Self {
            leaf_index,
            tree_size,
            leaf_hash: hex::encode(leaf),
            audit_path: path.iter().map(hex::encode).collect(),
            root: hex::encode(root),
        }
    }

    /// Parses the hex and runs [`verify_inclusion`]; false on bad hex.
    pub fn verify(&self) -> bool {
        let (Some(leaf), Some(path), Some(root)) =
            (parse_hash(&self.leaf_hash), parse_hashes(&self.audit_path), parse_hash(&self.root))
        else {
            return false;
        };
        verify_inclusion(&leaf, self.leaf_index, self.tree_size, &path, &root)
    }
}

/// JSON shape of a consistency proof (hex-encoded hashes, lowercase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyProof {
    /// Older tree size.
    pub first: u64,
    /// Newer tree size.
    pub second: u64,
    /// RFC 6962 consistency proof, hex.
    pub proof: Vec<String>,
}

impl ConsistencyProof {
    /// Builds the JSON shape from binary hashes.
    pub fn new(first: u64, second: u64, proof: &[Hash]) -> Self {
        Self { first, second, proof: proof.iter().map(hex::encode).collect() }
    }

    /// Parses the hex and runs [`verify_consistency`] against the two roots; false on bad hex.
    pub fn verify(&self, first_root: &Hash, second_root: &Hash) -> bool {
        parse_hashes(&self.proof)
            .is_some_and(|proof| verify_consistency(self.first, self.second, first_root, second_root, &proof))
    }
}
