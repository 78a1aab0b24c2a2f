//! A node for tests: a fresh data directory, a real chain on SQLite, the HTTP app, and
//! request helpers that return status and JSON.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use kalima_gateway::api::{AppState, app};
use kalima_gateway::config::Config;
use kalima_gateway::node;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A running in-process node.
#[allow(dead_code)]
pub struct TestNode {
    pub app: Router,
    pub state: AppState,
    pub admin: String,
    pub running: Option<node::Running>,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    /// A fresh node with default config (API on an ephemeral port, checkpoints off).
    pub async fn new() -> Self {
        Self::with_config(|_| {}).await
    }

    /// A fresh node whose config `tweak` may change before start.
    pub async fn with_config(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        node::init(dir.path(), "test").expect("init");
        let mut cfg = Config::load(dir.path()).expect("config");
        cfg.api.listen = "127.0.0.1:0".into();
        cfg.mqtt.listen = "127.0.0.1:0".into();
        cfg.chain.checkpoint_interval_secs = 0;
        tweak(&mut cfg);
        let running = node::start(dir.path(), cfg.clone()).await.expect("start");
        let state = AppState::new(running.chain.clone(), Arc::new(cfg));
        let admin = node::read_admin_token(dir.path()).expect("admin token");
        TestNode { app: app(state.clone()), state, admin, running: Some(running), dir }
    }

    /// Base URL of the node's real socket (for SSE/WebSocket clients).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.running.as_ref().expect("running").api_addr)
    }

    /// Sends a request; `token` goes in `Authorization: Bearer`.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_raw(method, uri, token.map(|t| format!("Bearer {t}")), body.map(|b| b.to_string())).await
    }

    /// Sends a request with a raw `Authorization` header value and raw body.
    pub async fn call_raw(
        &self,
        method: Method,
        uri: &str,
        authorization: Option<String>,
        body: Option<String>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b)),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = self.app.clone().oneshot(req).await.expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, v)
    }

    /// Registers a device with grants `(prefix, read, write)` and returns its token.
    pub async fn device(&self, id: &str, grants: &[(&str, bool, bool)]) -> String {
        let (s, v) = self.call(Method::POST, "/api/v1/devices", Some(&self.admin), Some(json!({ "id": id }))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        for (prefix, read, write) in grants {
            let (s, v) = self
                .call(
                    Method::POST,
                    &format!("/api/v1/devices/{id}/grants"),
                    Some(&self.admin),
                    Some(json!({ "prefix": prefix, "read": read, "write": write })),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
        v["token"].as_str().expect("token").to_string()
    }

    /// Writes one JSON value as `token` and returns the receipt.
    pub async fn put(&self, token: &str, address: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            "/api/v1/tx",
            Some(token),
            Some(json!({ "address": address, "key": key, "body": body })),
        )
        .await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (_, v) = self.call(Method::GET, "/metrics", None, None).await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Stops the node cleanly.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("stop");
        }
    }
}
