//! A compact frontier of O(log n) hashes that computes tree roots while streaming leaves.

use super::{Hash, empty_root, fold_peak, node_hash};

/// Streaming root computation (a compact frontier of O(log n) hashes) used by chain verification.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    len: u64,
    /// Entry `j` is the root of a perfect subtree of `2^j` leaves when bit `j`
    /// of `len` is set; its length is the bit length of `len`.
    peaks: Vec<Hash>,
}

impl Frontier {
    /// An empty frontier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a leaf hash; amortised one node hash per leaf.
    pub fn push(&mut self, leaf: Hash) {
        let mut pending = self.len;
        let mut carry = leaf;
        let mut height = 0;
        // Every set bit of `len` is below its bit length, so the index is in range.
        while pending & 1 == 1 {
            carry = node_hash(&self.peaks[height], &carry);
            pending >>= 1;
            height += 1;
        }
        match self.peaks.get_mut(height) {
            Some(slot) => *slot = carry,
            None => self.peaks.push(carry),
        }
        self.len += 1;
    }

    /// Number of leaves pushed.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no leaf was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// RFC 6962 root of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut acc = None;
        for (height, peak) in self.peaks.iter().enumerate() {
            if (self.len >> height) & 1 == 1 {
                acc = Some(fold_peak(peak, acc));
            }
        }
        acc.unwrap_or_else(empty_root)
    }
}
