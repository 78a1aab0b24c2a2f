//! Encryption at rest: transaction bytes are sealed with AES-256-GCM before they reach the
//! database, the key id of each row is the key that was active when it was written, rotation
//! keeps old rows readable, and a wrong key ring is refused instead of returning garbage.

use std::collections::BTreeMap;

use kalima_core::Error;
use kalima_core::keys::DataKeys;
use kalima_core::store::Backend;
use kalima_core::verify::verify_chain;

use crate::common::{CHAIN, TestDb, all_txs, backend_tests, put, submit_one};

backend_tests!(bodies_are_sealed_at_rest, key_rotation_keeps_old_rows_readable, wrong_key_ring_is_refused);

const MARKER: &[u8] = b"PLAINTEXT-MARKER-5f1c2a9d-reading-of-line-2";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn bodies_are_sealed_at_rest(db: TestDb) {
    let c = db.chain().await;
    let r = submit_one(&c.chain, put("admin", "/plant-1/line-2", "secret-key-7d1e", MARKER)).await;
    let store = c.chain.store().clone();

    let raw = store.raw_bodies(r.height, 1).await.unwrap();
    assert_eq!(raw.len(), 1);
    let body = &raw[0];
    assert_eq!(body.height, r.height);
    let committed = store.tx_by_id(&r.id).await.unwrap().expect("reads back");
    assert_eq!(committed.tx.content.body, MARKER, "decrypted on read");
    let canonical = committed.tx.encode();
    assert!(!contains(&body.sealed, MARKER), "the sealed column holds the body in clear");
    assert!(!contains(&body.sealed, &canonical[..40]), "the sealed column holds the canonical bytes in clear");
    // The block holds this one transaction: nonce (12) + packed bytes (version, count, one
    // length, the canonical bytes) + GCM tag (16); its leaf is the transaction id.
    let opened = store.open_body(body).unwrap();
    assert_eq!(opened.len(), 1);
    assert_eq!(body.sealed.len(), 12 + 1 + 4 + 4 + canonical.len() + 16);
    assert_eq!(body.leaves, r.id.to_vec());

    if db.backend == Backend::Sqlite {
        // Nowhere in the database files either (main file and write-ahead log).
        c.stop().await;
        for name in ["kalima.db", "kalima.db-wal"] {
            let path = db.dir.path().join(name);
            if let Ok(bytes) = std::fs::read(&path) {
                assert!(!contains(&bytes, MARKER), "{} holds the body in clear", path.display());
                // Lookups go through salted hashes: addresses and keys are not stored either.
                assert!(!contains(&bytes, b"/plant-1/line-2"), "{} holds the address in clear", path.display());
                assert!(!contains(&bytes, b"secret-key-7d1e"), "{} holds the key in clear", path.display());
            }
        }
    }
}

async fn key_rotation_keeps_old_rows_readable(db: TestDb) {
    // Three generations of keys: write under each, restart, rotate.
    let mut written: Vec<(u32, kalima_core::Receipt)> = Vec::new();
    for generation in 1..=3u32 {
        if generation > 1 {
            assert_eq!(DataKeys::rotate(&db.keys_path()).unwrap(), generation, "rotation adds the next id");
        }
        let c = db.chain().await;
        assert_eq!(c.chain.store().keys().active_id(), generation);
        for i in 0..3 {
            let body = format!("gen-{generation}-value-{i}");
            let r = submit_one(&c.chain, put("admin", "/plant-1", &format!("k{i}"), body.as_bytes())).await;
            written.push((generation, r));
        }
        // Values written under earlier keys were restored into the memcache at open.
        for (g, r) in &written {
            let got = c.chain.store().tx_by_id(&r.id).await.unwrap().expect("readable");
            assert!(got.tx.content.body.starts_with(format!("gen-{g}-").as_bytes()));
        }
        c.stop().await;
    }

    let store = db.store().await;
    assert_eq!(store.keys().ids(), vec![1, 2, 3]);
    let raw = store.raw_bodies(0, u32::MAX).await.unwrap();
    for (generation, r) in &written {
        let body = raw.iter().find(|b| b.height == r.height).expect("block body");
        assert_eq!(body.key_id, *generation, "block {} was written under key {generation}", r.height);
        let got = store.tx_by_sequence(r.global_sequence).await.unwrap().expect("readable");
        assert_eq!(got.id, r.id);
    }
    // The genesis block was sealed with the first key.
    assert_eq!(raw[0].key_id, 1);
    let opened: usize = raw.iter().map(|b| store.open_body(b).unwrap().len()).sum();
    assert_eq!(all_txs(&store).await.len(), opened);
    verify_chain(&store, CHAIN, |_| {}).await.unwrap();
}

async fn wrong_key_ring_is_refused(db: TestDb) {
    let c = db.chain().await;
    submit_one(&c.chain, put("admin", "/plant-1", "temp", b"20")).await;
    c.stop().await;

    // Same key id, different key material (e.g. the ring of another node).
    let other = db.dir.path().join("other-keys.json");
    let foreign = DataKeys::create(&other).unwrap();
    let store = db.store_with(foreign).await;
    let err = store.tx_by_sequence(1).await.expect_err("a foreign key must not open the row");
    assert!(matches!(err, Error::Crypto(_)), "got {err:?}");

    // A ring that lacks the row's key id names the missing key.
    let mut keys = BTreeMap::new();
    keys.insert(2u32, hex::encode([9u8; 32]));
    std::fs::write(&other, crate::common::key_ring_json(2, &keys)).unwrap();
    let store = db.store_with(DataKeys::load(&other).unwrap()).await;
    let err = store.tx_by_sequence(1).await.expect_err("unknown key id");
    assert!(matches!(err, Error::UnknownDataKey(1)), "got {err:?}");
}
