//! Storage of the chain with sqlx: SQLite (WAL) embedded by default, PostgreSQL by URL.
//! Migrations are embedded in the binary. Transactions are sealed with the data key ring
//! before they reach the database; each commit writes many blocks in one database
//! transaction (one fsync), and nothing here ever updates or deletes a chain row.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, QueryBuilder, Row, SqlitePool};

use crate::block::BlockHeader;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::keys::DataKeys;
use crate::merkle::Hash;
use crate::tx::Transaction;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Rows per multi-row INSERT: well under both backends' bind-parameter limits.
const INSERT_CHUNK: usize = 1000;

/// A committed transaction with where it landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedTx {
    /// The transaction.
    pub tx: Transaction,
    /// Its id (leaf hash).
    pub id: Hash,
    /// Height of the block holding it.
    pub height: u64,
}

/// A block header and its hash as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRecord {
    /// The header.
    pub header: BlockHeader,
    /// SHA-256 of the canonical header.
    pub hash: Hash,
}

/// A block row exactly as stored, for verification.
#[derive(Debug, Clone)]
pub struct RawBlock {
    /// Height column.
    pub height: u64,
    /// Hash column.
    pub hash: Vec<u8>,
    /// Canonical header bytes.
    pub header: Vec<u8>,
    /// Timestamp column.
    pub timestamp_ms: i64,
    /// Tree size column.
    pub tree_size: u64,
    /// Transaction count column.
    pub tx_count: u64,
}

/// A transaction row exactly as stored, for verification.
#[derive(Debug, Clone)]
pub struct RawTx {
    /// Global sequence column.
    pub global_seq: u64,
    /// Height column.
    pub height: u64,
    /// Leaf hash column.
    pub hash: Vec<u8>,
    /// Per-address sequence column.
    pub seq: u64,
    /// The plaintext index columns joined as `address|key|device|idempotency key` (`|` is not
    /// allowed in the first three; the idempotency key comes last and may hold anything).
    pub index_text: String,
    /// Data key id column.
    pub key_id: u32,
    /// Nonce and ciphertext of the canonical bytes.
    pub sealed: Vec<u8>,
}

/// Columns read into a [`Checkpoint`].
const CHECKPOINT_COLUMNS: &str = "tree_size, height, timestamp_ms, root, signer, signature";

/// Columns read into a [`RawTx`].
// One joined text value instead of four: decoding each value through sqlx is what verification
// spends its time on.
const TX_COLUMNS: &str = "global_seq, height, hash, seq, key_id, sealed, \
    address || '|' || tx_key || '|' || device_id || '|' || COALESCE(idem_key, '') AS index_text";

/// Builds a [`RawTx`] from a row of either backend.
macro_rules! raw_tx {
    ($r:expr) => {
        // Positional, in TX_COLUMNS order: a lookup by name costs a map search per value.
        RawTx {
            global_seq: to_u64($r.try_get(0)?),
            height: to_u64($r.try_get(1)?),
            hash: $r.try_get(2)?,
            seq: to_u64($r.try_get(3)?),
            key_id: u32::try_from($r.try_get::<i64, _>(4)?).unwrap_or(u32::MAX),
            sealed: $r.try_get(5)?,
            index_text: $r.try_get(6)?,
        }
    };
}

/// A transaction ready to be written: its canonical bytes were already computed to hash it.
#[derive(Debug, Clone)]
pub struct PendingTx {
    /// The committed form (shared with memcache and bus after the write).
    pub committed: Arc<CommittedTx>,
    /// Canonical bytes.
    pub bytes: Vec<u8>,
}

/// Which backend a URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file.
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same sqlx code on whichever pool is configured (both arms compile separately).
macro_rules! on_pool {
    ($target:expr, |$pool:ident| $body:expr) => {
        match $target {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
}

/// The chain store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    // SQLite: one dedicated writer connection whose page cache stays warm across commits
    // (the read pool's connections each have their own cache).
    writer: Option<SqlitePool>,
    keys: Arc<DataKeys>,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_hash(v: &[u8]) -> Result<Hash> {
    v.try_into().map_err(|_| Error::Crypto(format!("stored hash has {} bytes", v.len())))
}

fn aad(global_seq: u64, key_id: u32) -> [u8; 12] {
    let mut a = [0u8; 12];
    a[..8].copy_from_slice(&global_seq.to_be_bytes());
    a[8..].copy_from_slice(&key_id.to_be_bytes());
    a
}

impl Store {
    /// Opens (creating if needed) the store at `url` and applies pending migrations.
    pub async fn connect(url: &str, keys: Arc<DataKeys>) -> Result<Self> {
        let mut writer = None;
        let pool = match backend_of(url)? {
            Backend::Sqlite => {
                let opts = SqliteConnectOptions::from_str(url)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // FULL: a commit is on disk before we acknowledge it (invariant 1).
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(10))
                    .pragma("cache_size", "-65536")
                    .pragma("temp_store", "memory")
                    // Checkpoints run in the background (below), not inside a commit.
                    .pragma("wal_autocheckpoint", "0")
                    .pragma("mmap_size", "268435456");
                if let Some(parent) = std::path::Path::new(opts.get_filename()).parent() {
                    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts.clone()).await?;
                SQLITE_MIGRATIONS.run(&pool).await?;
                spawn_wal_checkpointer(pool.clone());
                writer = Some(SqlitePoolOptions::new().max_connections(1).min_connections(1).connect_with(opts).await?);
                Pool::Sqlite(pool)
            }
            Backend::Postgres => {
                let opts = PgConnectOptions::from_str(url)?;
                let pool = PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(opts)
                    .await?;
                POSTGRES_MIGRATIONS.run(&pool).await?;
                Pool::Postgres(pool)
            }
        };
        Ok(Self { pool, writer, keys })
    }

    fn write_pool(&self) -> Pool {
        match (&self.pool, &self.writer) {
            (Pool::Sqlite(_), Some(w)) => Pool::Sqlite(w.clone()),
            (p, _) => p.clone(),
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// The data key ring.
    pub fn keys(&self) -> &Arc<DataKeys> {
        &self.keys
    }

    /// Closes the pool, waiting for in-flight queries.
    pub async fn close(&self) {
        if let Some(w) = &self.writer {
            w.close().await;
        }
        on_pool!(&self.pool, |p| p.close().await)
    }

    /// Writes blocks and their transactions in one database transaction (one durable commit).
    pub async fn append(&self, blocks: &[BlockRecord], txs: &[PendingTx]) -> Result<()> {
        // Seal before opening the database transaction so the write lock is held briefly.
        let mut sealed = Vec::with_capacity(txs.len());
        for p in txs {
            let seq = p.committed.tx.global_sequence;
            let (key_id, s) = self.keys.seal(&p.bytes, &aad(seq, self.keys.active_id()))?;
            sealed.push((key_id, s));
        }
        on_pool!(&self.write_pool(), |pool| {
            let mut dbtx = pool.begin().await?;
            for chunk in blocks.chunks(INSERT_CHUNK) {
                let mut qb =
                    QueryBuilder::new("INSERT INTO blocks (height, hash, header, timestamp_ms, tree_size, tx_count) ");
                qb.push_values(chunk, |mut b, r| {
                    b.push_bind(to_i64(r.header.height))
                        .push_bind(r.hash.to_vec())
                        .push_bind(r.header.encode())
                        .push_bind(r.header.timestamp_ms)
                        .push_bind(to_i64(r.header.tree_size))
                        .push_bind(i64::from(r.header.tx_count));
                });
                qb.build().execute(&mut *dbtx).await?;
            }
            for (chunk, sealed) in txs.chunks(INSERT_CHUNK).zip(sealed.chunks(INSERT_CHUNK)) {
                let mut qb = QueryBuilder::new(
                    "INSERT INTO txs (global_seq, height, hash, address, tx_key, seq, device_id, idem_key, key_id, sealed) ",
                );
                qb.push_values(chunk.iter().zip(sealed), |mut b, (p, (key_id, s))| {
                    let c = &p.committed;
                    let idem = (!c.tx.content.idempotency_key.is_empty()).then(|| c.tx.content.idempotency_key.clone());
                    b.push_bind(to_i64(c.tx.global_sequence))
                        .push_bind(to_i64(c.height))
                        .push_bind(c.id.to_vec())
                        .push_bind(c.tx.content.address.clone())
                        .push_bind(c.tx.content.key.clone())
                        .push_bind(to_i64(c.tx.sequence))
                        .push_bind(c.tx.content.device_id.clone())
                        .push_bind(idem)
                        .push_bind(i64::from(*key_id))
                        .push_bind(s.clone());
                });
                qb.build().execute(&mut *dbtx).await?;
            }
            dbtx.commit().await?;
            Ok(())
        })
    }

    /// The highest block, if any.
    pub async fn latest_block(&self) -> Result<Option<BlockRecord>> {
        let row: Option<Vec<u8>> = on_pool!(&self.pool, |p| {
            sqlx::query_scalar("SELECT header FROM blocks ORDER BY height DESC LIMIT 1").fetch_optional(p).await?
        });
        row.map(|h| record_of(&h)).transpose()
    }

    /// The block at `height`.
    pub async fn block(&self, height: u64) -> Result<Option<BlockRecord>> {
        let row: Option<Vec<u8>> = on_pool!(&self.pool, |p| {
            sqlx::query_scalar("SELECT header FROM blocks WHERE height = $1")
                .bind(to_i64(height))
                .fetch_optional(p)
                .await?
        });
        row.map(|h| record_of(&h)).transpose()
    }

    /// Up to `limit` blocks at or below `below_or_at`, newest first.
    pub async fn blocks_desc(&self, below_or_at: u64, limit: u32) -> Result<Vec<BlockRecord>> {
        let rows: Vec<Vec<u8>> = on_pool!(&self.pool, |p| {
            sqlx::query_scalar("SELECT header FROM blocks WHERE height <= $1 ORDER BY height DESC LIMIT $2")
                .bind(to_i64(below_or_at))
                .bind(i64::from(limit))
                .fetch_all(p)
                .await?
        });
        rows.iter().map(|h| record_of(h)).collect()
    }

    /// The highest block row exactly as stored (not decoded), for verification snapshots.
    pub async fn latest_raw_block(&self) -> Result<Option<RawBlock>> {
        let max: Option<i64> =
            on_pool!(&self.pool, |p| sqlx::query_scalar("SELECT MAX(height) FROM blocks").fetch_one(p).await?);
        match max {
            Some(h) => Ok(self.raw_blocks(to_u64(h), 1).await?.into_iter().next()),
            None => Ok(None),
        }
    }

    /// Raw block rows with height in `[from, from + limit)`, for verification.
    pub async fn raw_blocks(&self, from: u64, limit: u32) -> Result<Vec<RawBlock>> {
        on_pool!(&self.pool, |p| {
            let rows =
                sqlx::query("SELECT height, hash, header, timestamp_ms, tree_size, tx_count FROM blocks WHERE height >= $1 ORDER BY height LIMIT $2")
                    .bind(to_i64(from))
                    .bind(i64::from(limit))
                    .fetch_all(p)
                    .await?;
            rows.iter()
                .map(|r| {
                    Ok(RawBlock {
                        height: to_u64(r.try_get("height")?),
                        hash: r.try_get("hash")?,
                        header: r.try_get("header")?,
                        timestamp_ms: r.try_get("timestamp_ms")?,
                        tree_size: to_u64(r.try_get("tree_size")?),
                        tx_count: to_u64(r.try_get("tx_count")?),
                    })
                })
                .collect()
        })
    }

    /// Raw transaction rows with global sequence in `[from, to)`, for verification.
    pub async fn raw_txs(&self, from: u64, to: u64) -> Result<Vec<RawTx>> {
        self.select_raw(
            "WHERE global_seq >= $1 AND global_seq < $2 ORDER BY global_seq",
            Binds { ints: &[to_i64(from), to_i64(to)], ..Default::default() },
        )
        .await
    }

    /// Decrypts and decodes a raw row, checking it against its stored hash.
    pub fn open_raw(&self, raw: &RawTx) -> Result<CommittedTx> {
        let bytes = self.keys.open(raw.key_id, &raw.sealed, &aad(raw.global_seq, raw.key_id))?;
        let tx = Transaction::decode(&bytes)?;
        let id = crate::merkle::leaf_hash(&bytes);
        let c = &tx.content;
        // The plaintext columns feed indexes and grant checks: they must say what the sealed,
        // hashed transaction says.
        let mut cols = raw.index_text.splitn(4, '|');
        let columns_match = cols.next() == Some(c.address.as_str())
            && cols.next() == Some(c.key.as_str())
            && cols.next() == Some(c.device_id.as_str())
            && cols.next() == Some(c.idempotency_key.as_str());
        if id.as_slice() != raw.hash.as_slice()
            || tx.global_sequence != raw.global_seq
            || tx.sequence != raw.seq
            || !columns_match
        {
            return Err(Error::Corrupt {
                height: raw.height,
                reason: format!("transaction {} does not match its row", raw.global_seq),
            });
        }
        Ok(CommittedTx { tx, id, height: raw.height })
    }

    async fn select_raw(&self, where_sql: &str, binds: Binds<'_>) -> Result<Vec<RawTx>> {
        let sql = format!("SELECT {TX_COLUMNS} FROM txs {where_sql}");
        on_pool!(&self.pool, |p| {
            let mut q = sqlx::query(&sql);
            for b in binds.ints {
                q = q.bind(*b);
            }
            for s in binds.strs {
                q = q.bind(*s);
            }
            if let Some(h) = binds.blob {
                q = q.bind(h.to_vec());
            }
            let rows = q.fetch_all(p).await?;
            rows.iter().map(|r| Ok::<_, Error>(raw_tx!(r))).collect::<Result<_>>()
        })
    }

    async fn select_txs(&self, where_sql: &str, binds: Binds<'_>) -> Result<Vec<CommittedTx>> {
        let raws = self.select_raw(where_sql, binds).await?;
        raws.iter().map(|r| self.open_raw(r)).collect()
    }

    /// The transaction with id `id`.
    pub async fn tx_by_id(&self, id: &Hash) -> Result<Option<CommittedTx>> {
        let v = self.select_txs("WHERE hash = $1", Binds { blob: Some(id), ..Default::default() }).await?;
        Ok(v.into_iter().next())
    }

    /// The transaction at global sequence `seq`.
    pub async fn tx_by_sequence(&self, seq: u64) -> Result<Option<CommittedTx>> {
        let v = self.select_txs("WHERE global_seq = $1", Binds { ints: &[to_i64(seq)], ..Default::default() }).await?;
        Ok(v.into_iter().next())
    }

    /// Transactions with global sequence in `[from, to)`, ascending, at most `limit`.
    pub async fn txs_between(&self, from: u64, to: u64, limit: u32) -> Result<Vec<CommittedTx>> {
        self.select_txs(
            "WHERE global_seq >= $1 AND global_seq < $2 ORDER BY global_seq LIMIT $3",
            Binds { ints: &[to_i64(from), to_i64(to), i64::from(limit)], ..Default::default() },
        )
        .await
    }

    /// History of one address and key, newest first, strictly below `before` (global sequence).
    pub async fn history(&self, address: &str, key: &str, before: u64, limit: u32) -> Result<Vec<CommittedTx>> {
        self.select_txs(
            "WHERE global_seq < $1 AND address = $3 AND tx_key = $4 ORDER BY global_seq DESC LIMIT $2",
            Binds { ints: &[to_i64(before), i64::from(limit)], strs: &[address, key], ..Default::default() },
        )
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
        let order = if descending { "DESC" } else { "ASC" };
        self.select_txs(
            &format!("WHERE seq > $1 AND seq < $2 AND address = $4 ORDER BY seq {order} LIMIT $3"),
            Binds { ints: &[to_i64(after), to_i64(before), i64::from(limit)], strs: &[address], ..Default::default() },
        )
        .await
    }

    /// Leaf hashes with global sequence in `[from, to)`, ascending.
    pub async fn leaf_hashes(&self, from: u64, to: u64) -> Result<Vec<Hash>> {
        let rows: Vec<Vec<u8>> = on_pool!(&self.pool, |p| {
            sqlx::query_scalar("SELECT hash FROM txs WHERE global_seq >= $1 AND global_seq < $2 ORDER BY global_seq")
                .bind(to_i64(from))
                .bind(to_i64(to))
                .fetch_all(p)
                .await?
        });
        rows.iter().map(|h| to_hash(h)).collect()
    }

    /// The latest transaction of every (address, key), for restoring the memcache.
    pub async fn latest_per_key(&self) -> Result<Vec<CommittedTx>> {
        self.select_txs(
            "WHERE global_seq IN (SELECT MAX(global_seq) FROM txs GROUP BY address, tx_key) ORDER BY global_seq",
            Binds::default(),
        )
        .await
    }

    /// Highest per-address sequence of every address.
    pub async fn address_sequences(&self) -> Result<Vec<(String, u64)>> {
        on_pool!(&self.pool, |p| {
            let rows = sqlx::query("SELECT address, MAX(seq) AS s FROM txs GROUP BY address").fetch_all(p).await?;
            rows.iter().map(|r| Ok((r.try_get("address")?, to_u64(r.try_get("s")?)))).collect()
        })
    }

    /// The `limit` most recent (device, idempotency key, transaction id), newest first.
    pub async fn recent_idempotency_keys(&self, limit: u64) -> Result<Vec<(String, String, Hash)>> {
        on_pool!(&self.pool, |p| {
            let rows = sqlx::query(
                "SELECT device_id, idem_key, hash FROM txs WHERE idem_key IS NOT NULL ORDER BY global_seq DESC LIMIT $1",
            )
            .bind(to_i64(limit))
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    let h: Vec<u8> = r.try_get("hash")?;
                    Ok((r.try_get("device_id")?, r.try_get("idem_key")?, to_hash(&h)?))
                })
                .collect()
        })
    }

    /// Which of `keys` `device` already used, with the transaction that used each (one query
    /// per 500 keys, through the unique index).
    pub async fn idempotency_lookup(&self, device: &str, keys: &[&str]) -> Result<Vec<(String, Hash)>> {
        let mut found = Vec::new();
        for chunk in keys.chunks(500) {
            let rows: Vec<(String, Vec<u8>)> = on_pool!(&self.pool, |p| {
                let mut qb = QueryBuilder::new("SELECT idem_key, hash FROM txs WHERE device_id = ");
                qb.push_bind(device).push(" AND idem_key IN (");
                let mut list = qb.separated(", ");
                for k in chunk {
                    list.push_bind(*k);
                }
                qb.push(")");
                let rows = qb.build().fetch_all(p).await?;
                rows.iter()
                    .map(|r| Ok::<_, Error>((r.try_get("idem_key")?, r.try_get("hash")?)))
                    .collect::<Result<_>>()?
            });
            for (k, h) in rows {
                found.push((k, to_hash(&h)?));
            }
        }
        Ok(found)
    }

    /// Number of transaction rows.
    pub async fn tx_count(&self) -> Result<u64> {
        let n: i64 = on_pool!(&self.pool, |p| sqlx::query_scalar("SELECT COUNT(*) FROM txs").fetch_one(p).await?);
        Ok(to_u64(n))
    }

    /// Stores a signed checkpoint (ignored when one for the same tree size exists).
    pub async fn insert_checkpoint(&self, cp: &Checkpoint) -> Result<()> {
        on_pool!(&self.pool, |p| {
            sqlx::query(
                "INSERT INTO checkpoints (tree_size, height, timestamp_ms, root, signer, signature) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tree_size) DO NOTHING",
            )
            .bind(to_i64(cp.tree_size))
            .bind(to_i64(cp.height))
            .bind(cp.timestamp_ms)
            .bind(cp.root.to_vec())
            .bind(cp.signer.clone())
            .bind(cp.signature.to_vec())
            .execute(p)
            .await?;
            Ok(())
        })
    }

    /// The checkpoint with the largest tree size.
    pub async fn latest_checkpoint(&self, chain: &str) -> Result<Option<Checkpoint>> {
        on_pool!(&self.pool, |p| {
            let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY tree_size DESC LIMIT 1");
            let row = sqlx::query(&sql).fetch_optional(p).await?;
            row.map(|r| checkpoint_of(chain, &r)).transpose()
        })
    }

    /// All checkpoints in ascending tree size from `from`, at most `limit`.
    pub async fn checkpoints_from(&self, chain: &str, from: u64, limit: u32) -> Result<Vec<Checkpoint>> {
        let sql = "WHERE tree_size >= $1 ORDER BY tree_size LIMIT $2";
        on_pool!(&self.pool, |p| {
            let rows = sqlx::query(&format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints {sql}"))
                .bind(to_i64(from))
                .bind(i64::from(limit))
                .fetch_all(p)
                .await?;
            rows.iter().map(|r| checkpoint_of(chain, r)).collect()
        })
    }

    /// Runs arbitrary SQL; only for tests that tamper with storage on purpose.
    #[cfg(any(test, feature = "test-utils"))]
    pub async fn execute_raw(&self, sql: &str) -> Result<u64> {
        on_pool!(&self.pool, |p| Ok(sqlx::raw_sql(sql).execute(p).await?.rows_affected()))
    }
}

/// Copies committed WAL frames into the database file off the commit path. PASSIVE never
/// blocks the writer; the WAL restarts from its beginning once fully checkpointed.
fn spawn_wal_checkpointer(pool: SqlitePool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            let started = std::time::Instant::now();
            match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                Ok(_) => metrics::histogram!("kalima_store_checkpoint_seconds").record(started.elapsed().as_secs_f64()),
                Err(e) if pool.is_closed() => {
                    tracing::debug!(target: "core::store", error = %e, "WAL checkpointer stopped.");
                    return;
                }
                Err(e) => tracing::warn!(target: "core::store", error = %e, "WAL checkpoint failed."),
            }
        }
    });
}

#[derive(Default)]
struct Binds<'a> {
    ints: &'a [i64],
    strs: &'a [&'a str],
    blob: Option<&'a Hash>,
}

fn record_of(header: &[u8]) -> Result<BlockRecord> {
    let header = BlockHeader::decode(header)?;
    let hash = header.hash();
    Ok(BlockRecord { header, hash })
}

fn checkpoint_of<R: Row>(chain: &str, r: &R) -> Result<Checkpoint>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    i64: for<'d> sqlx::Decode<'d, R::Database> + sqlx::Type<R::Database>,
    String: for<'d> sqlx::Decode<'d, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: for<'d> sqlx::Decode<'d, R::Database> + sqlx::Type<R::Database>,
{
    let root: Vec<u8> = r.try_get("root")?;
    let sig: Vec<u8> = r.try_get("signature")?;
    Ok(Checkpoint {
        chain: chain.to_string(),
        tree_size: to_u64(r.try_get("tree_size")?),
        height: to_u64(r.try_get("height")?),
        timestamp_ms: r.try_get("timestamp_ms")?,
        root: to_hash(&root)?,
        signer: r.try_get("signer")?,
        signature: sig.as_slice().try_into().map_err(|_| Error::Crypto("stored signature is not 64 bytes".into()))?,
    })
}

/// Which backend `url` names, or a clear error.
pub fn backend_of(url: &str) -> Result<Backend> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        Err(Error::Config(format!("[storage] url {url:?} must start with sqlite:// or postgres://")))
    }
}
