//! Helpers shared by the API tests: request shortcuts, a Prometheus text reader, an RFC 6962
//! verifier written from the RFC (not the product's `merkle` module), and minimal SSE and
//! WebSocket clients over the node's real socket.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::TestNode;

/// How long a test waits for something that should happen "at once" over a socket.
pub const STREAM_WAIT: Duration = Duration::from_secs(10);

pub type Hash = [u8; 32];

// --- requests -------------------------------------------------------------------------------

/// Stops the node, failing if graceful shutdown hangs (an open SSE or WebSocket client must
/// not keep the node from stopping).
pub async fn stop(node: TestNode) {
    tokio::time::timeout(Duration::from_secs(15), node.stop())
        .await
        .expect("the node stops within 15 s, open streams included");
}

/// `GET uri` as `token`.
pub async fn get(node: &TestNode, token: &str, uri: &str) -> (StatusCode, Value) {
    node.call(Method::GET, uri, Some(token), None).await
}

/// `POST /api/v1/tx` with a full request object.
pub async fn post_tx(node: &TestNode, token: &str, req: Value) -> (StatusCode, Value) {
    node.call(Method::POST, "/api/v1/tx", Some(token), Some(req)).await
}

/// `POST /api/v1/tx` that must succeed; returns the receipt.
pub async fn write_ok(node: &TestNode, token: &str, req: Value) -> Value {
    let (s, v) = post_tx(node, token, req.clone()).await;
    assert_eq!(s, StatusCode::OK, "write {req} -> {v}");
    v
}

/// Puts `body` at `address`/`key` as `token`; returns the receipt.
pub async fn put_ok(node: &TestNode, token: &str, address: &str, key: &str, body: Value) -> Value {
    write_ok(node, token, json!({ "address": address, "key": key, "body": body })).await
}

/// `GET /api/v1/tx/{id}` that must succeed.
pub async fn tx_ok(node: &TestNode, token: &str, id: &str) -> Value {
    let (s, v) = get(node, token, &format!("/api/v1/tx/{id}")).await;
    assert_eq!(s, StatusCode::OK, "tx {id}: {v}");
    v
}

/// Current value of one key (`None` on 404 not_found).
pub async fn value(node: &TestNode, token: &str, address: &str, key: &str) -> Option<Value> {
    let (s, v) = get(node, token, &format!("/api/v1/values?address={address}&key={}", enc(key))).await;
    match s {
        StatusCode::OK => {
            let values = v["values"].as_array().expect("values array");
            assert_eq!(values.len(), 1, "one key asked, one value expected: {v}");
            Some(values[0].clone())
        }
        StatusCode::NOT_FOUND => {
            assert_error(s, &v, StatusCode::NOT_FOUND, "not_found");
            None
        }
        other => panic!("GET values {address} {key}: {other} {v}"),
    }
}

/// Every live value of an address, by key.
pub async fn values(node: &TestNode, token: &str, address: &str) -> BTreeMap<String, Value> {
    let (s, v) = get(node, token, &format!("/api/v1/values?address={address}")).await;
    assert_eq!(s, StatusCode::OK, "GET values {address}: {v}");
    v["values"]
        .as_array()
        .expect("values array")
        .iter()
        .map(|t| (t["key"].as_str().expect("key").to_string(), t.clone()))
        .collect()
}

/// Percent-encodes what a query value may not hold literally.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Asserts the API error shape `{"error":{"code","message"}}` with this status and code.
#[track_caller]
pub fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "status (body {body})");
    assert_eq!(body["error"]["code"], json!(code), "error code in {body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "error message must say what is wrong: {body}");
}

/// Committed transactions (the Merkle tree size) as the API reports them.
pub async fn tree_size(node: &TestNode) -> u64 {
    latest_block(node).await["tree_size"].as_u64().expect("tree_size")
}

/// The head block from `GET /api/v1/blocks?limit=1`.
pub async fn latest_block(node: &TestNode) -> Value {
    let (s, v) = get(node, &node.admin, "/api/v1/blocks?limit=1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["blocks"][0].clone()
}

/// Registers a device with an optional Ed25519 key and grants; returns its token.
pub async fn register(
    node: &TestNode,
    id: &str,
    public_key: Option<&[u8; 32]>,
    require_signature: bool,
    grants: &[(&str, bool, bool)],
) -> String {
    let mut req = json!({ "id": id, "require_signature": require_signature });
    if let Some(pk) = public_key {
        req["public_key"] = json!(hex::encode(pk));
    }
    let (s, v) = node.call(Method::POST, "/api/v1/devices", Some(&node.admin), Some(req)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    for (prefix, read, write) in grants {
        let (s, g) = node
            .call(
                Method::POST,
                &format!("/api/v1/devices/{id}/grants"),
                Some(&node.admin),
                Some(json!({ "prefix": prefix, "read": read, "write": write })),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{g}");
    }
    v["token"].as_str().expect("token").to_string()
}

/// Revokes a device as the admin.
pub async fn revoke(node: &TestNode, id: &str) -> Value {
    let (s, v) = node.call(Method::DELETE, &format!("/api/v1/devices/{id}"), Some(&node.admin), None).await;
    assert_eq!(s, StatusCode::OK, "revoke {id}: {v}");
    v
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

pub fn unb64(s: &Value) -> Vec<u8> {
    B64.decode(s.as_str().expect("base64 string")).expect("valid base64")
}

pub fn hash_of(hex_text: &Value) -> Hash {
    let mut h = [0u8; 32];
    hex::decode_to_slice(hex_text.as_str().expect("hex string"), &mut h).expect("32 bytes hex");
    h
}

/// Polls `check` every 50 ms until it is true or `within` passed.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- metrics --------------------------------------------------------------------------------

/// Value of the series `name{labels}` with exactly these labels (0 when absent).
pub fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<&str, &str> = labels.iter().copied().collect();
    all_series(text, name)
        .into_iter()
        .find(|(l, _)| l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<BTreeMap<_, _>>() == want)
        .map(|(_, v)| v)
        .unwrap_or(0.0)
}

/// Sum of every series of the metric `name`, whatever its labels.
pub fn series_sum(text: &str, name: &str) -> f64 {
    all_series(text, name).into_iter().map(|(_, v)| v).sum()
}

fn all_series(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let labels = labels
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                Some((k.to_string(), v.trim_matches('"').to_string()))
            })
            .collect();
        out.push((labels, value.parse().expect("metric value")));
    }
    out
}

/// `kalima_writes_rejected_total{reason, interface="rest"}`.
pub fn rejected(text: &str, reason: &str) -> f64 {
    series(text, "kalima_writes_rejected_total", &[("reason", reason), ("interface", "rest")])
}

// --- RFC 6962 / RFC 9162, written from the RFC ----------------------------------------------

pub fn sha256(parts: &[&[u8]]) -> Hash {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// MTH({d}) = SHA-256(0x00 || d).
pub fn leaf(data: &[u8]) -> Hash {
    sha256(&[&[0x00], data])
}

/// SHA-256(0x01 || left || right).
pub fn interior(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[0x01], left, right])
}

/// MTH(D[n]) over leaf hashes (RFC 6962 section 2.1), recursively.
pub fn mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => sha256(&[]),
        1 => leaves[0],
        n => {
            let mut k = 1;
            while k * 2 < n {
                k *= 2;
            }
            interior(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// RFC 9162 section 2.1.3.2.
pub fn verify_inclusion(index: u64, size: u64, leaf_hash: &Hash, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in path {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = interior(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = interior(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// RFC 9162 section 2.1.4.2.
pub fn verify_consistency(first: u64, second: u64, first_root: &Hash, second_root: &Hash, proof: &[Hash]) -> bool {
    if first == 0 || first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    let mut path = proof.to_vec();
    if first.is_power_of_two() {
        path.insert(0, *first_root);
    }
    let Some((head, rest)) = path.split_first() else {
        return false;
    };
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*head, *head);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = interior(c, &fr);
            sr = interior(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = interior(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *first_root && sr == *second_root && s == 0
}

/// Every leaf hash of the chain, in global-sequence order, from `GET /api/v1/blocks/{h}`.
pub async fn all_leaves(node: &TestNode) -> Vec<Hash> {
    let head = latest_block(node).await["height"].as_u64().expect("height");
    let mut leaves = Vec::new();
    for h in 0..=head {
        let (s, v) = get(node, &node.admin, &format!("/api/v1/blocks/{h}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            v["block"]["first_sequence"].as_u64(),
            Some(leaves.len() as u64),
            "block {h} starts where the previous one ended"
        );
        for id in v["transactions"].as_array().expect("ids") {
            leaves.push(hash_of(id));
        }
    }
    leaves
}

/// The parts of `tx_bytes` a third party reads with `openapi/ENCODING.md` alone.
#[derive(Debug)]
pub struct DecodedTx {
    pub global_sequence: u64,
    pub sequence: u64,
    pub previous: Hash,
    pub kind: u8,
    pub device_id: String,
    pub address: String,
    pub key: String,
    pub ttl_secs: u32,
    pub props: BTreeMap<String, String>,
    pub idempotency_key: String,
    pub body: Vec<u8>,
    pub signature: Option<Vec<u8>>,
}

/// Parses canonical transaction bytes as documented in `openapi/ENCODING.md`.
pub fn decode_tx(b: &[u8]) -> DecodedTx {
    struct R<'a>(&'a [u8]);
    impl R<'_> {
        fn take(&mut self, n: usize) -> Vec<u8> {
            assert!(self.0.len() >= n, "tx_bytes truncated");
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            a.to_vec()
        }
        fn u8(&mut self) -> u8 {
            self.take(1)[0]
        }
        fn u16(&mut self) -> u16 {
            u16::from_be_bytes(self.take(2).try_into().expect("2"))
        }
        fn u32(&mut self) -> u32 {
            u32::from_be_bytes(self.take(4).try_into().expect("4"))
        }
        fn u64(&mut self) -> u64 {
            u64::from_be_bytes(self.take(8).try_into().expect("8"))
        }
        fn str16(&mut self) -> String {
            let n = self.u16() as usize;
            String::from_utf8(self.take(n)).expect("utf-8")
        }
    }
    let mut r = R(b);
    assert_eq!(r.u8(), 1, "version");
    let global_sequence = r.u64();
    let sequence = r.u64();
    let _timestamp = r.u64();
    let previous: Hash = r.take(32).try_into().expect("32");
    let kind = r.u8();
    let device_id = r.str16();
    let address = r.str16();
    let key = r.str16();
    let ttl_secs = r.u32();
    if r.u8() == 1 {
        r.u64();
    }
    let n = r.u16();
    let props = (0..n).map(|_| (r.str16(), r.str16())).collect();
    let idempotency_key = r.str16();
    let len = r.u32() as usize;
    let body = r.take(len);
    let signature = (r.u8() == 1).then(|| r.take(64));
    assert!(r.0.is_empty(), "trailing bytes in tx_bytes");
    DecodedTx {
        global_sequence,
        sequence,
        previous,
        kind,
        device_id,
        address,
        key,
        ttl_secs,
        props,
        idempotency_key,
        body,
        signature,
    }
}

// --- SSE ------------------------------------------------------------------------------------

/// One server-sent event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A minimal SSE client over reqwest.
#[derive(Debug)]
pub struct Sse {
    resp: reqwest::Response,
    buf: String,
}

/// Opens `GET /api/v1/stream?{query}`; returns the status and, on 200, the stream, else the
/// JSON error body.
pub async fn sse(
    node: &TestNode,
    token: &str,
    query: &str,
    last_event_id: Option<u64>,
) -> Result<Sse, (StatusCode, Value)> {
    let mut req = reqwest::Client::new().get(format!("{}/api/v1/stream?{query}", node.base_url())).bearer_auth(token);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id.to_string());
    }
    let resp = req.send().await.expect("SSE request");
    let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
    if status != StatusCode::OK {
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        return Err((status, body));
    }
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
    Ok(Sse { resp, buf: String::new() })
}

impl Sse {
    /// The next event (comments skipped), or `None` when `within` passed or the stream ended.
    pub async fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let mut ev = SseEvent::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if line.starts_with(':') || line.is_empty() {
                        continue;
                    }
                    let (field, val) = line.split_once(':').unwrap_or((line, ""));
                    let val = val.strip_prefix(' ').unwrap_or(val);
                    match field {
                        "event" => ev.event = val.to_string(),
                        "id" => ev.id = Some(val.to_string()),
                        "data" => data.push(val.to_string()),
                        _ => {}
                    }
                }
                if ev.event.is_empty() && data.is_empty() {
                    continue; // keep-alive comment
                }
                ev.data = data.join("\n");
                return Some(ev);
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk()).await;
            match chunk {
                Ok(Ok(Some(bytes))) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    /// The next `tx` event as (id, transaction JSON); panics on anything else.
    pub async fn next_tx(&mut self) -> (u64, Value) {
        let ev = self.next(STREAM_WAIT).await.expect("an SSE event in time");
        assert_eq!(ev.event, "tx", "{ev:?}");
        let id = ev.id.as_deref().expect("id: line").parse().expect("numeric id");
        let data: Value = serde_json::from_str(&ev.data).expect("data is JSON");
        (id, data)
    }
}

// --- WebSocket ------------------------------------------------------------------------------

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects `GET /api/v1/ws?{query}` with a bearer token; on refusal returns the HTTP status
/// and JSON body.
pub async fn ws(node: &TestNode, token: &str, query: &str) -> Result<Ws, (StatusCode, Value)> {
    let url = format!("{}/api/v1/ws?{query}", node.base_url().replacen("http://", "ws://", 1));
    let mut req = url.into_client_request().expect("ws request");
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    match tokio_tungstenite::connect_async(req).await {
        Ok((stream, _)) => Ok(stream),
        Err(tungstenite::Error::Http(resp)) => {
            let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
            let body = resp.body().as_deref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
            Err((status, body))
        }
        Err(e) => panic!("WebSocket connect: {e}"),
    }
}

/// The next text frame as JSON, or `None` on timeout or close.
pub async fn ws_next(ws: &mut Ws, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        match msg.ok()? {
            tungstenite::Message::Text(t) => {
                return Some(serde_json::from_str(t.as_str()).expect("JSON frame"));
            }
            tungstenite::Message::Close(_) => return None,
            _ => {}
        }
    }
}
