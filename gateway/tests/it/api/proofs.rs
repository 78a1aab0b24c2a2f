//! Proofs a third party checks without our code: transaction bytes and leaf hash, RFC 6962
//! inclusion and consistency proofs (verified with the RFC 9162 algorithms in `common`), and
//! Ed25519-signed checkpoints.

use axum::http::{Method, StatusCode};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde_json::{Value, json};

use super::common::*;
use crate::support::TestNode;

/// Writes `n` single transactions and one batch of `batch` under `/proof`; returns the ids.
async fn fill(node: &TestNode, n: usize, batch: usize) -> Vec<String> {
    let admin = node.admin.clone();
    let mut ids = Vec::new();
    for i in 0..n {
        let r = put_ok(node, &admin, "/proof", &format!("k{}", i % 3), json!(i)).await;
        ids.push(r["id"].as_str().expect("id").to_string());
    }
    if batch > 0 {
        let items: Vec<_> =
            (0..batch).map(|i| json!({ "address": "/proof/b", "key": format!("b{i}"), "body": i })).collect();
        let (s, v) =
            node.call(Method::POST, "/api/v1/tx/batch", Some(&admin), Some(json!({ "transactions": items }))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        ids.extend(
            v["receipts"].as_array().expect("receipts").iter().map(|r| r["id"].as_str().expect("id").to_string()),
        );
    }
    ids
}

fn hashes(v: &Value) -> Vec<Hash> {
    v.as_array().expect("array").iter().map(hash_of).collect()
}

#[tokio::test]
async fn tx_bytes_and_inclusion_proofs_verify_independently() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    // Past two 256-leaf chunks, so old proofs need leaf hashes the node reads back from storage.
    let ids = fill(&node, 7, 600).await;
    let head = latest_block(&node).await;
    let size = head["tree_size"].as_u64().expect("tree_size");
    let head_root = hash_of(&head["merkle_root"]);
    let leaves = all_leaves(&node).await;
    assert_eq!(leaves.len() as u64, size);
    assert_eq!(mth(&leaves), head_root, "the head's merkle_root is the RFC 6962 root of every leaf");

    let picks = [0, 1, 3, 6, 7, 30, 253, 254, 300, 509, 510, ids.len() - 1];
    for &i in &picks {
        let id = &ids[i];
        let t = tx_ok(&node, &admin, id).await;
        let bytes = unb64(&t["tx_bytes"]);
        let leaf_hash = leaf(&bytes);
        let proof = &t["proof"];
        assert_eq!(hex::encode(leaf_hash), *id, "id = SHA-256(0x00 || tx_bytes)");
        assert_eq!(proof["leaf_hash"], json!(id));
        let index = proof["leaf_index"].as_u64().expect("leaf_index");
        assert_eq!(json!(index), t["transaction"]["global_sequence"]);
        assert_eq!(leaves[index as usize], leaf_hash, "the leaf sits at its global sequence");
        assert_eq!(proof["tree_size"], json!(size));
        let root = hash_of(&proof["root"]);
        assert_eq!(root, head_root, "tx {i}: proof root is the latest block's merkle_root");
        let path = hashes(&proof["audit_path"]);
        assert!(verify_inclusion(index, size, &leaf_hash, &path, &root), "tx {i}: inclusion proof");

        // The verifier is not a rubber stamp.
        let mut wrong = path.clone();
        if let Some(h) = wrong.first_mut() {
            h[0] ^= 1;
            assert!(!verify_inclusion(index, size, &leaf_hash, &wrong, &root));
        }
        assert!(!verify_inclusion(index, size, &leaf(b"other"), &path, &root));

        // The bytes say what the JSON says.
        let d = decode_tx(&bytes);
        let tx = &t["transaction"];
        assert_eq!(json!(d.global_sequence), tx["global_sequence"]);
        assert_eq!(json!(d.sequence), tx["sequence"]);
        assert_eq!(json!(hex::encode(d.previous)), tx["previous"]);
        assert_eq!(json!(d.address), tx["address"]);
        assert_eq!(json!(d.key), tx["key"]);
        assert_eq!(json!(d.device_id), tx["device_id"]);
        assert_eq!(d.kind, 0, "put");
        assert_eq!(d.body, unb64(&tx["body_b64"]));
    }

    // After one more write the proof of an old transaction is in the new, larger tree.
    let r = put_ok(&node, &admin, "/proof", "late", json!("x")).await;
    let t = tx_ok(&node, &admin, &ids[0]).await;
    let head = latest_block(&node).await;
    assert_eq!(head["height"], r["height"]);
    assert_eq!(t["proof"]["tree_size"], json!(size + 1));
    assert_eq!(t["proof"]["root"], head["merkle_root"]);
    assert!(verify_inclusion(
        t["proof"]["leaf_index"].as_u64().expect("index"),
        size + 1,
        &hash_of(&t["proof"]["leaf_hash"]),
        &hashes(&t["proof"]["audit_path"]),
        &hash_of(&head["merkle_root"]),
    ));

    for (uri, status, code) in [
        ("/api/v1/tx/xyz", StatusCode::BAD_REQUEST, "invalid_id"),
        (&*format!("/api/v1/tx/{}", "ab".repeat(32)), StatusCode::NOT_FOUND, "not_found"),
    ] {
        let (s, v) = get(&node, &admin, uri).await;
        assert_error(s, &v, status, code);
    }
    stop(node).await;
}

async fn checkpoint(node: &TestNode) -> Value {
    let (s, cp) = node.call(Method::POST, "/api/v1/checkpoints", Some(&node.admin), None).await;
    assert_eq!(s, StatusCode::OK, "{cp}");
    cp
}

#[tokio::test]
async fn consistency_proofs_between_checkpoints_verify_independently() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let mut checkpoints = vec![checkpoint(&node).await]; // genesis only: size 2
    for (n, batch) in [(1, 0), (2, 5), (9, 0), (0, 40), (0, 300), (3, 0)] {
        fill(&node, n, batch).await;
        checkpoints.push(checkpoint(&node).await);
    }
    let sizes: Vec<u64> = checkpoints.iter().map(|c| c["tree_size"].as_u64().expect("size")).collect();
    assert!(sizes.windows(2).all(|w| w[0] < w[1]), "{sizes:?}");

    for (i, a) in checkpoints.iter().enumerate() {
        for b in &checkpoints[i..] {
            let (m, n) = (a["tree_size"].as_u64().expect("m"), b["tree_size"].as_u64().expect("n"));
            let (s, p) = get(&node, &admin, &format!("/api/v1/proofs/consistency?first={m}&second={n}")).await;
            assert_eq!(s, StatusCode::OK, "{m}->{n}: {p}");
            assert_eq!((p["first"].as_u64(), p["second"].as_u64()), (Some(m), Some(n)));
            let proof = hashes(&p["proof"]);
            let (ra, rb) = (hash_of(&a["root"]), hash_of(&b["root"]));
            assert!(verify_consistency(m, n, &ra, &rb, &proof), "{m}->{n}: consistency proof");
            if m < n {
                let mut forged = rb;
                forged[31] ^= 1;
                assert!(!verify_consistency(m, n, &ra, &forged, &proof), "{m}->{n}: wrong root accepted");
            }
        }
    }

    // Without `second`: up to the current tree, whose root is the head block's.
    let (m, rm) = (sizes[1], hash_of(&checkpoints[1]["root"]));
    put_ok(&node, &admin, "/proof", "tail", json!(1)).await;
    let head = latest_block(&node).await;
    let (s, p) = get(&node, &admin, &format!("/api/v1/proofs/consistency?first={m}")).await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(p["second"], head["tree_size"]);
    let n = head["tree_size"].as_u64().expect("n");
    assert!(verify_consistency(m, n, &rm, &hash_of(&head["merkle_root"]), &hashes(&p["proof"])));

    // Sizes that cannot have a proof are a client error, not a crash.
    for q in ["first=0&second=3", &*format!("first={n}&second=1"), &*format!("first=1&second={}", n + 1), "first=x"] {
        let (s, v) = get(&node, &admin, &format!("/api/v1/proofs/consistency?{q}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert!(v["error"]["code"].is_string(), "{q}: {v}");
    }
    stop(node).await;
}

#[tokio::test]
async fn checkpoints_are_signed_by_the_node_key() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let (s, v) = get(&node, &admin, "/api/v1/checkpoints/latest").await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found");
    fill(&node, 3, 0).await;
    let made = checkpoint(&node).await;
    let (s, cp) = get(&node, &admin, "/api/v1/checkpoints/latest").await;
    assert_eq!(s, StatusCode::OK, "{cp}");
    assert_eq!(cp, made, "latest is the one just made");

    let head = latest_block(&node).await;
    assert_eq!(cp["chain"], json!("test"));
    assert_eq!(cp["tree_size"], head["tree_size"]);
    assert_eq!(cp["height"], head["height"]);
    assert_eq!(cp["root"], head["merkle_root"]);
    let expected_text = format!(
        "kalima-checkpoint-v1\ntest\n{}\n{}\n{}\n{}\n",
        cp["tree_size"],
        cp["root"].as_str().expect("root"),
        cp["height"],
        cp["timestamp_ms"]
    );
    assert_eq!(cp["signed_text"], json!(expected_text), "signed text rebuilt from the fields");

    let sigs = cp["signatures"].as_array().expect("signatures");
    assert_eq!(sigs.len(), 1);
    let signer = &sigs[0]["signer"];
    assert_eq!(*signer, head["leader"], "signed by the node that builds the blocks");
    let mut pk = [0u8; 32];
    hex::decode_to_slice(signer.as_str().expect("hex"), &mut pk).expect("32-byte key");
    let key = VerifyingKey::from_bytes(&pk).expect("Ed25519 key");
    let mut sig = [0u8; 64];
    hex::decode_to_slice(sigs[0]["signature"].as_str().expect("hex"), &mut sig).expect("64-byte signature");
    let sig = Signature::from_bytes(&sig);
    key.verify(expected_text.as_bytes(), &sig).expect("checkpoint signature verifies");
    let forged = expected_text.replace(&format!("\n{}\n", cp["tree_size"]), "\n999999\n");
    assert!(key.verify(forged.as_bytes(), &sig).is_err(), "the signature covers the tree size");

    // The block at that height agrees with the checkpoint.
    let (s, b) = get(&node, &admin, &format!("/api/v1/blocks/{}", cp["height"])).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["block"]["merkle_root"], cp["root"]);
    stop(node).await;
}
