//! The PostgreSQL backend chosen by `KALIMA_STORAGE__URL`: writes survive SIGKILL and the
//! chain verifies, as on SQLite.

use kalima_e2e::{Node, PgDb, assert_verifies};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn postgres_backend() {
    let db = PgDb::create("pg").await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    let env = [("KALIMA_STORAGE__URL", db.url.as_str())];
    Node::init(&dir).await;

    let node = Node::start(&dir, &env).await;
    let mut written: Vec<(String, String, Value, String)> = Vec::new();
    for i in 0..10 {
        let (address, key, body) = (format!("/pg/line-{}", i % 3), format!("k{i}"), json!({ "i": i }));
        let r = node.put(&address, &key, body.clone()).await;
        written.push((address, key, body, r["id"].as_str().expect("id").to_string()));
    }
    let batch: Vec<(String, String, Value)> =
        (0..50).map(|i| (format!("/pg/batch-{}", i % 7), format!("b{i}"), json!(i))).collect();
    let (status, receipts) = node
        .post_json(
            "/api/v1/tx/batch",
            &json!({ "transactions": batch.iter().map(|(a, k, b)| json!({ "address": a, "key": k, "body": b })).collect::<Vec<_>>() }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{receipts}");
    for ((a, k, b), r) in batch.into_iter().zip(receipts["receipts"].as_array().expect("receipts")) {
        written.push((a, k, b, r["id"].as_str().expect("id").to_string()));
    }
    node.kill9();
    assert!(!dir.join("kalima.db").exists(), "a SQLite file was created although storage is PostgreSQL");
    assert_verifies(&dir, &env).await;

    let node = Node::start(&dir, &env).await;
    for (address, key, body, id) in &written {
        assert_eq!(node.value(address, key).await.as_ref(), Some(body), "{address} {key}");
        let (status, v) = node.get_json(&format!("/api/v1/tx/{id}")).await;
        assert_eq!(status, StatusCode::OK, "GET /api/v1/tx/{id}: {v}");
        assert_eq!(&v["transaction"]["body"], body);
    }
    node.put("/pg/after-restart", "k", json!("ok")).await;
    node.stop().await;
    assert_verifies(&dir, &env).await;
    db.drop_db().await;
}
