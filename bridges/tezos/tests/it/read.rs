//! `read_anchor` against recorded blocks (tests/it/octez/operations_3_*.json, served by the
//! stand-in Octez node): it finds the checkpoint of an applied anchor, and refuses a refused
//! anchor, a tez transfer and a call of another contract's entrypoint.

use kalima_bridge_tezos::forge::{OperationGroup, operation_hash};
use kalima_bridge_tezos::keys::{TezosKey, verify_forged};
use kalima_bridge_tezos::read::anchor_of_operation;
use kalima_bridge_tezos::standin::{
    Faults, RECORDED_ADMIN, RECORDED_CONTRACT, RECORDED_OPERATIONS_ANCHOR, RECORDED_OPERATIONS_REFUSED_AND_FOREIGN,
    StandInConfig, StandInOctez,
};
use kalima_bridge_tezos::{Error, read_anchor};
use serde_json::Value;
use tezos_crypto_rs::hash::{Ed25519Signature, HashTrait};

const ANCHOR_LEVEL: u64 = 11_432_103;
const REFUSED_LEVEL: u64 = 11_432_104;

fn ops(text: &str) -> Vec<Value> {
    serde_json::from_str(text).expect("recorded operations are JSON")
}

fn hash_of(text: &str, i: usize) -> String {
    ops(text)[i]["hash"].as_str().expect("an operation hash").to_string()
}

async fn node_with_recorded_blocks() -> StandInOctez {
    let node = StandInOctez::start(StandInConfig { block_time: None, ..StandInConfig::default() }, Faults::default())
        .await
        .expect("the stand-in Octez node starts");
    node.override_response(
        &format!("/chains/main/blocks/{ANCHOR_LEVEL}/operations/3"),
        200,
        RECORDED_OPERATIONS_ANCHOR,
    );
    node.override_response(
        &format!("/chains/main/blocks/{REFUSED_LEVEL}/operations/3"),
        200,
        RECORDED_OPERATIONS_REFUSED_AND_FOREIGN,
    );
    node
}

fn not_anchor(r: kalima_bridge_tezos::Result<Option<kalima_bridge_tezos::TezosAnchor>>) -> String {
    match r {
        Err(e @ Error::NotAnchor { .. }) => e.to_string(),
        other => panic!("expected NotAnchor, got {other:?}"),
    }
}

#[tokio::test]
async fn finds_the_checkpoint_of_an_applied_anchor() {
    let node = node_with_recorded_blocks().await;
    let op = hash_of(RECORDED_OPERATIONS_ANCHOR, 1);
    let a = read_anchor(&node.url, &op, ANCHOR_LEVEL).await.unwrap().expect("the anchor is in that block");
    assert_eq!((a.chain.as_str(), a.tree_size, a.height), ("plant-1", 1200, 87));
    let root = ops(RECORDED_OPERATIONS_ANCHOR)[1]["contents"][1]["parameters"]["value"]["args"][1]["args"][1]["args"]
        [0]["bytes"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(hex::encode(a.root), root);
    assert_eq!(a.contract, RECORDED_CONTRACT);
    assert_eq!(a.source, RECORDED_ADMIN);
    assert_eq!(a.network, "NetXdQprcVkpaWU");
}

#[tokio::test]
async fn an_operation_not_in_the_block_is_none() {
    let node = node_with_recorded_blocks().await;
    let op = hash_of(RECORDED_OPERATIONS_ANCHOR, 1);
    assert!(read_anchor(&node.url, &op, REFUSED_LEVEL).await.unwrap().is_none());
}

#[tokio::test]
async fn refuses_a_refused_anchor_a_transfer_and_a_foreign_call() {
    let node = node_with_recorded_blocks().await;
    let transfer = hash_of(RECORDED_OPERATIONS_ANCHOR, 0);
    let e = not_anchor(read_anchor(&node.url, &transfer, ANCHOR_LEVEL).await);
    assert!(e.contains("not to a contract"), "{e}");

    let refused = hash_of(RECORDED_OPERATIONS_REFUSED_AND_FOREIGN, 0);
    let e = not_anchor(read_anchor(&node.url, &refused, REFUSED_LEVEL).await);
    assert!(e.contains("did not apply") && e.contains("failed"), "{e}");

    let foreign = hash_of(RECORDED_OPERATIONS_REFUSED_AND_FOREIGN, 1);
    let e = not_anchor(read_anchor(&node.url, &foreign, REFUSED_LEVEL).await);
    assert!(e.contains("%transfer, not %anchor"), "{e}");
}

#[test]
fn refuses_a_call_whose_event_does_not_carry_the_checkpoint() {
    let mut op = ops(RECORDED_OPERATIONS_ANCHOR).remove(1);
    let hash = op["hash"].as_str().unwrap().to_string();
    assert!(anchor_of_operation(&hash, &op).is_ok());
    op["contents"][1]["metadata"]["internal_operation_results"][0]["payload"]["args"][1]["int"] = "1201".into();
    let e = anchor_of_operation(&hash, &op).unwrap_err().to_string();
    assert!(e.contains("emitted no %anchored event"), "{e}");
    op["contents"][1]["metadata"]["internal_operation_results"] = Value::Array(vec![]);
    assert!(anchor_of_operation(&hash, &op).is_err());
    op["contents"][1]["metadata"]["operation_result"]["status"] = "backtracked".into();
    assert!(anchor_of_operation(&hash, &op).unwrap_err().to_string().contains("backtracked"));
}

#[tokio::test]
async fn bad_input_and_malformed_blocks_are_errors() {
    let node = node_with_recorded_blocks().await;
    let e = read_anchor(&node.url, "not-a-hash", ANCHOR_LEVEL).await.unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    node.override_response("/chains/main/blocks/5/operations/3", 200, r#"{"not": "a list"}"#);
    let op = hash_of(RECORDED_OPERATIONS_ANCHOR, 1);
    let e = read_anchor(&node.url, &op, 5).await.unwrap_err().to_string();
    assert!(e.contains("operations/3") && e.contains("malformed answer"), "{e}");
    node.override_response("/chains/main/blocks/6/operations/3", 200, r#"[{"hash": 1}, 7, {"contents": null}]"#);
    assert!(read_anchor(&node.url, &op, 6).await.unwrap().is_none());
}

/// The recorded operations are real signed operations: their hashes are the hashes of their
/// bytes and their signatures verify (the tez transfer to an implicit account excepted: this
/// crate forges calls of contracts only).
#[test]
fn recorded_operations_hash_and_verify() {
    let keys: Vec<TezosKey> = [7u8, 8, 9].iter().map(|s| TezosKey::from_seed([*s; 32])).collect();
    let mut checked = 0;
    for text in [RECORDED_OPERATIONS_ANCHOR, RECORDED_OPERATIONS_REFUSED_AND_FOREIGN] {
        for op in ops(text) {
            let Ok(group) = OperationGroup::from_json(&op) else { continue };
            let forged = group.forge().unwrap();
            let sig = Ed25519Signature::from_b58check(op["signature"].as_str().unwrap()).unwrap();
            let sig: [u8; 64] = sig.as_ref().try_into().unwrap();
            let mut signed = forged.clone();
            signed.extend_from_slice(&sig);
            assert_eq!(operation_hash(&signed).to_b58check(), op["hash"].as_str().unwrap());
            let source = group.contents[0].manager().source.clone();
            let key = keys.iter().find(|k| *k.address() == source).expect("a known key");
            assert!(verify_forged(key.public_key(), &forged, &sig));
            checked += 1;
        }
    }
    assert_eq!(checked, 3);
}
