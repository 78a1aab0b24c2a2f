//! Order-independent digests of the index tables, so verification can compare what the
//! chain implies with what is stored without holding either in memory.

use sha2::{Digest, Sha256};

use super::IndexRows;

/// Row count and sum (mod 2^128) of a keyed SHA-256 of every row of one table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableDigest {
    /// Rows added.
    pub rows: u64,
    sum: u128,
}

impl TableDigest {
    /// Adds one row, hashed from `keyed` (a hasher that has absorbed the digest key).
    fn add(&mut self, keyed: &Sha256, values: &[i64]) {
        let mut h = keyed.clone();
        for v in values {
            h.update(v.to_be_bytes());
        }
        let d: [u8; 32] = h.finalize().into();
        let mut head = [0u8; 16];
        head.copy_from_slice(&d[..16]);
        self.sum = self.sum.wrapping_add(u128::from_be_bytes(head));
        self.rows += 1;
    }

    /// Adds every row of another digest.
    fn merge(&mut self, other: &TableDigest) {
        self.sum = self.sum.wrapping_add(other.sum);
        self.rows += other.rows;
    }
}

/// Digests of the four index tables under one key.
///
/// A sum of unkeyed hashes could be matched by rows chosen with a generalized-birthday
/// search; under a random key drawn for each verification, nobody editing the database
/// knows which rows would compensate.
#[derive(Clone)]
pub struct IndexDigest {
    // The SHA-256 state after the 64-byte key: one compression per row afterwards.
    keyed: Sha256,
    tables: [TableDigest; 4],
}

impl std::fmt::Debug for IndexDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexDigest").field("tables", &self.tables).finish_non_exhaustive()
    }
}

impl PartialEq for IndexDigest {
    fn eq(&self, other: &Self) -> bool {
        self.tables == other.tables
    }
}

/// Table names, in digest order.
pub const INDEX_TABLES: [&str; 4] = ["tx_ids", "tx_by_stream", "tx_by_address", "tx_idempotency"];

impl IndexDigest {
    /// An empty digest under `key`; digests are comparable only under the same key.
    pub fn new(key: &[u8; 64]) -> Self {
        Self { keyed: Sha256::new_with_prefix(key), tables: Default::default() }
    }

    /// An empty digest under a fresh random key.
    pub fn random() -> Self {
        use rand::RngCore;
        let mut key = [0u8; 64];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self::new(&key)
    }

    /// An empty digest under the same key as `self`.
    pub fn empty_like(&self) -> Self {
        Self { keyed: self.keyed.clone(), tables: Default::default() }
    }

    /// Adds the rows of one transaction.
    pub fn add(&mut self, rows: &IndexRows) {
        self.tables[0].add(&self.keyed, &rows.id);
        self.tables[1].add(&self.keyed, &rows.stream);
        self.tables[2].add(&self.keyed, &rows.address);
        if let Some(r) = &rows.idempotency {
            self.tables[3].add(&self.keyed, r);
        }
    }

    /// Adds one stored row of table `i` (in [`INDEX_TABLES`] order).
    pub(super) fn add_row(&mut self, i: usize, values: &[i64]) {
        self.tables[i].add(&self.keyed, values);
    }

    /// Adds every row of another digest made under the same key.
    pub fn merge(&mut self, other: &IndexDigest) {
        for (a, b) in self.tables.iter_mut().zip(&other.tables) {
            a.merge(b);
        }
    }

    /// The first table whose rows differ, with (stored, expected) row counts.
    pub fn first_difference(&self, expected: &IndexDigest) -> Option<(&'static str, u64, u64)> {
        self.tables
            .iter()
            .zip(&expected.tables)
            .zip(INDEX_TABLES)
            .find(|((a, b), _)| a != b)
            .map(|((a, b), name)| (name, a.rows, b.rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_ignore_order_but_see_any_change() {
        let key = [7u8; 64];
        let d = |rows: &[[i64; 3]]| {
            let mut d = IndexDigest::new(&key);
            for r in rows {
                d.add_row(1, r);
            }
            d
        };
        let a = d(&[[1, 2, 3], [4, 5, 6]]);
        assert_eq!(a, d(&[[4, 5, 6], [1, 2, 3]]));
        assert_ne!(a, d(&[[4, 5, 6], [1, 2, 4]]));
        assert_ne!(a, d(&[[4, 5, 6], [1, 2, 3], [0, 0, 0]]));
        assert_eq!(a.first_difference(&d(&[[1, 2, 3]])), Some(("tx_by_stream", 2, 1)));
        // The same rows under another key give another digest.
        let mut other = IndexDigest::new(&[8u8; 64]);
        other.add_row(1, &[1, 2, 3]);
        other.add_row(1, &[4, 5, 6]);
        assert_ne!(a.tables[1].sum, other.tables[1].sum);
    }
}
