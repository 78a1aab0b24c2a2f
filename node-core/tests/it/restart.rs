//! Restart: a node stopped and reopened on the same store restores its memcache, sequences,
//! Merkle tree, head, registry, idempotency keys and pending TTLs, and new writes continue
//! exactly where the old node stopped.

use std::time::Duration;

use kalima_core::registry::{ADMIN_ID, NODE_DEVICE_ID};
use kalima_core::tx::TxContent;
use kalima_core::verify::verify_chain;
use kalima_core::{Error, Rejection};

use crate::chain::assert_sequencing;
use crate::common::{ADMIN_TOKEN, CHAIN, TestDb, backend_tests, poll_until, put, register_device, submit_one};

backend_tests!(restart_after_shutdown, restart_after_kill);

#[derive(Clone, Copy, Debug)]
enum Stop {
    /// `Chain::shutdown` and wait for the sequencer (SIGTERM).
    Shutdown,
    /// The sequencer task aborted between commits (a crash or SIGKILL).
    Kill,
}

async fn restart_after_shutdown(db: TestDb) {
    state_is_restored_and_sequences_continue(db, Stop::Shutdown).await;
}

async fn restart_after_kill(db: TestDb) {
    state_is_restored_and_sequences_continue(db, Stop::Kill).await;
}

/// What a node knows in memory that must survive a restart.
#[derive(Debug, PartialEq)]
struct Snapshot {
    values: Vec<(String, String, [u8; 32])>,
    sequences: Vec<(String, u64)>,
    tree_size: u64,
    head: (u64, [u8; 32], [u8; 32]),
    root: [u8; 32],
    devices: Vec<String>,
}

async fn snapshot(chain: &kalima_core::Chain) -> Snapshot {
    let values: Vec<_> = chain
        .memcache()
        .snapshot()
        .iter()
        .map(|c| (c.tx.content.address.clone(), c.tx.content.key.clone(), c.id))
        .collect();
    let mut addresses: Vec<String> = values.iter().map(|v| v.0.clone()).collect();
    addresses.extend(["/plant-1/deleted".to_string()]);
    addresses.sort();
    addresses.dedup();
    let head = chain.head().block;
    Snapshot {
        sequences: addresses.iter().map(|a| (a.clone(), chain.memcache().sequence(a))).collect(),
        values,
        tree_size: chain.tree_size(),
        head: (head.header.height, head.hash, head.header.merkle_root),
        root: chain.root_at(chain.tree_size()).await.unwrap(),
        devices: chain.registry().list().iter().map(|d| d.id.clone()).collect(),
    }
}

async fn state_is_restored_and_sequences_continue(db: TestDb, stop: Stop) {
    let c = db.chain().await;
    let chain = &c.chain;
    register_device(chain, "sensor-1", "s1-token", &[("/plant-1", true, true)]).await;
    // Enough transactions for several 256-leaf Merkle chunks.
    for batch in 0..6 {
        let items: Vec<TxContent> = (0..100)
            .map(|i| {
                put(
                    "sensor-1",
                    &format!("/plant-1/line-{}", i % 4),
                    &format!("k{}", i % 9),
                    format!("{batch}-{i}").as_bytes(),
                )
            })
            .collect();
        chain.submit(items, None).await.unwrap();
    }
    let last_temp = submit_one(chain, put("sensor-1", "/plant-1/line-2", "temp", b"21.5")).await;
    submit_one(chain, put("sensor-1", "/plant-1/deleted", "x", b"1")).await;
    submit_one(chain, put("sensor-1", "/plant-1/deleted", "x", b"")).await;
    submit_one(chain, TxContent { idempotency_key: "once".into(), ..put("sensor-1", "/plant-1", "v", b"1") }).await;
    // Expires after the restart (the old node is stopped well within 3 s): the new node must
    // issue the delete.
    let ttl = submit_one(chain, TxContent { ttl_secs: 3, ..put("sensor-1", "/plant-1/ttl", "t", b"soon") }).await;

    let before = snapshot(chain).await;
    assert!(before.tree_size > 600);
    assert!(before.values.iter().any(|v| v.0 == "/plant-1/ttl"));
    match stop {
        Stop::Shutdown => c.stop().await,
        Stop::Kill => c.kill().await,
    }

    let c = db.chain().await;
    let chain = &c.chain;
    assert_eq!(snapshot(chain).await, before, "{stop:?}: restored state differs");
    assert!(chain.is_ready());
    assert_eq!(chain.memcache().get("/plant-1/line-2", "temp").map(|v| v.id), Some(last_temp.id));
    assert!(chain.memcache().get("/plant-1/deleted", "x").is_none(), "a delete stays a delete");
    assert!(chain.registry().authenticate(ADMIN_TOKEN).is_ok(), "genesis was not replayed and still applies");
    assert!(chain.registry().authenticate("s1-token").unwrap().can_write("/plant-1/x"));
    assert_eq!(chain.registry().list().iter().filter(|d| d.id == ADMIN_ID).count(), 1);

    // Idempotency keys survive.
    let err = chain
        .submit(vec![TxContent { idempotency_key: "once".into(), ..put("sensor-1", "/plant-1", "v", b"2") }], None)
        .await
        .expect_err("key used before the restart");
    assert!(matches!(err, Error::Rejected(Rejection::DuplicateIdempotencyKey { .. })), "{err:?}");

    // New writes continue every sequence.
    let seq_before = chain.memcache().sequence("/plant-1/line-2");
    let r = submit_one(chain, put("sensor-1", "/plant-1/line-2", "temp", b"22.0")).await;
    assert_eq!(r.global_sequence, chain.tree_size() - 1);
    assert!(r.global_sequence >= before.tree_size);
    assert_eq!(r.sequence, seq_before + 1);
    assert!(r.height > before.head.0);
    let stored = chain.store().tx_by_id(&r.id).await.unwrap().unwrap();
    assert_eq!(stored.tx.previous, last_temp.id, "previous links across the restart");
    let block = chain.store().block(r.height).await.unwrap().unwrap();
    let parent = chain.store().block(r.height - 1).await.unwrap().unwrap();
    assert_eq!(block.header.prev_hash, parent.hash);

    // The pending TTL survived the restart.
    let deleted = poll_until(Duration::from_secs(8), || {
        chain.memcache().last("/plant-1/ttl", "t").filter(|l| l.tx.content.body.is_empty())
    })
    .await
    .expect("the TTL value was not deleted after the restart");
    assert_eq!(deleted.tx.content.device_id, NODE_DEVICE_ID);
    assert_eq!(deleted.tx.previous, ttl.id);

    assert_sequencing(chain.store()).await;
    verify_chain(chain.store(), CHAIN, |_| {}).await.unwrap();
}
