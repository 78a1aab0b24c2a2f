//! Reading the stored index tables back for verification, as order-independent digests.

use super::{Backend, DIGEST_PAGE, Error, INDEX_TABLES, IndexDigest, Pool, Result, Store, to_i64};

impl Store {
    /// Digests of every index table as stored, under the key of `empty`, to compare with
    /// [`IndexDigest::add`] over the chain's transactions below global sequence `below_seq`.
    /// Rows still in the index writer's overlay count from there: stored rows of the blocks
    /// it holds may be in flight and are left out.
    pub async fn stored_index_digest(&self, below_seq: u64, empty: &IndexDigest) -> Result<IndexDigest> {
        let below = to_i64(below_seq);
        // A commit reaches the overlay just after the database: wait for the one that made
        // `below_seq` (bounded, in case the caller asks beyond the chain).
        let mut mem = self.indexer.snapshot();
        for _ in 0..5000 {
            if mem.covered_below >= below_seq {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            mem = self.indexer.snapshot();
        }
        let in_flight = mem.in_flight().map(|r| to_i64(*r.start())..=to_i64(*r.end()));
        let tables = (0..INDEX_TABLES.len()).map(|i| {
            let mut d = empty.empty_like();
            let in_flight = in_flight.clone();
            async move {
                self.digest_table(i, below, in_flight, &mut d).await?;
                Ok::<_, Error>(d)
            }
        });
        let mut total = empty.empty_like();
        for d in futures::future::try_join_all(tables).await? {
            total.merge(&d);
        }
        mem.digest(below, &mut total);
        Ok(total)
    }

    /// Adds the rows of index table `i` with global sequence below `below` to `d`, except
    /// those of blocks in `in_flight` (inclusive). Rows come
    /// back as text in pages of [`DIGEST_PAGE`] (keyset-paged on the primary key): one
    /// database row per page instead of one per index row is what makes this fast.
    async fn digest_table(
        &self,
        i: usize,
        below: i64,
        in_flight: Option<std::ops::RangeInclusive<i64>>,
        d: &mut IndexDigest,
    ) -> Result<()> {
        let (table, cols, key): (&str, &[&str], usize) = match i {
            0 => ("tx_ids", &["h", "global_seq", "height"], 2),
            1 => ("tx_by_stream", &["stream", "global_seq", "height"], 2),
            2 => ("tx_by_address", &["address", "seq", "global_seq", "height"], 3),
            _ => ("tx_idempotency", &["h", "global_seq", "height"], 2),
        };
        let gseq = cols.iter().position(|c| *c == "global_seq").unwrap_or(1);
        let agg = match self.backend() {
            Backend::Sqlite => "group_concat",
            Backend::Postgres => "string_agg",
        };
        let pk = cols[..key].join(", ");
        let params = (1..=key).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ");
        let text = cols.iter().map(|c| format!("CAST({c} AS TEXT)")).collect::<Vec<_>>().join(" || ',' || ");
        let sql = format!(
            "SELECT {agg}(r, ' ') FROM (SELECT {text} AS r FROM {table} WHERE ({pk}) > ({params}) \
             ORDER BY {pk} LIMIT {DIGEST_PAGE}) AS page"
        );
        let mut cursor = vec![i64::MIN; key];
        let mut row = Vec::with_capacity(cols.len());
        loop {
            let page: Option<String> = on_pool!(&self.pool, |p| {
                let mut q = sqlx::query_scalar(&sql);
                for c in &cursor {
                    q = q.bind(*c);
                }
                q.fetch_one(p).await?
            });
            let Some(page) = page.filter(|p| !p.is_empty()) else { return Ok(()) };
            let bad =
                || Error::Corrupt { height: 0, reason: format!("index {table} holds a row that is not integers") };
            let mut last: Option<Vec<i64>> = None;
            let mut n = 0;
            for r in page.split(' ') {
                row.clear();
                for v in r.split(',') {
                    row.push(v.parse::<i64>().map_err(|_| bad())?);
                }
                if row.len() != cols.len() {
                    return Err(bad());
                }
                let height = row[cols.len() - 1];
                if row[gseq] < below && !in_flight.as_ref().is_some_and(|r| r.contains(&height)) {
                    d.add_row(i, &row);
                }
                if last.as_deref().is_none_or(|l| l < &row[..key]) {
                    last = Some(row[..key].to_vec());
                }
                n += 1;
            }
            match last {
                Some(l) if n == DIGEST_PAGE => cursor = l,
                _ => return Ok(()),
            }
        }
    }
}
