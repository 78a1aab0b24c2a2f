//! The outbox of a client node: every local write is appended here, durably, before it is
//! acknowledged, and delivered to the masters from here in order. Entries are encrypted with
//! the node's data key and hash-chained (each entry's hash covers the previous one), so a
//! changed, removed or reordered entry stops the node at start instead of being delivered.
//!
//! One SQLite file (`outbox.db`, WAL, `synchronous = FULL`). Appends from concurrent writers
//! are grouped into one database transaction by a single writer task (group commit).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::{mpsc, oneshot};

use crate::chain::Receipt;
use crate::cluster::WireRejection;
use crate::error::{Error, Rejection, Result};
use crate::keys::DataKeys;
use crate::tx::TxContent;

/// File name of the outbox inside the data directory.
pub const OUTBOX_FILE: &str = "outbox.db";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox_entries (
    seq INTEGER PRIMARY KEY,
    grp INTEGER NOT NULL,
    idem BLOB NOT NULL UNIQUE,
    key_id INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    hash BLOB NOT NULL,
    enqueued_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_outcomes (
    grp INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    outcome BLOB NOT NULL,
    done_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS outbox_entries_immutable BEFORE UPDATE ON outbox_entries
BEGIN SELECT RAISE(ABORT, 'outbox entries are immutable'); END;
CREATE TRIGGER IF NOT EXISTS outbox_outcomes_immutable BEFORE UPDATE ON outbox_outcomes
BEGIN SELECT RAISE(ABORT, 'outbox outcomes are immutable'); END;
";

/// What became of one group of entries (one local write call).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Committed on the chain; one receipt per entry.
    Committed(Vec<Receipt>),
    /// Already on the chain from an earlier delivery whose answer was lost (a timeout, or
    /// the node stopped before recording it); one receipt per entry.
    AlreadyCommitted(Vec<Receipt>),
    /// Refused by the masters; nothing of the group is on the chain.
    Rejected(WireRejection),
}

/// One pending group read back for delivery.
#[derive(Debug, Clone)]
pub struct Group {
    /// Sequence of the group's first entry (the group's id).
    pub id: u64,
    /// Sequence of its last entry.
    pub last_seq: u64,
    /// The writes, in order.
    pub items: Vec<TxContent>,
    /// When the group was appended (ms since the epoch).
    pub enqueued_ms: u64,
}

/// Counts for status pages and metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OutboxCounts {
    /// Entries appended since the outbox was created.
    pub appended: u64,
    /// Entries not delivered yet.
    pub pending: u64,
    /// Sequence of the last entry with an outcome (0 when none).
    pub delivered_seq: u64,
    /// Groups refused by the masters.
    pub rejected_groups: u64,
    /// Append time of the oldest pending entry (ms since the epoch).
    pub oldest_pending_ms: Option<u64>,
}

/// One entry to insert: sequence, group, idempotency digest, key id, sealed content, hash.
type NewEntry = (u64, u64, Vec<u8>, u32, Vec<u8>, [u8; 32]);

struct Append {
    items: Vec<TxContent>,
    reply: oneshot::Sender<Result<(u64, u64)>>,
}

/// The outbox; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    pool: SqlitePool,
    keys: Arc<DataKeys>,
    appends: mpsc::Sender<Append>,
    state: Arc<parking_lot::Mutex<State>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("state", &*self.state.lock()).finish()
    }
}

#[derive(Debug, Clone)]
struct State {
    /// Last appended sequence and its hash.
    last_seq: u64,
    last_hash: [u8; 32],
    /// Last sequence with an outcome.
    delivered_seq: u64,
    rejected_groups: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The chained hash of an entry: it covers everything stored about the entry and the
/// previous entry's hash.
fn entry_hash(prev: &[u8; 32], seq: u64, grp: u64, key_id: u32, sealed: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"kalima-outbox-v1");
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(grp.to_be_bytes());
    h.update(key_id.to_be_bytes());
    h.update(sealed);
    h.finalize().into()
}

/// The stored form of (device, idempotency key): unique per entry, not readable.
fn idem_digest(device: &str, key: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(device.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    h.finalize().to_vec()
}

fn aad(seq: u64) -> Vec<u8> {
    let mut a = b"kalima-outbox".to_vec();
    a.extend_from_slice(&seq.to_be_bytes());
    a
}

fn corrupt(seq: u64, what: impl std::fmt::Display) -> Error {
    Error::Outbox(format!("entry {seq}: {what}; the outbox was altered outside the node, refusing to deliver it"))
}

impl Outbox {
    /// Opens (creating) the outbox in `dir` and checks its whole hash chain.
    pub async fn open(dir: &Path, keys: Arc<DataKeys>) -> Result<Self> {
        let path = dir.join(OUTBOX_FILE);
        let url = format!("sqlite://{}", path.display());
        let opts = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // An acknowledged local write must survive a power cut.
            .synchronous(SqliteSynchronous::Full);
        let pool = SqlitePoolOptions::new().test_before_acquire(false).max_connections(2).connect_with(opts).await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        let state = Self::check(&pool, &keys).await?;
        let (appends, rx) = mpsc::channel(1024);
        let outbox = Self { pool, keys, appends, state: Arc::new(parking_lot::Mutex::new(state)) };
        tokio::spawn(outbox.clone().writer(rx));
        Ok(outbox)
    }

    async fn meta(pool: &SqlitePool, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT value FROM outbox_meta WHERE name = $1").bind(name).fetch_optional(pool).await?)
    }

    /// Walks the hash chain from the pruned base and opens every pending entry.
    async fn check(pool: &SqlitePool, keys: &DataKeys) -> Result<State> {
        let base_seq = match Self::meta(pool, "base_seq").await? {
            Some(b) => u64::from_be_bytes(b.try_into().map_err(|_| corrupt(0, "base sequence unreadable"))?),
            None => 0,
        };
        let mut prev: [u8; 32] = match Self::meta(pool, "base_hash").await? {
            Some(b) => b.try_into().map_err(|_| corrupt(base_seq, "base hash unreadable"))?,
            None => [0; 32],
        };
        let delivered_seq: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(last_seq), 0) FROM outbox_outcomes").fetch_one(pool).await?;
        let delivered_seq = delivered_seq.max(0) as u64;
        let mut expect = base_seq + 1;
        let mut prev_grp: Option<u64> = None;
        let mut rows =
            sqlx::query("SELECT seq, grp, key_id, sealed, hash FROM outbox_entries ORDER BY seq").fetch(pool);
        use futures::TryStreamExt;
        while let Some(r) = rows.try_next().await? {
            let seq = r.get::<i64, _>(0) as u64;
            let grp = r.get::<i64, _>(1) as u64;
            let key_id = r.get::<i64, _>(2) as u32;
            let sealed: Vec<u8> = r.get(3);
            let hash: Vec<u8> = r.get(4);
            if seq != expect {
                return Err(corrupt(expect, format!("missing (the next entry stored is {seq})")));
            }
            // An entry starts a group or continues the previous entry's group.
            if grp != seq && Some(grp) != prev_grp {
                return Err(corrupt(seq, format!("belongs to group {grp}, which does not end here")));
            }
            prev_grp = Some(grp);
            let h = entry_hash(&prev, seq, grp, key_id, &sealed);
            if hash.as_slice() != h {
                return Err(corrupt(seq, "hash does not chain to the previous entry"));
            }
            if seq > delivered_seq {
                let plain = keys.open(key_id, &sealed, &aad(seq)).map_err(|e| corrupt(seq, e))?;
                TxContent::decode(&plain).map_err(|e| corrupt(seq, e))?;
            }
            prev = h;
            expect += 1;
        }
        let rejected: i64 = sqlx::query_scalar("SELECT value FROM outbox_meta WHERE name = 'rejected_groups'")
            .fetch_optional(pool)
            .await?
            .map(|b: Vec<u8>| b.try_into().map(i64::from_be_bytes).unwrap_or(0))
            .unwrap_or(0);
        let last_seq = expect - 1;
        if delivered_seq > last_seq {
            return Err(corrupt(delivered_seq, "an outcome is recorded for an entry that is not stored"));
        }
        Ok(State { last_seq, last_hash: prev, delivered_seq, rejected_groups: rejected.max(0) as u64 })
    }

    /// Appends `items` as one group; resolves once they are durable, with the group's first
    /// and last sequence. A (device, idempotency key) already in the outbox is refused.
    pub async fn append(&self, items: Vec<TxContent>) -> Result<(u64, u64)> {
        let (reply, rx) = oneshot::channel();
        self.appends.send(Append { items, reply }).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    async fn writer(self, mut rx: mpsc::Receiver<Append>) {
        let mut batch: Vec<Append> = Vec::new();
        while rx.recv_many(&mut batch, 256).await > 0 {
            let results = self.write_batch(&batch).await;
            for (a, r) in batch.drain(..).zip(results) {
                let _ = a.reply.send(r);
            }
        }
    }

    /// Writes every append of `batch` in one database transaction. An append refused for
    /// its own content (a repeated idempotency key) does not fail the others.
    async fn write_batch(&self, batch: &[Append]) -> Vec<Result<(u64, u64)>> {
        let start = self.state.lock().clone();
        let mut st = start.clone();
        let mut results: Vec<Option<Result<(u64, u64)>>> = Vec::with_capacity(batch.len());
        let mut rows: Vec<NewEntry> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let now = now_ms();
        // Repeated keys are found before the transaction so one bad append cannot abort it.
        let mut digests: Vec<Vec<Vec<u8>>> = Vec::with_capacity(batch.len());
        for a in batch {
            digests.push(a.items.iter().map(|c| idem_digest(&c.device_id, &c.idempotency_key)).collect());
        }
        let stored = match self.stored_digests(digests.iter().flatten()).await {
            Ok(s) => s,
            Err(e) => return batch.iter().map(|_| Err(Error::Outbox(format!("reading the outbox: {e}")))).collect(),
        };
        for (a, ds) in batch.iter().zip(&digests) {
            let mut own = std::collections::HashSet::new();
            if let Some((c, _)) =
                a.items.iter().zip(ds).find(|(_, d)| stored.contains(*d) || seen.contains(*d) || !own.insert(*d))
            {
                results.push(Some(Err(Rejection::DuplicateIdempotencyKey {
                    key: c.idempotency_key.clone(),
                    existing: "in this node's outbox".into(),
                }
                .into())));
                continue;
            }
            let first = st.last_seq + 1;
            let mut sealed_rows = Vec::with_capacity(a.items.len());
            let mut failed = None;
            for (i, (c, d)) in a.items.iter().zip(ds).enumerate() {
                let seq = first + i as u64;
                match self.keys.seal(&c.encode(), &aad(seq)) {
                    Ok((key_id, sealed)) => sealed_rows.push((seq, d.clone(), key_id, sealed)),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                results.push(Some(Err(e)));
                continue;
            }
            for (seq, d, key_id, sealed) in sealed_rows {
                let h = entry_hash(&st.last_hash, seq, first, key_id, &sealed);
                seen.insert(d.clone());
                rows.push((seq, first, d, key_id, sealed, h));
                st.last_seq = seq;
                st.last_hash = h;
            }
            results.push(Some(Ok((first, st.last_seq))));
        }
        if !rows.is_empty()
            && let Err(e) = self.insert(&rows, now).await
        {
            let msg = format!("writing the outbox: {e}");
            return batch.iter().map(|_| Err(Error::Outbox(msg.clone()))).collect();
        }
        {
            let mut s = self.state.lock();
            s.last_seq = st.last_seq;
            s.last_hash = st.last_hash;
        }
        let n = rows.len() as u64;
        metrics::counter!("kalima_client_outbox_appended_total").increment(n);
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(Error::Outbox("no result".into())))).collect()
    }

    async fn stored_digests<'a>(
        &self,
        digests: impl Iterator<Item = &'a Vec<u8>>,
    ) -> Result<std::collections::HashSet<Vec<u8>>> {
        let mut found = std::collections::HashSet::new();
        let all: Vec<&Vec<u8>> = digests.collect();
        for chunk in all.chunks(500) {
            let sql = format!(
                "SELECT idem FROM outbox_entries WHERE idem IN ({})",
                (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(",")
            );
            let mut q = sqlx::query_scalar::<_, Vec<u8>>(&sql);
            for d in chunk {
                q = q.bind(d.as_slice());
            }
            found.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(found)
    }

    async fn insert(&self, rows: &[NewEntry], now: u64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (seq, grp, idem, key_id, sealed, hash) in rows {
            sqlx::query(
                "INSERT INTO outbox_entries (seq, grp, idem, key_id, sealed, hash, enqueued_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(to_i64(*seq))
            .bind(to_i64(*grp))
            .bind(idem.as_slice())
            .bind(i64::from(*key_id))
            .bind(sealed.as_slice())
            .bind(hash.as_slice())
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Pending groups in order, from the first undelivered one, up to about `max_items`
    /// entries (always at least one whole group).
    pub async fn pending(&self, max_items: usize) -> Result<Vec<Group>> {
        let from = self.state.lock().delivered_seq + 1;
        let rows = sqlx::query(
            "SELECT seq, grp, key_id, sealed, enqueued_ms FROM outbox_entries WHERE seq >= $1 ORDER BY seq LIMIT $2",
        )
        .bind(to_i64(from))
        .bind(i64::try_from(max_items.max(1)).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let mut groups: Vec<Group> = Vec::new();
        for r in rows {
            let seq = r.get::<i64, _>(0) as u64;
            let grp = r.get::<i64, _>(1) as u64;
            let key_id = r.get::<i64, _>(2) as u32;
            let sealed: Vec<u8> = r.get(3);
            let plain = self.keys.open(key_id, &sealed, &aad(seq)).map_err(|e| corrupt(seq, e))?;
            let content = TxContent::decode(&plain).map_err(|e| corrupt(seq, e))?;
            match groups.last_mut() {
                Some(g) if g.id == grp => {
                    g.items.push(content);
                    g.last_seq = seq;
                }
                _ => groups.push(Group {
                    id: grp,
                    last_seq: seq,
                    items: vec![content],
                    enqueued_ms: r.get::<i64, _>(4).max(0) as u64,
                }),
            }
        }
        // A group cut by the limit is read whole next time.
        if groups.len() > 1
            && let Some(g) = groups.last()
        {
            let complete: bool =
                sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM outbox_entries WHERE seq = $1 AND grp = $2)")
                    .bind(to_i64(g.last_seq + 1))
                    .bind(to_i64(g.id))
                    .fetch_one(&self.pool)
                    .await?;
            if !complete {
                groups.pop();
            }
        } else if let Some(g) = groups.first_mut() {
            // A single group larger than the limit: read the rest of it.
            let rest =
                sqlx::query("SELECT seq, key_id, sealed FROM outbox_entries WHERE grp = $1 AND seq > $2 ORDER BY seq")
                    .bind(to_i64(g.id))
                    .bind(to_i64(g.last_seq))
                    .fetch_all(&self.pool)
                    .await?;
            for r in rest {
                let seq = r.get::<i64, _>(0) as u64;
                let key_id = r.get::<i64, _>(1) as u32;
                let sealed: Vec<u8> = r.get(2);
                let plain = self.keys.open(key_id, &sealed, &aad(seq)).map_err(|e| corrupt(seq, e))?;
                g.items.push(TxContent::decode(&plain).map_err(|e| corrupt(seq, e))?);
                g.last_seq = seq;
            }
        }
        Ok(groups)
    }

    /// Records the outcomes of delivered groups, which must be the next pending ones in order.
    pub async fn record(&self, outcomes: &[(Group, Outcome)]) -> Result<()> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut expect = self.state.lock().delivered_seq + 1;
        for (g, _) in outcomes {
            if g.id != expect {
                return Err(Error::Outbox(format!(
                    "outcome for group {} recorded out of order (next is {expect})",
                    g.id
                )));
            }
            expect = g.last_seq + 1;
        }
        let now = now_ms();
        let rejected_now = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Rejected(_))).count() as u64;
        let rejected_total = self.state.lock().rejected_groups + rejected_now;
        let mut tx = self.pool.begin().await?;
        for (g, o) in outcomes {
            let bytes = postcard::to_stdvec(o).map_err(|e| Error::Outbox(format!("encoding an outcome: {e}")))?;
            sqlx::query("INSERT INTO outbox_outcomes (grp, last_seq, outcome, done_ms) VALUES ($1, $2, $3, $4)")
                .bind(to_i64(g.id))
                .bind(to_i64(g.last_seq))
                .bind(bytes)
                .bind(to_i64(now))
                .execute(&mut *tx)
                .await?;
        }
        if rejected_now > 0 {
            sqlx::query("INSERT INTO outbox_meta (name, value) VALUES ('rejected_groups', $1) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
                .bind(to_i64(rejected_total).to_be_bytes().to_vec())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let mut s = self.state.lock();
        s.delivered_seq = expect - 1;
        s.rejected_groups = rejected_total;
        Ok(())
    }

    /// The recorded outcome of the group starting at `id`, if delivered.
    pub async fn outcome(&self, id: u64) -> Result<Option<Outcome>> {
        let b: Option<Vec<u8>> = sqlx::query_scalar("SELECT outcome FROM outbox_outcomes WHERE grp = $1")
            .bind(to_i64(id))
            .fetch_optional(&self.pool)
            .await?;
        b.map(|b| postcard::from_bytes(&b).map_err(|e| Error::Outbox(format!("outcome of group {id}: {e}"))))
            .transpose()
    }

    /// The latest refused groups (newest first), with their reasons.
    pub async fn rejections(&self, limit: u32) -> Result<Vec<(u64, u64, Rejection)>> {
        let rows = sqlx::query("SELECT grp, last_seq, outcome FROM outbox_outcomes ORDER BY grp DESC LIMIT 10000")
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::new();
        for r in rows {
            let b: Vec<u8> = r.get(2);
            if let Ok(Outcome::Rejected(why)) = postcard::from_bytes::<Outcome>(&b) {
                out.push((r.get::<i64, _>(0) as u64, r.get::<i64, _>(1) as u64, Rejection::from(why)));
                if out.len() >= limit as usize {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Counts for status and metrics.
    pub async fn counts(&self) -> Result<OutboxCounts> {
        let s = self.state.lock().clone();
        let oldest: Option<i64> = sqlx::query_scalar("SELECT enqueued_ms FROM outbox_entries WHERE seq = $1")
            .bind(to_i64(s.delivered_seq + 1))
            .fetch_optional(&self.pool)
            .await?;
        Ok(OutboxCounts {
            appended: s.last_seq,
            pending: s.last_seq - s.delivered_seq,
            delivered_seq: s.delivered_seq,
            rejected_groups: s.rejected_groups,
            oldest_pending_ms: oldest.map(|v| v.max(0) as u64),
        })
    }

    /// Sequence of the last entry with an outcome.
    pub fn delivered_seq(&self) -> u64 {
        self.state.lock().delivered_seq
    }

    /// Entries not delivered yet (from memory, no I/O).
    pub fn pending_count(&self) -> u64 {
        let s = self.state.lock();
        s.last_seq - s.delivered_seq
    }

    /// Removes delivered entries and outcomes older than the newest `keep` delivered entries;
    /// the hash of the last removed entry becomes the base the chain is checked from.
    pub async fn prune(&self, keep: u64) -> Result<u64> {
        let delivered = self.state.lock().delivered_seq;
        let Some(upto) = delivered.checked_sub(keep).filter(|u| *u > 0) else { return Ok(0) };
        // Whole groups only, so a group is never half pruned.
        let upto: Option<i64> = sqlx::query_scalar("SELECT MAX(last_seq) FROM outbox_outcomes WHERE last_seq <= $1")
            .bind(to_i64(upto))
            .fetch_one(&self.pool)
            .await?;
        let Some(upto) = upto.filter(|u| *u > 0) else { return Ok(0) };
        let hash: Option<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM outbox_entries WHERE seq = $1")
            .bind(upto)
            .fetch_optional(&self.pool)
            .await?;
        let Some(hash) = hash else { return Ok(0) };
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM outbox_entries WHERE seq <= $1")
            .bind(upto)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM outbox_outcomes WHERE last_seq <= $1").bind(upto).execute(&mut *tx).await?;
        for (name, value) in [("base_seq", upto.to_be_bytes().to_vec()), ("base_hash", hash)] {
            sqlx::query("INSERT INTO outbox_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
                .bind(name)
                .bind(value)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Closes the database.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
