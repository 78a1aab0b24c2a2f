//! Lookup indexes written behind the chain.
//!
//! A commit writes blocks and sealed bodies only. The rows of the four lookup indexes of its
//! transactions go to an in-memory overlay, which every read consults at once, and a
//! background writer moves them to the index tables in large sorted batches. On SQLite those
//! tables live in their own file (`<db>-index`, attached to the read connections as `idx`),
//! so index writes run beside chain commits instead of inside them, and a batch dirties each
//! B-tree page once for many rows. The index is derived data: on open it is checked against
//! the chain (block hash at its height, index salt) and rebuilt from the bodies where it is
//! behind, missing, or belongs to another store.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row};
use tokio::sync::Notify;

use super::{Error, INSERT_CHUNK, IndexDigest, IndexRows, Pool, Result, Store, to_i64, to_u64};
use crate::merkle::Hash;

/// Transactions the overlay may hold before commits wait for the index writer (about 80
/// bytes each): a burst this long is absorbed at full commit speed.
pub(super) const OVERLAY_CAP: usize = 1_000_000;
/// Transactions per index write transaction, at most.
const WRITE_MAX: usize = 250_000;
/// The writer waits up to [`LINGER`] for this many transactions before writing: a write of
/// many rows dirties each index page once for several of them, where small writes would
/// rewrite a page per row (the WAL traffic is most of the index's cost), and each write
/// briefly competes with chain commits for the disk (at 10k writes/s, p99 commit-to-delivery
/// went from 6.4 ms with 250 ms to 3–5 ms with 2 s; `kalima bench mqtt`).
const MIN_WRITE: usize = 50_000;
/// Longest wait for [`MIN_WRITE`] transactions.
const LINGER: Duration = Duration::from_secs(2);
/// Transactions per batch while rebuilding from the bodies.
const REBUILD_BATCH: usize = 100_000;

/// Schema of the SQLite index file. The tables are append-only, like the chain's; only the
/// watermark row in `index_state` changes.
const SQLITE_INDEX_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tx_ids (
    h INTEGER NOT NULL, global_seq INTEGER NOT NULL, height INTEGER NOT NULL,
    PRIMARY KEY (h, global_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tx_by_stream (
    stream INTEGER NOT NULL, global_seq INTEGER NOT NULL, height INTEGER NOT NULL,
    PRIMARY KEY (stream, global_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tx_by_address (
    address INTEGER NOT NULL, seq INTEGER NOT NULL, global_seq INTEGER NOT NULL, height INTEGER NOT NULL,
    PRIMARY KEY (address, seq, global_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tx_idempotency (
    h INTEGER NOT NULL, global_seq INTEGER NOT NULL, height INTEGER NOT NULL,
    PRIMARY KEY (h, global_seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tx_idempotency_recent ON tx_idempotency (global_seq);
CREATE TABLE IF NOT EXISTS index_state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    height INTEGER NOT NULL,
    block_hash BLOB,
    salt_check BLOB,
    -- Boot id of the machine while the file is open; NULL once closed cleanly.
    open_on_boot BLOB
);
INSERT OR IGNORE INTO index_state (id, height) VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS tx_ids_no_update BEFORE UPDATE ON tx_ids BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER IF NOT EXISTS tx_ids_no_delete BEFORE DELETE ON tx_ids BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER IF NOT EXISTS tx_by_stream_no_update BEFORE UPDATE ON tx_by_stream BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER IF NOT EXISTS tx_by_stream_no_delete BEFORE DELETE ON tx_by_stream BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER IF NOT EXISTS tx_by_address_no_update BEFORE UPDATE ON tx_by_address BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER IF NOT EXISTS tx_by_address_no_delete BEFORE DELETE ON tx_by_address BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER IF NOT EXISTS tx_idempotency_no_update BEFORE UPDATE ON tx_idempotency BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER IF NOT EXISTS tx_idempotency_no_delete BEFORE DELETE ON tx_idempotency BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
"#;

/// Drops the SQLite index file's tables, to rebuild them.
const SQLITE_INDEX_DROP: &str = "DROP TABLE IF EXISTS tx_ids; DROP TABLE IF EXISTS tx_by_stream; \
    DROP TABLE IF EXISTS tx_by_address; DROP TABLE IF EXISTS tx_idempotency; DROP TABLE IF EXISTS index_state;";

/// The index file beside SQLite database `db`.
pub(super) fn sqlite_index_path(db: &std::path::Path) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-index");
    std::path::PathBuf::from(name)
}

/// Opens (creating if needed) the SQLite index file: one writer connection. Its writes are
/// never synced while the node runs (`synchronous=OFF`): a killed process loses nothing the
/// kernel already has, and after a power loss or an OS crash, which may leave the file torn,
/// the next open finds the file still marked open under another boot and rebuilds it from
/// the chain. A clean close syncs it and clears the mark.
/// Syncs the index file: checkpoints its WAL with syncs on (the connection runs without).
const SYNC_FILE: &str = "PRAGMA synchronous = FULL; PRAGMA wal_checkpoint(TRUNCATE);";

pub(super) async fn open_sqlite_index(path: &std::path::Path) -> Result<sqlx::SqlitePool> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Off)
        .busy_timeout(Duration::from_secs(10))
        .pragma("temp_store", "memory")
        .pragma("cache_size", "-65536");
    let pool = SqlitePoolOptions::new()
        .test_before_acquire(false)
        .max_connections(1)
        .min_connections(1)
        .connect_with(opts)
        .await?;
    sqlx::raw_sql(SQLITE_INDEX_SCHEMA).execute(&pool).await?;
    Ok(pool)
}

/// Index rows of one or more commits, each vector sorted, with the block they reach.
#[derive(Debug, Default)]
pub(super) struct IndexBatch {
    pub(super) ids: Vec<[i64; 3]>,
    pub(super) streams: Vec<[i64; 3]>,
    pub(super) addresses: Vec<[i64; 4]>,
    pub(super) idempotency: Vec<[i64; 3]>,
    /// Height and hash of the highest block whose transactions the batch holds.
    pub(super) top: (u64, Hash),
}

impl IndexBatch {
    fn txs(&self) -> usize {
        self.ids.len()
    }

    /// Adds one transaction's rows (unsorted until [`IndexBatch::sort`]).
    pub(super) fn add(&mut self, r: IndexRows) {
        self.ids.push(r.id);
        self.streams.push(r.stream);
        self.addresses.push(r.address);
        self.idempotency.extend(r.idempotency);
    }

    /// Sorts every table's rows by key, as the overlay's lookups expect.
    pub(super) fn sort(&mut self) {
        self.ids.sort_unstable();
        self.streams.sort_unstable();
        self.addresses.sort_unstable();
        self.idempotency.sort_unstable();
    }
}

/// Rows of a sorted table whose first column is `key`.
fn with_key<const N: usize>(rows: &[[i64; N]], key: i64) -> &[[i64; N]] {
    let lo = rows.partition_point(|r| r[0] < key);
    let hi = rows.partition_point(|r| r[0] <= key);
    &rows[lo..hi]
}

/// The overlay as one read saw it: every batch not yet in the tables when the read began.
pub(super) struct Snapshot {
    batches: Vec<Arc<IndexBatch>>,
    /// Blocks below this height were in the tables when the snapshot was taken; stored rows
    /// of the blocks the overlay holds may be in flight and are counted from it instead.
    pub(super) indexed: u64,
    /// Every transaction below this global sequence was in the tables or the snapshot.
    pub(super) covered_below: u64,
}

impl Snapshot {
    /// `(global_seq, height)` of rows of `tx_ids` with key `h`.
    pub(super) fn ids(&self, h: i64) -> Vec<(u64, u64)> {
        self.batches.iter().flat_map(|b| with_key(&b.ids, h)).map(|r| (to_u64(r[1]), to_u64(r[2]))).collect()
    }

    /// `(global_seq, height)` of `stream`'s rows below `before`.
    pub(super) fn stream_before(&self, stream: i64, before: i64) -> Vec<(u64, u64)> {
        self.batches
            .iter()
            .flat_map(|b| with_key(&b.streams, stream))
            .filter(|r| r[1] < before)
            .map(|r| (to_u64(r[1]), to_u64(r[2])))
            .collect()
    }

    /// `[global_seq, height, seq]` of `address`'s rows with `lo < seq < hi`.
    pub(super) fn address_between(&self, address: i64, lo: i64, hi: i64) -> Vec<[i64; 3]> {
        self.batches
            .iter()
            .flat_map(|b| with_key(&b.addresses, address))
            .filter(|r| r[1] > lo && r[1] < hi)
            .map(|r| [r[2], r[3], r[1]])
            .collect()
    }

    /// `(global_seq, height)` of `tx_idempotency` rows with key `h`.
    pub(super) fn idempotency(&self, h: i64) -> Vec<(u64, u64)> {
        self.batches.iter().flat_map(|b| with_key(&b.idempotency, h)).map(|r| (to_u64(r[1]), to_u64(r[2]))).collect()
    }

    /// `(global_seq, height)` of every idempotency row.
    pub(super) fn all_idempotency(&self) -> Vec<(u64, u64)> {
        self.batches.iter().flat_map(|b| b.idempotency.iter()).map(|r| (to_u64(r[1]), to_u64(r[2]))).collect()
    }

    /// Latest `(global_seq, height)` per stream key.
    pub(super) fn latest_per_stream(&self) -> HashMap<i64, (i64, i64)> {
        let mut out: HashMap<i64, (i64, i64)> = HashMap::new();
        for r in self.batches.iter().flat_map(|b| b.streams.iter()) {
            let e = out.entry(r[0]).or_insert((r[1], r[2]));
            if r[1] > e.0 {
                *e = (r[1], r[2]);
            }
        }
        out
    }

    /// Heights (inclusive) of the blocks whose rows the snapshot holds, if any.
    pub(super) fn in_flight(&self) -> Option<std::ops::RangeInclusive<u64>> {
        self.batches.last().map(|b| self.indexed..=b.top.0)
    }

    /// Adds the rows with global sequence below `below` to `d`.
    pub(super) fn digest(&self, below: i64, d: &mut IndexDigest) {
        for b in &self.batches {
            b.ids.iter().filter(|r| r[1] < below).for_each(|r| d.add_row(0, r));
            b.streams.iter().filter(|r| r[1] < below).for_each(|r| d.add_row(1, r));
            b.addresses.iter().filter(|r| r[2] < below).for_each(|r| d.add_row(2, r));
            b.idempotency.iter().filter(|r| r[1] < below).for_each(|r| d.add_row(3, r));
        }
    }
}

#[derive(Default)]
struct Overlay {
    batches: VecDeque<Arc<IndexBatch>>,
    txs: usize,
    indexed: u64,
    covered_below: u64,
}

/// The index writer and its overlay.
pub(super) struct Indexer {
    /// Where the index tables are written: the SQLite index file, or the PostgreSQL pool.
    writer: Pool,
    overlay: Mutex<Overlay>,
    /// Rows arrived, or the store is closing.
    wake: Notify,
    /// Rows reached the tables.
    written: Notify,
    closing: AtomicBool,
    stopped: AtomicBool,
    /// Callers waiting in [`Indexer::flush`]: the writer does not linger for them.
    hurry: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Indexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = self.overlay.lock();
        f.debug_struct("Indexer").field("pending_txs", &o.txs).field("indexed", &o.indexed).finish_non_exhaustive()
    }
}

impl Indexer {
    pub(super) fn new(writer: Pool) -> Self {
        Self {
            writer,
            overlay: Mutex::new(Overlay::default()),
            wake: Notify::new(),
            written: Notify::new(),
            closing: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            hurry: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Where the index tables are written.
    pub(super) fn writer(&self) -> &Pool {
        &self.writer
    }

    /// The overlay as it is now.
    pub(super) fn snapshot(&self) -> Snapshot {
        let o = self.overlay.lock();
        Snapshot { batches: o.batches.iter().cloned().collect(), indexed: o.indexed, covered_below: o.covered_below }
    }

    /// Waits while the overlay is full, so memory stays bounded when commits outrun index writes.
    pub(super) async fn room(&self) {
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if self.overlay.lock().txs < OVERLAY_CAP || self.stopped.load(Ordering::Acquire) {
                return;
            }
            metrics::counter!("kalima_store_index_waits_total").increment(1);
            written.await;
        }
    }

    /// Hands the index rows of a durable commit to the writer; reads see them from now on.
    pub(super) fn push(&self, batch: IndexBatch) {
        if batch.txs() == 0 {
            return;
        }
        {
            let mut o = self.overlay.lock();
            let top_seq = batch.ids.iter().map(|r| to_u64(r[1]) + 1).max().unwrap_or(0);
            o.covered_below = o.covered_below.max(top_seq);
            o.txs += batch.txs();
            o.batches.push_back(Arc::new(batch));
            metrics::gauge!("kalima_store_index_lag_transactions").set(o.txs as f64);
        }
        self.wake.notify_one();
    }

    /// Waits until every pushed row is in the tables (or the writer stopped).
    pub(super) async fn flush(&self) {
        self.hurry.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
        let _done = scopeguard::guard((), |()| {
            self.hurry.fetch_sub(1, Ordering::AcqRel);
        });
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if self.overlay.lock().txs == 0 || self.stopped.load(Ordering::Acquire) {
                return;
            }
            written.await;
        }
    }

    /// Copies the index file's WAL into it and syncs both (SQLite). The file is written
    /// without syncs, so its pages may otherwise be written back later, while commits sync.
    pub(super) async fn checkpoint(&self) -> Result<()> {
        if let Pool::Sqlite(p) = &self.writer {
            sqlx::raw_sql(SYNC_FILE).execute(p).await?;
            sqlx::raw_sql("PRAGMA synchronous = OFF;").execute(p).await?;
        }
        Ok(())
    }

    /// Stops the writer after it has written everything pushed (or failed three times in a
    /// row: the rows are indexed again from the bodies at the next open).
    pub(super) async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.flush().await;
        if let Pool::Sqlite(p) = &self.writer {
            let sql = format!("{SYNC_FILE} UPDATE index_state SET open_on_boot = NULL WHERE id = 0;");
            let sealed = sqlx::raw_sql(&sql).execute(p).await;
            if let Err(e) = sealed {
                tracing::warn!(target: "core::store", error = %e, "Index file not closed cleanly; it is rebuilt if the machine restarts first.");
            }
        }
    }

    /// Runs the writer until the store closes. A failed write is retried: the rows stay in
    /// the overlay (and readable) meanwhile.
    pub(super) fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            let mut lingered_since: Option<tokio::time::Instant> = None;
            loop {
                let wake = me.wake.notified();
                tokio::pin!(wake);
                wake.as_mut().enable();
                let batch: Vec<Arc<IndexBatch>> = {
                    let o = me.overlay.lock();
                    let mut n = 0;
                    o.batches
                        .iter()
                        .take_while(|b| {
                            let take = n == 0 || n + b.txs() <= WRITE_MAX;
                            n += b.txs();
                            take
                        })
                        .cloned()
                        .collect()
                };
                if batch.is_empty() {
                    if me.closing.load(Ordering::Acquire) {
                        break;
                    }
                    wake.await;
                    lingered_since.get_or_insert_with(tokio::time::Instant::now);
                    continue;
                }
                let pending: usize = batch.iter().map(|b| b.txs()).sum();
                let since = *lingered_since.get_or_insert_with(tokio::time::Instant::now);
                if pending < MIN_WRITE
                    && me.hurry.load(Ordering::Acquire) == 0
                    && !me.closing.load(Ordering::Acquire)
                    && since.elapsed() < LINGER
                {
                    let _ = tokio::time::timeout_at(since + LINGER, wake).await;
                    continue;
                }
                lingered_since = None;
                let started = std::time::Instant::now();
                match me.write(&batch).await {
                    Ok(()) => {
                        failures = 0;
                        metrics::histogram!("kalima_store_index_write_seconds").record(started.elapsed().as_secs_f64());
                        let mut o = me.overlay.lock();
                        for b in &batch {
                            if o.batches.front().is_some_and(|f| Arc::ptr_eq(f, b)) {
                                o.batches.pop_front();
                                o.txs -= b.txs();
                                o.indexed = b.top.0 + 1;
                            }
                        }
                        metrics::gauge!("kalima_store_index_lag_transactions").set(o.txs as f64);
                    }
                    Err(e) => {
                        failures += 1;
                        metrics::counter!("kalima_store_index_write_failures_total").increment(1);
                        tracing::warn!(target: "core::store", error = %e, attempt = failures, "Index write failed; retrying.");
                        if me.closing.load(Ordering::Acquire) && failures >= 3 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(25)))).await;
                    }
                }
                me.written.notify_waiters();
            }
            me.stopped.store(true, Ordering::Release);
            me.written.notify_waiters();
        });
    }

    /// Writes `batches` (in order) and moves the watermark past the last one, in one
    /// transaction.
    pub(super) async fn write(&self, batches: &[Arc<IndexBatch>]) -> Result<()> {
        let Some(last) = batches.last() else { return Ok(()) };
        let mut rows = IndexBatch { top: last.top, ..Default::default() };
        for b in batches {
            rows.ids.extend_from_slice(&b.ids);
            rows.streams.extend_from_slice(&b.streams);
            rows.addresses.extend_from_slice(&b.addresses);
            rows.idempotency.extend_from_slice(&b.idempotency);
        }
        // Key order keeps each B-tree page hot while its rows go in.
        rows.sort();
        on_pool!(&self.writer, |pool| {
            // Idempotent: another process opening the same store (`kalima verify` beside a
            // running node) may index the same blocks.
            let mut dbtx = pool.begin().await?;
            insert_rows!(
                dbtx,
                "tx_ids",
                "h, global_seq, height",
                rows.ids,
                |b, r| { b.push_bind(r[0]).push_bind(r[1]).push_bind(r[2]) },
                " ON CONFLICT DO NOTHING"
            );
            insert_rows!(
                dbtx,
                "tx_by_stream",
                "stream, global_seq, height",
                rows.streams,
                |b, r| { b.push_bind(r[0]).push_bind(r[1]).push_bind(r[2]) },
                " ON CONFLICT DO NOTHING"
            );
            insert_rows!(
                dbtx,
                "tx_by_address",
                "address, seq, global_seq, height",
                rows.addresses,
                |b, r| { b.push_bind(r[0]).push_bind(r[1]).push_bind(r[2]).push_bind(r[3]) },
                " ON CONFLICT DO NOTHING"
            );
            insert_rows!(
                dbtx,
                "tx_idempotency",
                "h, global_seq, height",
                rows.idempotency,
                |b, r| { b.push_bind(r[0]).push_bind(r[1]).push_bind(r[2]) },
                " ON CONFLICT DO NOTHING"
            );
            sqlx::query("UPDATE index_state SET height = $1, block_hash = $2 WHERE id = 0 AND height < $1")
                .bind(to_i64(rows.top.0 + 1))
                .bind(rows.top.1.to_vec())
                .execute(&mut *dbtx)
                .await?;
            dbtx.commit().await?;
        });
        Ok(())
    }

    /// The stored watermark: blocks below `height` are indexed, the hash of the last of them,
    /// and the salt check.
    async fn state(&self) -> Result<(u64, Option<Vec<u8>>, Option<Vec<u8>>)> {
        on_pool!(&self.writer, |p| {
            let r =
                sqlx::query("SELECT height, block_hash, salt_check FROM index_state WHERE id = 0").fetch_one(p).await?;
            Ok((to_u64(r.try_get(0)?), r.try_get(1)?, r.try_get(2)?))
        })
    }
}

/// This boot of the machine (Linux); `None` where it cannot be read, which makes any
/// unclean close look like a restart.
fn boot_id() -> Option<Vec<u8>> {
    std::fs::read("/proc/sys/kernel/random/boot_id").ok().filter(|b| !b.is_empty())
}

/// What ties an index to its store's salt, without revealing the salt.
fn salt_check(salt: &[u8; 32]) -> Vec<u8> {
    Sha256::new_with_prefix(b"kalima index salt check").chain_update(salt).finalize().to_vec()
}

impl Store {
    /// Checks the index against the chain and brings it up to the chain's head, rebuilding it
    /// from the bodies where it is behind, and from scratch where it names a block the chain
    /// does not hold or another store's salt. Runs once, on open, before any read.
    pub(super) async fn open_index(&self) -> Result<()> {
        let check = salt_check(self.index.salt());
        // `height` and `end` count blocks: those below are indexed, or stored.
        let (mut height, hash, salt) = self.indexer.state().await?;
        let end = self.latest_block().await?.map_or(0, |b| b.header.height + 1);
        let foreign_salt = salt.as_ref().is_some_and(|s| *s != check);
        let off_chain = match height.checked_sub(1) {
            None => false,
            Some(last) => match (self.block(last).await?, &hash) {
                (Some(b), Some(h)) => b.hash.as_slice() != h.as_slice(),
                _ => true,
            },
        };
        let torn = match &self.indexer.writer {
            Pool::Sqlite(p) => {
                let mark: Option<Vec<u8>> =
                    sqlx::query_scalar("SELECT open_on_boot FROM index_state WHERE id = 0").fetch_one(p).await?;
                let torn = mark.is_some_and(|m| Some(m) != boot_id());
                sqlx::query("UPDATE index_state SET open_on_boot = $1 WHERE id = 0")
                    .bind(boot_id().unwrap_or_default())
                    .execute(p)
                    .await?;
                torn
            }
            Pool::Postgres(_) => false,
        };
        if foreign_salt || off_chain || torn || height > end {
            let Pool::Sqlite(p) = &self.indexer.writer else {
                return Err(Error::Corrupt {
                    height,
                    reason: "the lookup indexes name a block this chain does not hold".into(),
                });
            };
            tracing::warn!(
                target: "core::store",
                indexed = height,
                blocks = end,
                torn,
                "The index file does not match this chain, or was open when the machine stopped; rebuilding it."
            );
            sqlx::raw_sql(SQLITE_INDEX_DROP).execute(p).await?;
            sqlx::raw_sql(SQLITE_INDEX_SCHEMA).execute(p).await?;
            sqlx::query("UPDATE index_state SET open_on_boot = $1 WHERE id = 0")
                .bind(boot_id().unwrap_or_default())
                .execute(p)
                .await?;
            height = 0;
        }
        if salt.is_none() || foreign_salt || off_chain {
            on_pool!(&self.indexer.writer, |p| {
                sqlx::query("UPDATE index_state SET salt_check = $1 WHERE id = 0").bind(check).execute(p).await?;
            });
        }
        if height < end {
            let started = std::time::Instant::now();
            tracing::info!(target: "core::store", indexed = height, blocks = end, "Indexing blocks written since the index was last saved.");
            let mut next = height;
            let mut batch = IndexBatch::default();
            let mut done = 0u64;
            while next < end {
                let bodies = self.raw_bodies(next, 1000).await?;
                let Some(last) = bodies.last() else { break };
                next = last.height + 1;
                for raw in &bodies {
                    if raw.height >= end {
                        break;
                    }
                    for c in self.open_body(raw)? {
                        batch.add(self.index_rows(&c));
                    }
                    batch.top.0 = raw.height;
                    if batch.txs() >= REBUILD_BATCH {
                        done += self.write_rebuilt(std::mem::take(&mut batch)).await?;
                    }
                }
            }
            done += self.write_rebuilt(batch).await?;
            tracing::info!(target: "core::store", transactions = done, elapsed_ms = started.elapsed().as_millis() as u64, "Index up to date.");
        }
        let (indexed, _, _) = self.indexer.state().await?;
        let covered = self.latest_block().await?.map_or(0, |b| b.header.tree_size);
        let mut o = self.indexer.overlay.lock();
        o.indexed = indexed;
        o.covered_below = covered;
        Ok(())
    }

    async fn write_rebuilt(&self, mut batch: IndexBatch) -> Result<u64> {
        if batch.txs() == 0 {
            return Ok(0);
        }
        let block = self
            .block(batch.top.0)
            .await?
            .ok_or_else(|| Error::Corrupt { height: batch.top.0, reason: "a stored body has no block".into() })?;
        batch.top.1 = block.hash;
        let n = batch.txs() as u64;
        self.indexer.write(&[Arc::new(batch)]).await?;
        Ok(n)
    }

    /// Transactions committed but not yet in the index tables (they are read from memory).
    pub fn index_lag(&self) -> usize {
        self.indexer.overlay.lock().txs
    }

    /// Waits until every committed transaction is in the index tables.
    pub async fn flush_index(&self) {
        self.indexer.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_of(
        ids: Vec<[i64; 3]>,
        streams: Vec<[i64; 3]>,
        addresses: Vec<[i64; 4]>,
        idempotency: Vec<[i64; 3]>,
        top: (u64, Hash),
    ) -> IndexBatch {
        let mut b = IndexBatch { ids, streams, addresses, idempotency, top };
        b.sort();
        b
    }

    #[test]
    fn overlay_queries_find_rows_by_key_across_batches() {
        let a = batch_of(
            vec![[5, 1, 1], [9, 2, 1]],
            vec![[7, 1, 1], [7, 2, 1]],
            vec![[3, 1, 1, 1], [3, 2, 2, 1]],
            vec![],
            (1, [0; 32]),
        );
        let b = batch_of(vec![[5, 3, 2]], vec![[7, 3, 2]], vec![[3, 3, 3, 2]], vec![[11, 3, 2]], (2, [0; 32]));
        let s = Snapshot { batches: vec![Arc::new(a), Arc::new(b)], indexed: 0, covered_below: 4 };
        assert_eq!(s.ids(5), vec![(1, 1), (3, 2)]);
        assert!(s.ids(6).is_empty());
        assert_eq!(s.stream_before(7, 3), vec![(1, 1), (2, 1)]);
        assert_eq!(s.address_between(3, 1, 4), vec![[2, 1, 2], [3, 2, 3]]);
        assert_eq!(s.idempotency(11), vec![(3, 2)]);
        assert_eq!(s.latest_per_stream().get(&7), Some(&(3, 2)));
        assert_eq!(s.in_flight(), Some(0..=2));
    }
}
