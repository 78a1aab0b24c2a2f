//! Graceful shutdown: SIGTERM stops the node promptly and cleanly (exit 0, chain verifies)
//! even while clients hold live streams open, as a dashboard does when the operator
//! restarts the node.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kalima_e2e::{Node, assert_verifies};
use reqwest::StatusCode;
use serde_json::json;

/// Longest acceptable time from SIGTERM to exit.
const STOP_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test]
async fn sigterm_with_open_stream() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let mut node = Node::start(&dir, &[]).await;
    let resp = node
        .http()
        .get(node.url("/api/v1/stream?address=/plant-1"))
        .bearer_auth(node.token())
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("GET /api/v1/stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    node.put("/plant-1/line-1", "temp", json!(20.5)).await;
    let first = tokio::time::timeout(Duration::from_secs(5), body.next()).await.expect("no SSE event within 5 s");
    assert!(matches!(first, Some(Ok(_))), "stream ended early: {first:?}");

    let started = Instant::now();
    let term =
        std::process::Command::new("kill").args(["-TERM", &node.pid().to_string()]).status().expect("kill -TERM");
    assert!(term.success());
    // Keep reading, as a client would, until the node closes the stream or exits.
    let status = loop {
        if let Some(status) = node.try_wait() {
            break status;
        }
        assert!(
            started.elapsed() < STOP_WITHIN,
            "kalima did not exit within {STOP_WITHIN:?} of SIGTERM while an SSE client was \
             connected:\n{}",
            node.log()
        );
        match tokio::time::timeout(Duration::from_millis(50), body.next()).await {
            Ok(None) | Ok(Some(Err(_))) => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(Some(Ok(_))) | Err(_) => {}
        }
    };
    assert!(status.success(), "exit after SIGTERM: {status}\n{}", node.log());
    drop(body);
    drop(node);
    assert_verifies(&dir, &[]).await;
}
