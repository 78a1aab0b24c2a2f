//! Operations and documentation endpoints: health, readiness, Prometheus metrics, Swagger UI,
//! the OpenAPI document, and JSON errors for routes that do not exist.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use super::common::*;
use crate::support::TestNode;

#[tokio::test]
async fn health_and_readiness_answer_200() {
    let node = TestNode::new().await;
    for path in ["/healthz", "/readyz"] {
        let (s, v) = node.call(Method::GET, path, None, None).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
    }
    // Over the real socket too, as a load balancer probes it.
    let resp = reqwest::get(format!("{}/readyz", node.base_url())).await.expect("GET /readyz");
    assert_eq!(resp.status().as_u16(), 200);
    stop(node).await;
}

#[tokio::test]
async fn metrics_expose_writes_commit_latency_and_height() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let before = node.metrics().await;
    let accepted = |t: &str| series(t, "kalima_writes_accepted_total", &[("interface", "rest")]);
    put_ok(&node, &admin, "/m", "k", json!(1)).await;
    let items: Vec<_> = (0..4).map(|i| json!({ "address": "/m", "key": format!("b{i}"), "body": i })).collect();
    let (s, v) =
        node.call(Method::POST, "/api/v1/tx/batch", Some(&admin), Some(json!({ "transactions": items }))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let text = node.metrics().await;

    assert_eq!(accepted(&text) - accepted(&before), 5.0, "one per accepted transaction");
    assert!(text.contains("# TYPE kalima_writes_accepted_total counter"), "{text}");
    assert!(text.contains("# TYPE kalima_commit_seconds histogram"), "{text}");
    let count = |t: &str| series(t, "kalima_commit_seconds_count", &[]);
    assert!(count(&text) >= count(&before) + 2.0, "one observation per committed request");
    assert!(series(&text, "kalima_commit_seconds_bucket", &[("le", "+Inf")]) >= 2.0, "{text}");
    let height = latest_block(&node).await["height"].as_f64().expect("height");
    assert!(text.contains("# TYPE kalima_block_height gauge"), "{text}");
    assert_eq!(series(&text, "kalima_block_height", &[]), height, "gauge follows the head");
    stop(node).await;
}

#[tokio::test]
async fn swagger_ui_and_the_openapi_document_are_served() {
    let node = TestNode::new().await;
    // As a browser opens it (redirects followed).
    let resp = reqwest::get(format!("{}/docs", node.base_url())).await.expect("GET /docs");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(ct.starts_with("text/html"), "content-type {ct}");
    let html = resp.text().await.expect("body");
    assert!(html.contains("swagger-ui"), "Swagger UI page: {html}");

    let resp = reqwest::get(format!("{}/api/v1/openapi.json", node.base_url())).await.expect("GET openapi.json");
    assert_eq!(resp.status().as_u16(), 200);
    let doc: Value = resp.json().await.expect("JSON document");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{}", doc["openapi"]);
    for path in [
        "/api/v1/tx",
        "/api/v1/tx/batch",
        "/api/v1/tx/{id}",
        "/api/v1/values",
        "/api/v1/stream",
        "/api/v1/proofs/consistency",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    assert!(doc["paths"]["/api/v1/tx"]["post"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    stop(node).await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_errors() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    for uri in ["/api/v1/nope", "/api/v1/tx/abc/def", "/api/v1/blocks/1/x"] {
        let (s, v) = get(&node, &admin, uri).await;
        assert_error(s, &v, StatusCode::NOT_FOUND, "not_found");
    }
    // A known path with the wrong method: 405 with the same error body.
    let (s, v) = node.call(Method::PUT, "/api/v1/tx", Some(&admin), Some(json!({}))).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    assert!(v["error"]["code"].is_string(), "405 has the API error body: {v:?}");
    stop(node).await;
}

/// Every metric the shipped dashboard and alert rules query exists on a running node after
/// ordinary traffic, so operators never stare at "no data" because of a renamed series.
#[tokio::test]
async fn dashboards_and_alerts_only_use_exported_metrics() {
    let node = TestNode::new().await;
    let (s, _) = node.put(&node.admin, "/dash/a", "temp", json!(1)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = node.put("no-such-token", "/dash/a", "temp", json!(1)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let exported = node.metrics().await;

    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards");
    let mut referenced = std::collections::BTreeSet::new();
    for file in ["kalima-node.json", "prometheus-alerts.yml"] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).expect("dashboard file");
        for (i, _) in text.match_indices("kalima_") {
            let name: String = text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            // Histogram queries name their series with the exporter's suffixes.
            let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            if base != "kalima_" && base != "kalima_node" {
                referenced.insert(base.to_string());
            }
        }
    }
    assert!(referenced.len() >= 8, "too few metrics found in the dashboards: {referenced:?}");
    let missing: Vec<_> = referenced.iter().filter(|m| !exported.lines().any(|l| l.starts_with(m.as_str()))).collect();
    assert!(missing.is_empty(), "dashboards query metrics the node does not export: {missing:?}\n{exported}");
    stop(node).await;
}

/// A plain GET on the WebSocket route gets the API error body, not the framework's text.
#[tokio::test]
async fn websocket_route_without_upgrade_answers_json() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let (s, v) = get(&node, &admin, "/api/v1/ws?address=/").await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "not_websocket");
    stop(node).await;
}
