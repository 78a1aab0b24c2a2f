//! Storage of the chain with sqlx: SQLite (WAL) embedded by default, PostgreSQL by URL.
//! Migrations are embedded in the binary. Each block's transactions are packed and sealed
//! with the data key ring into one row, so a group commit writes one row per block in one
//! database transaction (one fsync); the lookup index rows follow behind (`indexer`).
//! Nothing here ever updates or deletes a chain row.

mod digest;
pub mod packed;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, PgPool, QueryBuilder, Row, SqliteConnection, SqlitePool};

use crate::block::BlockHeader;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::keys::DataKeys;
use crate::merkle::{Hash, leaf_hash};
use crate::tx::Transaction;

pub use digest::{INDEX_TABLES, IndexDigest, TableDigest};
use packed::{IndexKeys, pack, prefix_i64, unpack};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Rows per multi-row INSERT: well under both backends' bind-parameter limits.
const INSERT_CHUNK: usize = 1000;
/// Values per `IN (...)` list.
const IN_CHUNK: usize = 500;

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

/// A block's packed transactions exactly as stored.
#[derive(Debug, Clone)]
pub struct RawBody {
    /// Height column.
    pub height: u64,
    /// Global sequence of the first transaction.
    pub first_seq: u64,
    /// Data key id column.
    pub key_id: u32,
    /// Leaf hashes, 32 bytes each.
    pub leaves: Vec<u8>,
    /// Nonce and ciphertext of the packed canonical bytes.
    pub sealed: Vec<u8>,
}

impl RawBody {
    /// Stored bytes of the row.
    pub fn stored_len(&self) -> usize {
        self.leaves.len() + self.sealed.len() + 20
    }
}

/// Index rows per round trip when digesting an index table.
const DIGEST_PAGE: usize = 65_536;

/// Columns read into a [`Checkpoint`].
const CHECKPOINT_COLUMNS: &str = "tree_size, height, timestamp_ms, root, signer, signature";

/// Columns read into a [`RawBody`].
const BODY_COLUMNS: &str = "height, first_seq, key_id, leaves, sealed";

/// Builds a [`RawBody`] from a row of either backend, in BODY_COLUMNS order.
macro_rules! raw_body {
    ($r:expr) => {
        RawBody {
            height: to_u64($r.try_get(0)?),
            first_seq: to_u64($r.try_get(1)?),
            key_id: u32::try_from($r.try_get::<i64, _>(2)?).unwrap_or(u32::MAX),
            leaves: $r.try_get(3)?,
            sealed: $r.try_get(4)?,
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

/// A `block_txs` row: height, first sequence, key id, leaves, sealed body.
type BodyRow = (i64, i64, i64, Vec<u8>, Vec<u8>);

/// Rows of one commit, ready for the database.
#[derive(Default)]
struct Rows {
    bodies: Vec<BodyRow>,
    index: indexer::IndexBatch,
}

/// Index rows of one transaction: (key, global sequence, height), by index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRows {
    /// `tx_ids` row.
    pub id: [i64; 3],
    /// `tx_by_stream` row.
    pub stream: [i64; 3],
    /// `tx_by_address` row (address, seq, global sequence, height).
    pub address: [i64; 4],
    /// `tx_idempotency` row, when the transaction has an idempotency key.
    pub idempotency: Option<[i64; 3]>,
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

/// Runs `$body` inside one database transaction on the chain's writing connection, and
/// commits it: the held SQLite writer, or a pooled PostgreSQL connection.
macro_rules! in_write_txn {
    ($store:expr, |$dbtx:ident| $body:expr) => {
        match &$store.writer {
            Some(w) => {
                let mut held = w.conn.lock().await;
                let outcome: Result<_> = async {
                    let conn = match &mut *held {
                        Some(c) => c,
                        None if w.closed.load(std::sync::atomic::Ordering::Acquire) => {
                            return Err(sqlx::Error::PoolClosed.into());
                        }
                        None => held.insert(sqlx::ConnectOptions::connect(&w.opts).await?),
                    };
                    let mut $dbtx = sqlx::Connection::begin(conn).await?;
                    let r = $body;
                    $dbtx.commit().await?;
                    Ok(r)
                }
                .await;
                if outcome.is_err() {
                    // Its state after a failure is unknown: the next write opens a new one.
                    *held = None;
                }
                outcome
            }
            None => on_pool!(&$store.pool, |pool| {
                let mut $dbtx = pool.begin().await?;
                let r = $body;
                $dbtx.commit().await?;
                Ok(r)
            }),
        }
    };
}

/// SQLite's one writing connection. It is held, not pooled: a pooled connection goes back
/// through a spawned task and a round trip to its thread (sqlx pings it on release), once per
/// commit. Its page cache stays warm across commits.
#[derive(Debug)]
struct SqliteWriter {
    conn: tokio::sync::Mutex<Option<SqliteConnection>>,
    opts: SqliteConnectOptions,
    /// Set by [`Store::close`]: no new connection is opened after it.
    closed: std::sync::atomic::AtomicBool,
}

/// The chain store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    writer: Option<Arc<SqliteWriter>>,
    keys: Arc<DataKeys>,
    index: IndexKeys,
    indexer: Arc<indexer::Indexer>,
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

/// Additional data of a sealed body: it only opens at its own height, under its own key id.
fn body_aad(height: u64, key_id: u32) -> [u8; 12] {
    let mut a = [0u8; 12];
    a[..8].copy_from_slice(&height.to_be_bytes());
    a[8..].copy_from_slice(&key_id.to_be_bytes());
    a
}

/// Inserts `rows` into `table` in multi-row statements, inside `$tx`.
macro_rules! insert_rows {
    ($tx:expr, $table:literal, $cols:literal, $rows:expr, |$b:ident, $r:ident| $push:expr) => {
        insert_rows!($tx, $table, $cols, $rows, |$b, $r| $push, "")
    };
    ($tx:expr, $table:literal, $cols:literal, $rows:expr, |$b:ident, $r:ident| $push:expr, $suffix:literal) => {
        for chunk in $rows.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::new(concat!("INSERT INTO ", $table, " (", $cols, ") "));
            qb.push_values(chunk, |mut $b, $r| {
                $push;
            });
            qb.push($suffix);
            qb.build().execute(&mut *$tx).await?;
        }
    };
}

/// Writes the block bodies of a commit inside the database transaction `$tx`.
macro_rules! write_bodies {
    ($tx:expr, $rows:expr) => {{
        let rows: &Rows = $rows;
        insert_rows!($tx, "block_txs", "height, first_seq, key_id, leaves, sealed", rows.bodies, |b, r| {
            b.push_bind(r.0).push_bind(r.1).push_bind(r.2).push_bind(r.3.clone()).push_bind(r.4.clone())
        });
    }};
}

impl Store {
    /// Opens (creating if needed) the store at `url`, applies pending migrations and repacks
    /// data written in the v1 layout.
    pub async fn connect(url: &str, keys: Arc<DataKeys>) -> Result<Self> {
        let mut writer = None;
        let (pool, index_writer) = match backend_of(url)? {
            Backend::Sqlite => {
                let opts = SqliteConnectOptions::from_str(url)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // FULL: a commit is on disk before we acknowledge it (invariant 1).
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(10))
                    .pragma("temp_store", "memory")
                    // Checkpoints run in the background (below), not inside a commit.
                    .pragma("wal_autocheckpoint", "0")
                    .pragma("mmap_size", "268435456");
                if let Some(parent) = std::path::Path::new(opts.get_filename()).parent() {
                    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                // Page caches are per connection: the writer keeps the chain's B-trees hot (64 MB);
                // readers mostly go through the memory map and stay small (8 MB each). A SQLite
                // connection is a local file: no pool tests it before use (sqlx's default ping
                // is one more round trip to the connection's thread per query).
                let writer_opts = opts.clone().pragma("cache_size", "-65536");
                let mut w = writer_opts.connect().await?;
                SQLITE_MIGRATIONS.run(&mut w).await?;
                writer = Some(Arc::new(SqliteWriter {
                    conn: tokio::sync::Mutex::new(Some(w)),
                    opts: writer_opts,
                    closed: std::sync::atomic::AtomicBool::new(false),
                }));
                let index_path = indexer::sqlite_index_path(opts.get_filename());
                let index_writer = indexer::open_sqlite_index(&index_path).await?;
                // Readers see the index file's tables by their plain names.
                let attach = index_path.to_string_lossy().into_owned();
                let pool = SqlitePoolOptions::new()
                    .test_before_acquire(false)
                    .max_connections(4)
                    .after_connect(move |conn, _| {
                        let attach = attach.clone();
                        Box::pin(async move {
                            sqlx::query("ATTACH DATABASE $1 AS idx").bind(attach).execute(&mut *conn).await?;
                            Ok(())
                        })
                    })
                    .connect_with(opts.pragma("cache_size", "-8192"))
                    .await?;
                spawn_wal_checkpointer(pool.clone());
                (Pool::Sqlite(pool), Pool::Sqlite(index_writer))
            }
            Backend::Postgres => {
                let opts = PgConnectOptions::from_str(url)?;
                let pool = PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(opts)
                    .await?;
                POSTGRES_MIGRATIONS.run(&pool).await?;
                let pool = Pool::Postgres(pool);
                (pool.clone(), pool)
            }
        };
        let salt = index_salt(&pool).await?;
        let indexer = Arc::new(indexer::Indexer::new(index_writer));
        let store = Self { pool, writer, keys, index: IndexKeys::new(salt), indexer: indexer.clone() };
        legacy::repack(&store).await?;
        store.open_index().await?;
        indexer.spawn();
        Ok(store)
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
        self.indexer.close().await;
        if let Pool::Sqlite(w) = self.indexer.writer() {
            w.close().await;
        }
        if let Some(w) = &self.writer {
            let mut held = w.conn.lock().await;
            w.closed.store(true, std::sync::atomic::Ordering::Release);
            if let Some(c) = held.take()
                && let Err(e) = c.close().await
            {
                tracing::warn!(target: "core::store", error = %e, "The chain's writing connection did not close cleanly.");
            }
        }
        on_pool!(&self.pool, |p| p.close().await)
    }

    /// Copies the whole WAL into the database files and empties it (SQLite; nothing on
    /// PostgreSQL). Writers wait meanwhile: for quiet moments, such as between benchmark runs.
    /// The index file is synced too.
    pub async fn checkpoint_wal(&self) -> Result<()> {
        if let Pool::Sqlite(p) = &self.pool {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(p).await?;
        }
        self.indexer.checkpoint().await
    }

    /// The index rows `c` must have.
    pub fn index_rows(&self, c: &CommittedTx) -> IndexRows {
        let t = &c.tx;
        let (g, h) = (to_i64(t.global_sequence), to_i64(c.height));
        IndexRows {
            id: [prefix_i64(&c.id), g, h],
            stream: [self.index.stream(&t.content.address, &t.content.key), g, h],
            address: [self.index.address(&t.content.address), to_i64(t.sequence), g, h],
            idempotency: (!t.content.idempotency_key.is_empty())
                .then(|| [self.index.idempotency(&t.content.device_id, &t.content.idempotency_key), g, h]),
        }
    }

    /// Packs, seals and indexes `txs` (ascending global sequence) into the rows of `blocks`.
    fn rows(&self, blocks: &[(u64, u64)], txs: &[(&CommittedTx, &[u8])]) -> Result<Rows> {
        let mut rows = Rows::default();
        let mut rest = txs;
        for &(height, count) in blocks {
            let n = usize::try_from(count).unwrap_or(usize::MAX).min(rest.len());
            let (mine, after) = rest.split_at(n);
            rest = after;
            let Some(first) = mine.first() else { continue };
            let first_seq = first.0.tx.global_sequence;
            let body = pack(mine.iter().map(|(_, b)| *b));
            let (key_id, sealed) = self.keys.seal(&body, &body_aad(height, self.keys.active_id()))?;
            let mut leaves = Vec::with_capacity(32 * mine.len());
            for (c, _) in mine {
                leaves.extend_from_slice(&c.id);
                rows.index.add(self.index_rows(c));
            }
            rows.bodies.push((to_i64(height), to_i64(first_seq), i64::from(key_id), leaves, sealed));
        }
        if !rest.is_empty() {
            return Err(Error::Fatal(format!("{} transactions fall outside the blocks written with them", rest.len())));
        }
        Ok(rows)
    }

    /// Writes blocks and their transactions in one database transaction (one durable commit).
    pub async fn append(&self, blocks: &[BlockRecord], txs: &[PendingTx]) -> Result<()> {
        self.append_with_state(blocks, txs, &[]).await
    }

    /// [`Store::append`], also setting `state` rows (see [`Store::node_state`]) in the same
    /// database transaction.
    pub async fn append_with_state(
        &self,
        blocks: &[BlockRecord],
        txs: &[PendingTx],
        state: &[(&str, Vec<u8>)],
    ) -> Result<()> {
        // Seal before opening the database transaction so the write lock is held briefly.
        let shape: Vec<(u64, u64)> = blocks.iter().map(|b| (b.header.height, u64::from(b.header.tx_count))).collect();
        let items: Vec<(&CommittedTx, &[u8])> = txs.iter().map(|p| (&*p.committed, p.bytes.as_slice())).collect();
        let rows = self.rows(&shape, &items)?;
        self.indexer.room().await;
        in_write_txn!(self, |dbtx| {
            insert_rows!(dbtx, "blocks", "height, hash, header, timestamp_ms, tree_size, tx_count", blocks, |b, r| {
                b.push_bind(to_i64(r.header.height))
                    .push_bind(r.hash.to_vec())
                    .push_bind(r.header.encode())
                    .push_bind(r.header.timestamp_ms)
                    .push_bind(to_i64(r.header.tree_size))
                    .push_bind(i64::from(r.header.tx_count))
            });
            write_bodies!(dbtx, &rows);
            for (name, value) in state {
                sqlx::query(node_state::UPSERT).bind(*name).bind(value.clone()).execute(&mut *dbtx).await?;
            }
        })?;
        if let Some(top) = blocks.last() {
            let mut index = rows.index;
            index.top = (top.header.height, top.hash);
            index.sort();
            self.indexer.push(index);
        }
        Ok(())
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

    /// Packed bodies with height in `[from, from + limit)`, ascending.
    pub async fn raw_bodies(&self, from: u64, limit: u32) -> Result<Vec<RawBody>> {
        let sql = format!("SELECT {BODY_COLUMNS} FROM block_txs WHERE height >= $1 ORDER BY height LIMIT $2");
        on_pool!(&self.pool, |p| {
            let rows = sqlx::query(&sql).bind(to_i64(from)).bind(i64::from(limit)).fetch_all(p).await?;
            rows.iter().map(|r| Ok::<_, Error>(raw_body!(r))).collect()
        })
    }

    /// Packed bodies at the given heights (any order, missing ones left out).
    async fn bodies_at(&self, heights: &[u64]) -> Result<Vec<RawBody>> {
        let mut out = Vec::with_capacity(heights.len());
        for chunk in heights.chunks(IN_CHUNK) {
            on_pool!(&self.pool, |p| {
                let mut qb = QueryBuilder::new(format!("SELECT {BODY_COLUMNS} FROM block_txs WHERE height IN ("));
                let mut list = qb.separated(", ");
                for h in chunk {
                    list.push_bind(to_i64(*h));
                }
                qb.push(")");
                for r in qb.build().fetch_all(p).await? {
                    out.push(raw_body!(r));
                }
            });
        }
        Ok(out)
    }

    /// Decrypts and splits a body into its transactions' canonical bytes, checking them
    /// against the stored leaf hashes.
    fn open_bytes(&self, raw: &RawBody) -> Result<Vec<Vec<u8>>> {
        let corrupt = |reason: String| Error::Corrupt { height: raw.height, reason };
        // A wrong key ring and a damaged row look alike to GCM: keep the key error, which
        // names the key, and let verification attribute it to the block.
        let plain = self.keys.open(raw.key_id, &raw.sealed, &body_aad(raw.height, raw.key_id))?;
        let txs = unpack(&plain).map_err(|e| corrupt(e.to_string()))?;
        if raw.leaves.len() != 32 * txs.len() {
            return Err(corrupt(format!("{} leaf hash bytes stored for {} transactions", raw.leaves.len(), txs.len())));
        }
        Ok(txs.into_iter().map(<[u8]>::to_vec).collect())
    }

    /// Opens transaction `index` of a body's already-split bytes.
    fn open_one(&self, raw: &RawBody, index: usize, bytes: &[u8]) -> Result<CommittedTx> {
        let expected = raw.first_seq + index as u64;
        let corrupt = |reason: String| Error::Corrupt { height: raw.height, reason };
        let id = leaf_hash(bytes);
        if raw.leaves.get(32 * index..32 * index + 32) != Some(id.as_slice()) {
            return Err(corrupt(format!("transaction {expected} does not match its stored leaf hash")));
        }
        let tx = Transaction::decode(bytes).map_err(|e| corrupt(format!("transaction {expected}: {e}")))?;
        if tx.global_sequence != expected {
            return Err(corrupt(format!("transaction {expected} says it is {}", tx.global_sequence)));
        }
        Ok(CommittedTx { tx, id, height: raw.height })
    }

    /// Decrypts and decodes every transaction of a body, checking each against its leaf hash
    /// and its place in the chain.
    pub fn open_body(&self, raw: &RawBody) -> Result<Vec<CommittedTx>> {
        let bytes = self.open_bytes(raw)?;
        bytes.iter().enumerate().map(|(i, b)| self.open_one(raw, i, b)).collect()
    }

    /// Number of stored transactions (those of every stored body).
    pub async fn tx_count(&self) -> Result<u64> {
        let n: i64 =
            on_pool!(&self.pool, |p| sqlx::query_scalar("SELECT COALESCE(SUM(length(leaves) / 32), 0) FROM block_txs")
                .fetch_one(p)
                .await?);
        Ok(to_u64(n))
    }

    /// Number of stored block bodies.
    pub async fn body_count(&self) -> Result<u64> {
        let n: i64 =
            on_pool!(&self.pool, |p| sqlx::query_scalar("SELECT COUNT(*) FROM block_txs").fetch_one(p).await?);
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

/// The per-store salt of the index keys, created on first use.
async fn index_salt(pool: &Pool) -> Result<[u8; 32]> {
    use rand::RngCore;
    let mut fresh = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut fresh);
    let salt: Vec<u8> = on_pool!(pool, |p| {
        sqlx::query("INSERT INTO store_meta (name, value) VALUES ('index_salt', $1) ON CONFLICT (name) DO NOTHING")
            .bind(fresh.to_vec())
            .execute(p)
            .await?;
        sqlx::query_scalar("SELECT value FROM store_meta WHERE name = 'index_salt'").fetch_one(p).await?
    });
    salt.as_slice()
        .try_into()
        .map_err(|_| Error::Corrupt { height: 0, reason: "the stored index salt is not 32 bytes".into() })
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

// Declared last: it uses the macros above.
mod legacy;

mod index_audit;
mod indexer;
mod lookup;
mod node_state;
