//! The device admin API: registration, listing, grants, revocation, and the audit trail
//! they leave on the chain.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::common::*;
use crate::support::TestNode;

async fn admin_call(node: &TestNode, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    node.call(method, uri, Some(&node.admin), body).await
}

#[tokio::test]
async fn register_grant_revoke_and_the_audit_trail() {
    let node = TestNode::new().await;

    // Register: 201 with a token that works at once.
    let (s, created) = admin_call(&node, Method::POST, "/api/v1/devices", Some(json!({ "id": "sensor-1" }))).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["id"], json!("sensor-1"));
    let token = created["token"].as_str().expect("token").to_string();
    assert!(created["receipt"]["id"].is_string(), "{created}");
    let (s, v) = node.put(&token, "/plant", "t", json!(1)).await;
    assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden"); // authenticated, no grant yet
    let (s, me) = get(&node, &token, "/api/v1/devices/sensor-1").await;
    assert_eq!(s, StatusCode::OK, "the fresh token authenticates: {me}");

    // Duplicate id.
    let (s, v) = admin_call(&node, Method::POST, "/api/v1/devices", Some(json!({ "id": "sensor-1" }))).await;
    assert_error(s, &v, StatusCode::CONFLICT, "device_exists");

    // Grant, then the token writes.
    let (s, g) = admin_call(
        &node,
        Method::POST,
        "/api/v1/devices/sensor-1/grants",
        Some(json!({ "prefix": "/plant", "read": true, "write": true })),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{g}");
    put_ok(&node, &token, "/plant/line", "t", json!(1)).await;

    // List and show.
    node.device("sensor-2", &[("/x", true, false)]).await;
    let (s, list) = admin_call(&node, Method::GET, "/api/v1/devices", None).await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<_> = list["devices"].as_array().expect("devices").iter().map(|d| d["id"].clone()).collect();
    assert_eq!(ids, [json!("admin"), json!("sensor-1"), json!("sensor-2")], "sorted by id");
    let (s, shown) = admin_call(&node, Method::GET, "/api/v1/devices/sensor-1", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(shown["grants"], json!([{ "prefix": "/plant", "read": true, "write": true }]));
    assert_eq!(shown["revoked"], json!(false));
    assert_eq!(shown["admin"], json!(false));
    let (s, v) = admin_call(&node, Method::GET, "/api/v1/devices/nobody", None).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "no_such_device");

    // Remove the grant: writes and reads stop.
    let (s, v) = admin_call(&node, Method::DELETE, "/api/v1/devices/sensor-1/grants?prefix=/plant", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = node.put(&token, "/plant/line", "t", json!(2)).await;
    assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden");
    let (s, v) = get(&node, &token, "/api/v1/values?address=/plant/line").await;
    assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden");
    let (s, v) = admin_call(&node, Method::DELETE, "/api/v1/devices/sensor-1/grants?prefix=/plant", None).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found");
    admin_call(
        &node,
        Method::POST,
        "/api/v1/devices/sensor-1/grants",
        Some(json!({ "prefix": "/plant", "read": true, "write": true })),
    )
    .await;

    // Revoke: the token stops working at once, everywhere.
    revoke(&node, "sensor-1").await;
    let (s, v) = node.put(&token, "/plant/line", "t", json!(3)).await;
    assert_error(s, &v, StatusCode::UNAUTHORIZED, "revoked_device");
    let (s, v) = get(&node, &token, "/api/v1/values?address=/plant/line").await;
    assert_error(s, &v, StatusCode::UNAUTHORIZED, "revoked_device");
    let (s, v) = sse(&node, &token, "address=/plant", None).await.expect_err("refused");
    assert_error(s, &v, StatusCode::UNAUTHORIZED, "revoked_device");
    let (s, v) = ws(&node, &token, "address=/plant").await.expect_err("refused");
    assert_error(s, &v, StatusCode::UNAUTHORIZED, "revoked_device");
    let (s, shown) = admin_call(&node, Method::GET, "/api/v1/devices/sensor-1", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(shown["revoked"], json!(true));
    // The id cannot come back.
    let (s, v) = admin_call(&node, Method::POST, "/api/v1/devices", Some(json!({ "id": "sensor-1" }))).await;
    assert_error(s, &v, StatusCode::CONFLICT, "device_exists");

    // The audit trail is on the chain: registration then revocation, newest first.
    let (s, h) = admin_call(&node, Method::GET, "/api/v1/history?address=/_kalima/devices&key=sensor-1", None).await;
    assert_eq!(s, StatusCode::OK, "{h}");
    let items = h["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{h}");
    assert_eq!(items[1]["id"], created["receipt"]["id"], "the registration");
    assert_eq!(items[0]["body"]["revoked"], json!(true), "the revocation");
    assert_eq!(items[1]["body"]["revoked"], json!(false));
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    for i in items {
        assert_eq!(i["device_id"], json!("admin"), "signed off by the admin");
        assert_eq!(i["body"]["token_sha256"], json!(digest));
        assert!(!i.to_string().contains(&token), "the token itself is never stored");
    }
    let (s, g) =
        admin_call(&node, Method::GET, "/api/v1/history?address=/_kalima/grants/sensor-1&key=/plant", None).await;
    assert_eq!(s, StatusCode::OK, "{g}");
    let kinds: Vec<_> = g["items"].as_array().expect("items").iter().map(|i| i["kind"].clone()).collect();
    assert_eq!(kinds, [json!("put"), json!("delete"), json!("put")], "grant, removal, grant again");
    assert_eq!(g["items"][2]["body"], json!({ "read": true, "write": true }));
    stop(node).await;
}

#[tokio::test]
async fn registration_and_grant_input_is_checked() {
    let node = TestNode::new().await;
    node.device("dev", &[]).await;
    let size = tree_size(&node).await;
    struct Test {
        name: &'static str,
        method: Method,
        uri: &'static str,
        body: Option<Value>,
        expected_status: StatusCode,
        expected_code: &'static str,
    }
    let tests = [
        Test {
            name: "reserved id",
            method: Method::POST,
            uri: "/api/v1/devices",
            body: Some(json!({ "id": "_node" })),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_field",
        },
        Test {
            name: "id with a slash",
            method: Method::POST,
            uri: "/api/v1/devices",
            body: Some(json!({ "id": "a/b" })),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_field",
        },
        Test {
            name: "public key not hex",
            method: Method::POST,
            uri: "/api/v1/devices",
            body: Some(json!({ "id": "k1", "public_key": "zz" })),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_field",
        },
        Test {
            name: "signature required without a key",
            method: Method::POST,
            uri: "/api/v1/devices",
            body: Some(json!({ "id": "k2", "require_signature": true })),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_field",
        },
        Test {
            name: "grant for an unknown device",
            method: Method::POST,
            uri: "/api/v1/devices/ghost/grants",
            body: Some(json!({ "prefix": "/x", "read": true, "write": false })),
            expected_status: StatusCode::NOT_FOUND,
            expected_code: "no_such_device",
        },
        Test {
            name: "grant prefix that is not an address",
            method: Method::POST,
            uri: "/api/v1/devices/dev/grants",
            body: Some(json!({ "prefix": "x//y", "read": true, "write": false })),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_address",
        },
        Test {
            name: "revoke an unknown device",
            method: Method::DELETE,
            uri: "/api/v1/devices/ghost",
            body: None,
            expected_status: StatusCode::NOT_FOUND,
            expected_code: "no_such_device",
        },
        Test {
            name: "revoke the admin",
            method: Method::DELETE,
            uri: "/api/v1/devices/admin",
            body: None,
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_field",
        },
    ];
    for t in tests {
        let (s, v) = admin_call(&node, t.method, t.uri, t.body).await;
        assert_eq!(s, t.expected_status, "{}: {v}", t.name);
        assert_eq!(v["error"]["code"], json!(t.expected_code), "{}: {v}", t.name);
    }
    assert_eq!(tree_size(&node).await, size, "no refused admin call wrote anything");
    stop(node).await;
}

/// Revocation stops the token "everywhere at once": a stream opened before the revocation must
/// not keep delivering data to the revoked device.
#[tokio::test]
async fn an_open_sse_stream_stops_delivering_after_revocation() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let token = node.device("watcher", &[("/r", true, false)]).await;
    let mut stream = sse(&node, &token, "address=/r", None).await.expect("SSE");
    put_ok(&node, &admin, "/r", "t", json!("before")).await;
    assert_eq!(stream.next_tx().await.1["body"], json!("before"));

    revoke(&node, "watcher").await;
    let mut admin_stream = sse(&node, &admin, "address=/r", None).await.expect("SSE");
    put_ok(&node, &admin, "/r", "t", json!("after")).await;
    assert_eq!(admin_stream.next_tx().await.1["body"], json!("after"), "published");
    if let Some(ev) = stream.next(Duration::from_secs(1)).await {
        assert_ne!(ev.event, "tx", "a revoked device still receives data: {}", ev.data);
    }
    stop(node).await;
}

/// Removing a read grant likewise ends delivery on streams that are already open.
#[tokio::test]
async fn an_open_websocket_stops_delivering_after_the_grant_is_removed() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let token = node.device("watcher", &[("/r", true, false)]).await;
    let mut socket = ws(&node, &token, "address=/r").await.expect("WebSocket");
    put_ok(&node, &admin, "/r", "t", json!("before")).await;
    assert_eq!(ws_next(&mut socket, STREAM_WAIT).await.expect("frame")["body"], json!("before"));

    let (s, v) = admin_call(&node, Method::DELETE, "/api/v1/devices/watcher/grants?prefix=/r", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut admin_stream = sse(&node, &admin, "address=/r", None).await.expect("SSE");
    put_ok(&node, &admin, "/r", "t", json!("after")).await;
    assert_eq!(admin_stream.next_tx().await.1["body"], json!("after"), "published");
    let frame = ws_next(&mut socket, Duration::from_secs(1)).await;
    assert!(frame.is_none(), "a device without a read grant still receives data: {frame:?}");
    stop(node).await;
}
