//! Live data over the node's real socket: SSE (`event: tx`, `id:` = global sequence,
//! `data:` = transaction JSON), resuming with `Last-Event-ID`, and the WebSocket twin.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use super::common::*;
use crate::support::TestNode;

#[tokio::test]
async fn sse_delivers_a_committed_write() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let mut stream = sse(&node, &admin, "address=/live", None).await.expect("SSE");
    put_ok(&node, &admin, "/elsewhere", "t", json!(0)).await;
    let r = put_ok(&node, &admin, "/live/line-1", "temp", json!({ "c": 20.5 })).await;

    let ev = stream.next(STREAM_WAIT).await.expect("an event");
    assert_eq!(ev.event, "tx");
    assert_eq!(ev.id.as_deref(), Some(&*r["global_sequence"].to_string()), "id: is the global sequence");
    let data: Value = serde_json::from_str(&ev.data).expect("data: is JSON");
    assert_eq!(data["id"], r["id"]);
    assert_eq!(data["address"], json!("/live/line-1"));
    assert_eq!(data["body"], json!({ "c": 20.5 }));
    let t = tx_ok(&node, &admin, r["id"].as_str().expect("id")).await;
    assert_eq!(data, t["transaction"], "the stream carries the transaction as GET /tx shows it");

    // Every write of a batch arrives, in order.
    let items: Vec<_> = (0..50).map(|i| json!({ "address": "/live", "key": format!("k{i}"), "body": i })).collect();
    let (s, v) =
        node.call(Method::POST, "/api/v1/tx/batch", Some(&admin), Some(json!({ "transactions": items }))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for (i, receipt) in v["receipts"].as_array().expect("receipts").iter().enumerate() {
        let (id, tx) = stream.next_tx().await;
        assert_eq!(json!(id), receipt["global_sequence"], "event {i}");
        assert_eq!(tx["body"], json!(i));
    }

    // Unauthenticated and malformed subscriptions are refused with the API error body.
    let (s, v) = sse(&node, "kal_nope", "address=/live", None).await.expect_err("refused");
    assert_error(s, &v, StatusCode::UNAUTHORIZED, "unknown_device");
    let (s, v) = sse(&node, &admin, "address=live//x", None).await.expect_err("refused");
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_address");
    stop(node).await;
}

#[tokio::test]
async fn sse_resumes_from_last_event_id_without_gaps_or_duplicates() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let dev = node.device("follower", &[("/res", true, false)]).await;
    let mut stream = sse(&node, &dev, "address=/res", None).await.expect("SSE");
    let mut last = 0;
    for i in 0..3 {
        let r = put_ok(&node, &admin, "/res", "k", json!(i)).await;
        let (id, _) = stream.next_tx().await;
        assert_eq!(json!(id), r["global_sequence"]);
        last = id;
    }
    drop(stream);

    // Missed while disconnected, mixed with data the follower may not read.
    let mut missed = Vec::new();
    for i in 3..9 {
        missed.push(put_ok(&node, &admin, "/res", "k", json!(i)).await["global_sequence"].clone());
        put_ok(&node, &admin, "/hidden", "k", json!(i)).await;
    }
    let items: Vec<_> = (0..5).map(|i| json!({ "address": "/res/batch", "key": format!("b{i}"), "body": i })).collect();
    let (s, v) =
        node.call(Method::POST, "/api/v1/tx/batch", Some(&admin), Some(json!({ "transactions": items }))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    missed.extend(v["receipts"].as_array().expect("receipts").iter().map(|r| r["global_sequence"].clone()));

    let mut stream = sse(&node, &dev, "address=/res", Some(last)).await.expect("resumed SSE");
    let live = put_ok(&node, &admin, "/res", "k", json!("live")).await;
    let mut expected = missed.clone();
    expected.push(live["global_sequence"].clone());
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        let (id, tx) = stream.next_tx().await;
        assert!(tx["address"].as_str().is_some_and(|a| a.starts_with("/res")), "{tx}");
        got.push(json!(id));
    }
    assert_eq!(got, expected, "missed events replayed in order, then live ones");
    assert!(stream.next(Duration::from_millis(300)).await.is_none(), "no duplicate after the replay");

    // Resuming from the newest id replays nothing.
    let newest = live["global_sequence"].as_u64().expect("seq");
    let mut stream = sse(&node, &dev, "address=/res", Some(newest)).await.expect("SSE");
    assert!(stream.next(Duration::from_millis(300)).await.is_none(), "nothing to replay");
    let r = put_ok(&node, &admin, "/res", "k", json!("next")).await;
    assert_eq!(json!(stream.next_tx().await.0), r["global_sequence"]);
    stop(node).await;
}

#[tokio::test]
async fn websocket_delivers_the_same_json_as_sse() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let mut socket = ws(&node, &admin, "address=/ws").await.expect("WebSocket");
    let mut stream = sse(&node, &admin, "address=/ws", None).await.expect("SSE");
    let mut receipts = Vec::new();
    for i in 0..5 {
        receipts.push(
            write_ok(
                &node,
                &admin,
                json!({ "address": "/ws/m", "key": "k", "body": i, "props": { "n": i.to_string() } }),
            )
            .await,
        );
    }
    for r in &receipts {
        let frame = ws_next(&mut socket, STREAM_WAIT).await.expect("a frame");
        let (id, data) = stream.next_tx().await;
        assert_eq!(frame, data, "WebSocket and SSE carry the same JSON");
        assert_eq!(frame["id"], r["id"]);
        assert_eq!(json!(id), r["global_sequence"]);
    }

    // `?after=` resumes a WebSocket like Last-Event-ID resumes SSE.
    let after = receipts[1]["global_sequence"].as_u64().expect("seq");
    let mut resumed = ws(&node, &admin, &format!("address=/ws&after={after}")).await.expect("WebSocket");
    for r in &receipts[2..] {
        let frame = ws_next(&mut resumed, STREAM_WAIT).await.expect("a replayed frame");
        assert_eq!(frame["id"], r["id"]);
    }
    assert!(ws_next(&mut resumed, Duration::from_millis(300)).await.is_none());
    stop(node).await;
}

/// A device holds at most `[api] max_streams_per_device` live streams; closing one frees
/// its slot, so a client that reconnects is not locked out.
#[tokio::test]
async fn live_streams_per_device_are_capped() {
    let node = TestNode::with_config(|c| c.api.max_streams_per_device = 2).await;
    let dev = node.device("watcher", &[("/w", true, false)]).await;
    let client = reqwest::Client::new();
    let open = || client.get(format!("{}/api/v1/stream?address=/w", node.base_url())).bearer_auth(&dev).send();
    let first = open().await.expect("first stream");
    let second = open().await.expect("second stream");
    assert!(first.status().is_success() && second.status().is_success());
    let third = open().await.expect("third request");
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = third.json().await.expect("json body");
    assert_eq!(body["error"]["code"], json!("too_many_streams"), "{body}");
    drop(first);
    let reopened =
        eventually(Duration::from_secs(5), || async { open().await.map(|r| r.status().is_success()).unwrap_or(false) })
            .await;
    assert!(reopened, "closing a stream must free its slot");
    drop(second);
    stop(node).await;
}
