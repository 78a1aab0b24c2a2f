//! Proofs over a chain of a few thousand transactions, so that most 256-leaf chunks are no
//! longer in memory and must be fetched from the store: inclusion proofs verify against the
//! head's Merkle root and recompute from the stored transaction bytes, historic roots equal
//! the roots recorded in every block, consistency proofs verify between many size pairs, and
//! signed checkpoints verify.

use kalima_core::merkle::{CHUNK_SIZE, Hash, leaf_hash, verify_consistency};
use kalima_core::tx::TxContent;
use kalima_core::verify::verify_chain;
use kalima_core::{Chain, Error};

use crate::common::{CHAIN, TestDb, all_blocks, backend_tests, blob_literal, drop_immutability_triggers, put};

backend_tests!(
    inclusion_proofs_verify,
    historic_roots_and_consistency_proofs_verify,
    signed_checkpoint_verifies,
    proofs_refuse_tampered_leaf_rows
);

/// Genesis + 3000 transactions in 30 batches of 100.
async fn build(db: &TestDb) -> crate::common::TestChain {
    let c = db.chain().await;
    for batch in 0..30 {
        let items: Vec<TxContent> = (0..100)
            .map(|i| {
                put("admin", &format!("/plant-{}/line-{}", i % 5, i % 3), "temp", format!("{batch}.{i}").as_bytes())
            })
            .collect();
        c.chain.submit(items, None).await.unwrap();
    }
    assert_eq!(c.chain.tree_size(), 3001);
    c
}

fn unhex(s: &str) -> Hash {
    let mut h = [0u8; 32];
    hex::decode_to_slice(s, &mut h).expect("hex hash");
    h
}

fn indices(size: u64) -> Vec<u64> {
    let mut v =
        vec![0, 1, 2, 127, 255, 256, 257, 511, 512, 1000, 1023, 1024, 2047, 2048, 2500, size - 257, size - 2, size - 1];
    // A spread over every chunk.
    v.extend((0..size).step_by(97));
    v.sort_unstable();
    v.dedup();
    v
}

async fn inclusion_proofs_verify(db: TestDb) {
    let c = build(&db).await;
    let chain = &c.chain;
    let size = chain.tree_size();
    let head = chain.head().block.header;
    assert_eq!(head.tree_size, size);
    for i in indices(size) {
        let p = chain.inclusion_proof(i, None).await.unwrap_or_else(|e| panic!("proof of {i}: {e:#}"));
        assert!(p.verify(), "proof of leaf {i} does not verify: {p:?}");
        assert_eq!((p.leaf_index, p.tree_size), (i, size));
        assert_eq!(unhex(&p.root), head.merkle_root, "leaf {i}: root is the head block's merkle_root");
        // A third party recomputes the leaf hash from the canonical transaction bytes.
        let tx = chain.store().tx_by_sequence(i).await.unwrap().expect("stored");
        assert_eq!(unhex(&p.leaf_hash), leaf_hash(&tx.tx.encode()), "leaf {i}");
        assert_eq!(unhex(&p.leaf_hash), tx.id);
        // A wrong leaf or index does not verify.
        let mut wrong = p.clone();
        wrong.leaf_index = (i + 1) % size;
        assert!(!wrong.verify() || size == 1, "leaf {i}: proof verifies at another index");
    }

    // Proofs in older trees: the root is the one the block of that size recorded.
    let blocks = all_blocks(chain.store()).await;
    for b in blocks.iter().filter(|b| b.tree_size > 0).step_by(5) {
        for i in [0, b.tree_size / 2, b.tree_size - 1] {
            let p = chain.inclusion_proof(i, Some(b.tree_size)).await.unwrap();
            assert!(p.verify(), "leaf {i} in tree {}", b.tree_size);
            assert_eq!(unhex(&p.root), b.merkle_root, "root at size {} (block {})", b.tree_size, b.height);
        }
    }

    // Out-of-range requests are errors, not panics.
    assert!(chain.inclusion_proof(size, None).await.is_err());
    assert!(chain.inclusion_proof(5, Some(5)).await.is_err());
    assert!(chain.inclusion_proof(0, Some(size + 1)).await.is_err());
}

async fn historic_roots_and_consistency_proofs_verify(db: TestDb) {
    let c = build(&db).await;
    let chain = &c.chain;
    let size = chain.tree_size();

    // Every block's recorded root is the tree root at its size.
    for b in all_blocks(chain.store()).await.iter().filter(|b| b.tree_size > 0) {
        assert_eq!(chain.root_at(b.tree_size).await.unwrap(), b.merkle_root, "block {}", b.height);
    }
    assert_eq!(chain.root_at(0).await.unwrap(), kalima_core::merkle::empty_root());

    let pairs = [
        (1, 2),
        (1, size),
        (2, 3),
        (3, 7),
        (255, 256),
        (256, 257),
        (257, 513),
        (1000, 2048),
        (1024, 2048),
        (1500, size),
        (2048, size),
        (size - 1, size),
        (size, size),
        (300, 301),
        (777, 2999),
    ];
    for (first, second) in pairs {
        let p = chain.consistency_proof(first, second).await.unwrap_or_else(|e| panic!("{first}->{second}: {e:#}"));
        assert_eq!((p.first, p.second), (first, second));
        let r1 = root_at(chain, first).await;
        let r2 = root_at(chain, second).await;
        let proof: Vec<Hash> = p.proof.iter().map(|h| unhex(h)).collect();
        assert!(verify_consistency(first, second, &r1, &r2, &proof), "consistency {first} -> {second}");
        assert!(p.verify(&r1, &r2));
        if first != second {
            let mut bad = r2;
            bad[0] ^= 1;
            assert!(!verify_consistency(first, second, &r1, &bad, &proof), "{first} -> {second} verifies a wrong root");
        }
    }
    assert!(matches!(chain.consistency_proof(0, 10).await, Err(Error::Merkle(_))));
    assert!(matches!(chain.consistency_proof(10, 5).await, Err(Error::Merkle(_))));
    assert!(chain.consistency_proof(1, size + 1).await.is_err());
    assert!(chain.root_at(size + 1).await.is_err());
}

async fn root_at(chain: &Chain, size: u64) -> Hash {
    chain.root_at(size).await.unwrap_or_else(|e| panic!("root at {size}: {e:#}"))
}

async fn signed_checkpoint_verifies(db: TestDb) {
    let c = build(&db).await;
    let chain = &c.chain;
    assert!(chain.latest_checkpoint().await.unwrap().is_none());
    let cp = chain.checkpoint_now().await.unwrap();
    let head = chain.head().block;
    assert!(cp.verify(), "checkpoint signature");
    assert_eq!(cp.chain, CHAIN);
    assert_eq!(cp.tree_size, chain.tree_size());
    assert_eq!(cp.root, head.header.merkle_root);
    assert_eq!(cp.height, head.header.height);
    assert_eq!(cp.signer, chain.node_id());
    assert_eq!(chain.latest_checkpoint().await.unwrap(), Some(cp.clone()));
    assert_eq!(chain.store().latest_checkpoint(CHAIN).await.unwrap(), Some(cp.clone()));
    let json = cp.to_json();
    assert_eq!(json.root, hex::encode(cp.root));
    assert_eq!(json.signatures.len(), 1);

    // An inclusion proof at the checkpoint's size ends at its root; a later checkpoint is
    // consistent with it.
    let p = chain.inclusion_proof(1234, Some(cp.tree_size)).await.unwrap();
    assert!(p.verify());
    assert_eq!(unhex(&p.root), cp.root);
    crate::common::submit_one(chain, put("admin", "/plant-1", "more", b"1")).await;
    let cp2 = chain.checkpoint_now().await.unwrap();
    assert!(cp2.verify() && cp2.tree_size == cp.tree_size + 1);
    let proof = chain.consistency_proof(cp.tree_size, cp2.tree_size).await.unwrap();
    assert!(proof.verify(&cp.root, &cp2.root));

    let report = verify_chain(chain.store(), CHAIN, |_| {}).await.unwrap();
    assert_eq!(report.checkpoints, 2);
}

/// merkle.rs: "Proof functions trust their LeafSource; running `check_chunk` once per fetched
/// chunk keeps a corrupt database row from turning into a bad proof." A leaf-hash row changed
/// in the database must make the proof call fail, not return a proof that does not verify.
async fn proofs_refuse_tampered_leaf_rows(db: TestDb) {
    let c = build(&db).await;
    let chain = &c.chain;
    let store = chain.store().clone();
    let victim = 10u64; // in chunk 0, long out of memory
    assert!(victim < CHUNK_SIZE);
    let body = store
        .raw_bodies(0, u32::MAX)
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.first_seq <= victim && victim < b.first_seq + (b.leaves.len() / 32) as u64)
        .expect("the victim's block");
    drop_immutability_triggers(&store).await;
    let mut bad = body.leaves.clone();
    bad[32 * (victim - body.first_seq) as usize] ^= 1;
    let b = store.backend();
    store
        .execute_raw(&format!("UPDATE block_txs SET leaves = {} WHERE height = {}", blob_literal(b, &bad), body.height))
        .await
        .unwrap();

    // Leaf 11's audit path needs leaf 10's hash, and leaf 10's own proof returns it.
    for i in [victim + 1, victim] {
        match chain.inclusion_proof(i, None).await {
            Err(_) => {}
            Ok(p) => panic!(
                "{:?}: proof of leaf {i} built from a tampered row was served (verifies: {}): {p:?}",
                db.backend,
                p.verify()
            ),
        }
    }
    match chain.root_at(victim + 5).await {
        Err(_) => {}
        Ok(r) => {
            panic!("{:?}: historic root at {} computed from a tampered row: {}", db.backend, victim + 5, hex::encode(r))
        }
    }
}
