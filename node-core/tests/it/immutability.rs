//! Chain rows are append-only in the database itself: every UPDATE, DELETE (and TRUNCATE on
//! PostgreSQL) on blocks, transaction bodies, their index rows, checkpoints and the store's metadata fails, whatever code path issues it,
//! and leaves the rows as they were.

use kalima_core::store::Backend;

use crate::common::{TestDb, backend_tests, put, submit_one};

backend_tests!(chain_rows_cannot_be_rewritten);

async fn chain_rows_cannot_be_rewritten(db: TestDb) {
    let c = db.chain().await;
    for i in 0..3 {
        let mut p = put("admin", "/plant-1", "temp", format!("2{i}").as_bytes());
        p.idempotency_key = format!("reading-{i}");
        submit_one(&c.chain, p).await;
    }
    c.chain.checkpoint_now().await.unwrap();
    let store = c.chain.store().clone();

    let snapshot = |s: kalima_core::Store| async move {
        let blocks = s.raw_blocks(0, 1000).await.unwrap();
        let bodies = s.raw_bodies(0, 1000).await.unwrap();
        let cps = s.checkpoints_from(crate::common::CHAIN, 0, 1000).await.unwrap();
        (
            blocks.iter().map(|b| (b.height, b.hash.clone(), b.header.clone())).collect::<Vec<_>>(),
            bodies
                .iter()
                .map(|t| (t.height, t.first_seq, t.leaves.clone(), t.key_id, t.sealed.clone()))
                .collect::<Vec<_>>(),
            cps,
            s.stored_index_digest(u64::MAX, &kalima_core::store::IndexDigest::new(&[1; 64])).await.unwrap(),
        )
    };
    let before = snapshot(store.clone()).await;
    assert!(!before.0.is_empty() && !before.1.is_empty() && !before.2.is_empty());

    let mut statements = vec![
        "UPDATE block_txs SET key_id = 7",
        "UPDATE block_txs SET sealed = leaves WHERE height = 1",
        "UPDATE block_txs SET first_seq = first_seq + 100 WHERE height = 0",
        "DELETE FROM block_txs WHERE height = 1",
        "DELETE FROM block_txs",
        "UPDATE blocks SET hash = header",
        "UPDATE blocks SET timestamp_ms = 0 WHERE height = 1",
        "DELETE FROM blocks WHERE height = 2",
        "DELETE FROM blocks",
        "UPDATE checkpoints SET tree_size = 1",
        "DELETE FROM checkpoints",
        "UPDATE store_meta SET value = value || value",
        "DELETE FROM store_meta",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    for t in kalima_core::store::INDEX_TABLES {
        statements.push(format!("UPDATE {t} SET height = height + 1"));
        statements.push(format!("DELETE FROM {t} WHERE global_seq = 1"));
        statements.push(format!("DELETE FROM {t}"));
    }
    if db.backend == Backend::Postgres {
        for t in crate::common::CHAIN_TABLES {
            statements.push(format!("TRUNCATE {t}"));
        }
    }
    for sql in &statements {
        let res = store.execute_raw(sql).await;
        assert!(res.is_err(), "{:?}: `{sql}` must be refused, got {res:?}", db.backend);
        let msg = format!("{:#}", res.unwrap_err());
        assert!(msg.contains("immutable"), "{:?}: `{sql}` failed for another reason: {msg}", db.backend);
    }
    assert_eq!(snapshot(store.clone()).await, before, "nothing changed");

    // Appending stays possible, and the untouched chain still verifies.
    submit_one(&c.chain, put("admin", "/plant-1", "temp", b"30")).await;
    kalima_core::verify::verify_chain(&store, crate::common::CHAIN, |_| {}).await.unwrap();
}
