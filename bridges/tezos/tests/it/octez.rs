//! The anchorer against a stand-in Octez node answering with the recorded Octez response
//! shapes (tests/it/octez/*.json): first anchor with a reveal, later ones without, a refused
//! simulation, reorgs, lost operations, waiting for confirmations, malformed answers.

use std::sync::Arc;
use std::time::Duration;

use kalima_bridge_tezos::forge::Content;
use kalima_bridge_tezos::standin::{Faults, RECORDED_ADMIN, RECORDED_CONTRACT, StandInConfig, StandInOctez};
use kalima_bridge_tezos::{AnchorParameter, TezosAnchorer, TezosKey, TezosTarget, read_anchor};
use kalima_core::anchor::{AnchorKind, Anchorer};
use kalima_core::checkpoint::CheckpointJson;
use tezos_crypto_rs::hash::HashTrait;

const MAINNET: &str = "NetXdQprcVkpaWU";

fn key() -> TezosKey {
    TezosKey::from_seed([7; 32])
}

fn checkpoint(chain: &str, tree_size: u64, height: u64) -> CheckpointJson {
    CheckpointJson {
        chain: chain.into(),
        tree_size,
        height,
        timestamp_ms: 1_795_000_000_000,
        root: hex::encode([tree_size as u8; 32]),
        signed_text: String::new(),
        signatures: Vec::new(),
    }
}

fn target(node: &StandInOctez, confirmations: u64, max_wait_blocks: u64) -> TezosTarget {
    TezosTarget {
        rpc_url: node.url.clone(),
        contract: RECORDED_CONTRACT.into(),
        confirmations,
        max_wait_blocks,
        poll_interval_ms: 5,
        ..TezosTarget::default()
    }
}

fn anchorer(node: &StandInOctez, confirmations: u64) -> TezosAnchorer {
    TezosAnchorer::with_key(&target(node, confirmations, 60), key()).expect("a valid target")
}

async fn start(config: StandInConfig, faults: Faults) -> StandInOctez {
    StandInOctez::start(config, faults).await.expect("the stand-in Octez node starts")
}

fn revealed() -> StandInConfig {
    StandInConfig { revealed: vec![key().public_key().clone()], ..StandInConfig::default() }
}

async fn anchor(a: &TezosAnchorer, cp: &CheckpointJson) -> Result<kalima_core::anchor::AnchorRecord, String> {
    tokio::time::timeout(Duration::from_secs(30), a.anchor(cp)).await.expect("the anchor settles within 30 s")
}

#[tokio::test]
async fn first_anchor_reveals_the_key_and_later_ones_do_not() {
    let node = start(StandInConfig::default(), Faults::default()).await;
    let a = anchorer(&node, 2);
    assert_eq!(a.address(), RECORDED_ADMIN);
    assert_eq!(a.target(), "tezos");

    let cp = checkpoint("plant-1", 1200, 87);
    let rec = anchor(&a, &cp).await.unwrap();
    assert_eq!(rec.target, "tezos");
    assert_eq!(rec.kind, AnchorKind::Tezos);
    assert_eq!(rec.network, MAINNET);
    assert_eq!(rec.contract, RECORDED_CONTRACT);
    assert_eq!((rec.chain.as_str(), rec.tree_size, rec.height), ("plant-1", 1200, 87));
    assert_eq!(rec.root, cp.root);
    assert!(rec.checkpoint.is_none());
    assert!(rec.tx_hash.starts_with('o'));
    assert_eq!(node.included(&rec.tx_hash), Some((rec.block_number, true)));
    assert!(node.head_level() >= rec.block_number + 2);

    let injections = node.injections();
    assert_eq!(injections.len(), 1);
    assert_eq!(injections[0].hash, rec.tx_hash);
    let op = injections[0].operation.clone().expect("the injected bytes decode");
    match op.group.contents.as_slice() {
        [
            Content::Reveal { manager: r, public_key },
            Content::Transaction { manager: t, amount, destination, parameters },
        ] => {
            assert_eq!(public_key, key().public_key());
            assert_eq!((r.counter, t.counter), (42, 43));
            // Limits from the recorded simulation: consumed gas + 100, paid storage + 20.
            assert_eq!((r.gas_limit, r.storage_limit), (1_100, 0));
            assert_eq!((t.gas_limit, t.storage_limit), (2_069, 90));
            assert!(r.fee > 0 && t.fee > 0);
            assert_eq!(*amount, 0);
            assert_eq!(destination.to_b58check(), RECORDED_CONTRACT);
            let p = parameters.as_ref().unwrap();
            assert_eq!(p.entrypoint, "anchor");
            let anchored = AnchorParameter::from_micheline(&p.value).unwrap();
            assert_eq!(
                anchored,
                AnchorParameter { chain: "plant-1".into(), tree_size: 1200, root: [1200u64 as u8; 32], height: 87 }
            );
        }
        other => panic!("expected a reveal then a transaction, got {other:?}"),
    }

    let rec2 = anchor(&a, &checkpoint("plant-1", 1300, 90)).await.unwrap();
    let injections = node.injections();
    assert_eq!(injections.len(), 2);
    let op = injections[1].operation.clone().unwrap();
    match op.group.contents.as_slice() {
        [Content::Transaction { manager, .. }] => assert_eq!(manager.counter, 44),
        other => panic!("expected the transaction alone, got {other:?}"),
    }
    assert_eq!(node.included(&rec2.tx_hash), Some((rec2.block_number, true)));
    assert!(node.problems().is_empty(), "{:#?}", node.problems());

    // What a verifier with RPC access reads back.
    let found = read_anchor(&node.url, &rec.tx_hash, rec.block_number).await.unwrap().expect("the anchor is there");
    assert_eq!((found.chain.as_str(), found.tree_size, found.height), ("plant-1", 1200, 87));
    assert_eq!(hex::encode(found.root), rec.root);
    assert_eq!((found.contract.as_str(), found.source.as_str()), (RECORDED_CONTRACT, RECORDED_ADMIN));
    assert_eq!(found.network, MAINNET);
}

#[tokio::test]
async fn a_refused_simulation_names_the_failwith_and_sends_nothing() {
    let config = StandInConfig { anchored: vec![("plant-1".into(), 5_000)], ..revealed() };
    let node = start(config, Faults::default()).await;
    let err = anchor(&anchorer(&node, 2), &checkpoint("plant-1", 1200, 87)).await.unwrap_err();
    assert!(err.contains("simulation"), "{err}");
    assert!(err.contains("FAILWITH \"TREE_SIZE_NOT_NEWER\""), "{err}");
    assert!(err.contains("script_rejected"), "{err}");
    assert!(node.injections().is_empty());
    assert!(node.problems().is_empty(), "{:#?}", node.problems());
}

#[tokio::test]
async fn an_account_that_is_not_the_admin_is_refused_by_the_contract() {
    let other = TezosKey::from_seed([8; 32]);
    let config = StandInConfig { accounts: vec![(other.address_b58(), 16)], ..StandInConfig::default() };
    let node = start(config, Faults::default()).await;
    let a = TezosAnchorer::with_key(&target(&node, 2, 60), other).unwrap();
    let err = anchor(&a, &checkpoint("plant-1", 1200, 87)).await.unwrap_err();
    assert!(err.contains("NOT_ADMIN"), "{err}");
    // The reveal before the refused call is backtracked.
    assert!(err.contains("reveal (counter 17) backtracked"), "{err}");
}

#[tokio::test]
async fn an_unfunded_account_is_told_to_get_tez() {
    let config = StandInConfig { accounts: Vec::new(), ..StandInConfig::default() };
    let node = start(config, Faults::default()).await;
    let err = anchor(&anchorer(&node, 2), &checkpoint("plant-1", 1, 1)).await.unwrap_err();
    assert!(err.contains(RECORDED_ADMIN) && err.contains("send it some tez"), "{err}");
}

#[tokio::test]
async fn an_anchor_taken_out_of_its_block_is_sent_again() {
    let faults = Faults { reorgs: 1, requeue_on_reorg: false, lose_injections: 0 };
    let node = start(StandInConfig::default(), faults).await;
    let rec = anchor(&anchorer(&node, 2), &checkpoint("plant-1", 1200, 87)).await.unwrap();
    let injections = node.injections();
    assert_eq!(injections.len(), 2, "{injections:#?}");
    assert!(injections.iter().all(|i| i.accepted));
    assert_ne!(injections[0].hash, injections[1].hash);
    assert_eq!(rec.tx_hash, injections[1].hash);
    assert_eq!(node.included(&injections[0].hash), None);
    assert_eq!(node.included(&rec.tx_hash), Some((rec.block_number, true)));
    // Sent again once seen leaving its block, not after waiting max_wait_blocks (60).
    assert!(injections[1].head_level < injections[0].head_level + 10, "{injections:#?}");
    // The first was lost with its reveal: the second reveals again, with the same counters.
    let second = injections[1].operation.clone().unwrap();
    assert_eq!(second.group.contents.len(), 2);
    assert_eq!(second.group.contents[1].manager().counter, 43);
    assert!(node.problems().is_empty(), "{:#?}", node.problems());
}

#[tokio::test]
async fn an_anchor_back_in_the_mempool_after_a_reorg_lands_once() {
    let faults = Faults { reorgs: 1, requeue_on_reorg: true, lose_injections: 0 };
    let node = start(revealed(), faults).await;
    let rec = anchor(&anchorer(&node, 2), &checkpoint("plant-1", 1200, 87)).await.unwrap();
    let injections = node.injections();
    // The first operation came back and was confirmed; a second send, if any, was refused
    // (it conflicts with the first, or comes after it).
    assert_eq!(rec.tx_hash, injections[0].hash);
    assert!(injections[1..].iter().all(|i| !i.accepted), "{injections:#?}");
    assert_eq!(node.included(&rec.tx_hash), Some((rec.block_number, true)));
    assert!(node.problems().is_empty(), "{:#?}", node.problems());
}

#[tokio::test]
async fn a_lost_operation_is_sent_again_after_max_wait_blocks() {
    let faults = Faults { lose_injections: 1, ..Faults::default() };
    let node = start(revealed(), faults).await;
    let a = TezosAnchorer::with_key(&target(&node, 2, 3), key()).unwrap();
    let rec = anchor(&a, &checkpoint("plant-1", 1200, 87)).await.unwrap();
    let injections = node.injections();
    assert_eq!(injections.len(), 2);
    assert_eq!(rec.tx_hash, injections[1].hash);
    assert_eq!(node.included(&injections[0].hash), None);
    // Sent again once the head passed its branch (two levels below the head when it was
    // sent) by max_wait_blocks (3) without it in a block.
    assert!(injections[1].head_level > injections[0].head_level - 2 + 3, "{injections:#?}");
    assert!(node.problems().is_empty(), "{:#?}", node.problems());
}

#[tokio::test]
async fn confirmed_only_once_enough_blocks_are_on_top() {
    let config = StandInConfig { block_time: None, ..revealed() };
    let node = start(config, Faults::default()).await;
    let a = Arc::new(anchorer(&node, 3));
    let task = {
        let a = a.clone();
        tokio::spawn(async move { a.anchor_checkpoint(&checkpoint("plant-1", 1200, 87)).await })
    };
    for _ in 0..1000 {
        if node.mempool_len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(node.mempool_len(), 1, "the anchor was not injected");
    node.bake();
    let level = node.head_level();
    for on_top in 1..3 {
        node.bake();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!task.is_finished(), "confirmed with {on_top} blocks on top, 3 wanted");
    }
    node.bake();
    let rec = tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap().unwrap();
    assert_eq!(rec.block_number, level);
}

/// Each case: the call answered badly, the answer, and words the error must hold.
#[tokio::test]
async fn malformed_answers_are_clear_errors() {
    let cases: &[(&str, u16, &str, &[&str])] = &[
        (
            "/chains/main/blocks/head~2/header",
            200,
            "<html>proxy error</html>",
            &["GET /chains/main/blocks/head~2/header", "malformed answer"],
        ),
        (
            "/chains/main/blocks/head~2/header",
            200,
            r#"{"hash": "BLx", "level": "x"}"#,
            &["head~2/header", "malformed answer"],
        ),
        ("/chains/main/blocks/head~2/header", 200, r#"{"hash": "#, &["head~2/header", "malformed answer"]),
        ("/chains/main/blocks/head~2/header", 502, "Bad Gateway", &["head~2/header", "HTTP 502", "Bad Gateway"]),
        (
            "/chains/main/blocks/head/context/contracts/tz1Qr9uevaimfiPS6X1otehsKrwvZjX7bsyL/counter",
            200,
            r#"{"counter": 1}"#,
            &["/counter", "malformed answer"],
        ),
        (
            "/chains/main/blocks/head/context/contracts/tz1Qr9uevaimfiPS6X1otehsKrwvZjX7bsyL/manager_key",
            200,
            "42",
            &["/manager_key", "malformed answer"],
        ),
        (
            "/chains/main/blocks/head/context/constants",
            200,
            r#"{"hard_gas_limit_per_operation": "1040000"}"#,
            &["/constants", "malformed answer", "hard_gas_limit_per_block"],
        ),
        (
            "/chains/main/blocks/head/helpers/scripts/run_operation",
            200,
            r#"{"contents": "nope"}"#,
            &["run_operation", "no contents list"],
        ),
        (
            "/chains/main/blocks/head/helpers/scripts/run_operation",
            200,
            r#"{"contents": [{"kind": "reveal", "metadata": {}}, {"kind": "transaction", "metadata": {}}]}"#,
            &["run_operation", "no metadata.operation_result"],
        ),
        (
            "/chains/main/blocks/head/helpers/scripts/run_operation",
            200,
            r#"{"contents": [{"kind": "transaction", "metadata": {"operation_result": {"status": "applied"}}}]}"#,
            &["run_operation", "1 results for 2 contents"],
        ),
        (
            "/chains/main/blocks/head/helpers/scripts/run_operation",
            500,
            r#"[{"kind":"temporary","id":"proto.024-PtTALLiN.contract.balance_too_low","contract":"tz1Qr9uevaimfiPS6X1otehsKrwvZjX7bsyL","balance":"12","amount":"900"}]"#,
            &["simulation", "balance_too_low", "balance 12"],
        ),
        ("/injection/operation", 200, "42", &["/injection/operation", "malformed answer"]),
        (
            "/injection/operation",
            200,
            r#""ooZ5rsK7D3nMhnRnzbuGyW9qHB3Lh2D1rzs2LgwXVhWDtpBu5Ry""#,
            &["the node names the operation ooZ5rsK7D3nMhnRnzbuGyW9qHB3Lh2D1rzs2LgwXVhWDtpBu5Ry"],
        ),
        ("/injection/operation", 500, "", &["refused", "HTTP 500", "(empty body)"]),
        (
            "/chains/main/blocks/head/header",
            500,
            "Internal Server Error",
            &["GET /chains/main/blocks/head/header", "HTTP 500"],
        ),
    ];
    for (path, status, body, words) in cases {
        let node = start(StandInConfig::default(), Faults::default()).await;
        node.override_response(path, *status, body);
        let err = anchor(&anchorer(&node, 2), &checkpoint("plant-1", 1200, 87)).await.unwrap_err();
        for w in *words {
            assert!(err.contains(w), "{path} answering {status} {body:?}: the error {err:?} lacks {w:?}");
        }
    }
}

#[tokio::test]
async fn a_bad_checkpoint_root_is_refused_before_any_call() {
    let node = start(StandInConfig::default(), Faults::default()).await;
    let mut cp = checkpoint("plant-1", 1200, 87);
    cp.root = "abcd".into();
    let err = anchor(&anchorer(&node, 2), &cp).await.unwrap_err();
    assert!(err.contains("not 32 bytes"), "{err}");
    assert!(node.requests().iter().all(|r| !r.contains("run_operation")));
}

#[tokio::test]
async fn fees_above_the_cap_are_refused_before_injection() {
    let node = start(revealed(), Faults::default()).await;
    let t = TezosTarget { fee_cap_mutez: 100, ..target(&node, 2, 60) };
    let err = anchor(&TezosAnchorer::with_key(&t, key()).unwrap(), &checkpoint("plant-1", 1200, 87)).await.unwrap_err();
    assert!(err.contains("fee_cap_mutez = 100"), "{err}");
    assert!(node.injections().is_empty());
}
