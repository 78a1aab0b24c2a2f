//! Lookup indexes written behind the chain: reads find every committed transaction whether
//! its index rows are still in memory or already in the tables, and on SQLite the index file
//! is rebuilt from the chain when it is missing, belongs to another store, or was open when
//! the machine stopped.

use std::path::Path;

use kalima_core::Store;
use kalima_core::registry::ADMIN_ID;
use kalima_core::store::Backend;
use kalima_core::verify::verify_chain;
use sqlx::Connection;

use crate::common::{CHAIN, TestDb, backend_tests, put, run};

backend_tests!(reads_find_commits_before_and_after_their_index_rows_are_written);

/// Writes `n` readings of `/plant-1 temp` (every third with an idempotency key) and returns
/// their ids in order.
async fn write_readings(db: &TestDb, n: usize) -> Vec<[u8; 32]> {
    let c = db.chain().await;
    let mut ids = Vec::new();
    for i in 0..n {
        let mut p = put(ADMIN_ID, "/plant-1", "temp", format!("{i}").as_bytes());
        if i % 3 == 0 {
            p.idempotency_key = format!("reading-{i}");
        }
        let r = c.chain.submit(vec![p], None).await.expect("submit").remove(0);
        ids.push(r.id);
    }
    c.stop().await;
    ids
}

/// Every lookup a client can make answers for all of `ids`, and the chain verifies.
async fn assert_lookups(store: &Store, ids: &[[u8; 32]]) {
    for id in ids {
        assert!(store.tx_by_id(id).await.expect("by id").is_some(), "transaction {} not found", hex::encode(id));
    }
    let history = store.history("/plant-1", "temp", u64::MAX >> 1, 10_000).await.expect("history");
    assert_eq!(history.len(), ids.len(), "history of /plant-1 temp");
    let range = store.address_range("/plant-1", 0, u64::MAX >> 1, 10_000, false).await.expect("range");
    assert_eq!(range.len(), ids.len(), "/plant-1 by sequence");
    let keys: Vec<String> = (0..ids.len()).step_by(3).map(|i| format!("reading-{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let used = store.idempotency_lookup(ADMIN_ID, &refs).await.expect("idempotency");
    assert_eq!(used.len(), keys.len(), "idempotency keys found");
    verify_chain(store, CHAIN, |_| {}).await.expect("the chain and its indexes verify");
}

async fn reads_find_commits_before_and_after_their_index_rows_are_written(db: TestDb) {
    let c = db.chain().await;
    let store = c.chain.store().clone();
    let mut ids = Vec::new();
    for i in 0..40 {
        let mut p = put(ADMIN_ID, "/plant-1", "temp", format!("{i}").as_bytes());
        if i % 3 == 0 {
            p.idempotency_key = format!("reading-{i}");
        }
        let r = c.chain.submit(vec![p], None).await.expect("submit").remove(0);
        // Read at once: the rows may still be in memory only.
        assert!(store.tx_by_id(&r.id).await.expect("by id").is_some(), "reading {i} right after its commit");
        ids.push(r.id);
    }
    assert_lookups(&store, &ids).await;
    store.flush_index().await;
    assert_eq!(store.index_lag(), 0);
    assert_lookups(&store, &ids).await;
    c.stop().await;
    // Reopened, with every row in the tables.
    let store = db.store().await;
    assert_lookups(&store, &ids).await;
    store.close().await;
}

fn index_files(db: &Path) -> Vec<std::path::PathBuf> {
    ["-index", "-index-wal", "-index-shm"]
        .iter()
        .map(|s| {
            let mut p = db.as_os_str().to_owned();
            p.push(s);
            p.into()
        })
        .collect()
}

fn db_file(db: &TestDb) -> std::path::PathBuf {
    db.dir.path().join("kalima.db")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_index_file_is_rebuilt_from_the_chain() {
    run(Backend::Sqlite, |db| async move {
        let ids = write_readings(&db, 30).await;
        for f in index_files(&db_file(&db)) {
            let _ = std::fs::remove_file(f);
        }
        let store = db.store().await;
        assert_lookups(&store, &ids).await;
        store.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_file_of_another_store_is_replaced() {
    run(Backend::Sqlite, |other| async move {
        // Another store with the same genesis (so the same block 0) but its own salt and
        // readings.
        write_readings(&other, 12).await;
        run(Backend::Sqlite, |db| async move {
            let ids = write_readings(&db, 20).await;
            let (from, to) = (index_files(&db_file(&other)), index_files(&db_file(&db)));
            for (f, t) in from.iter().zip(&to) {
                let _ = std::fs::remove_file(t);
                if f.exists() {
                    std::fs::copy(f, t).expect("copy the other index file");
                }
            }
            let store = db.store().await;
            assert_lookups(&store, &ids).await;
            store.close().await;
        })
        .await;
    })
    .await;
}

/// Index writes are not synced; a file still marked open by another boot of the machine may
/// be torn and is rebuilt. Here it is damaged (a table emptied): with the mark of another
/// boot the damage is gone after reopening; without it, verify names the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_file_left_open_by_another_boot_is_rebuilt() {
    run(Backend::Sqlite, |db| async move {
        let ids = write_readings(&db, 25).await;
        let index_url = format!("sqlite://{}", index_files(&db_file(&db))[0].display());
        let damage = |mark: &'static str| {
            let url = index_url.clone();
            async move {
                let mut c = sqlx::SqliteConnection::connect(&url).await.expect("open index file");
                sqlx::raw_sql(&format!(
                    "DROP TRIGGER IF EXISTS tx_by_stream_no_delete; DELETE FROM tx_by_stream; \
                     UPDATE index_state SET open_on_boot = {mark} WHERE id = 0;"
                ))
                .execute(&mut c)
                .await
                .expect("damage the index file");
                c.close().await.expect("close");
            }
        };
        // A clean close, then damage: nothing says the file may be torn.
        damage("NULL").await;
        let store = db.store().await;
        match verify_chain(&store, CHAIN, |_| {}).await {
            Err(kalima_core::Error::Corrupt { reason, .. }) => assert!(reason.contains("tx_by_stream"), "{reason}"),
            other => panic!("an emptied index table verified: {other:?}"),
        }
        store.close().await;
        // Marked open under another boot: rebuilt on open.
        damage("X'00'").await;
        let store = db.store().await;
        assert_lookups(&store, &ids).await;
        store.close().await;
    })
    .await;
}
