//! Writes through `POST /api/v1/tx`, `/tx/batch` and `/tx/move`: receipts, what is read back
//! at once, deletes, TTL, props, `wait=false`, and batch atomicity.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use super::common::*;
use crate::support::TestNode;

#[tokio::test]
async fn json_write_answers_a_receipt_and_the_value_is_readable_at_once() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let before = tree_size(&node).await;
    let body = json!({ "celsius": 21.5, "ok": true, "tags": ["a", "b"] });

    let r = put_ok(&node, &admin, "/plant-1/line-2", "temp", body.clone()).await;
    let id = r["id"].as_str().expect("id");
    assert_eq!(id.len(), 64, "{r}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{r}");
    assert_eq!(r["global_sequence"], json!(before), "next position in the chain");
    assert_eq!(r["sequence"], json!(1), "first write of this address");
    let head = latest_block(&node).await;
    assert_eq!(r["height"], head["height"], "committed in the head block");
    let (s, blk) = get(&node, &admin, &format!("/api/v1/blocks/{}", r["height"])).await;
    assert_eq!(s, StatusCode::OK);
    assert!(blk["transactions"].as_array().expect("ids").contains(&json!(id)), "{blk}");

    // Readable at once, with and without the key.
    let v = value(&node, &admin, "/plant-1/line-2", "temp").await.expect("value");
    assert_eq!(v["body"], body);
    assert_eq!(v["id"], json!(id));
    assert_eq!(v["kind"], json!("put"));
    assert_eq!(v["device_id"], json!("admin"));
    assert_eq!(v["global_sequence"], r["global_sequence"]);
    let stored: Value = serde_json::from_slice(&unb64(&v["body_b64"])).expect("JSON text");
    assert_eq!(stored, body, "body_b64 holds the JSON text");

    let r2 = put_ok(&node, &admin, "/plant-1/line-2", "pressure", json!(1.2)).await;
    let r3 = put_ok(&node, &admin, "/plant-1/line-2", "temp", json!(22)).await;
    assert_eq!(r2["sequence"], json!(2));
    assert_eq!(r3["sequence"], json!(3));
    assert_eq!(r3["global_sequence"], json!(before + 2));

    let all = values(&node, &admin, "/plant-1/line-2").await;
    assert_eq!(all.keys().collect::<Vec<_>>(), ["pressure", "temp"]);
    assert_eq!(all["temp"]["body"], json!(22), "the newest value replaced the old one");
    assert_eq!(all["temp"]["previous"], json!(id), "linked to the prior write of the key");
    assert_eq!(all["pressure"]["previous"], json!("0".repeat(64)), "first of its key");
    let (_, page) = get(&node, &admin, "/api/v1/values?address=/plant-1/line-2").await;
    assert_eq!(page["sequence"], json!(3), "{page}");
    stop(node).await;
}

#[tokio::test]
async fn body_b64_write_stores_the_exact_bytes() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let bytes = [0u8, 0x9f, 0x92, 0x96, 0xff, b'\n'];
    let r = write_ok(&node, &admin, json!({ "address": "/raw", "key": "frame", "body_b64": b64(&bytes) })).await;
    let v = value(&node, &admin, "/raw", "frame").await.expect("value");
    assert_eq!(unb64(&v["body_b64"]), bytes);
    assert_eq!(v["body"], Value::Null, "not JSON, so no parsed body");
    let t = tx_ok(&node, &admin, r["id"].as_str().expect("id")).await;
    assert_eq!(decode_tx(&unb64(&t["tx_bytes"])).body, bytes, "canonical bytes hold the body");

    // The limit is 8 KB inclusive.
    let max = vec![b'x'; 8 * 1024];
    write_ok(&node, &admin, json!({ "address": "/raw", "key": "max", "body_b64": b64(&max) })).await;
    let v = value(&node, &admin, "/raw", "max").await.expect("8 KB value");
    assert_eq!(unb64(&v["body_b64"]).len(), 8 * 1024);
    stop(node).await;
}

#[tokio::test]
async fn an_empty_body_deletes_the_value() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let forms = [
        ("absent", json!({ "address": "/d", "key": "k1" })),
        ("null", json!({ "address": "/d", "key": "k2", "body": null })),
        ("empty b64", json!({ "address": "/d", "key": "k3", "body_b64": "" })),
    ];
    for (name, delete) in forms {
        let key = delete["key"].as_str().expect("key").to_string();
        let put = put_ok(&node, &admin, "/d", &key, json!("on")).await;
        put_ok(&node, &admin, "/d", "keep", json!(1)).await;
        let del = write_ok(&node, &admin, delete).await;
        assert_eq!(value(&node, &admin, "/d", &key).await, None, "{name}: deleted");
        let all = values(&node, &admin, "/d").await;
        assert!(!all.contains_key(&key), "{name}: not listed");
        assert!(all.contains_key("keep"), "{name}: other keys untouched");

        let t = tx_ok(&node, &admin, del["id"].as_str().expect("id")).await;
        assert_eq!(t["transaction"]["kind"], json!("delete"), "{name}");
        assert_eq!(t["transaction"]["previous"], put["id"], "{name}: the delete links to the put");
        let (s, h) = get(&node, &admin, &format!("/api/v1/history?address=/d&key={key}")).await;
        assert_eq!(s, StatusCode::OK);
        let kinds: Vec<_> = h["items"].as_array().expect("items").iter().map(|i| i["kind"].clone()).collect();
        assert_eq!(kinds, [json!("delete"), json!("put")], "{name}: history keeps both");
    }
    stop(node).await;
}

#[tokio::test]
async fn ttl_deletes_the_value_within_a_few_seconds() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let expiring = write_ok(&node, &admin, json!({ "address": "/ttl", "key": "short", "body": 1, "ttl": 1 })).await;
    // A value overwritten before its TTL passed keeps the new value.
    let first = write_ok(&node, &admin, json!({ "address": "/ttl", "key": "renewed", "body": 1, "ttl": 1 })).await;
    put_ok(&node, &admin, "/ttl", "renewed", json!(2)).await;
    let first_ms = tx_ok(&node, &admin, first["id"].as_str().expect("id")).await["transaction"]["timestamp_ms"]
        .as_i64()
        .expect("timestamp_ms");
    let v = value(&node, &admin, "/ttl", "short").await.expect("live before expiry");
    assert_eq!(v["ttl"], json!(1));

    let gone =
        eventually(Duration::from_secs(8), || async { value(&node, &admin, "/ttl", "short").await.is_none() }).await;
    assert!(gone, "a 1 s TTL value still readable after 8 s");
    let (_, h) = get(&node, &admin, "/api/v1/history?address=/ttl&key=short").await;
    let del = &h["items"][0];
    assert_eq!(del["kind"], json!("delete"), "{h}");
    assert_eq!(del["device_id"], json!("_node"), "the node issues the delete");
    assert_eq!(del["props"]["reason"], json!("ttl"));
    assert_eq!(del["props"]["expired"], json!(expiring["global_sequence"].to_string()));

    // Past the first write's expiry (node clock = this machine's clock), with a margin.
    let now_ms =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    while now_ms() < first_ms + 1000 + 700 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renewed = value(&node, &admin, "/ttl", "renewed").await.expect("renewed value kept");
    assert_eq!(renewed["body"], json!(2));
    stop(node).await;
}

#[tokio::test]
async fn props_round_trip_on_every_read() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let props = json!({ "unit": "C", "source": "plc 7", "z-last": "", "a": "é ü" });
    let r = write_ok(
        &node,
        &admin,
        json!({ "address": "/p", "key": "t", "body": 3, "props": props, "client_time_ms": 1_700_000_000_123_i64 }),
    )
    .await;
    let v = value(&node, &admin, "/p", "t").await.expect("value");
    assert_eq!(v["props"], props);
    assert_eq!(v["client_time_ms"], json!(1_700_000_000_123_i64));
    let t = tx_ok(&node, &admin, r["id"].as_str().expect("id")).await;
    assert_eq!(t["transaction"]["props"], props);
    let decoded = decode_tx(&unb64(&t["tx_bytes"]));
    let expected: std::collections::BTreeMap<String, String> = serde_json::from_value(props.clone()).expect("map");
    assert_eq!(decoded.props, expected, "props are in the canonical bytes");
    let (_, h) = get(&node, &admin, "/api/v1/history?address=/p&key=t").await;
    assert_eq!(h["items"][0]["props"], props);
    stop(node).await;
}

#[tokio::test]
async fn wait_false_answers_202_and_the_value_appears_shortly_after() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let (s, v) = node
        .call(
            Method::POST,
            "/api/v1/tx?wait=false",
            Some(&admin),
            Some(json!({ "address": "/nw", "key": "k", "body": "queued" })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v, json!({ "status": "accepted", "count": 1 }));
    let seen = eventually(Duration::from_secs(5), || async {
        value(&node, &admin, "/nw", "k").await.is_some_and(|v| v["body"] == json!("queued"))
    })
    .await;
    assert!(seen, "a queued write never committed");

    let items: Vec<_> = (0..3).map(|i| json!({ "address": "/nw", "key": format!("b{i}"), "body": i })).collect();
    let (s, v) = node
        .call(Method::POST, "/api/v1/tx/batch?wait=false", Some(&admin), Some(json!({ "transactions": items })))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["count"], json!(3));
    let seen = eventually(Duration::from_secs(5), || async { values(&node, &admin, "/nw").await.len() == 4 }).await;
    assert!(seen, "a queued batch never committed");
    stop(node).await;
}

#[tokio::test]
async fn batch_of_1000_commits_with_consecutive_global_sequences() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let before = tree_size(&node).await;
    let items: Vec<_> = (0..1000).map(|i| json!({ "address": "/batch", "key": format!("k{i}"), "body": i })).collect();
    let (s, v) =
        node.call(Method::POST, "/api/v1/tx/batch", Some(&admin), Some(json!({ "transactions": items }))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let receipts = v["receipts"].as_array().expect("receipts");
    assert_eq!(receipts.len(), 1000);
    for (i, r) in receipts.iter().enumerate() {
        assert_eq!(r["global_sequence"], json!(before + i as u64), "receipt {i} in request order");
        assert_eq!(r["sequence"], json!(i as u64 + 1), "per-address sequence of receipt {i}");
    }
    let ids: BTreeSet<_> = receipts.iter().map(|r| r["id"].as_str().expect("id")).collect();
    assert_eq!(ids.len(), 1000, "distinct ids");
    assert_eq!(tree_size(&node).await, before + 1000);
    let all = values(&node, &admin, "/batch").await;
    assert_eq!(all.len(), 1000);
    for i in [0, 499, 999] {
        assert_eq!(all[&format!("k{i}")]["body"], json!(i));
    }
    stop(node).await;
}

#[tokio::test]
async fn a_batch_with_one_bad_item_commits_nothing() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let limited = node.device("limited", &[("/ok", true, true)]).await;
    let batch = |address: &str, bad: Option<(usize, Value)>| {
        let mut items: Vec<Value> =
            (0..1000).map(|i| json!({ "address": address, "key": format!("k{i}"), "body": i })).collect();
        if let Some((i, item)) = bad {
            items[i] = item;
        }
        json!({ "transactions": items })
    };
    struct Test {
        name: &'static str,
        token: String,
        address: &'static str,
        request: Value,
        expected_status: StatusCode,
        expected_code: &'static str,
    }
    let tests = [
        Test {
            name: "invalid key in item 700",
            token: admin.clone(),
            address: "/all",
            request: batch("/all", Some((700, json!({ "address": "/all", "key": "bad#key", "body": 1 })))),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_key",
        },
        Test {
            name: "item 999 outside the device's grants",
            token: limited.clone(),
            address: "/ok",
            request: batch("/ok", Some((999, json!({ "address": "/elsewhere", "key": "k", "body": 1 })))),
            expected_status: StatusCode::FORBIDDEN,
            expected_code: "forbidden",
        },
        Test {
            name: "body over 8 KB in item 1",
            token: admin.clone(),
            address: "/all",
            request: batch("/all", Some((1, json!({ "address": "/all", "key": "big", "body_b64": b64(&[1; 8193]) })))),
            expected_status: StatusCode::PAYLOAD_TOO_LARGE,
            expected_code: "too_large",
        },
        Test {
            name: "the same idempotency key twice in one batch",
            token: admin.clone(),
            address: "/all",
            request: json!({ "transactions": [
                { "address": "/all", "key": "a", "body": 1, "idempotency_key": "same" },
                { "address": "/all", "key": "b", "body": 2, "idempotency_key": "same" },
            ] }),
            expected_status: StatusCode::CONFLICT,
            expected_code: "duplicate_idempotency_key",
        },
        Test {
            name: "empty batch",
            token: admin.clone(),
            address: "/all",
            request: json!({ "transactions": [] }),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "batch_size",
        },
    ];
    for t in tests {
        let size = tree_size(&node).await;
        let (s, v) = node.call(Method::POST, "/api/v1/tx/batch", Some(&t.token), Some(t.request)).await;
        assert_error(s, &v, t.expected_status, t.expected_code);
        assert_eq!(tree_size(&node).await, size, "{}: nothing committed", t.name);
        assert!(values(&node, &admin, t.address).await.is_empty(), "{}: no value written", t.name);
    }
    stop(node).await;
}

/// `wait=false` answers 202 only "once the write passed every check": a batch that the
/// sequencer will refuse must be refused to the sender, never accepted and dropped silently.
#[tokio::test]
async fn wait_false_refuses_what_wait_true_refuses() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    struct Test {
        name: &'static str,
        request: Value,
        expected_status: StatusCode,
        expected_code: &'static str,
    }
    let tests = [
        Test {
            name: "invalid key",
            request: json!({ "transactions": [{ "address": "/nw", "key": "a#b", "body": 1 }] }),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_key",
        },
        Test {
            name: "the same idempotency key twice in one batch",
            request: json!({ "transactions": [
                { "address": "/nw", "key": "a", "body": 1, "idempotency_key": "same" },
                { "address": "/nw", "key": "b", "body": 2, "idempotency_key": "same" },
            ] }),
            expected_status: StatusCode::CONFLICT,
            expected_code: "duplicate_idempotency_key",
        },
    ];
    for t in tests {
        let (s, v) = node.call(Method::POST, "/api/v1/tx/batch?wait=false", Some(&admin), Some(t.request)).await;
        if s == StatusCode::ACCEPTED {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let committed = values(&node, &admin, "/nw").await.len();
            panic!("{}: answered 202 {v}, then {committed} of its writes committed", t.name);
        }
        assert_error(s, &v, t.expected_status, t.expected_code);
    }
    stop(node).await;
}

#[tokio::test]
async fn move_puts_the_value_at_the_destination_and_deletes_the_source() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    write_ok(&node, &admin, json!({ "address": "/m/src", "key": "k", "body": { "v": 1 }, "props": { "unit": "C" } }))
        .await;
    let (s, v) = node
        .call(
            Method::POST,
            "/api/v1/tx/move",
            Some(&admin),
            Some(json!({ "from_address": "/m/src", "to_address": "/m/dst", "key": "k" })),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let receipts = v["receipts"].as_array().expect("receipts");
    assert_eq!(receipts.len(), 2, "{v}");
    let g0 = receipts[0]["global_sequence"].as_u64().expect("seq");
    assert_eq!(receipts[1]["global_sequence"], json!(g0 + 1), "one commit, delete then put");
    let del = tx_ok(&node, &admin, receipts[0]["id"].as_str().expect("id")).await;
    assert_eq!(del["transaction"]["address"], json!("/m/src"));
    assert_eq!(del["transaction"]["kind"], json!("delete"));

    assert_eq!(value(&node, &admin, "/m/src", "k").await, None, "source emptied");
    let moved = value(&node, &admin, "/m/dst", "k").await.expect("moved value");
    assert_eq!(moved["body"], json!({ "v": 1 }));
    assert_eq!(moved["props"]["unit"], json!("C"), "props travel");
    assert_eq!(moved["props"]["moved_from"], json!("/m/src"));

    let size = tree_size(&node).await;
    let (s, v) = node
        .call(
            Method::POST,
            "/api/v1/tx/move",
            Some(&admin),
            Some(json!({ "from_address": "/m/src", "to_address": "/m/dst", "key": "k" })),
        )
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found");
    let (s, v) = node
        .call(
            Method::POST,
            "/api/v1/tx/move",
            Some(&admin),
            Some(json!({ "from_address": "/m/dst", "to_address": "m//bad", "key": "k" })),
        )
        .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_address");
    assert_eq!(tree_size(&node).await, size, "refused moves commit nothing");
    assert!(value(&node, &admin, "/m/dst", "k").await.is_some());
    stop(node).await;
}

/// A moved value keeps its TTL: it must not become permanent by moving.
#[tokio::test]
async fn a_moved_value_keeps_its_ttl() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    write_ok(&node, &admin, json!({ "address": "/m/from", "key": "k", "body": 1, "ttl": 300 })).await;
    let (s, v) = node
        .call(
            Method::POST,
            "/api/v1/tx/move",
            Some(&admin),
            Some(json!({ "from_address": "/m/from", "to_address": "/m/to", "key": "k" })),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let moved = value(&node, &admin, "/m/to", "k").await.expect("moved value");
    assert_eq!(moved["ttl"], json!(300), "{moved}");
    stop(node).await;
}
