//! Reading transactions back: by id, sequence, history, address range and idempotency key,
//! through the integer index tables, each answer checked against what it decrypts.

use std::collections::{BTreeMap, HashMap};

use sqlx::{QueryBuilder, Row};

use super::packed::prefix_i64;
use super::{BODY_COLUMNS, CommittedTx, Error, IN_CHUNK, Pool, RawBody, Result, Store, to_hash, to_i64, to_u64};
use crate::merkle::Hash;

impl Store {
    /// The transactions at `(global sequence, height)` pairs, in the order asked; an index row
    /// that points at nothing is corruption.
    async fn fetch(&self, wanted: &[(u64, u64)]) -> Result<Vec<CommittedTx>> {
        let mut heights: Vec<u64> = wanted.iter().map(|w| w.1).collect();
        heights.sort_unstable();
        heights.dedup();
        let bodies: HashMap<u64, RawBody> =
            self.bodies_at(&heights).await?.into_iter().map(|b| (b.height, b)).collect();
        let mut opened: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
        let mut out = Vec::with_capacity(wanted.len());
        for &(seq, height) in wanted {
            let raw = bodies.get(&height).ok_or_else(|| Error::Corrupt {
                height,
                reason: format!("an index names transaction {seq} in block {height}, which is not stored"),
            })?;
            let bytes = match opened.entry(height) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(self.open_bytes(raw)?),
            };
            let index = usize::try_from(seq.wrapping_sub(raw.first_seq)).unwrap_or(usize::MAX);
            let b = bytes.get(index).ok_or_else(|| Error::Corrupt {
                height,
                reason: format!("an index names transaction {seq}, which block {height} does not hold"),
            })?;
            out.push(self.open_one(raw, index, b)?);
        }
        Ok(out)
    }

    /// `(global_seq, height)` pairs selected by `sql` with integer binds.
    async fn locate(&self, sql: &str, binds: &[i64]) -> Result<Vec<(u64, u64)>> {
        Ok(self.int_rows::<2>(sql, binds).await?.into_iter().map(|[g, h]| (to_u64(g), to_u64(h))).collect())
    }

    /// Rows of `N` integer columns selected by `sql` with integer binds.
    async fn int_rows<const N: usize>(&self, sql: &str, binds: &[i64]) -> Result<Vec<[i64; N]>> {
        on_pool!(&self.pool, |p| {
            let mut q = sqlx::query(sql);
            for b in binds {
                q = q.bind(*b);
            }
            let rows = q.fetch_all(p).await?;
            rows.iter()
                .map(|r| {
                    let mut a = [0i64; N];
                    for (i, v) in a.iter_mut().enumerate() {
                        *v = r.try_get(i)?;
                    }
                    Ok::<_, Error>(a)
                })
                .collect::<Result<Vec<_>>>()
        })
    }

    /// The transaction with id `id`.
    pub async fn tx_by_id(&self, id: &Hash) -> Result<Option<CommittedTx>> {
        let h = prefix_i64(id);
        // The overlay is read before the tables: a row the index writer moves meanwhile is
        // then seen twice (and deduplicated), never missed.
        let mut at = self.indexer.snapshot().ids(h);
        at.extend(self.locate("SELECT global_seq, height FROM tx_ids WHERE h = $1", &[h]).await?);
        at.sort_unstable();
        at.dedup();
        Ok(self.fetch(&at).await?.into_iter().find(|c| &c.id == id))
    }

    /// The transaction at global sequence `seq`.
    pub async fn tx_by_sequence(&self, seq: u64) -> Result<Option<CommittedTx>> {
        Ok(self.txs_between(seq, seq.saturating_add(1), 1).await?.into_iter().next())
    }

    /// Bodies holding global sequences from `from` (below `to`), at most `limit` of them.
    async fn bodies_from_seq(&self, from: u64, to: u64, limit: u32) -> Result<Vec<RawBody>> {
        let sql = format!(
            "SELECT {BODY_COLUMNS} FROM block_txs WHERE first_seq < $2 AND height >= \
             (SELECT COALESCE(MAX(height), 0) FROM block_txs WHERE first_seq <= $1) ORDER BY height LIMIT $3"
        );
        on_pool!(&self.pool, |p| {
            let rows =
                sqlx::query(&sql).bind(to_i64(from)).bind(to_i64(to)).bind(i64::from(limit)).fetch_all(p).await?;
            rows.iter().map(|r| Ok::<_, Error>(raw_body!(r))).collect()
        })
    }

    /// Transactions with global sequence in `[from, to)`, ascending, at most `limit`.
    pub async fn txs_between(&self, from: u64, to: u64, limit: u32) -> Result<Vec<CommittedTx>> {
        if from >= to || limit == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        // Every block holds at least one transaction, so `limit` blocks always suffice.
        for raw in self.bodies_from_seq(from, to, limit).await? {
            let bytes = self.open_bytes(&raw)?;
            for (i, b) in bytes.iter().enumerate() {
                let seq = raw.first_seq + i as u64;
                if seq >= from && seq < to && out.len() < limit as usize {
                    out.push(self.open_one(&raw, i, b)?);
                }
            }
        }
        Ok(out)
    }

    /// Runs an index query page by page until `limit` transactions pass `keep`: a salted-hash
    /// collision only costs an extra page. `page(cursor)` returns located rows and the next
    /// cursor.
    async fn collect_filtered<F, Fut>(
        &self,
        limit: u32,
        mut cursor: i64,
        page: F,
        keep: impl Fn(&CommittedTx) -> bool,
    ) -> Result<Vec<CommittedTx>>
    where
        F: Fn(i64) -> Fut,
        Fut: std::future::Future<Output = Result<(Vec<(u64, u64)>, i64)>>,
    {
        let mut out = Vec::new();
        loop {
            let (at, next) = page(cursor).await?;
            let full = at.len() >= limit as usize;
            for c in self.fetch(&at).await? {
                if keep(&c) && out.len() < limit as usize {
                    out.push(c);
                }
            }
            if !full || out.len() >= limit as usize {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// History of one address and key, newest first, strictly below `before` (global sequence).
    pub async fn history(&self, address: &str, key: &str, before: u64, limit: u32) -> Result<Vec<CommittedTx>> {
        let stream = self.index.stream(address, key);
        let mem = &self.indexer.snapshot();
        let page = |before: i64| async move {
            let mut at = mem.stream_before(stream, before);
            at.extend(
                self.locate(
                    "SELECT global_seq, height FROM tx_by_stream WHERE stream = $1 AND global_seq < $2 \
                     ORDER BY global_seq DESC LIMIT $3",
                    &[stream, before, i64::from(limit)],
                )
                .await?,
            );
            at.sort_unstable_by(|a, b| b.cmp(a));
            at.dedup();
            at.truncate(limit as usize);
            let next = at.last().map(|a| to_i64(a.0)).unwrap_or(0);
            Ok((at, next))
        };
        self.collect_filtered(limit, to_i64(before), page, |c| {
            c.tx.content.address == address && c.tx.content.key == key
        })
        .await
    }

    /// Transactions of `address` with per-address sequence in `(after, before)`, ascending or
    /// descending, at most `limit` (Kalima's `/cache/after` and `/cache/before`).
    pub async fn address_range(
        &self,
        address: &str,
        after: u64,
        before: u64,
        limit: u32,
        descending: bool,
    ) -> Result<Vec<CommittedTx>> {
        let addr = self.index.address(address);
        let (after, before) = (to_i64(after), to_i64(before));
        let mem = &self.indexer.snapshot();
        let page = |cursor: i64| async move {
            let (lo, hi, order) = if descending { (after, cursor, "DESC") } else { (cursor, before, "ASC") };
            let mut at = mem.address_between(addr, lo, hi);
            at.extend(
                self.int_rows::<3>(
                    &format!(
                        "SELECT global_seq, height, seq FROM tx_by_address WHERE address = $1 AND seq > $2 \
                         AND seq < $3 ORDER BY seq {order}, global_seq LIMIT $4"
                    ),
                    &[addr, lo, hi, i64::from(limit)],
                )
                .await?,
            );
            at.sort_unstable_by(|a, b| {
                let by_seq = if descending { b[2].cmp(&a[2]) } else { a[2].cmp(&b[2]) };
                by_seq.then(a[0].cmp(&b[0]))
            });
            at.dedup();
            at.truncate(limit as usize);
            let next = at.last().map(|a| a[2]).unwrap_or(cursor);
            Ok((at.into_iter().map(|a| (to_u64(a[0]), to_u64(a[1]))).collect(), next))
        };
        let start = if descending { before } else { after };
        self.collect_filtered(limit, start, page, |c| c.tx.content.address == address).await
    }

    /// Leaf hashes with global sequence in `[from, to)`, ascending.
    pub async fn leaf_hashes(&self, from: u64, to: u64) -> Result<Vec<Hash>> {
        let mut out = Vec::with_capacity(usize::try_from(to.saturating_sub(from)).unwrap_or(0).min(1 << 20));
        let mut next = from;
        while next < to {
            let sql = "SELECT height, first_seq, leaves FROM block_txs WHERE first_seq < $2 AND height >= \
                       (SELECT COALESCE(MAX(height), 0) FROM block_txs WHERE first_seq <= $1) ORDER BY height LIMIT 1000";
            let rows: Vec<(i64, i64, Vec<u8>)> = on_pool!(&self.pool, |p| {
                sqlx::query_as(sql).bind(to_i64(next)).bind(to_i64(to)).fetch_all(p).await?
            });
            if rows.is_empty() {
                break;
            }
            for (height, first, leaves) in rows {
                let first = to_u64(first);
                for (i, leaf) in leaves.chunks(32).enumerate() {
                    let seq = first + i as u64;
                    if seq >= next && seq < to {
                        if seq != from + out.len() as u64 {
                            return Err(Error::Corrupt {
                                height: to_u64(height),
                                reason: format!("transaction {} is missing", from + out.len() as u64),
                            });
                        }
                        out.push(to_hash(leaf)?);
                    }
                }
            }
            let reached = from + out.len() as u64;
            if reached <= next {
                break;
            }
            next = reached;
        }
        Ok(out)
    }

    /// The latest transaction of every (address, key), for restoring the memcache.
    pub async fn latest_per_key(&self) -> Result<Vec<CommittedTx>> {
        let mut latest = self.indexer.snapshot().latest_per_stream();
        let stored = self
            .int_rows::<3>(
                "SELECT s.stream, s.global_seq, s.height FROM tx_by_stream s JOIN \
                 (SELECT stream, MAX(global_seq) AS g FROM tx_by_stream GROUP BY stream) m \
                 ON s.stream = m.stream AND s.global_seq = m.g",
                &[],
            )
            .await?;
        for [stream, g, h] in stored {
            let e = latest.entry(stream).or_insert((g, h));
            if g > e.0 {
                *e = (g, h);
            }
        }
        let mut at: Vec<(u64, u64)> = latest.into_values().map(|(g, h)| (to_u64(g), to_u64(h))).collect();
        at.sort_unstable();
        let mut out = Vec::with_capacity(at.len());
        for chunk in at.chunks(10_000) {
            out.extend(self.fetch(chunk).await?);
        }
        Ok(out)
    }

    /// The `limit` most recent (device, idempotency key, transaction id), newest first.
    pub async fn recent_idempotency_keys(&self, limit: u64) -> Result<Vec<(String, String, Hash)>> {
        let mut at = self.indexer.snapshot().all_idempotency();
        at.extend(
            self.locate(
                "SELECT global_seq, height FROM tx_idempotency ORDER BY global_seq DESC LIMIT $1",
                &[to_i64(limit)],
            )
            .await?,
        );
        at.sort_unstable_by(|a, b| b.cmp(a));
        at.dedup();
        at.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let mut out = Vec::with_capacity(at.len());
        for chunk in at.chunks(10_000) {
            for c in self.fetch(chunk).await? {
                let content = c.tx.content;
                out.push((content.device_id, content.idempotency_key, c.id));
            }
        }
        Ok(out)
    }

    /// Which of `keys` `device` already used, with the transaction that used each.
    pub async fn idempotency_lookup(&self, device: &str, keys: &[&str]) -> Result<Vec<(String, Hash)>> {
        let mut found = Vec::new();
        for chunk in keys.chunks(IN_CHUNK) {
            let hashes: BTreeMap<i64, ()> = chunk.iter().map(|k| (self.index.idempotency(device, k), ())).collect();
            let mem = self.indexer.snapshot();
            let mut at: Vec<(u64, u64)> = hashes.keys().flat_map(|h| mem.idempotency(*h)).collect();
            let stored: Vec<(i64, i64)> = on_pool!(&self.pool, |p| {
                let mut qb = QueryBuilder::new("SELECT global_seq, height FROM tx_idempotency WHERE h IN (");
                let mut list = qb.separated(", ");
                for h in hashes.keys() {
                    list.push_bind(*h);
                }
                qb.push(")");
                qb.build_query_as().fetch_all(p).await?
            });
            at.extend(stored.into_iter().map(|(g, h)| (to_u64(g), to_u64(h))));
            at.sort_unstable();
            at.dedup();
            for c in self.fetch(&at).await? {
                let content = &c.tx.content;
                if content.device_id == device && chunk.contains(&content.idempotency_key.as_str()) {
                    found.push((content.idempotency_key.clone(), c.id));
                }
            }
        }
        Ok(found)
    }
}
