//! Self-contained receipts: built from a chain, they verify with nothing but the receipt;
//! every part a forger could change (bytes, id, proofs, checkpoint fields and signatures,
//! anchors) makes verification fail naming that part; the checkpoint chosen is the one
//! anchored, and a proof already held at an older tree size is joined to it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kalima_core::anchor::{AnchorKind, AnchorRecord, record_anchor};
use kalima_core::receipt::{BuildError, RECEIPT_FORMAT, Receipt, ReceiptError, build};
use kalima_core::testing::TestChain;
use kalima_core::tx::TxContent;

const CHAIN: &str = "receipt-test";

async fn write(t: &TestChain, key: &str, body: &str) -> [u8; 32] {
    let dev = match t.chain.registry().get("sensor") {
        Some(d) => d,
        None => t.register("sensor", &[("/plant", true, true)]).await,
    };
    let item = TxContent {
        device_id: dev.id.clone(),
        address: "/plant/line-1".into(),
        key: key.into(),
        body: body.as_bytes().to_vec(),
        ..TxContent::default()
    };
    t.ingest.write("test", &dev, vec![item]).await.expect("write").receipts()[0].id
}

fn anchor_of(cp: &kalima_core::checkpoint::CheckpointJson, target: &str) -> AnchorRecord {
    AnchorRecord {
        target: target.into(),
        kind: AnchorKind::Ethereum,
        network: "31337".into(),
        contract: "0x5fbdb2315678afecb367f032d93f642f64180aa3".into(),
        chain: cp.chain.clone(),
        tree_size: cp.tree_size,
        root: cp.root.clone(),
        height: cp.height,
        tx_hash: format!("0x{:064x}", cp.tree_size),
        block_number: 7,
        checkpoint: Some(cp.clone()),
    }
}

fn fails(r: &Receipt) -> String {
    match r.verify() {
        Ok(_) => panic!("a tampered receipt verified: {}", serde_json::to_string_pretty(r).unwrap_or_default()),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_receipt_verifies_on_its_own_and_names_what_was_tampered_with() {
    let t = TestChain::start(CHAIN).await;
    let id = write(&t, "temp", "21.5").await;
    for i in 0..20 {
        write(&t, &format!("k{i}"), "1").await;
    }
    let cp = t.chain.checkpoint_now().await.expect("checkpoint");
    let r = build(&t.chain, &id, None).await.expect("receipt");
    assert_eq!(r.format, RECEIPT_FORMAT);
    assert!(r.anchors.is_empty(), "nothing is anchored yet");
    assert_eq!(r.checkpoint.tree_size, cp.tree_size);
    // The default inclusion tree is the one the transaction was committed into.
    assert_eq!(r.inclusion.tree_size, r.inclusion.leaf_index + 1);
    let v = r.verify().expect("verifies");
    assert_eq!((v.tx.content.key.as_str(), v.tx.content.body.as_slice()), ("temp", b"21.5".as_slice()));
    assert_eq!(v.signers, vec![t.chain.node_id().to_lowercase()], "signed by the node");
    // It survives a JSON round trip (what a file is).
    let text = serde_json::to_string(&r).expect("json");
    assert_eq!(serde_json::from_str::<Receipt>(&text).expect("parse"), r);

    let mut x = r.clone();
    // The forger's edit: the reading 21.5 becomes 29.5.
    let mut bytes = B64.decode(&x.tx_bytes).expect("b64");
    let at = bytes.windows(4).position(|w| w == b"21.5").expect("the body in the bytes");
    bytes[at + 1] = b'9';
    x.tx_bytes = B64.encode(&bytes);
    assert!(fails(&x).contains("hash of tx_bytes"), "{}", fails(&x));

    let mut x = r.clone();
    x.id = hex::encode([7u8; 32]);
    assert!(fails(&x).starts_with("id "), "{}", fails(&x));

    let mut x = r.clone();
    x.inclusion.audit_path.reverse();
    if x.inclusion.audit_path != r.inclusion.audit_path {
        assert!(fails(&x).contains("inclusion proof"), "{}", fails(&x));
    }
    let mut x = r.clone();
    x.inclusion.root = hex::encode([1u8; 32]);
    assert!(fails(&x).contains("inclusion proof"), "{}", fails(&x));

    let mut x = r.clone();
    x.consistency.proof.push(hex::encode([2u8; 32]));
    assert!(fails(&x).contains("consistency proof"), "{}", fails(&x));

    let mut x = r.clone();
    x.consistency.second -= 1;
    assert!(fails(&x).contains("consistency proof is from"), "{}", fails(&x));

    // A checkpoint whose root or size was changed keeps no valid signature.
    let mut x = r.clone();
    x.checkpoint.root = x.inclusion.root.clone();
    x.consistency = kalima_core::merkle::ConsistencyProof::new(x.inclusion.tree_size, x.inclusion.tree_size, &[]);
    x.checkpoint.tree_size = x.inclusion.tree_size;
    assert!(fails(&x).contains("no signature"), "{}", fails(&x));

    let mut x = r.clone();
    x.checkpoint.signatures[0].signature = hex::encode([3u8; 64]);
    assert!(fails(&x).contains("no signature"), "{}", fails(&x));

    let mut x = r.clone();
    let mut a = anchor_of(&x.checkpoint, "ethereum");
    a.root = hex::encode([4u8; 32]);
    x.anchors.push(a);
    assert!(fails(&x).contains("anchor ethereum"), "{}", fails(&x));

    let mut x = r.clone();
    x.format = "kalima-receipt-v0".into();
    assert!(matches!(x.verify(), Err(ReceiptError::Format(_))));

    let mut x = r.clone();
    x.tx_bytes = "***".into();
    assert!(matches!(x.verify(), Err(ReceiptError::Malformed { field: "tx_bytes", .. })));
}

#[tokio::test]
async fn a_receipt_leads_to_the_anchored_checkpoint_and_joins_a_proof_already_held() {
    let t = TestChain::start(CHAIN).await;
    let id = write(&t, "temp", "21.5").await;
    // What a buyer received at delivery: the proof in the tree of that moment.
    let held = t.chain.inclusion_proof(t.chain.tree_size() - 1, None).await.expect("proof");
    let early = t.chain.checkpoint_now().await.expect("checkpoint").to_json();
    record_anchor(&t.chain, &anchor_of(&early, "ethereum")).await.expect("anchor recorded");
    for i in 0..10 {
        write(&t, &format!("k{i}"), "1").await;
    }
    let late = t.chain.checkpoint_now().await.expect("checkpoint").to_json();
    assert!(late.tree_size > early.tree_size);

    // Only the early checkpoint is anchored: the receipt leads there, not to the latest.
    let r = build(&t.chain, &id, None).await.expect("receipt");
    assert_eq!(r.checkpoint, early);
    assert_eq!(r.anchors.len(), 1);
    assert_eq!(r.anchors[0].checkpoint, None, "the anchor is not repeated inside the receipt");
    r.verify().expect("verifies");

    // Two targets anchor the late checkpoint: it is the better-anchored one.
    record_anchor(&t.chain, &anchor_of(&late, "ethereum")).await.expect("anchor recorded");
    record_anchor(&t.chain, &anchor_of(&late, "polygon")).await.expect("anchor recorded");
    let r = build(&t.chain, &id, Some(held.tree_size)).await.expect("receipt");
    assert_eq!(r.checkpoint, late);
    let mut targets: Vec<&str> = r.anchors.iter().map(|a| a.target.as_str()).collect();
    targets.sort_unstable();
    assert_eq!(targets, vec!["ethereum", "polygon"]);
    // The inclusion proof is the one the buyer holds, joined to the anchor by consistency.
    assert_eq!(r.inclusion, held);
    assert_eq!((r.consistency.first, r.consistency.second), (held.tree_size, late.tree_size));
    r.verify().expect("verifies");

    // Sizes that cannot hold the transaction or pass the checkpoint are refused by name.
    let leaf = r.inclusion.leaf_index;
    for bad in [leaf, late.tree_size + 1] {
        match build(&t.chain, &id, Some(bad)).await {
            Err(BuildError::BadSize(m)) => assert!(m.contains("tree_size"), "{m}"),
            other => panic!("tree_size {bad}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn no_receipt_before_a_checkpoint_covers_the_transaction() {
    let t = TestChain::start(CHAIN).await;
    t.chain.checkpoint_now().await.expect("checkpoint");
    let id = write(&t, "temp", "21.5").await;
    match build(&t.chain, &id, None).await {
        Err(BuildError::NotCheckpointed(m)) => assert!(m.contains("no checkpoint covers"), "{m}"),
        other => panic!("expected NotCheckpointed: {other:?}"),
    }
    match build(&t.chain, &[9u8; 32], None).await {
        Err(BuildError::NotFound(_)) => {}
        other => panic!("expected NotFound: {other:?}"),
    }
    t.chain.checkpoint_now().await.expect("checkpoint");
    build(&t.chain, &id, None).await.expect("covered now").verify().expect("verifies");
}
