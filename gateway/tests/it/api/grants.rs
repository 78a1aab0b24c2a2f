//! Invariant 4: a device reads and writes only what its grants allow, on every interface
//! (values, history, addresses, transactions with proofs, SSE, WebSocket, moves, the admin
//! API, the reserved `/_kalima` prefix).

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use super::common::*;
use crate::support::TestNode;

/// A node where `dev` may read `/a` and write only `/a/w`, with data under `/a/x` and `/b`.
struct Setup {
    node: TestNode,
    dev: String,
    a_tx: String,
    b_tx: String,
}

async fn setup() -> Setup {
    let node = TestNode::new().await;
    let dev = node.device("dev", &[("/a", true, false), ("/a/w", false, true)]).await;
    let admin = node.admin.clone();
    let a = put_ok(&node, &admin, "/a/x", "t", json!(1)).await;
    let b = put_ok(&node, &admin, "/b", "t", json!(2)).await;
    put_ok(&node, &admin, "/ab", "t", json!(3)).await;
    Setup { a_tx: a["id"].as_str().expect("id").into(), b_tx: b["id"].as_str().expect("id").into(), node, dev }
}

#[tokio::test]
async fn a_device_reads_and_writes_only_under_its_grants_over_rest() {
    let Setup { node, dev, a_tx, b_tx } = setup().await;

    // Reads under /a.
    assert_eq!(value(&node, &dev, "/a/x", "t").await.expect("value")["body"], json!(1));
    let (s, h) = get(&node, &dev, "/api/v1/history?address=/a/x&key=t").await;
    assert_eq!(s, StatusCode::OK, "{h}");
    assert_eq!(h["items"].as_array().map(Vec::len), Some(1));
    let t = tx_ok(&node, &dev, &a_tx).await;
    assert_eq!(t["transaction"]["address"], json!("/a/x"));
    let (s, list) = get(&node, &dev, "/api/v1/addresses?prefix=/").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["addresses"], json!(["/a/x"]), "only readable addresses are listed");

    // Nothing outside /a: /b, /ab (a grant is segment-bounded) and the system prefix.
    for uri in [
        "/api/v1/values?address=/b".to_string(),
        "/api/v1/values?address=/b&key=t".into(),
        "/api/v1/values?address=/ab".into(),
        "/api/v1/history?address=/b&key=t".into(),
        "/api/v1/history?address=/_kalima/devices&key=dev".into(),
        "/api/v1/values?address=/_kalima/devices".into(),
        format!("/api/v1/tx/{b_tx}"),
    ] {
        let (s, v) = get(&node, &dev, &uri).await;
        assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden");
        assert!(!v.to_string().contains("\"body\""), "{uri}: a refusal leaks no data: {v}");
    }

    // Writes only under /a/w.
    put_ok(&node, &dev, "/a/w", "t", json!(4)).await;
    put_ok(&node, &dev, "/a/w/deeper", "t", json!(5)).await;
    let size = tree_size(&node).await;
    for address in ["/a/x", "/a", "/b", "/a/wx"] {
        let (s, v) = node.put(&dev, address, "t", json!(6)).await;
        assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden");
    }
    // A move needs write on both ends: /a/x is readable but not writable.
    let (s, v) = node
        .call(
            Method::POST,
            "/api/v1/tx/move",
            Some(&dev),
            Some(json!({ "from_address": "/a/x", "to_address": "/a/w", "key": "t" })),
        )
        .await;
    assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden");
    // And a move from an unreadable source does not reveal whether it holds a value.
    let (s, v) = node
        .call(
            Method::POST,
            "/api/v1/tx/move",
            Some(&dev),
            Some(json!({ "from_address": "/b", "to_address": "/a/w", "key": "t" })),
        )
        .await;
    assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(tree_size(&node).await, size, "no refused write committed");
    assert_eq!(value(&node, &node.admin, "/a/x", "t").await.expect("kept")["body"], json!(1));
    stop(node).await;
}

#[tokio::test]
async fn devices_cannot_write_under_the_reserved_prefix() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let dev = node.device("dev", &[("/", true, true)]).await;
    let size = tree_size(&node).await;
    // Granting oneself admin by writing the registry directly.
    let forged = json!({ "token_sha256": "00", "admin": true });
    for token in [&dev, &admin] {
        for address in ["/_kalima/devices", "/_kalima/grants/dev", "/_kalima/chain"] {
            let (s, v) = node.put(token, address, "dev", forged.clone()).await;
            assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden");
        }
        let (s, v) = node
            .call(
                Method::POST,
                "/api/v1/tx/batch",
                Some(token),
                Some(json!({ "transactions": [
                    { "address": "/ok", "key": "k", "body": 1 },
                    { "address": "/_kalima/devices", "key": "dev", "body": forged },
                ] })),
            )
            .await;
        assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden");
    }
    assert_eq!(tree_size(&node).await, size);
    let (s, d) = get(&node, &admin, "/api/v1/devices/dev").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(d["admin"], json!(false));
    // A grant on the reserved prefix is refused too.
    let (s, v) = node
        .call(
            Method::POST,
            "/api/v1/devices/dev/grants",
            Some(&admin),
            Some(json!({ "prefix": "/_kalima", "read": true, "write": true })),
        )
        .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_address");
    stop(node).await;
}

#[tokio::test]
async fn admin_routes_refuse_devices() {
    let node = TestNode::new().await;
    let dev = node.device("dev", &[("/", true, true)]).await;
    node.device("other", &[]).await;
    let size = tree_size(&node).await;
    let calls: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/api/v1/devices", None),
        (Method::POST, "/api/v1/devices", Some(json!({ "id": "new" }))),
        (Method::GET, "/api/v1/devices/other", None),
        (Method::DELETE, "/api/v1/devices/other", None),
        (Method::POST, "/api/v1/devices/dev/grants", Some(json!({ "prefix": "/", "read": true, "write": true }))),
        (Method::POST, "/api/v1/devices/other/grants", Some(json!({ "prefix": "/", "read": true, "write": true }))),
        (Method::DELETE, "/api/v1/devices/dev/grants?prefix=/", None),
        (Method::POST, "/api/v1/checkpoints", None),
    ];
    for (method, uri, body) in calls {
        let (s, v) = node.call(method.clone(), uri, Some(&dev), body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{method} {uri}: {v}");
        assert_eq!(v["error"]["code"], json!("admin_only"), "{method} {uri}: {v}");
    }
    assert_eq!(tree_size(&node).await, size, "no refused admin call wrote anything");
    let (s, me) = get(&node, &dev, "/api/v1/devices/dev").await;
    assert_eq!(s, StatusCode::OK, "a device may see itself: {me}");
    assert_eq!(me["id"], json!("dev"));
    assert!(me.get("token").is_none() && !me.to_string().contains("token_sha256"), "{me}");
    stop(node).await;
}

#[tokio::test]
async fn sse_delivers_only_what_the_device_may_read() {
    let Setup { node, dev, .. } = setup().await;
    let admin = node.admin.clone();
    for prefix in ["/b", "/ab", "/_kalima"] {
        let (s, v) = sse(&node, &dev, &format!("address={prefix}"), None).await.expect_err("refused");
        assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden");
    }
    let mut stream = sse(&node, &dev, "address=/", None).await.expect("SSE on /");
    let mut expected = Vec::new();
    for i in 0..3 {
        put_ok(&node, &admin, "/b", "t", json!(i)).await;
        put_ok(&node, &admin, "/ab", "t", json!(i)).await;
        node.device(&format!("d{i}"), &[("/b", true, true)]).await; // /_kalima traffic
        expected.push(put_ok(&node, &admin, "/a/x", "t", json!(i)).await["global_sequence"].clone());
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        let (id, tx) = stream.next_tx().await;
        assert_eq!(tx["address"], json!("/a/x"), "only /a reaches this device: {tx}");
        got.push(json!(id));
    }
    assert_eq!(got, expected);
    assert!(stream.next(std::time::Duration::from_millis(300)).await.is_none(), "nothing else");
    stop(node).await;
}

#[tokio::test]
async fn websocket_delivers_only_what_the_device_may_read() {
    let Setup { node, dev, .. } = setup().await;
    let admin = node.admin.clone();
    for prefix in ["/b", "/_kalima/devices"] {
        let (s, v) = ws(&node, &dev, &format!("address={prefix}")).await.expect_err("refused");
        assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden");
    }
    let (s, v) = ws(&node, "kal_nope", "address=/").await.expect_err("refused");
    assert_error(s, &v, StatusCode::UNAUTHORIZED, "unknown_device");
    let mut socket = ws(&node, &dev, "address=/").await.expect("WebSocket on /");
    let mut expected = Vec::new();
    for i in 0..3 {
        put_ok(&node, &admin, "/b", "t", json!(i)).await;
        node.device(&format!("d{i}"), &[]).await;
        expected.push(put_ok(&node, &admin, "/a/x", "t", json!(i)).await["global_sequence"].clone());
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        let tx = ws_next(&mut socket, STREAM_WAIT).await.expect("a frame");
        assert_eq!(tx["address"], json!("/a/x"), "only /a reaches this device: {tx}");
        got.push(tx["global_sequence"].clone());
    }
    assert_eq!(got, expected);
    assert!(ws_next(&mut socket, std::time::Duration::from_millis(300)).await.is_none());
    stop(node).await;
}

/// A block lists all its transaction ids to the admin, only the readable ones to a device:
/// ids alone would tell who writes what and when.
#[tokio::test]
async fn block_transaction_ids_are_filtered_by_read_grants() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let dev = node.device("reader", &[("/a", true, false)]).await;
    let batch = json!({ "transactions": [
        { "address": "/a/x", "key": "k", "body": 1 },
        { "address": "/b", "key": "k", "body": 2 },
    ]});
    let (s, v) = node.call(Method::POST, "/api/v1/tx/batch", Some(&admin), Some(batch)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (mine, other) = (&v["receipts"][0], &v["receipts"][1]);
    let uri = format!("/api/v1/blocks/{}", mine["height"]);
    assert_eq!(mine["height"], other["height"], "one commit, one block");
    let (_, all) = get(&node, &admin, &uri).await;
    let (_, seen) = get(&node, &dev, &uri).await;
    let ids = |v: &Value| v["transactions"].as_array().cloned().unwrap_or_default();
    assert!(ids(&all).contains(&mine["id"]) && ids(&all).contains(&other["id"]), "{all}");
    assert_eq!(ids(&seen), vec![mine["id"].clone()], "{seen}");

    let (s, v) = get(&node, &dev, "/api/v1/blocks/not-a-height").await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_path");
    stop(node).await;
}
