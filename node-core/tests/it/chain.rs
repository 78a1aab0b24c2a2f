//! The chain engine: sequences, `previous` links, deletes, group commit under concurrent
//! writers with the 16 KB block limit, TTL deletes issued by the node, idempotency keys,
//! registry guards, and what happens when the last handle goes away.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::future::join_all;
use kalima_core::block::MAX_BLOCK_TX_BYTES;
use kalima_core::bus::SubscriptionEnd;
use kalima_core::chain::Guard;
use kalima_core::registry::{ADMIN_ID, DEVICES_ADDRESS, NODE_DEVICE_ID};
use kalima_core::tx::TxContent;
use kalima_core::{Error, Rejection};

use crate::common::{
    TestDb, all_blocks, all_txs, backend_tests, device_registration, poll_until, put, register_device, submit_one,
};

backend_tests!(
    revocation_and_grant_removal_apply_to_queued_writes,
    sequences_and_previous_links,
    delete_removes_the_value,
    concurrent_submissions_group_commit_within_16kb,
    ttl_value_is_deleted_by_the_node,
    duplicate_idempotency_key_is_rejected,
    registry_guards,
    shutdown_commits_queued_work_then_stops,
    dropping_every_handle_stops_the_sequencer,
    failed_commits_leave_nothing_behind_under_load,
    ttl_deletes_are_issued_under_continuous_writes,
);

/// Checks the sequencing invariants over the whole stored chain: global sequence gap-free
/// from 0, per-address sequence gap-free from 1 in global order, `previous` = id of the prior
/// transaction on the same address and key (zero for the first), ids = leaf hashes.
pub(crate) async fn assert_sequencing(store: &kalima_core::Store) {
    let txs = all_txs(store).await;
    let mut addr: HashMap<&str, u64> = HashMap::new();
    let mut last: HashMap<(&str, &str), [u8; 32]> = HashMap::new();
    for (i, c) in txs.iter().enumerate() {
        let t = &c.tx;
        assert_eq!(t.global_sequence, i as u64, "global sequence has a gap");
        assert_eq!(c.id, kalima_core::merkle::leaf_hash(&t.encode()), "id is the leaf hash");
        let a = addr.entry(t.content.address.as_str()).or_insert(0);
        *a += 1;
        assert_eq!(t.sequence, *a, "per-address sequence of {} at global {i}", t.content.address);
        let k = (t.content.address.as_str(), t.content.key.as_str());
        assert_eq!(t.previous, last.get(&k).copied().unwrap_or([0; 32]), "previous of global {i}");
        last.insert(k, c.id);
    }
}

async fn sequences_and_previous_links(db: TestDb) {
    let c = db.chain().await;
    let chain = &c.chain;
    // Genesis holds the admin device.
    assert_eq!(chain.tree_size(), 1);
    assert_eq!(chain.head().block.header.height, 0);
    assert!(chain.registry().get(ADMIN_ID).is_some());

    // Single writes and a mixed batch over two addresses and several keys.
    let mut receipts = Vec::new();
    receipts.push(submit_one(chain, put("admin", "/plant-1/line-2", "temp", b"21.5")).await);
    receipts.push(submit_one(chain, put("admin", "/plant-1/line-2", "pressure", b"1.01")).await);
    receipts.extend(
        chain
            .submit(
                vec![
                    put("admin", "/plant-1/line-2", "temp", b"21.6"),
                    put("admin", "/plant-1/line-3", "temp", b"30"),
                    put("admin", "/plant-1/line-2", "temp", b"21.7"),
                    put("admin", "/plant-1/line-3", "temp", b"31"),
                ],
                None,
            )
            .await
            .unwrap(),
    );
    receipts.push(submit_one(chain, put("admin", "/plant-1/line-2", "temp", b"21.8")).await);

    let globals: Vec<u64> = receipts.iter().map(|r| r.global_sequence).collect();
    assert_eq!(globals, (1..=7).collect::<Vec<_>>(), "global sequence continues after genesis, gap-free");
    let line2: Vec<u64> = [0, 1, 2, 4, 6].iter().map(|&i| receipts[i].sequence).collect();
    assert_eq!(line2, vec![1, 2, 3, 4, 5], "per-address sequence of /plant-1/line-2");
    assert_eq!([receipts[3].sequence, receipts[5].sequence], [1, 2], "per-address sequence of /plant-1/line-3");
    assert_eq!(chain.memcache().sequence("/plant-1/line-2"), 5);

    // `previous` chains the temp readings of line 2; the first one has none.
    let store = chain.store();
    let get = |i: usize| {
        let id = receipts[i].id;
        async move { store.tx_by_id(&id).await.unwrap().expect("stored") }
    };
    assert_eq!(get(0).await.tx.previous, [0; 32]);
    assert_eq!(get(1).await.tx.previous, [0; 32], "another key starts its own chain");
    assert_eq!(get(2).await.tx.previous, receipts[0].id);
    assert_eq!(get(4).await.tx.previous, receipts[2].id, "links within one batch");
    assert_eq!(get(6).await.tx.previous, receipts[4].id);
    assert_eq!(get(3).await.tx.previous, [0; 32]);
    assert_eq!(get(5).await.tx.previous, receipts[3].id);

    // Receipts name the block that holds each transaction, and the head moved.
    for r in &receipts {
        assert_eq!(get_height(store, r.global_sequence).await, r.height);
    }
    assert_eq!(chain.head().block.header.height, receipts[6].height);
    assert_eq!(chain.tree_size(), 8);
    assert_eq!(chain.head().block.header.tree_size, 8);

    // The memcache holds the latest value of each key.
    let v = chain.memcache().get("/plant-1/line-2", "temp").expect("value");
    assert_eq!(v.tx.content.body, b"21.8");
    assert_eq!(chain.memcache().keys("/plant-1/line-2"), vec!["pressure".to_string(), "temp".to_string()]);

    assert_sequencing(store).await;
}

async fn get_height(store: &kalima_core::Store, seq: u64) -> u64 {
    store.tx_by_sequence(seq).await.unwrap().expect("stored").height
}

async fn delete_removes_the_value(db: TestDb) {
    let c = db.chain().await;
    let chain = &c.chain;
    let a = "/plant-1/line-2";
    let p = submit_one(chain, put("admin", a, "temp", b"21.5")).await;
    submit_one(chain, put("admin", a, "pressure", b"1.01")).await;
    assert_eq!(chain.memcache().get(a, "temp").map(|v| v.id), Some(p.id));

    let d = submit_one(chain, put("admin", a, "temp", b"")).await;
    assert!(chain.memcache().get(a, "temp").is_none(), "the deleted value is gone");
    assert_eq!(chain.memcache().keys(a), vec!["pressure".to_string()]);
    let last = chain.memcache().last(a, "temp").expect("the delete is the last transaction");
    assert_eq!(last.id, d.id);
    assert_eq!(last.tx.previous, p.id, "the delete links to the value it removed");
    assert_eq!(d.sequence, 3, "a delete takes a per-address sequence");

    // The history keeps both; a new put links to the delete.
    let h = chain.store().history(a, "temp", u64::MAX, 10).await.unwrap();
    assert_eq!(h.iter().map(|c| c.id).collect::<Vec<_>>(), vec![d.id, p.id]);
    let again = submit_one(chain, put("admin", a, "temp", b"22")).await;
    let stored = chain.store().tx_by_id(&again.id).await.unwrap().unwrap();
    assert_eq!(stored.tx.previous, d.id);
    assert_eq!(chain.memcache().get(a, "temp").map(|v| v.id), Some(again.id));

    // Deleting the last key empties the address.
    submit_one(chain, put("admin", a, "temp", b"")).await;
    submit_one(chain, put("admin", a, "pressure", b"")).await;
    assert!(chain.memcache().values(a).is_empty());
    assert!(!chain.memcache().addresses("/plant-1").contains(&a.to_string()));
    assert_sequencing(chain.store()).await;
}

async fn concurrent_submissions_group_commit_within_16kb(db: TestDb) {
    let c = db.chain().await;
    let chain = &c.chain;
    let before_height = chain.head().block.header.height;
    const N: usize = 400;
    // ~1 KB bodies: 400 of them are ~25 blocks' worth, so commits must split into blocks.
    let futs = (0..N).map(|i| {
        let body = vec![b'a' + (i % 26) as u8; 900 + (i % 7) * 30];
        let address = format!("/plant-{}/line-{}", i % 3, i % 5);
        chain.submit(vec![put("admin", &address, &format!("k{}", i % 11), &body)], None)
    });
    let results = join_all(futs).await;
    let mut receipts = Vec::with_capacity(N);
    for (i, r) in results.into_iter().enumerate() {
        let mut r = r.unwrap_or_else(|e| panic!("submission {i} failed: {e:#}"));
        assert_eq!(r.len(), 1);
        receipts.push(r.remove(0));
    }
    let mut globals: Vec<u64> = receipts.iter().map(|r| r.global_sequence).collect();
    globals.sort_unstable();
    assert_eq!(globals, (1..=N as u64).collect::<Vec<_>>(), "every submission committed exactly once");
    assert_eq!(chain.tree_size(), N as u64 + 1);
    let new_blocks = chain.head().block.header.height - before_height;
    assert!(new_blocks <= N as u64, "{new_blocks} blocks for {N} submissions");
    assert!(new_blocks >= 20, "{new_blocks} blocks cannot hold ~380 KB at <= 16 KB each");

    // Every block, read back raw: its transactions are exactly its range, they fit in 16 KB of
    // canonical bytes, and the receipts agree with where they landed.
    let store = chain.store();
    let txs = all_txs(store).await;
    let blocks = all_blocks(store).await;
    let mut by_height: BTreeMap<u64, Vec<&kalima_core::CommittedTx>> = BTreeMap::new();
    for t in &txs {
        by_height.entry(t.height).or_default().push(t);
    }
    let mut seen = 0u64;
    for b in &blocks {
        let in_block = by_height.get(&b.height).cloned().unwrap_or_default();
        assert_eq!(in_block.len() as u64, u64::from(b.tx_count), "block {} tx_count", b.height);
        assert_eq!(b.first_sequence(), seen, "block {} starts where the previous ended", b.height);
        for (j, t) in in_block.iter().enumerate() {
            assert_eq!(t.tx.global_sequence, seen + j as u64);
        }
        seen = b.tree_size;
        let bytes: usize = in_block.iter().map(|t| t.tx.encode().len()).sum();
        assert!(bytes <= MAX_BLOCK_TX_BYTES, "block {} holds {bytes} bytes of transactions", b.height);
    }
    assert_eq!(seen, chain.tree_size());
    let height_of: HashMap<u64, u64> = txs.iter().map(|t| (t.tx.global_sequence, t.height)).collect();
    for r in &receipts {
        assert_eq!(height_of[&r.global_sequence], r.height);
    }
    assert_sequencing(store).await;
    kalima_core::verify::verify_chain(store, crate::common::CHAIN, |_| {}).await.unwrap();
}

async fn ttl_value_is_deleted_by_the_node(db: TestDb) {
    let c = db.chain().await;
    let chain = &c.chain;
    let a = "/plant-1/line-2";
    // `kept` expires first but is overwritten by a put without TTL: the node must not delete
    // it. `gone` expires last; once its delete is in, `kept`'s expiry was handled too.
    let kept = submit_one(chain, TxContent { ttl_secs: 1, ..put("admin", a, "kept", b"1") }).await;
    let kept2 = submit_one(chain, put("admin", a, "kept", b"2")).await;
    let gone = submit_one(chain, TxContent { ttl_secs: 1, ..put("admin", a, "gone", b"42") }).await;
    let forever = submit_one(chain, put("admin", a, "forever", b"7")).await;
    assert!(chain.memcache().get(a, "gone").is_some());

    let deleted = poll_until(Duration::from_secs(6), || {
        chain.memcache().last(a, "gone").filter(|l| l.tx.content.body.is_empty())
    })
    .await
    .expect("the node did not delete the TTL value within 6 s");
    assert!(chain.memcache().get(a, "gone").is_none());
    assert_eq!(deleted.tx.content.device_id, NODE_DEVICE_ID, "the node issues the delete");
    assert_eq!(deleted.tx.previous, gone.id);
    assert_eq!(deleted.tx.content.props.get("reason").map(String::as_str), Some("ttl"));
    assert_eq!(deleted.tx.content.props.get("expired"), Some(&gone.global_sequence.to_string()));
    assert!(deleted.tx.timestamp_ms >= chain.store().tx_by_id(&gone.id).await.unwrap().unwrap().tx.timestamp_ms + 1000);

    assert_eq!(chain.memcache().get(a, "kept").map(|v| v.id), Some(kept2.id), "an overwritten TTL value stays");
    assert_eq!(chain.memcache().get(a, "forever").map(|v| v.id), Some(forever.id));
    let h = chain.store().history(a, "kept", u64::MAX, 10).await.unwrap();
    assert_eq!(h.iter().map(|c| c.id).collect::<Vec<_>>(), vec![kept2.id, kept.id], "no delete of `kept`");

    // The delete is an ordinary committed transaction.
    let stored = chain.store().tx_by_id(&deleted.id).await.unwrap().expect("stored");
    assert_eq!(stored, *deleted);
    assert_sequencing(chain.store()).await;
}

async fn duplicate_idempotency_key_is_rejected(db: TestDb) {
    let c = db.chain().await;
    let chain = &c.chain;
    let with_key = |device: &str, key: &str, body: &[u8]| TxContent {
        idempotency_key: key.into(),
        ..put(device, "/plant-1", "temp", body)
    };
    for d in ["sensor-1", "sensor-2", "sensor-3"] {
        register_device(chain, d, &format!("kal_{d}"), &[("/plant-1", true, true)]).await;
    }
    let first = submit_one(chain, with_key("sensor-1", "k-1", b"1")).await;
    assert_eq!(chain.idempotency_hit("sensor-1", "k-1"), Some(first.id));
    let size = chain.tree_size();

    struct Case {
        name: &'static str,
        items: Vec<TxContent>,
        existing: Option<[u8; 32]>,
    }
    let cases = [
        Case {
            name: "same device, same key",
            items: vec![with_key("sensor-1", "k-1", b"2")],
            existing: Some(first.id),
        },
        Case {
            name: "repeated inside one batch",
            items: vec![with_key("sensor-1", "k-2", b"3"), with_key("sensor-1", "k-2", b"4")],
            existing: None,
        },
        Case {
            name: "a used key anywhere in a batch",
            items: vec![with_key("sensor-1", "k-3", b"5"), with_key("sensor-1", "k-1", b"6")],
            existing: Some(first.id),
        },
    ];
    for case in cases {
        let err = chain.submit(case.items, None).await.expect_err(case.name);
        match err {
            Error::Rejected(Rejection::DuplicateIdempotencyKey { key, existing }) => {
                assert!(key == "k-1" || key == "k-2", "{}: key {key}", case.name);
                if let Some(id) = case.existing {
                    assert_eq!(existing, hex::encode(id), "{}: names the first transaction", case.name);
                }
            }
            other => panic!("{}: expected DuplicateIdempotencyKey, got {other:?}", case.name),
        }
        assert_eq!(chain.tree_size(), size, "{}: nothing of the rejected batch was committed", case.name);
    }
    assert_eq!(chain.idempotency_hit("sensor-1", "k-3"), None, "the rejected batch used no key");

    // Keys are per device; an empty key is no key.
    submit_one(chain, with_key("sensor-2", "k-1", b"7")).await;
    submit_one(chain, with_key("sensor-1", "", b"8")).await;
    submit_one(chain, with_key("sensor-1", "", b"9")).await;

    // Racing retries of one request: exactly one commits.
    let racing = (0..8).map(|i| chain.submit(vec![with_key("sensor-3", "retry", format!("{i}").as_bytes())], None));
    let results = join_all(racing).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    let winner = results.iter().find_map(|r| r.as_ref().ok()).map(|r| hex::encode(r[0].id));
    for r in results.iter().filter(|r| r.is_err()) {
        // Each names the one that committed, or was refused in the same commit as it.
        match r {
            Err(Error::Rejected(Rejection::DuplicateIdempotencyKey { existing, .. })) => {
                assert!(Some(existing) == winner.as_ref() || existing == "in the same commit", "{r:?}");
            }
            other => panic!("expected DuplicateIdempotencyKey, got {other:?}"),
        }
    }
    let keys = chain.store().recent_idempotency_keys(u64::MAX >> 1).await.unwrap();
    assert_eq!(keys.iter().filter(|(d, k, _)| d == "sensor-3" && k == "retry").count(), 1);
}

async fn registry_guards(db: TestDb) {
    let c = db.chain().await;
    let chain = &c.chain;
    let size = chain.tree_size();

    // The genesis admin exists: registering it again is refused and nothing is written.
    let again = device_registration(ADMIN_ID, "other-token", true, None, false);
    let err = chain.submit(vec![again], Some(Guard::DeviceAbsent(ADMIN_ID.into()))).await.expect_err("admin exists");
    assert!(matches!(err, Error::Rejected(Rejection::DeviceExists(ref id)) if id == ADMIN_ID), "{err:?}");
    assert_eq!(chain.tree_size(), size);
    assert!(chain.registry().authenticate("other-token").is_err(), "the refused record did not apply");

    // A new device registers once.
    let reg = device_registration("sensor-1", "s1-token", false, None, false);
    chain.submit(vec![reg.clone()], Some(Guard::DeviceAbsent("sensor-1".into()))).await.unwrap();
    assert!(chain.registry().get("sensor-1").is_some());
    assert_eq!(chain.registry().authenticate("s1-token").unwrap().id, "sensor-1");
    let err = chain.submit(vec![reg], Some(Guard::DeviceAbsent("sensor-1".into()))).await.expect_err("exists now");
    assert!(matches!(err, Error::Rejected(Rejection::DeviceExists(_))), "{err:?}");

    // Two racing registrations of one id: one wins, even inside the same group commit.
    let racing = (0..4).map(|i| {
        chain.submit(
            vec![device_registration("sensor-2", &format!("t{i}"), false, None, false)],
            Some(Guard::DeviceAbsent("sensor-2".into())),
        )
    });
    let results = join_all(racing).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    let regs = chain.store().history(DEVICES_ADDRESS, "sensor-2", u64::MAX, 10).await.unwrap();
    assert_eq!(regs.len(), 1);

    // DevicePresent guards admin calls on existing devices.
    let grant = crate::common::grant("ghost", "/plant-1", true, true);
    let err = chain.submit(vec![grant], Some(Guard::DevicePresent("ghost".into()))).await.expect_err("no ghost");
    assert!(matches!(err, Error::Rejected(Rejection::NoSuchDevice(ref id)) if id == "ghost"), "{err:?}");
    let grant = crate::common::grant("sensor-1", "/plant-1", true, false);
    chain.submit(vec![grant], Some(Guard::DevicePresent("sensor-1".into()))).await.unwrap();
    let dev = chain.registry().get("sensor-1").unwrap();
    assert!(dev.can_read("/plant-1/line-2") && !dev.can_write("/plant-1/line-2"));
}

/// `Chain::shutdown`: what is already queued is committed, the sequencer ends, later writes
/// are refused with `ShuttingDown`, and once the last handle is gone subscribers see `Closed`.
async fn shutdown_commits_queued_work_then_stops(db: TestDb) {
    let c = db.chain().await;
    let chain = c.chain.clone();
    let size = chain.tree_size();
    for i in 0..20 {
        chain.submit_nowait(vec![put("admin", "/plant-1", "q", format!("{i}").as_bytes())]).await.unwrap();
    }
    let mut sub = chain.bus().subscribe();
    chain.shutdown();
    assert!(!chain.is_ready(), "a stopping node is not ready");
    let crate::common::TestChain { chain: handle, task } = c;
    task.await.expect("sequencer task panicked").expect("sequencer ended with an error");
    let err = chain.submit(vec![put("admin", "/plant-1", "late", b"1")], None).await.expect_err("after shutdown");
    assert!(matches!(err, Error::ShuttingDown), "{err:?}");
    assert_eq!(chain.tree_size(), size + 20, "queued writes were committed before stopping");
    assert_eq!(chain.store().tx_count().await.unwrap(), size + 20);
    assert_eq!(chain.memcache().get("/plant-1", "q").map(|v| v.tx.content.body.clone()), Some(b"19".to_vec()));
    drop(handle);
    drop(chain);
    // Drain what was published, then the bus reports the end.
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await.expect("bus still open") {
            Ok(_) => continue,
            Err(end) => break end,
        }
    };
    assert_eq!(end, SubscriptionEnd::Closed);
}

/// `Chain::open` documents: "The returned task ends when every handle is dropped". Code that
/// relies on it (tests, an embedding that reopens the store) otherwise leaks a live sequencer
/// that still owns the store and still issues TTL deletes.
async fn dropping_every_handle_stops_the_sequencer(db: TestDb) {
    let c = db.chain().await;
    submit_one(&c.chain, put("admin", "/plant-1", "temp", b"1")).await;
    let crate::common::TestChain { chain, task } = c;
    drop(chain);
    let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
    let res = ended.expect("the sequencer task is still running 5 s after the last Chain handle was dropped");
    res.expect("sequencer task panicked").expect("sequencer task failed");
}

/// A write checked by ingest just before its device was revoked, or lost its grant, waits in
/// the queue; the sequencer checks again and refuses it, so revocation takes effect at once.
async fn revocation_and_grant_removal_apply_to_queued_writes(db: TestDb) {
    let c = db.chain().await;
    let chain = &c.chain;
    register_device(chain, "late", "kal_late", &[("/plant-1", true, true), ("/plant-2", true, true)]).await;
    submit_one(chain, put("late", "/plant-1", "temp", b"1")).await;

    // Grant removed (empty body deletes the grant value).
    submit_one(chain, crate::common::grant_removal("late", "/plant-2")).await;
    let err = chain.submit(vec![put("late", "/plant-2", "temp", b"2")], None).await.unwrap_err();
    assert!(matches!(err, Error::Rejected(Rejection::Forbidden { .. })), "{err:?}");

    // Revoked.
    let mut record = device_registration("late", "kal_late", false, None, false);
    let mut body: serde_json::Value = serde_json::from_slice(&record.body).unwrap();
    body["revoked"] = serde_json::json!(true);
    record.body = serde_json::to_vec(&body).unwrap();
    submit_one(chain, record).await;
    let err = chain.submit(vec![put("late", "/plant-1", "temp", b"3")], None).await.unwrap_err();
    assert!(matches!(err, Error::Rejected(Rejection::Revoked(_))), "{err:?}");
    assert_eq!(chain.memcache().get("/plant-1", "temp").map(|t| t.tx.content.body.clone()), Some(b"1".to_vec()));
    c.stop().await;
}

/// Makes every commit fail inside the database (a trigger refuses new blocks) while a row is
/// in `fail_writes`, as a full disk or a lost connection would.
fn failing_writes_sql(backend: kalima_core::store::Backend) -> &'static str {
    match backend {
        kalima_core::store::Backend::Sqlite => {
            "CREATE TABLE fail_writes (x INTEGER);
             CREATE TRIGGER fail_blocks BEFORE INSERT ON blocks WHEN EXISTS (SELECT 1 FROM fail_writes)
             BEGIN SELECT RAISE(ABORT, 'writes are failing'); END;"
        }
        kalima_core::store::Backend::Postgres => {
            "CREATE TABLE fail_writes (x INTEGER);
             CREATE FUNCTION fail_blocks() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF EXISTS (SELECT 1 FROM fail_writes) THEN RAISE EXCEPTION 'writes are failing'; END IF;
             RETURN NEW; END $$;
             CREATE TRIGGER fail_blocks BEFORE INSERT ON blocks FOR EACH ROW EXECUTE FUNCTION fail_blocks();"
        }
    }
}

/// (idempotency key, outcome) of every write one writer made.
type Outcomes = Vec<(String, kalima_core::Result<Vec<kalima_core::chain::Receipt>>)>;

/// Writers that keep the queue busy until stopped or until the chain stops.
fn continuous_writers(
    chain: &kalima_core::Chain,
    writers: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    failures: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Outcomes>> {
    use std::sync::atomic::Ordering::Relaxed;
    (0..writers)
        .map(|w| {
            let (chain, stop, failures) = (chain.clone(), stop.clone(), failures.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut i = 0;
                while !stop.load(Relaxed) {
                    let key = format!("w{w}-{i}");
                    let item = TxContent {
                        idempotency_key: key.clone(),
                        ..put("admin", &format!("/load-{}", w % 3), &format!("k{}", i % 4), key.as_bytes())
                    };
                    let r = chain.submit(vec![item], None).await;
                    let stopped = matches!(r, Err(ref e) if !matches!(e, Error::CommitFailed(_)));
                    if r.is_err() {
                        failures.fetch_add(1, Relaxed);
                    }
                    out.push((key, r));
                    if stopped {
                        // The chain stopped: the test reports the error.
                        break;
                    }
                    i += 1;
                }
                out
            })
        })
        .collect()
}

/// Commits that fail inside the database while writers keep the queue full: their writers
/// are told the write was not stored, and no sequence, `previous` link or idempotency key of
/// a failed commit leaks into the commits after it. The store's writing connection is
/// replaced after each failure, and writes resume once the database accepts them.
async fn failed_commits_leave_nothing_behind_under_load(db: TestDb) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    let c = db.chain().await;
    let chain = c.chain.clone();
    let store = chain.store().clone();
    store.execute_raw(failing_writes_sql(store.backend())).await.expect("install the failing trigger");
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let writers = continuous_writers(&chain, 16, &stop, &failures);

    poll_until(Duration::from_secs(20), || (chain.tree_size() > 300).then_some(())).await.expect("writes land");
    store.execute_raw("INSERT INTO fail_writes VALUES (1)").await.expect("fail writes");
    poll_until(Duration::from_secs(20), || (failures.load(Relaxed) >= 40).then_some(()))
        .await
        .expect("writes fail while the trigger refuses blocks");
    store.execute_raw("DELETE FROM fail_writes").await.expect("let writes through");
    let resumed = chain.tree_size();
    poll_until(Duration::from_secs(20), || (chain.tree_size() > resumed + 300).then_some(()))
        .await
        .expect("writes land again once the store accepts them");
    stop.store(true, Relaxed);
    let mut outcomes = Vec::new();
    for w in writers {
        outcomes.extend(w.await.expect("writer panicked"));
    }

    let stored: HashMap<String, kalima_core::CommittedTx> = all_txs(&store)
        .await
        .into_iter()
        .filter(|t| !t.tx.content.idempotency_key.is_empty())
        .map(|t| (t.tx.content.idempotency_key.clone(), t))
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for (key, r) in &outcomes {
        match r {
            Ok(receipts) => {
                ok += 1;
                let t = stored.get(key).unwrap_or_else(|| panic!("{key} was acknowledged but is not stored"));
                assert_eq!(receipts.len(), 1);
                assert_eq!(
                    (receipts[0].id, receipts[0].global_sequence, receipts[0].height),
                    (t.id, t.tx.global_sequence, t.height),
                    "{key}: the receipt names where it is stored"
                );
            }
            Err(Error::CommitFailed(why)) => {
                failed += 1;
                assert!(why.contains("not stored"), "{key}: a rolled-back write is reported as not stored: {why}");
                assert!(!stored.contains_key(key), "{key} was reported as not stored but is on the chain");
            }
            Err(other) => panic!("{key}: unexpected error {other:?}"),
        }
    }
    assert!(failed >= 40, "{failed} writes failed");
    assert_eq!(stored.len(), ok, "the chain holds exactly the acknowledged writes");
    assert_eq!(chain.tree_size(), store.tx_count().await.unwrap(), "memory and store agree");
    assert_sequencing(&store).await;
    kalima_core::verify::verify_chain(&store, crate::common::CHAIN, |_| {}).await.unwrap();
    submit_one(&chain, put("admin", "/load-0", "after", b"1")).await;
    assert_sequencing(&store).await;
}

/// TTL deletes are issued even when the queue never empties.
async fn ttl_deletes_are_issued_under_continuous_writes(db: TestDb) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    let c = db.chain().await;
    let chain = c.chain.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let writers = continuous_writers(&chain, 16, &stop, &failures);
    let a = "/plant-1/line-2";
    let gone = submit_one(&chain, TxContent { ttl_secs: 1, ..put("admin", a, "gone", b"42") }).await;
    let deleted = poll_until(Duration::from_secs(6), || {
        chain.memcache().last(a, "gone").filter(|l| l.tx.content.body.is_empty())
    })
    .await;
    let before_stop = chain.tree_size();
    stop.store(true, Relaxed);
    for w in writers {
        w.await.expect("writer panicked");
    }
    let deleted = deleted.expect("the node did not delete the TTL value within 6 s of continuous writes");
    assert_eq!(deleted.tx.previous, gone.id);
    assert_eq!(deleted.tx.content.device_id, NODE_DEVICE_ID);
    assert!(before_stop > gone.global_sequence + 100, "writes kept flowing: {before_stop}");
    assert_eq!(failures.load(Relaxed), 0);
    assert_sequencing(chain.store()).await;
}
