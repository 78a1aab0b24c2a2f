//! `verify_chain` (behind `kalima verify`): a healthy chain passes; a byte flipped anywhere in
//! storage, by someone who first turned the immutability triggers off, is reported as
//! `Error::Corrupt` naming the height of the tampered block. Each case restores the original
//! bytes afterwards and checks that the chain verifies again, so cases are independent.

use kalima_core::Error;
use kalima_core::Store;
use kalima_core::store::RawBlock;
use kalima_core::verify::verify_chain;

use crate::common::{CHAIN, TestDb, backend_tests, blob_literal, drop_immutability_triggers, put, submit_one};

backend_tests!(
    healthy_chain_verifies,
    tampering_is_detected_at_its_height,
    device_signatures_are_checked_against_the_registered_key,
    index_rows_must_match_the_sealed_transactions,
    bodies_outside_the_chain_are_caught,
    verify_passes_while_the_node_writes,
    only_trusted_keys_sign_checkpoints_and_lead_blocks,
    a_checkpoint_size_beyond_the_chain_is_caught
);

/// Ten blocks after genesis with two transactions each, then one commit of 400 (several blocks;
/// pages of more than 256 rows are opened on every core), a checkpoint, one more block.
async fn build(db: &TestDb) -> crate::common::TestChain {
    let c = db.chain().await;
    for i in 0..10 {
        c.chain
            .submit(
                vec![
                    put("admin", "/plant-1/line-2", "temp", format!("2{i}.5").as_bytes()),
                    put("admin", "/plant-1/line-3", "pressure", format!("1.0{i}").as_bytes()),
                ],
                None,
            )
            .await
            .unwrap();
    }
    let bulk = (0..400).map(|i| put("admin", &format!("/plant-2/m-{}", i % 7), "v", format!("{i}").as_bytes()));
    c.chain.submit(bulk.collect(), None).await.unwrap();
    assert!(c.chain.head().block.header.height >= 12, "the bulk commit spans several blocks");
    c.chain.checkpoint_now().await.unwrap();
    submit_one(&c.chain, put("admin", "/plant-1", "after-checkpoint", b"1")).await;
    c
}

async fn healthy_chain_verifies(db: TestDb) {
    let c = build(&db).await;
    let mut pages = Vec::new();
    let report = verify_chain(c.chain.store(), CHAIN, |h| pages.push(h)).await.unwrap();
    let head = c.chain.head().block.header;
    assert_eq!(report.blocks, head.height + 1);
    assert_eq!(report.transactions, c.chain.tree_size());
    assert_eq!(report.checkpoints, 1);
    assert!(report.bytes > 0);
    assert_eq!(pages.last(), Some(&head.height), "progress reaches the head");

    // Verification reads only the store: a fresh connection (as `kalima verify` opens) agrees.
    c.stop().await;
    let store = db.store().await;
    assert_eq!(verify_chain(&store, CHAIN, |_| {}).await.unwrap(), report);
}

#[derive(Clone, Copy, Debug)]
enum Target {
    /// A byte of the canonical header (the timestamp) in the `blocks.header` column.
    BlockHeader,
    /// A byte of the `blocks.hash` column.
    BlockHash,
    /// The header rewritten *with* a matching hash: its timestamp no longer matches the
    /// `timestamp_ms` column (and the next block's link breaks).
    BlockHeaderRehashed,
    /// A byte (in the GCM tag) of the `block_txs.sealed` column.
    BodySealed,
    /// A byte of the first leaf hash in the `block_txs.leaves` column.
    BodyLeaves,
    /// The `block_txs.key_id` column pointing at another key.
    BodyKeyId,
    /// The `block_txs.first_seq` column moved far away.
    BodyFirstSeq,
    /// The block's `block_txs` row deleted.
    BodyDeleted,
}

struct Case {
    target: Target,
    /// Height the fault must be reported at, relative to the tampered block.
    reported_offset: u64,
}

async fn tampering_is_detected_at_its_height(db: TestDb) {
    let c = build(&db).await;
    let store = c.chain.store().clone();
    verify_chain(&store, CHAIN, |_| {}).await.expect("healthy before tampering");
    drop_immutability_triggers(&store).await;
    verify_chain(&store, CHAIN, |_| {}).await.expect("turning the triggers off changes no data");

    let cases = [
        Case { target: Target::BlockHeader, reported_offset: 0 },
        Case { target: Target::BlockHash, reported_offset: 0 },
        Case { target: Target::BlockHeaderRehashed, reported_offset: 0 },
        Case { target: Target::BodySealed, reported_offset: 0 },
        Case { target: Target::BodyLeaves, reported_offset: 0 },
        Case { target: Target::BodyKeyId, reported_offset: 0 },
        Case { target: Target::BodyFirstSeq, reported_offset: 0 },
        Case { target: Target::BodyDeleted, reported_offset: 0 },
    ];
    // A block in the middle, one inside the bulk commit, the genesis block and the head.
    let head = c.chain.head().block.header.height;
    for height in [5, 12, 0, head] {
        for case in &cases {
            if matches!(case.target, Target::BlockHeaderRehashed) && height == head {
                continue; // no next block to break
            }
            let name = format!("{:?} {:?} at height {height}", db.backend, case.target);
            let undo = tamper(&store, case.target, height).await;
            match verify_chain(&store, CHAIN, |_| {}).await {
                Err(Error::Corrupt { height: h, reason }) => {
                    assert_eq!(h, height + case.reported_offset, "{name}: reported at the wrong height ({reason})");
                }
                other => panic!("{name}: expected Error::Corrupt, got {other:?}"),
            }
            store.execute_raw(&undo).await.unwrap_or_else(|e| panic!("{name}: undo: {e:#}"));
            verify_chain(&store, CHAIN, |_| {}).await.unwrap_or_else(|e| panic!("{name}: after undo: {e:#}"));
        }
    }
}

/// Applies the tampering and returns the SQL that restores the original bytes.
async fn tamper(store: &Store, target: Target, height: u64) -> String {
    let b = store.backend();
    let block: RawBlock = store.raw_blocks(height, 1).await.unwrap().remove(0);
    let header = kalima_core::block::BlockHeader::decode(&block.header).unwrap();
    let body = store.raw_bodies(height, 1).await.unwrap().into_iter().find(|r| r.height == height);
    let flip = |v: &[u8], i: usize| {
        let mut v = v.to_vec();
        v[i] ^= 0x01;
        v
    };
    let (set, undo) = match target {
        Target::BlockHeader => {
            // Byte 41 is inside the timestamp: the header still decodes.
            let bad = flip(&block.header, 41);
            (
                format!("UPDATE blocks SET header = {} WHERE height = {height}", blob_literal(b, &bad)),
                format!("UPDATE blocks SET header = {} WHERE height = {height}", blob_literal(b, &block.header)),
            )
        }
        Target::BlockHash => {
            let bad = flip(&block.hash, 0);
            (
                format!("UPDATE blocks SET hash = {} WHERE height = {height}", blob_literal(b, &bad)),
                format!("UPDATE blocks SET hash = {} WHERE height = {height}", blob_literal(b, &block.hash)),
            )
        }
        Target::BlockHeaderRehashed => {
            let mut h = header.clone();
            h.timestamp_ms += 1;
            (
                format!(
                    "UPDATE blocks SET header = {}, hash = {} WHERE height = {height}",
                    blob_literal(b, &h.encode()),
                    blob_literal(b, &h.hash())
                ),
                format!(
                    "UPDATE blocks SET header = {}, hash = {} WHERE height = {height}",
                    blob_literal(b, &block.header),
                    blob_literal(b, &block.hash)
                ),
            )
        }
        Target::BodySealed => {
            let body = body.expect("block holds transactions");
            let bad = flip(&body.sealed, body.sealed.len() - 1);
            (
                format!("UPDATE block_txs SET sealed = {} WHERE height = {height}", blob_literal(b, &bad)),
                format!("UPDATE block_txs SET sealed = {} WHERE height = {height}", blob_literal(b, &body.sealed)),
            )
        }
        Target::BodyLeaves => {
            let body = body.expect("block holds transactions");
            let bad = flip(&body.leaves, 0);
            (
                format!("UPDATE block_txs SET leaves = {} WHERE height = {height}", blob_literal(b, &bad)),
                format!("UPDATE block_txs SET leaves = {} WHERE height = {height}", blob_literal(b, &body.leaves)),
            )
        }
        Target::BodyKeyId => {
            let body = body.expect("block holds transactions");
            (
                format!("UPDATE block_txs SET key_id = {} WHERE height = {height}", body.key_id + 1),
                format!("UPDATE block_txs SET key_id = {} WHERE height = {height}", body.key_id),
            )
        }
        Target::BodyFirstSeq => {
            let body = body.expect("block holds transactions");
            (
                format!("UPDATE block_txs SET first_seq = {} WHERE height = {height}", body.first_seq + (1 << 40)),
                format!("UPDATE block_txs SET first_seq = {} WHERE height = {height}", body.first_seq),
            )
        }
        Target::BodyDeleted => {
            let body = body.expect("block holds transactions");
            (
                format!("DELETE FROM block_txs WHERE height = {height}"),
                format!(
                    "INSERT INTO block_txs (height, first_seq, key_id, leaves, sealed) VALUES ({height}, {}, {}, {}, {})",
                    body.first_seq,
                    body.key_id,
                    blob_literal(b, &body.leaves),
                    blob_literal(b, &body.sealed)
                ),
            )
        }
    };
    let n = store.execute_raw(&set).await.unwrap_or_else(|e| panic!("tamper {target:?}: {e:#}"));
    assert_eq!(n, 1, "tamper {target:?} touched one row");
    undo
}

/// A signed transaction that ingest would have refused (its signature does not match the
/// device's key) but that reached the sequencer anyway must make verification fail at its
/// height; valid signatures are counted.
async fn device_signatures_are_checked_against_the_registered_key(db: TestDb) {
    use ed25519_dalek::{Signer, SigningKey};

    let c = db.chain().await;
    let sk = SigningKey::from_bytes(&[42; 32]);
    let pk = hex::encode(sk.verifying_key().as_bytes());
    submit_one(&c.chain, crate::common::device_registration("signer", "kal_signer", false, Some(pk), false)).await;
    submit_one(&c.chain, crate::common::grant("signer", "/plant", false, true)).await;

    let mut good = put("signer", "/plant/line", "temp", b"21.5");
    good.idempotency_key = "good".into();
    good.signature = Some(sk.sign(&good.signing_bytes(CHAIN)).to_bytes());
    submit_one(&c.chain, good).await;
    let report = verify_chain(c.chain.store(), CHAIN, |_| {}).await.unwrap();
    assert_eq!(report.signatures, 1);

    let other = SigningKey::from_bytes(&[7; 32]);
    let mut forged = put("signer", "/plant/line", "temp", b"99.9");
    forged.idempotency_key = "forged".into();
    forged.signature = Some(other.sign(&forged.signing_bytes(CHAIN)).to_bytes());
    let receipt = submit_one(&c.chain, forged).await;
    match verify_chain(c.chain.store(), CHAIN, |_| {}).await {
        Err(Error::Corrupt { height, reason }) => {
            assert_eq!(height, receipt.height, "{reason}");
            assert!(reason.contains("signature"), "{reason}");
        }
        other => panic!("a forged signature verified: {other:?}"),
    }
    c.stop().await;
}

/// The lookup indexes are derived from the sealed transactions: a row added, removed or
/// redirected in any of them is caught by verify (naming the table), and a row that points a
/// reading at another address is never served by reads, which check what they decrypt.
async fn index_rows_must_match_the_sealed_transactions(db: TestDb) {
    let c = build(&db).await;
    let store = c.chain.store().clone();
    let r = submit_one(&c.chain, {
        let mut p = put("admin", "/plant-1", "temp", b"21.5");
        p.idempotency_key = "reading-1".into();
        p
    })
    .await;
    let tx = store.tx_by_id(&r.id).await.unwrap().expect("committed");
    let rows = store.index_rows(&tx);
    // The rows are written behind the chain: tamper with them once they are in the tables.
    store.flush_index().await;
    assert_eq!(store.index_lag(), 0);
    drop_immutability_triggers(&store).await;
    let g = r.global_sequence;
    let tables: [(&str, &str, String); 4] = [
        ("tx_ids", "h, global_seq, height", join(&rows.id)),
        ("tx_by_stream", "stream, global_seq, height", join(&rows.stream)),
        ("tx_by_address", "address, seq, global_seq, height", join(&rows.address)),
        ("tx_idempotency", "h, global_seq, height", join(&rows.idempotency.expect("idempotency row"))),
    ];
    for (table, cols, values) in &tables {
        let stray = {
            // The same row for a transaction of an earlier block.
            let mut v: Vec<String> = values.split(", ").map(String::from).collect();
            let n = v.len();
            v[n - 2] = "3".into();
            v[n - 1] = "1".into();
            v.join(", ")
        };
        let faults = [
            (
                format!("DELETE FROM {table} WHERE global_seq = {g}"),
                format!("INSERT INTO {table} ({cols}) VALUES ({values})"),
            ),
            (
                format!("UPDATE {table} SET height = height - 1 WHERE global_seq = {g}"),
                format!("UPDATE {table} SET height = height + 1 WHERE global_seq = {g}"),
            ),
            (
                format!("INSERT INTO {table} ({cols}) VALUES ({stray})"),
                format!(
                    "DELETE FROM {table} WHERE global_seq = 3 AND height = 1 AND {} = {}",
                    first_col(cols),
                    first_val(values)
                ),
            ),
        ];
        for (set, undo) in faults {
            let name = format!("{:?} `{set}`", db.backend);
            assert_eq!(store.execute_raw(&set).await.unwrap_or_else(|e| panic!("{name}: {e:#}")), 1, "{name}");
            match verify_chain(&store, CHAIN, |_| {}).await {
                Err(Error::Corrupt { reason, .. }) => assert!(reason.contains(table), "{name}: {reason}"),
                other => panic!("{name}: expected Error::Corrupt, got {other:?}"),
            }
            store.execute_raw(&undo).await.unwrap_or_else(|e| panic!("{name}: undo: {e:#}"));
            verify_chain(&store, CHAIN, |_| {}).await.unwrap_or_else(|e| panic!("{name}: after undo: {e:#}"));
        }
    }

    // Point /plant-2's history at the /plant-1 reading: verify names the index, and reads
    // refuse to present the reading as /plant-2's.
    let mut moved = tx.clone();
    moved.tx.content.address = "/plant-2".into();
    let fake = store.index_rows(&moved);
    store
        .execute_raw(&format!("INSERT INTO tx_by_stream (stream, global_seq, height) VALUES ({})", join(&fake.stream)))
        .await
        .unwrap();
    match verify_chain(&store, CHAIN, |_| {}).await {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("tx_by_stream"), "{reason}"),
        other => panic!("a redirected index row verified: {other:?}"),
    }
    assert!(
        store.history("/plant-2", "temp", u64::MAX >> 1, 10).await.unwrap().is_empty(),
        "a read served the moved row"
    );
    let own = store.history("/plant-1", "temp", u64::MAX >> 1, 10).await.unwrap();
    assert_eq!(own.iter().map(|c| c.id).collect::<Vec<_>>(), vec![r.id]);
    c.stop().await;
}

/// Body rows outside every block are reported.
async fn bodies_outside_the_chain_are_caught(db: TestDb) {
    let c = build(&db).await;
    let store = c.chain.store().clone();
    let head = c.chain.head().block.header;
    let body = store.raw_bodies(head.height, 1).await.unwrap().remove(0);
    drop_immutability_triggers(&store).await;
    let b = store.backend();
    store
        .execute_raw(&format!(
            "INSERT INTO block_txs (height, first_seq, key_id, leaves, sealed) VALUES ({}, {}, {}, {}, {})",
            head.height + 1,
            head.tree_size,
            body.key_id,
            blob_literal(b, &body.leaves),
            blob_literal(b, &body.sealed)
        ))
        .await
        .unwrap();
    match verify_chain(&store, CHAIN, |_| {}).await {
        Err(Error::Corrupt { height, reason }) => {
            assert_eq!(height, head.height, "{reason}");
            assert!(reason.contains("outside any block"), "{reason}");
        }
        other => panic!("a body beyond the head verified: {other:?}"),
    }
    c.stop().await;
}

fn first_col(cols: &str) -> &str {
    cols.split(", ").next().unwrap_or(cols)
}

fn first_val(values: &str) -> &str {
    values.split(", ").next().unwrap_or(values)
}

fn join(v: &[i64]) -> String {
    v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
}

/// Verifying a running node (as an operator may do against SQLite WAL or PostgreSQL) must not
/// report the blocks committed meanwhile as faults.
async fn verify_passes_while_the_node_writes(db: TestDb) {
    let c = db.chain().await;
    let writer = {
        let chain = c.chain.clone();
        tokio::spawn(async move {
            for i in 0..400u32 {
                let items = (0..5).map(|j| put("admin", "/live", &format!("k{j}"), i.to_string().as_bytes())).collect();
                chain.submit(items, None).await.expect("write");
            }
        })
    };
    let mut runs = 0;
    while !writer.is_finished() {
        let report = verify_chain(c.chain.store(), CHAIN, |_| {}).await.expect("a live chain verifies");
        assert!(report.transactions > 0);
        runs += 1;
    }
    writer.await.expect("writer");
    assert!(runs >= 2, "verification did not overlap the writes ({runs} runs)");
    verify_chain(c.chain.store(), CHAIN, |_| {}).await.expect("verifies once quiet");
    c.stop().await;
}

/// A checkpoint re-signed with a foreign key is internally consistent, so only pinning the
/// node's key catches it; the same pin refuses blocks led by another key.
async fn only_trusted_keys_sign_checkpoints_and_lead_blocks(db: TestDb) {
    use kalima_core::checkpoint::Checkpoint;
    use kalima_core::keys::NodeKey;
    use kalima_core::verify::verify_chain_with;

    let c = db.chain().await;
    let r = submit_one(&c.chain, put("admin", "/plant-1", "temp", b"1")).await;
    let head = c.chain.head().block.header;
    let ours = crate::common::node_key().public_hex();
    verify_chain_with(c.chain.store(), CHAIN, std::slice::from_ref(&ours), |_| {})
        .await
        .expect("our own chain verifies");

    let forger = NodeKey::from_seed([99; 32]);
    let forged = Checkpoint::sign(&forger, CHAIN, head.tree_size, head.merkle_root, head.height, 1);
    c.chain.store().insert_checkpoint(&forged).await.unwrap();
    verify_chain(c.chain.store(), CHAIN, |_| {}).await.expect("without a pin the forged signature is merely valid");
    match verify_chain_with(c.chain.store(), CHAIN, &[ours], |_| {}).await {
        Err(Error::Corrupt { height, .. }) => assert_eq!(height, r.height),
        other => panic!("a checkpoint signed by another key passed: {other:?}"),
    }
    match verify_chain_with(c.chain.store(), CHAIN, &[forger.public_hex()], |_| {}).await {
        Err(Error::Corrupt { height, reason }) => assert_eq!(height, 0, "{reason}"),
        other => panic!("blocks led by an untrusted key passed: {other:?}"),
    }
    c.stop().await;
}

/// A flipped high bit in a checkpoint's tree size puts it beyond the chain; verification must
/// report it, not skip it as "committed after the snapshot".
async fn a_checkpoint_size_beyond_the_chain_is_caught(db: TestDb) {
    let c = db.chain().await;
    submit_one(&c.chain, put("admin", "/plant-1", "temp", b"1")).await;
    let cp = c.chain.checkpoint_now().await.unwrap();
    let store = c.chain.store().clone();
    drop_immutability_triggers(&store).await;
    let bumped = cp.tree_size + (1u64 << 40);
    store
        .execute_raw(&format!("UPDATE checkpoints SET tree_size = {bumped} WHERE tree_size = {}", cp.tree_size))
        .await
        .unwrap();
    match verify_chain(&store, CHAIN, |_| {}).await {
        Err(Error::Corrupt { height, reason }) => {
            assert_eq!(height, cp.height, "{reason}");
            assert!(reason.contains("beyond the chain"), "{reason}");
        }
        other => panic!("a checkpoint beyond the chain verified: {other:?}"),
    }
    c.stop().await;
}
