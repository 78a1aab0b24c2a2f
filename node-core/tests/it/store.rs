//! The store on its own: what `append` writes reads back the same way through every query
//! (by id, by global sequence, history pages, per-address ranges, leaf hashes, latest value
//! per key), a failed append leaves nothing behind, and checkpoints are kept.

use std::collections::BTreeMap;

use kalima_core::checkpoint::Checkpoint;
use kalima_core::store::{BlockRecord, PendingTx};
use kalima_core::tx::TxContent;
use kalima_core::{CommittedTx, Error};

use crate::common::{BlockBuilder, CHAIN, TestDb, backend_tests, node_key, put};

backend_tests!(append_then_read_back, failed_append_writes_nothing, checkpoints_insert_and_latest);

const T0: i64 = 1_763_700_000_000;

/// Five blocks: `/plant-1/line-2` gets 7 `temp` readings interleaved with `pressure`
/// readings, a delete, and writes to other addresses; one transaction carries every optional
/// field.
fn sample_blocks() -> Vec<(BlockRecord, Vec<PendingTx>)> {
    let a = "/plant-1/line-2";
    let mut b = BlockBuilder::new();
    let full = TxContent {
        device_id: "sensor-1".into(),
        address: a.into(),
        key: "temp".into(),
        body: b"21.5".to_vec(),
        props: [("unit".to_string(), "C".to_string()), ("src".to_string(), "modbus".to_string())].into(),
        ttl_secs: 3600,
        client_time_ms: Some(T0 - 5),
        idempotency_key: "reading-0001".into(),
        signature: Some([5; 64]),
    };
    vec![
        b.block(vec![put("admin", "/plant-1", "name", b"Plant one")], T0),
        b.block(vec![full, put("sensor-1", a, "pressure", b"1.01"), put("sensor-1", a, "temp", b"21.6")], T0 + 1),
        b.block(
            vec![
                put("sensor-1", a, "temp", b"21.7"),
                put("sensor-2", "/plant-1/line-3", "temp", b"30"),
                put("sensor-1", a, "temp", b"21.8"),
                put("sensor-1", a, "pressure", b""),
            ],
            T0 + 2,
        ),
        b.block(vec![put("sensor-1", a, "temp", b"21.9"), put("sensor-1", a, "temp", b"22.0")], T0 + 3),
        b.block(vec![put("sensor-1", a, "temp", b"22.1"), put("sensor-2", "/plant-1/line-3", "temp", b"31")], T0 + 4),
    ]
}

fn committed(blocks: &[(BlockRecord, Vec<PendingTx>)]) -> Vec<CommittedTx> {
    blocks.iter().flat_map(|(_, p)| p.iter().map(|p| (*p.committed).clone())).collect()
}

fn seqs(v: &[CommittedTx]) -> Vec<u64> {
    v.iter().map(|c| c.tx.global_sequence).collect()
}

async fn append_then_read_back(db: TestDb) {
    let store = db.store().await;
    assert_eq!(store.backend(), db.backend);
    assert!(store.latest_block().await.unwrap().is_none(), "a fresh store has no block");
    assert_eq!(store.tx_count().await.unwrap(), 0);

    let blocks = sample_blocks();
    // The first block alone, then the other four in one append (one group commit).
    store.append(&[blocks[0].0.clone()], &blocks[0].1).await.unwrap();
    let rest_blocks: Vec<BlockRecord> = blocks[1..].iter().map(|(b, _)| b.clone()).collect();
    let rest_txs: Vec<PendingTx> = blocks[1..].iter().flat_map(|(_, p)| p.clone()).collect();
    store.append(&rest_blocks, &rest_txs).await.unwrap();
    let all = committed(&blocks);
    let n = all.len() as u64;

    // Blocks.
    assert_eq!(store.latest_block().await.unwrap().as_ref(), Some(&blocks[4].0));
    for (b, _) in &blocks {
        assert_eq!(store.block(b.header.height).await.unwrap().as_ref(), Some(b), "block {}", b.header.height);
    }
    assert!(store.block(5).await.unwrap().is_none());
    let desc = store.blocks_desc(3, 2).await.unwrap();
    assert_eq!(desc, vec![blocks[3].0.clone(), blocks[2].0.clone()], "blocks_desc is newest first from the bound");
    let raw = store.raw_blocks(1, 10).await.unwrap();
    assert_eq!(raw.iter().map(|r| r.height).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    for r in &raw {
        let b = &blocks[r.height as usize].0;
        assert_eq!(r.header, b.header.encode());
        assert_eq!(r.hash, b.hash.to_vec());
    }

    // Transactions by id and by global sequence: exactly what was written.
    assert_eq!(store.tx_count().await.unwrap(), n);
    for c in &all {
        assert_eq!(store.tx_by_id(&c.id).await.unwrap().as_ref(), Some(c), "by id, seq {}", c.tx.global_sequence);
        assert_eq!(store.tx_by_sequence(c.tx.global_sequence).await.unwrap().as_ref(), Some(c));
    }
    assert!(store.tx_by_id(&[0xab; 32]).await.unwrap().is_none());
    assert!(store.tx_by_sequence(n).await.unwrap().is_none());
    assert_eq!(store.txs_between(0, n, 1000).await.unwrap(), all);
    assert_eq!(seqs(&store.txs_between(2, 9, 3).await.unwrap()), vec![2, 3, 4], "limit applies from the low end");

    // History of one key: newest first, paged with the `before` cursor.
    let a = "/plant-1/line-2";
    let temp: Vec<u64> = all
        .iter()
        .filter(|c| c.tx.content.address == a && c.tx.content.key == "temp")
        .map(|c| c.tx.global_sequence)
        .rev()
        .collect();
    assert_eq!(temp.len(), 7);
    let mut pages = Vec::new();
    let mut before = u64::MAX;
    loop {
        let page = store.history(a, "temp", before, 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        before = page.last().unwrap().tx.global_sequence;
        pages.push(seqs(&page));
    }
    assert_eq!(pages.concat(), temp, "pages cover the history newest first, without overlap");
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 1]);
    let pressure = store.history(a, "pressure", u64::MAX, 10).await.unwrap();
    assert_eq!(pressure.len(), 2, "a delete stays in the history");
    assert!(pressure[0].tx.content.body.is_empty());
    assert_eq!(pressure[0].tx.previous, pressure[1].id);
    assert!(store.history(a, "nope", u64::MAX, 10).await.unwrap().is_empty());
    assert!(store.history("/plant-1/line", "temp", u64::MAX, 10).await.unwrap().is_empty(), "no prefix match");

    // Per-address ranges (Kalima's /cache/after and /cache/before): exclusive bounds.
    let addr_seqs = |v: Vec<CommittedTx>| v.iter().map(|c| c.tx.sequence).collect::<Vec<_>>();
    assert_eq!(addr_seqs(store.address_range(a, 2, 6, 10, false).await.unwrap()), vec![3, 4, 5]);
    assert_eq!(addr_seqs(store.address_range(a, 2, 6, 10, true).await.unwrap()), vec![5, 4, 3]);
    assert_eq!(addr_seqs(store.address_range(a, 2, 6, 2, false).await.unwrap()), vec![3, 4]);
    assert_eq!(addr_seqs(store.address_range(a, 2, 6, 2, true).await.unwrap()), vec![5, 4]);
    assert_eq!(addr_seqs(store.address_range(a, 0, u64::MAX, 100, false).await.unwrap()), (1..=9).collect::<Vec<_>>());
    assert!(store.address_range(a, 9, u64::MAX, 100, false).await.unwrap().is_empty());
    assert!(store.address_range("/plant-9", 0, u64::MAX, 100, false).await.unwrap().is_empty());

    // Leaf hashes are the ids, in global order.
    let ids: Vec<_> = all.iter().map(|c| c.id).collect();
    assert_eq!(store.leaf_hashes(0, n).await.unwrap(), ids);
    assert_eq!(store.leaf_hashes(3, 6).await.unwrap(), ids[3..6].to_vec());
    assert!(store.leaf_hashes(n, n + 10).await.unwrap().is_empty());

    // Latest transaction of every (address, key), deletes included.
    let mut expected: BTreeMap<(String, String), u64> = BTreeMap::new();
    for c in &all {
        expected.insert((c.tx.content.address.clone(), c.tx.content.key.clone()), c.tx.global_sequence);
    }
    let mut exp: Vec<u64> = expected.values().copied().collect();
    exp.sort_unstable();
    assert_eq!(seqs(&store.latest_per_key().await.unwrap()), exp);

    // The newest per-address sequence of each address, found through the address index.
    for (address, last) in [("/plant-1", 1), ("/plant-1/line-2", 9), ("/plant-1/line-3", 2)] {
        let newest = store.address_range(address, 0, u64::MAX, 1, true).await.unwrap();
        assert_eq!(newest.iter().map(|c| c.tx.sequence).collect::<Vec<_>>(), vec![last], "{address}");
    }
    assert!(store.address_range("/plant-9", 0, u64::MAX, 10, false).await.unwrap().is_empty());
    let idem = store.recent_idempotency_keys(u64::MAX >> 1).await.unwrap();
    assert_eq!(idem, vec![("sensor-1".to_string(), "reading-0001".to_string(), all[1].id)]);

    // A second connection (a restarted node) sees the same.
    store.close().await;
    let again = db.store().await;
    assert_eq!(again.txs_between(0, n, 1000).await.unwrap(), all);
    assert_eq!(again.latest_block().await.unwrap().as_ref(), Some(&blocks[4].0));
}

async fn failed_append_writes_nothing(db: TestDb) {
    let store = db.store().await;
    let blocks = sample_blocks();
    store.append(&[blocks[0].0.clone()], &blocks[0].1).await.unwrap();

    // Block 1 is fine but the commit writes it twice: its second rows collide with the first
    // on every unique key, and the whole commit (first copy included) must roll back.
    let (b1, txs) = blocks[1].clone();
    let twice: Vec<_> = txs.iter().chain(&txs).cloned().collect();
    let err = store.append(&[b1.clone(), b1.clone()], &twice).await.expect_err("a duplicate block must fail");
    assert!(matches!(err, Error::Db(_)), "a database error, got {err:?}");
    assert_eq!(store.latest_block().await.unwrap().map(|b| b.header.height), Some(0), "block 1 was rolled back");
    assert_eq!(store.tx_count().await.unwrap(), 1, "no transaction of the failed commit stayed");

    // The same commit without the bad row then goes through.
    store.append(&[b1], &blocks[1].1).await.unwrap();
    assert_eq!(store.tx_count().await.unwrap(), 1 + blocks[1].1.len() as u64);
}

async fn checkpoints_insert_and_latest(db: TestDb) {
    let store = db.store().await;
    assert!(store.latest_checkpoint(CHAIN).await.unwrap().is_none());
    let key = node_key();
    let cp3 = Checkpoint::sign(&key, CHAIN, 3, [3; 32], 1, T0);
    let cp7 = Checkpoint::sign(&key, CHAIN, 7, [7; 32], 4, T0 + 10);
    let cp5 = Checkpoint::sign(&key, CHAIN, 5, [5; 32], 2, T0 + 20);
    for cp in [&cp3, &cp7, &cp5] {
        store.insert_checkpoint(cp).await.unwrap();
    }
    let latest = store.latest_checkpoint(CHAIN).await.unwrap().expect("a checkpoint");
    assert_eq!(latest, cp7, "latest is the largest tree size, not the last inserted");
    assert!(latest.verify(), "the signature survives the round trip");

    // A second checkpoint for a tree size already covered is ignored, not an error.
    let dup = Checkpoint::sign(&key, CHAIN, 7, [9; 32], 4, T0 + 30);
    store.insert_checkpoint(&dup).await.unwrap();
    assert_eq!(store.latest_checkpoint(CHAIN).await.unwrap(), Some(cp7.clone()));

    assert_eq!(store.checkpoints_from(CHAIN, 0, 100).await.unwrap(), vec![cp3.clone(), cp5.clone(), cp7.clone()]);
    assert_eq!(store.checkpoints_from(CHAIN, 4, 1).await.unwrap(), vec![cp5]);
    assert!(store.checkpoints_from(CHAIN, 8, 100).await.unwrap().is_empty());
}
