//! `kalima up --demo` on an empty directory: the node initialises itself, simulated sensors
//! write at once, and the values and the SSE stream show them.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kalima_e2e::Node;
use reqwest::StatusCode;
use serde_json::Value;

/// How long the demo may take to show data.
const WITHIN: Duration = Duration::from_secs(10);
const KEYS: [&str; 3] = ["pressure", "temp", "vibration"];

#[tokio::test]
async fn demo_mode() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // Never initialised: `up` must do it.
    let dir = tmp.path().join("fresh");
    let node = Node::start_with(&dir, &["--demo"], &[]).await;
    assert!(dir.join("admin.token").is_file(), "up did not initialise {}", dir.display());

    let started = Instant::now();
    let values = loop {
        let (status, v) = node.get_json("/api/v1/values?address=/demo/plant-1/line-1").await;
        let keys: Vec<&str> =
            v["values"].as_array().map(|a| a.iter().filter_map(|x| x["key"].as_str()).collect()).unwrap_or_default();
        if status == StatusCode::OK && KEYS.iter().all(|k| keys.contains(k)) {
            break v;
        }
        assert!(
            started.elapsed() < WITHIN,
            "no temp/pressure/vibration at /demo/plant-1/line-1 within {WITHIN:?}: {status} {v}\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for v in values["values"].as_array().into_iter().flatten() {
        assert!(
            v["body"]["value"].is_number() && v["body"]["unit"].is_string(),
            "demo reading without a numeric value and a unit: {v}"
        );
        assert_eq!(v["address"], "/demo/plant-1/line-1");
    }

    let resp = node
        .http()
        .get(node.url("/api/v1/stream?address=/demo"))
        .bearer_auth(node.token())
        .send()
        .await
        .expect("GET /api/v1/stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(ctype.starts_with("text/event-stream"), "content-type {ctype}");

    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut events: Vec<(String, Value)> = Vec::new();
    let deadline = tokio::time::Instant::now() + WITHIN;
    while events.len() < 6 {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("only {} SSE events within {WITHIN:?}: {events:?}", events.len()))
            .expect("the SSE stream ended")
            .expect("reading the SSE stream");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut event, mut id, mut data) = (None, None, String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            // Keep-alive comments carry no event.
            if let Some(event) = event {
                assert_eq!(event, "tx", "unexpected SSE event: {block}");
                let tx: Value =
                    serde_json::from_str(&data).unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {data}"));
                assert_eq!(
                    id.as_deref(),
                    Some(tx["global_sequence"].to_string().as_str()),
                    "SSE id is not the global sequence: {block}"
                );
                events.push((id.unwrap_or_default(), tx));
            }
        }
    }
    for (_, tx) in &events {
        let address = tx["address"].as_str().unwrap_or_default();
        assert!(address.starts_with("/demo/"), "event outside /demo: {tx}");
        assert!(KEYS.contains(&tx["key"].as_str().unwrap_or_default()), "{tx}");
    }
    // Closed first: stopping with a stream open is the shutdown test's subject.
    drop(body);
    node.stop().await;
}
