//! Checkpoints anchored on a real anvil: the event holds the checkpoint's root and size,
//! the anchor is confirmed after N blocks and recorded on the chain, a reorg that drops it
//! makes the anchorer send it again, and only allowed anchorers can anchor newer sizes.

use std::time::Duration;

use alloy::primitives::B256;
use kalima_bridge_ethereum::anchor::{Anchorer, Confirmation, read_anchor};
use kalima_bridge_ethereum::anvil::TestChain as Anvil;
use kalima_bridge_ethereum::contracts::KlxAnchor;
use kalima_core::anchor::{ANCHORS_ADDRESS, AnchorKind, AnchorRecord, anchor_latest, latest_anchor};
use kalima_core::testing::TestChain;
use kalima_core::tx::TxContent;

/// Mines a block every 50 ms until dropped, so confirmations accrue.
struct Miner(tokio::task::JoinHandle<()>);

impl Miner {
    fn start(anvil: &Anvil) -> Miner {
        let provider = anvil.provider();
        Miner(tokio::spawn(async move {
            loop {
                let _ = alloy::providers::Provider::raw_request::<_, serde_json::Value>(
                    &provider,
                    "anvil_mine".into(),
                    (1u64,),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }))
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn write(t: &TestChain, n: usize) {
    let dev = t.register(&format!("sensor-{}", t.chain.tree_size()), &[("/plant", false, true)]).await;
    let items = (0..n)
        .map(|i| TxContent {
            device_id: dev.id.clone(),
            address: "/plant/line-1".into(),
            key: format!("k{i}"),
            body: b"21.5".to_vec(),
            ..TxContent::default()
        })
        .collect();
    t.ingest.write("test", &dev, items).await.expect("write");
}

async fn setup() -> (TestChain, Anvil, String, Anchorer) {
    let t = TestChain::start("anchor-test").await;
    let anvil = Anvil::spawn(31337);
    let anchorer_key = anvil.signer(1);
    let contract = KlxAnchor::deploy(anvil.provider(), vec![anchorer_key.address()]).await.expect("deploy anchor");
    let contract = format!("{:#x}", contract.address());
    let a = Anchorer::new("ethereum", anvil.endpoint().as_str(), &contract, anchorer_key, 3).expect("anchorer");
    (t, anvil, contract, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_checkpoint_is_anchored_confirmed_and_recorded_on_the_chain() {
    let (t, anvil, contract, a) = setup().await;
    let _miner = Miner::start(&anvil);
    write(&t, 5).await;
    let cp = t.chain.checkpoint_now().await.expect("checkpoint");

    let record = anchor_latest(&t.chain, &a).await.expect("anchor").expect("something to anchor");
    assert_eq!(
        (record.tree_size, record.root.as_str(), record.height),
        (cp.tree_size, &*hex::encode(cp.root), cp.height)
    );
    assert_eq!(record.chain, "anchor-test");
    // What a verifier sees with nothing but RPC access.
    let on_chain = read_anchor(anvil.endpoint().as_str(), &contract, &record.tx_hash)
        .await
        .expect("read")
        .expect("the Anchored event");
    assert_eq!(
        (on_chain.chain.as_str(), on_chain.tree_size, on_chain.root, on_chain.height),
        ("anchor-test", cp.tree_size, B256::from(cp.root), cp.height)
    );
    assert_eq!((on_chain.block_number, on_chain.chain_id), (record.block_number, 31337));
    assert!(on_chain.confirmations >= 3, "recorded only after 3 confirmations: {on_chain:?}");
    assert!(latest_anchor(&t.chain, "ethereum").is_some_and(|l| l == record), "recorded on the chain");
    assert_eq!((record.kind, record.network.as_str()), (AnchorKind::Ethereum, "31337"));
    let signed = record.checkpoint.as_ref().expect("the anchored checkpoint is recorded with its signatures");
    assert_eq!(signed.valid_signers().len(), 1, "the node's signature verifies");

    // Nothing new: nothing sent. A newer checkpoint: a second anchor, both in the history.
    assert_eq!(anchor_latest(&t.chain, &a).await.expect("anchor"), None);
    write(&t, 3).await;
    let cp2 = t.chain.checkpoint_now().await.expect("checkpoint");
    let second = anchor_latest(&t.chain, &a).await.expect("anchor").expect("a newer checkpoint");
    assert_eq!(second.tree_size, cp2.tree_size);
    let history = t.history(ANCHORS_ADDRESS, "ethereum").await;
    let sizes: Vec<u64> = history
        .iter()
        .map(|c| serde_json::from_slice::<AnchorRecord>(&c.tx.content.body).expect("record").tree_size)
        .collect();
    assert_eq!(sizes, vec![cp2.tree_size, cp.tree_size]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anchor_dropped_by_a_reorg_before_its_confirmations_is_sent_again() {
    let (t, anvil, contract, a) = setup().await;
    write(&t, 4).await;
    let cp = t.chain.checkpoint_now().await.expect("checkpoint");
    let dropped = a.submit(&cp.chain, cp.tree_size, B256::from(cp.root), cp.height).await.expect("sent");
    anvil.reorg(1).await.expect("reorg");
    let _miner = Miner::start(&anvil);
    assert_eq!(a.confirm(dropped).await.expect("confirm"), Confirmation::Dropped);
    assert!(read_anchor(anvil.endpoint().as_str(), &contract, &format!("{dropped:#x}")).await.expect("read").is_none());

    let record = anchor_latest(&t.chain, &a).await.expect("anchor").expect("anchored again");
    assert_ne!(record.tx_hash, format!("{dropped:#x}"));
    assert_eq!(record.tree_size, cp.tree_size);
    assert!(read_anchor(anvil.endpoint().as_str(), &contract, &record.tx_hash).await.expect("read").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_anchorers_anchor_and_only_newer_tree_sizes() {
    let (t, anvil, contract, a) = setup().await;
    let _miner = Miner::start(&anvil);
    write(&t, 2).await;
    let cp = t.chain.checkpoint_now().await.expect("checkpoint");
    // Someone else's key.
    let stranger =
        Anchorer::new("ethereum", anvil.endpoint().as_str(), &contract, anvil.signer(4), 1).expect("anchorer");
    let err = stranger
        .submit(&cp.chain, cp.tree_size, B256::from(cp.root), cp.height)
        .await
        .expect_err("a stranger anchored");
    let selector = hex::encode(<KlxAnchor::NotAnchorer as alloy::sol_types::SolError>::SELECTOR);
    assert!(err.to_string().contains(&selector), "expected NotAnchorer (0x{selector}): {err}");
    anchor_latest(&t.chain, &a).await.expect("anchor").expect("anchored");
    // The same size again is refused by the contract.
    let err = a
        .submit(&cp.chain, cp.tree_size, B256::from(cp.root), cp.height)
        .await
        .expect_err("the same size was anchored twice");
    let selector = hex::encode(<KlxAnchor::NotNewer as alloy::sol_types::SolError>::SELECTOR);
    assert!(err.to_string().contains(&selector), "expected NotNewer (0x{selector}): {err}");
}
