//! Pending TTL deletes: at most one per (address, key), ordered by due time.

use std::collections::{BTreeSet, HashMap};

use crate::store::CommittedTx;

/// Pending TTL deletes: at most one per (address, key), ordered by due time, so memory is
/// bounded by the number of live values with a TTL however often they are rewritten.
#[derive(Default)]
pub(super) struct Expiries {
    by_key: HashMap<(String, String), (i64, u64)>,
    order: BTreeSet<(i64, u64, String, String)>,
}

impl Expiries {
    /// Records a commit on a key: any pending expiry of the key is replaced (or dropped).
    pub(super) fn track(&mut self, c: &CommittedTx) {
        let k = (c.tx.content.address.clone(), c.tx.content.key.clone());
        if let Some((at, seq)) = self.by_key.remove(&k) {
            self.order.remove(&(at, seq, k.0.clone(), k.1.clone()));
        }
        if let Some(at) = c.tx.expires_at_ms() {
            self.order.insert((at, c.tx.global_sequence, k.0.clone(), k.1.clone()));
            self.by_key.insert(k, (at, c.tx.global_sequence));
        }
    }

    pub(super) fn forget(&mut self, address: &str, key: &str, seq: u64) {
        let k = (address.to_string(), key.to_string());
        if let Some((at, s)) = self.by_key.get(&k).copied()
            && s == seq
        {
            self.by_key.remove(&k);
            self.order.remove(&(at, s, k.0, k.1));
        }
    }

    pub(super) fn next_due(&self) -> Option<i64> {
        self.order.first().map(|(at, ..)| *at)
    }

    /// Up to `max` entries due at `now`, oldest first; they stay pending.
    pub(super) fn due(&self, now: i64, max: usize) -> Vec<(u64, String, String)> {
        self.order
            .iter()
            .take_while(|(at, ..)| *at <= now)
            .take(max)
            .map(|(_, s, a, k)| (*s, a.clone(), k.clone()))
            .collect()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tx::{Transaction, TxContent};

    fn committed(seq: u64, key: &str, ttl: u32, body: &[u8]) -> CommittedTx {
        let tx = Transaction {
            global_sequence: seq,
            sequence: seq,
            timestamp_ms: 1_000,
            previous: [0; 32],
            content: TxContent {
                address: "/a".into(),
                key: key.into(),
                body: body.to_vec(),
                ttl_secs: ttl,
                ..TxContent::default()
            },
        };
        CommittedTx { id: tx.id(), tx, height: 1 }
    }

    #[test]
    fn one_pending_expiry_per_key_however_often_it_is_rewritten() {
        let mut e = Expiries::default();
        for seq in 0..10_000 {
            e.track(&committed(seq, "temp", 60, b"1"));
        }
        assert_eq!(e.len(), 1);
        assert_eq!(e.due(i64::MAX, 10), vec![(9_999, "/a".to_string(), "temp".to_string())]);
        // A put without TTL, or a delete, clears it.
        e.track(&committed(10_000, "temp", 0, b"2"));
        assert_eq!((e.len(), e.next_due()), (0, None));
    }

    #[test]
    fn due_entries_come_oldest_first_capped_and_stay_until_committed() {
        let mut e = Expiries::default();
        e.track(&committed(1, "b", 2, b"1"));
        e.track(&committed(2, "a", 1, b"1"));
        e.track(&committed(3, "c", 100, b"1"));
        assert_eq!(e.next_due(), Some(2_000));
        let due: Vec<_> = e.due(5_000, 10).into_iter().map(|(s, _, k)| (s, k)).collect();
        assert_eq!(due, vec![(2, "a".to_string()), (1, "b".to_string())]);
        assert_eq!(e.due(5_000, 1).len(), 1, "capped");
        assert_eq!(e.len(), 3, "still pending until the delete commits");
        e.forget("/a", "a", 99);
        assert_eq!(e.len(), 3, "a different sequence is not forgotten");
        e.forget("/a", "a", 2);
        assert_eq!(e.len(), 2);
    }
}
