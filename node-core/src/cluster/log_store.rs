//! The Raft log and vote of a master, in their own SQLite file (`raft.db`) beside the chain:
//! log entries are node-local and short-lived (purged once a snapshot covers them), whatever
//! backend holds the chain.

// openraft's storage traits return its `StorageError`, whose size is not ours to choose.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::str::FromStr;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::{NodeId, TypeConfig};
use crate::error::{Error, Result};

/// File name of the Raft log inside the data directory.
pub const RAFT_LOG_FILE: &str = "raft.db";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS raft_log (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS raft_meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
";

/// The Raft log store; cheap to clone (clones share the database).
#[derive(Clone, Debug)]
pub(crate) struct LogStore {
    pool: SqlitePool,
}

fn read_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::error(e)).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::error(e)).into()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl LogStore {
    /// Opens (creating) the log in `dir`.
    pub(crate) async fn open(dir: &Path) -> Result<Self> {
        let url = format!("sqlite://{}", dir.join(RAFT_LOG_FILE).display());
        let opts = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A vote or an entry acknowledged to the leader must survive a crash.
            .synchronous(SqliteSynchronous::Full);
        // One connection: Raft requires log writes to be serialized anyway.
        let pool = SqlitePoolOptions::new().test_before_acquire(false).max_connections(1).connect_with(opts).await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }

    async fn meta<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> std::result::Result<Option<T>, StorageError<NodeId>> {
        let v: Option<Vec<u8>> = sqlx::query_scalar("SELECT value FROM raft_meta WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(read_err)?;
        v.map(|b| postcard::from_bytes(&b).map_err(read_err)).transpose()
    }

    async fn set_meta<T: serde::Serialize>(&self, name: &str, v: &T) -> std::result::Result<(), StorageError<NodeId>> {
        let bytes = postcard::to_stdvec(v).map_err(write_err)?;
        sqlx::query("INSERT INTO raft_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(name)
            .bind(bytes)
            .execute(&self.pool)
            .await
            .map_err(write_err)?;
        Ok(())
    }

    /// True when nothing was ever logged or voted here (a pristine master).
    pub(crate) async fn is_pristine(&self) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT (SELECT COUNT(*) FROM raft_log) + (SELECT COUNT(*) FROM raft_meta)")
            .fetch_one(&self.pool)
            .await?;
        Ok(n == 0)
    }

    /// Closes the database.
    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }
}

impl From<openraft::StorageError<NodeId>> for Error {
    fn from(e: openraft::StorageError<NodeId>) -> Self {
        Error::Link(format!("raft storage: {e}"))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> std::result::Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        let rows: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT entry FROM raft_log WHERE idx >= $1 AND idx < $2 ORDER BY idx")
                .bind(to_i64(start))
                .bind(to_i64(end))
                .fetch_all(&self.pool)
                .await
                .map_err(read_err)?;
        rows.iter().map(|b| postcard::from_bytes(b).map_err(read_err)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> std::result::Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.meta("last_purged").await?;
        let last: Option<Vec<u8>> = sqlx::query_scalar("SELECT entry FROM raft_log ORDER BY idx DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(read_err)?;
        let last_log_id = match last {
            Some(b) => Some(postcard::from_bytes::<Entry<TypeConfig>>(&b).map_err(read_err)?.log_id),
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> std::result::Result<(), StorageError<NodeId>> {
        self.set_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> std::result::Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.meta("vote").await
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> std::result::Result<(), StorageError<NodeId>> {
        self.set_meta("committed", &committed).await
    }

    async fn read_committed(&mut self) -> std::result::Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.meta::<Option<LogId<NodeId>>>("committed").await?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> std::result::Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((to_i64(e.log_id.index), postcard::to_stdvec(&e).map_err(write_err)?));
        }
        let res = async {
            let mut tx = self.pool.begin().await?;
            for chunk in rows.chunks(1000) {
                let mut q = sqlx::QueryBuilder::new("INSERT OR REPLACE INTO raft_log (idx, entry) ");
                q.push_values(chunk, |mut b, (i, e)| {
                    b.push_bind(*i).push_bind(e.clone());
                });
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await
        }
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> std::result::Result<(), StorageError<NodeId>> {
        sqlx::query("DELETE FROM raft_log WHERE idx >= $1")
            .bind(to_i64(log_id.index))
            .execute(&self.pool)
            .await
            .map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> std::result::Result<(), StorageError<NodeId>> {
        self.set_meta("last_purged", &log_id).await?;
        sqlx::query("DELETE FROM raft_log WHERE idx <= $1")
            .bind(to_i64(log_id.index))
            .execute(&self.pool)
            .await
            .map_err(write_err)?;
        Ok(())
    }
}
