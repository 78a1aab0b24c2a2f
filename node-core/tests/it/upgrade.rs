//! Stores written by the previous release (layout v1: one sealed row per transaction in a
//! `txs` table) are repacked into packed block bodies on the first connect: the chain then
//! verifies, every lookup answers as before, and the v1 table is gone. A v1 row that does
//! not match its hash stops the upgrade and leaves the v1 data as it was.
//!
//! The fixture `tests/fixtures/store-v1` was written by the v1 node: chain "legacy-fixture",
//! 13 blocks, 218 transactions, one checkpoint at tree size 218, data keys 1 and 2
//! (transactions 208..218 were written after `kalima keys rotate`). The PostgreSQL variant
//! builds the same v1 database from the fixture's rows with the v1 migration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kalima_core::keys::DataKeys;
use kalima_core::store::Backend;
use kalima_core::verify::verify_chain;
use kalima_core::{Error, Store};
use sqlx::{Connection, Row};

use crate::common::{TestDb, backend_tests};

backend_tests!(v1_store_is_repacked_and_answers_as_before, damaged_v1_row_stops_the_upgrade);

const FIXTURE_CHAIN: &str = "legacy-fixture";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/store-v1")
}

fn fixture_keys() -> Arc<DataKeys> {
    Arc::new(DataKeys::load(&fixture().join("data-keys.json")).expect("fixture data keys"))
}

/// Puts the fixture's v1 database at `db.url`, with `flip_seq` (if any) having one byte of
/// its sealed column flipped.
async fn load_v1(db: &TestDb, flip_seq: Option<i64>) {
    let src = fixture().join("kalima.db");
    let tmp = tempfile::tempdir().expect("temp dir");
    let v1 = tmp.path().join("v1.db");
    std::fs::copy(&src, &v1).expect("copy fixture");
    let mut lite = sqlx::SqliteConnection::connect(&format!("sqlite://{}", v1.display())).await.expect("open fixture");
    if let Some(seq) = flip_seq {
        sqlx::raw_sql("DROP TRIGGER txs_no_update").execute(&mut lite).await.expect("drop trigger");
        let n = sqlx::query(
            "UPDATE txs SET sealed = substr(sealed, 1, 20) || X'FF' || substr(sealed, 22) WHERE global_seq = $1",
        )
        .bind(seq)
        .execute(&mut lite)
        .await
        .expect("flip")
        .rows_affected();
        assert_eq!(n, 1);
        // Put the trigger back: the upgrade must not depend on it being gone.
        sqlx::raw_sql(
            "CREATE TRIGGER txs_no_update BEFORE UPDATE ON txs BEGIN SELECT RAISE(ABORT, 'transactions are immutable'); END;",
        )
        .execute(&mut lite)
        .await
        .expect("restore trigger");
    }
    match db.backend {
        Backend::Sqlite => {
            lite.close().await.expect("close fixture");
            let dst = db.url.strip_prefix("sqlite://").expect("sqlite url");
            std::fs::copy(&v1, dst).expect("install fixture");
        }
        Backend::Postgres => {
            // The v1 schema, exactly as the v1 node migrated it.
            let dir = tmp.path().join("migrations");
            std::fs::create_dir(&dir).expect("mkdir");
            let first = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres/0001_chain.sql");
            std::fs::copy(&first, dir.join("0001_chain.sql")).expect("copy v1 migration");
            let mut pg = sqlx::PgConnection::connect(&db.url).await.expect("connect postgres");
            sqlx::migrate::Migrator::new(dir.as_path())
                .await
                .expect("v1 migrator")
                .run(&mut pg)
                .await
                .expect("v1 schema");
            for (table, cols) in [
                ("blocks", "height, hash, header, timestamp_ms, tree_size, tx_count"),
                ("txs", "global_seq, height, hash, address, tx_key, seq, device_id, idem_key, key_id, sealed"),
                ("checkpoints", "tree_size, height, timestamp_ms, root, signer, signature"),
            ] {
                let rows = sqlx::query(&format!("SELECT {cols} FROM {table}"))
                    .fetch_all(&mut lite)
                    .await
                    .expect("read fixture");
                let n = cols.split(", ").count();
                let params = (1..=n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
                let insert = format!("INSERT INTO {table} ({cols}) VALUES ({params})");
                for r in &rows {
                    let mut q = sqlx::query(&insert);
                    for (i, col) in cols.split(", ").enumerate() {
                        q = match col {
                            "hash" | "header" | "root" | "signature" | "sealed" => q.bind(r.get::<Vec<u8>, _>(i)),
                            "address" | "tx_key" | "device_id" | "signer" => q.bind(r.get::<String, _>(i)),
                            "idem_key" => q.bind(r.get::<Option<String>, _>(i)),
                            _ => q.bind(r.get::<i64, _>(i)),
                        };
                    }
                    q.execute(&mut pg).await.expect("copy row");
                }
            }
            pg.close().await.expect("close postgres");
        }
    }
}

async fn table_exists(store: &Store, table: &str) -> bool {
    store.execute_raw(&format!("SELECT 1 FROM {table} LIMIT 1")).await.is_ok()
}

async fn v1_store_is_repacked_and_answers_as_before(db: TestDb) {
    load_v1(&db, None).await;
    let store = Store::connect(&db.url, fixture_keys()).await.expect("upgrade on connect");
    assert!(!table_exists(&store, "txs").await, "{:?}: the v1 table was dropped", db.backend);

    let report = verify_chain(&store, FIXTURE_CHAIN, |_| {}).await.expect("the repacked chain verifies");
    assert_eq!((report.blocks, report.transactions, report.checkpoints), (13, 218, 1));
    assert_eq!(store.tx_count().await.unwrap(), 218);
    assert_eq!(store.body_count().await.unwrap(), 13);
    let cp = store.latest_checkpoint(FIXTURE_CHAIN).await.unwrap().expect("checkpoint");
    assert_eq!(hex::encode(cp.root).get(..8), Some("d34613a6"));

    // Lookups by sequence, id, history and address, as the v1 node answered them.
    let t100 = store.tx_by_sequence(100).await.unwrap().expect("tx 100");
    assert_eq!((t100.tx.content.address.as_str(), t100.tx.content.key.as_str()), ("/plant/line-1", "temp-0"));
    let id = hex::encode(t100.id);
    assert!(id.starts_with("10c2e2c7") && id.ends_with("9b85"), "{id}");
    assert_eq!(store.tx_by_id(&t100.id).await.unwrap().map(|c| c.tx.global_sequence), Some(100));
    let history = store.history("/plant/line-1", "temp-0", u64::MAX >> 1, 1000).await.unwrap();
    assert!(history.iter().any(|c| c.id == t100.id));
    assert!(history.iter().all(|c| c.tx.content.address == "/plant/line-1" && c.tx.content.key == "temp-0"));
    assert!(history.windows(2).all(|w| w[0].tx.global_sequence > w[1].tx.global_sequence), "newest first");
    let by_address = store.address_range("/plant/line-1", 0, u64::MAX, 1000, false).await.unwrap();
    let seqs: Vec<u64> = by_address.iter().map(|c| c.tx.sequence).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "per-address sequences are gap-free");

    // Idempotency keys written by v1 are still found, so a retried write is not applied twice.
    let t204 = store.tx_by_sequence(204).await.unwrap().expect("tx 204");
    assert_eq!(t204.tx.content.idempotency_key, "legacy-1");
    let found = store.idempotency_lookup("admin", &["legacy-1", "never-used"]).await.unwrap();
    assert_eq!(found, vec![("legacy-1".to_string(), t204.id)]);
    assert!(hex::encode(t204.id).starts_with("8a929ec0"));

    // Rows written under both v1 keys were read; the repacked bodies use the active key.
    for seq in [0, 207, 208, 217] {
        assert!(store.tx_by_sequence(seq).await.unwrap().is_some(), "tx {seq}");
    }
    let bodies = store.raw_bodies(0, 100).await.unwrap();
    assert!(bodies.iter().all(|b| b.key_id == store.keys().active_id()));
    let all = store.txs_between(0, 218, 1000).await.unwrap();
    assert_eq!(all.len(), 218);

    // Connecting again is a no-op: same chain, same answers.
    store.close().await;
    let again = Store::connect(&db.url, fixture_keys()).await.expect("second connect");
    assert_eq!(verify_chain(&again, FIXTURE_CHAIN, |_| {}).await.unwrap(), report);
    assert_eq!(again.txs_between(0, 218, 1000).await.unwrap(), all);
    again.close().await;
}

async fn damaged_v1_row_stops_the_upgrade(db: TestDb) {
    load_v1(&db, Some(100)).await;
    match Store::connect(&db.url, fixture_keys()).await {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("100"), "{reason}"),
        Err(e) => panic!("{:?}: expected Error::Corrupt naming transaction 100, got {e:?}", db.backend),
        Ok(_) => panic!("{:?}: a damaged v1 row was repacked", db.backend),
    }
    // Nothing was half-done: the v1 rows are all there and nothing was packed.
    let url = db.url.clone();
    let count = |sql: &'static str| {
        let url = url.clone();
        async move {
            match db.backend {
                Backend::Sqlite => {
                    let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
                    sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut c).await.unwrap()
                }
                Backend::Postgres => {
                    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
                    sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut c).await.unwrap()
                }
            }
        }
    };
    assert_eq!(count("SELECT COUNT(*) FROM txs").await, 218);
    assert_eq!(count("SELECT COUNT(*) FROM block_txs").await, 0);
    // Nor was anything indexed: SQLite keeps the lookup indexes in their own file.
    let indexed = match db.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&format!("{url}-index")).await.unwrap();
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM tx_by_stream").fetch_one(&mut c).await.unwrap()
        }
        Backend::Postgres => count("SELECT COUNT(*) FROM tx_by_stream").await,
    };
    assert_eq!(indexed, 0);
}
