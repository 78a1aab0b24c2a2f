//! Upgrade of stores written in the v1 layout, which kept one sealed row per transaction in
//! a `txs` table: on the first start after the upgrade every block's transactions are
//! checked against their stored hashes, repacked into `block_txs` with their index rows, and
//! the v1 table is dropped, all in one database transaction.

use std::time::Instant;

use sqlx::{QueryBuilder, Row};

use super::{CommittedTx, Error, INSERT_CHUNK, Pool, Result, Rows, Store, to_i64, to_u64};
use crate::merkle::leaf_hash;
use crate::tx::Transaction;

/// Blocks repacked per round trip.
const PAGE: i64 = 500;

/// Additional data of a v1 row: its global sequence and key id.
fn v1_aad(global_seq: u64, key_id: u32) -> [u8; 12] {
    let mut a = [0u8; 12];
    a[..8].copy_from_slice(&global_seq.to_be_bytes());
    a[8..].copy_from_slice(&key_id.to_be_bytes());
    a
}

/// Opens a v1 row, checking it against its hash, sequence and height columns.
fn open_v1(
    store: &Store,
    seq: i64,
    height: i64,
    hash: &[u8],
    key_id: i64,
    sealed: &[u8],
) -> Result<(CommittedTx, Vec<u8>)> {
    let (seq, height) = (to_u64(seq), to_u64(height));
    let key_id = u32::try_from(key_id).unwrap_or(u32::MAX);
    let corrupt = |reason: String| Error::Corrupt { height, reason };
    let bytes = store
        .keys
        .open(key_id, sealed, &v1_aad(seq, key_id))
        .map_err(|e| corrupt(format!("v1 transaction {seq} does not open: {e}")))?;
    let id = leaf_hash(&bytes);
    if id.as_slice() != hash {
        return Err(corrupt(format!("v1 transaction {seq} does not match its hash")));
    }
    let tx = Transaction::decode(&bytes).map_err(|e| corrupt(format!("v1 transaction {seq}: {e}")))?;
    if tx.global_sequence != seq {
        return Err(corrupt(format!("v1 transaction {seq} says it is {}", tx.global_sequence)));
    }
    Ok((CommittedTx { tx, id, height }, bytes))
}

/// Repacks a v1 `txs` table if there is one.
pub(super) async fn repack(store: &Store) -> Result<()> {
    let exists_sql = match store.pool {
        Pool::Sqlite(_) => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'txs'",
        Pool::Postgres(_) => {
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'txs' AND table_schema = current_schema()"
        }
    };
    let exists: i64 = on_pool!(&store.pool, |p| sqlx::query_scalar(exists_sql).fetch_one(p).await?);
    if exists == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let drop_sql = match store.pool {
        Pool::Sqlite(_) => "DROP TRIGGER txs_no_update; DROP TRIGGER txs_no_delete; DROP TABLE txs;",
        Pool::Postgres(_) => "DROP TABLE txs;",
    };
    let mut repacked = 0u64;
    in_write_txn!(store, |dbtx| {
        let mut next = 0i64;
        loop {
            let blocks: Vec<(i64, i64, i64)> = sqlx::query_as(
                "SELECT height, tree_size, tx_count FROM blocks WHERE height >= $1 ORDER BY height LIMIT $2",
            )
            .bind(next)
            .bind(PAGE)
            .fetch_all(&mut *dbtx)
            .await?;
            let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else { break };
            let rows = sqlx::query(
                "SELECT global_seq, height, hash, key_id, sealed FROM txs WHERE global_seq >= $1 AND global_seq < $2 ORDER BY global_seq",
            )
            .bind(first.1 - first.2)
            .bind(last.1)
            .fetch_all(&mut *dbtx)
            .await?;
            let mut opened = Vec::with_capacity(rows.len());
            for r in &rows {
                let hash: Vec<u8> = r.try_get(2)?;
                let sealed: Vec<u8> = r.try_get(4)?;
                opened.push(open_v1(store, r.try_get(0)?, r.try_get(1)?, &hash, r.try_get(3)?, &sealed)?);
            }
            for (height, tree_size, count) in &blocks {
                let lo = tree_size - count;
                let n = opened.iter().filter(|(c, _)| (lo..*tree_size).contains(&to_i64(c.tx.global_sequence))).count();
                if to_i64(n as u64) != *count {
                    return Err(Error::Corrupt {
                        height: to_u64(*height),
                        reason: format!("v1 store holds {n} of the block's {count} transactions"),
                    });
                }
            }
            let shape: Vec<(u64, u64)> = blocks.iter().map(|b| (to_u64(b.0), to_u64(b.2))).collect();
            let items: Vec<(&CommittedTx, &[u8])> = opened.iter().map(|(c, b)| (c, b.as_slice())).collect();
            let packed = store.rows(&shape, &items)?;
            // Index rows are rebuilt from the repacked bodies when the store opens.
            write_bodies!(dbtx, &packed);
            repacked += opened.len() as u64;
            next = last.0 + 1;
        }
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM txs").fetch_one(&mut *dbtx).await?;
        if to_u64(stored) != repacked {
            return Err(Error::Corrupt {
                height: 0,
                reason: format!("v1 store holds {stored} transactions but its blocks cover {repacked}"),
            });
        }
        sqlx::raw_sql(drop_sql).execute(&mut *dbtx).await?;
    })?;
    tracing::info!(
        target: "core::store",
        transactions = repacked,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Store upgraded to packed blocks."
    );
    Ok(())
}
