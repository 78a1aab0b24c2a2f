//! Data-key rotation through the CLI: records sealed under the old key stay readable, new
//! ones are sealed under the new key, and the chain still verifies.

use kalima_e2e::{Node, assert_verifies, describe, kalima, sqlite3_query};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Reads every written value back (from the memcache) and every transaction (from the store).
async fn assert_readable(node: &Node, written: &[(String, Value, String)]) {
    for (key, body, id) in written {
        assert_eq!(node.value("/rotation", key).await.as_ref(), Some(body), "value of {key}");
        let (status, v) = node.get_json(&format!("/api/v1/tx/{id}")).await;
        assert_eq!(status, StatusCode::OK, "GET /api/v1/tx/{id}: {v}");
        assert_eq!(&v["transaction"]["body"], body, "stored body of {key}");
    }
}

#[tokio::test]
async fn key_rotation() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let mut written = Vec::new();
    let (mut old_heights, mut new_heights) = (Vec::new(), Vec::new());

    let node = Node::start(&dir, &[]).await;
    for i in 0..5 {
        let body = json!({ "before_rotation": i });
        let r = node.put("/rotation", &format!("old-{i}"), body.clone()).await;
        old_heights.push(r["height"].as_u64().expect("height").to_string());
        written.push((format!("old-{i}"), body, r["id"].as_str().expect("id").to_string()));
    }
    node.stop().await;

    let o = kalima(&["keys", "rotate", "--dir", &dir.to_string_lossy()], &[]).await;
    assert!(o.status.success(), "kalima keys rotate:\n{}", describe(&o));

    let node = Node::start(&dir, &[]).await;
    assert_readable(&node, &written).await;
    for i in 0..5 {
        let body = json!({ "after_rotation": i });
        let r = node.put("/rotation", &format!("new-{i}"), body.clone()).await;
        new_heights.push(r["height"].as_u64().expect("height").to_string());
        written.push((format!("new-{i}"), body, r["id"].as_str().expect("id").to_string()));
    }
    assert_readable(&node, &written).await;
    node.stop().await;

    // A fresh start restores the memcache from records under both keys.
    let node = Node::start(&dir, &[]).await;
    assert_readable(&node, &written).await;
    node.stop().await;
    assert_verifies(&dir, &[]).await;

    let db = dir.join("kalima.db");
    // Each block's transactions are sealed together under the key active when it was written.
    let ids = sqlite3_query(&db, "SELECT DISTINCT key_id FROM block_txs ORDER BY key_id").await;
    assert_eq!(ids.split_whitespace().collect::<Vec<_>>(), ["1", "2"], "key ids of the stored blocks");
    for (heights, key, when) in [(&new_heights, 2, "after"), (&old_heights, 1, "before")] {
        let keys = sqlite3_query(
            &db,
            &format!("SELECT DISTINCT key_id FROM block_txs WHERE height IN ({})", heights.join(", ")),
        )
        .await;
        assert_eq!(keys, key.to_string(), "blocks written {when} the rotation are sealed under key {key}");
    }
}
