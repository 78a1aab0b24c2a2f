//! Mutable per-node bookkeeping beside the chain (`node_state`): values such as the Raft
//! state machine's applied log position, which must change atomically with the blocks.

use super::{Pool, Result, Store};

/// Inserts or replaces one value; `$1` name, `$2` value.
pub(super) const UPSERT: &str =
    "INSERT INTO node_state (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value";

impl Store {
    /// Sets `state` rows in one database transaction, without writing chain data.
    pub async fn put_node_state(&self, state: &[(&str, Vec<u8>)]) -> Result<()> {
        in_write_txn!(self, |dbtx| {
            for (name, value) in state {
                sqlx::query(UPSERT).bind(*name).bind(value.clone()).execute(&mut *dbtx).await?;
            }
        })
    }

    /// The value stored under `name`, if any.
    pub async fn node_state(&self, name: &str) -> Result<Option<Vec<u8>>> {
        on_pool!(&self.pool, |p| {
            Ok(sqlx::query_scalar("SELECT value FROM node_state WHERE name = $1").bind(name).fetch_optional(p).await?)
        })
    }
}
