//! Order-independent digests of the index tables, so verification can compare what the
//! chain implies with what is stored without holding either in memory.

use sha2::{Digest, Sha256};

use super::IndexRows;

/// Row count and sum (mod 2^128) of the SHA-256 of every row of one table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableDigest {
    /// Rows added.
    pub rows: u64,
    sum: u128,
}

impl TableDigest {
    /// Adds one row.
    pub fn add(&mut self, values: &[i64]) {
        let mut h = Sha256::new();
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
    pub fn merge(&mut self, other: &TableDigest) {
        self.sum = self.sum.wrapping_add(other.sum);
        self.rows += other.rows;
    }
}

/// Digests of the four index tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexDigest {
    tables: [TableDigest; 4],
}

/// Table names, in digest order.
pub const INDEX_TABLES: [&str; 4] = ["tx_ids", "tx_by_stream", "tx_by_address", "tx_idempotency"];

impl IndexDigest {
    /// Adds the rows of one transaction.
    pub fn add(&mut self, rows: &IndexRows) {
        self.tables[0].add(&rows.id);
        self.tables[1].add(&rows.stream);
        self.tables[2].add(&rows.address);
        if let Some(r) = &rows.idempotency {
            self.tables[3].add(r);
        }
    }

    /// Adds every row of another digest.
    pub fn merge(&mut self, other: &IndexDigest) {
        for (a, b) in self.tables.iter_mut().zip(&other.tables) {
            a.merge(b);
        }
    }

    pub(super) fn table_mut(&mut self, i: usize) -> &mut TableDigest {
        &mut self.tables[i]
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
        let mut a = TableDigest::default();
        a.add(&[1, 2, 3]);
        a.add(&[4, 5, 6]);
        let mut b = TableDigest::default();
        b.add(&[4, 5, 6]);
        b.add(&[1, 2, 3]);
        assert_eq!(a, b);
        let mut c = TableDigest::default();
        c.add(&[4, 5, 6]);
        c.add(&[1, 2, 4]);
        assert_ne!(a, c);
        let mut d = b;
        d.add(&[0, 0, 0]);
        assert_ne!(a, d);
    }
}
