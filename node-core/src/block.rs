//! Block headers: the canonical versioned encoding whose SHA-256 links the chain, and the
//! packing rule that keeps each block's transactions within 16 KB.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::merkle::Hash;
use crate::tx::{DecodeError, Reader, Writer};

/// Current header encoding version.
pub const BLOCK_VERSION: u8 = 1;
/// Most canonical transaction bytes in one block.
pub const MAX_BLOCK_TX_BYTES: usize = 16 * 1024;

/// A block header; the transactions it covers are the global-sequence range
/// `[tree_size - tx_count, tree_size)` and are bound to it through `merkle_root`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockHeader {
    /// 0 for genesis.
    pub height: u64,
    /// Hash of the previous header; zero for genesis.
    #[serde(with = "hex_hash")]
    pub prev_hash: Hash,
    /// Leader time in ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// Transactions in this block.
    pub tx_count: u32,
    /// Size of the global Merkle tree after this block.
    pub tree_size: u64,
    /// Root of the global Merkle tree at `tree_size`.
    #[serde(with = "hex_hash")]
    pub merkle_root: Hash,
    /// Public key (hex) of the node that sequenced the block.
    pub leader: String,
}

impl BlockHeader {
    /// Canonical bytes (version 1); see `openapi/ENCODING.md`.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(128 + self.leader.len());
        w.u8(BLOCK_VERSION);
        w.u64(self.height);
        w.raw(&self.prev_hash);
        w.i64(self.timestamp_ms);
        w.u32(self.tx_count);
        w.u64(self.tree_size);
        w.raw(&self.merkle_root);
        w.str16(&self.leader);
        w.0
    }

    /// Parses canonical header bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let v = r.u8()?;
        if v != BLOCK_VERSION {
            return Err(DecodeError(format!("unknown block version {v}")));
        }
        let h = BlockHeader {
            height: r.u64()?,
            prev_hash: r.array()?,
            timestamp_ms: r.i64()?,
            tx_count: r.u32()?,
            tree_size: r.u64()?,
            merkle_root: r.array()?,
            leader: r.str16()?,
        };
        r.finish()?;
        Ok(h)
    }

    /// SHA-256 of the canonical header bytes.
    pub fn hash(&self) -> Hash {
        Sha256::digest(self.encode()).into()
    }

    /// Global sequence of the first transaction in this block.
    pub fn first_sequence(&self) -> u64 {
        self.tree_size.saturating_sub(u64::from(self.tx_count))
    }
}

/// Hex (de)serialisation of hashes for JSON.
pub mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes lowercase hex.
    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    /// Reads 64 hex digits.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_round_trips(height: u64, prev: [u8; 32], ts: i64, n: u32, size: u64, root: [u8; 32], leader in "[0-9a-f]{0,64}") {
            let h = BlockHeader { height, prev_hash: prev, timestamp_ms: ts, tx_count: n, tree_size: size, merkle_root: root, leader };
            prop_assert_eq!(BlockHeader::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = BlockHeader::decode(&bytes);
        }
    }
}
