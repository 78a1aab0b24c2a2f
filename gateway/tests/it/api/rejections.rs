//! Every refusal of the write path: its status, its `{"error":{"code","message"}}` body, its
//! `kalima_writes_rejected_total{reason,interface="rest"}` counter, and a chain that still
//! verifies afterwards. Also signed writes (Ed25519 over `TxContent::signing_bytes(chain)`).

use std::collections::BTreeMap;

use axum::http::{Method, StatusCode};
use ed25519_dalek::{Signer, SigningKey, Verifier};
use kalima_core::tx::TxContent;
use serde_json::{Value, json};

use super::common::*;
use crate::support::TestNode;

/// The request a signed write sends for `content` (body as `body_b64`, exact bytes).
fn signed_request(content: &TxContent, signature: Option<[u8; 64]>) -> Value {
    let mut req = json!({
        "address": content.address,
        "key": content.key,
        "body_b64": b64(&content.body),
        "props": content.props,
    });
    if content.ttl_secs > 0 {
        req["ttl"] = json!(content.ttl_secs);
    }
    if let Some(t) = content.client_time_ms {
        req["client_time_ms"] = json!(t);
    }
    if !content.idempotency_key.is_empty() {
        req["idempotency_key"] = json!(content.idempotency_key);
    }
    if let Some(sig) = signature {
        req["signature"] = json!(hex::encode(sig));
    }
    req
}

fn sample_content(device: &str, body: &[u8]) -> TxContent {
    TxContent {
        device_id: device.into(),
        address: "/s/line".into(),
        key: "temp".into(),
        body: body.to_vec(),
        props: BTreeMap::from([("unit".to_string(), "C".to_string())]),
        ttl_secs: 0,
        client_time_ms: Some(1_763_700_000_000),
        // Signed writes must carry one (replay protection).
        idempotency_key: format!("{device}-{}", hex::encode(body)),
        signature: None,
    }
}

/// The chain name of `TestNode` (signatures are bound to it).
const CHAIN: &str = "test";

fn sign(key: &SigningKey, content: &TxContent) -> [u8; 64] {
    key.sign(&content.signing_bytes(CHAIN)).to_bytes()
}

/// Who sends a request of the table.
#[derive(Clone)]
enum Who {
    Nobody,
    Token(String),
}

struct Request {
    who: Who,
    body: String,
}

struct Test {
    name: &'static str,
    request: Request,
    expected_status: StatusCode,
    expected_code: &'static str,
}

#[tokio::test]
async fn every_write_rejection_answers_its_status_code_and_counter() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let writer = node.device("writer", &[("/w", true, true)]).await;
    let reader = node.device("reader", &[("/w", true, false)]).await;
    let gone = node.device("gone", &[("/w", true, true)]).await;
    revoke(&node, "gone").await;
    let sk = SigningKey::from_bytes(&[7; 32]);
    let pk = sk.verifying_key().to_bytes();
    let signer = register(&node, "signer", Some(&pk), false, &[("/s", true, true)]).await;
    let strict = register(&node, "strict", Some(&pk), true, &[("/s", true, true)]).await;
    write_ok(&node, &writer, json!({ "address": "/w", "key": "k", "body": 1, "idempotency_key": "once" })).await;

    let tok = |t: &String| Who::Token(t.clone());
    let req = |who: Who, body: Value| Request { who, body: body.to_string() };
    let raw = |who: Who, body: &str| Request { who, body: body.to_string() };
    let put = |address: &str, key: &str| json!({ "address": address, "key": key, "body": 1 });
    // A signature over other content than the one sent.
    let signed_other = sign(&sk, &sample_content("signer", b"21.5"));
    let mut bad_sig = signed_request(&sample_content("signer", b"99.9"), Some(signed_other));
    bad_sig["idempotency_key"] = json!("sig-bad");
    // Signed as another device id: the node fills device_id with the authenticated one.
    let as_other = sign(&sk, &sample_content("strict", b"21.5"));

    let tests = vec![
        Test {
            name: "no Authorization header",
            request: req(Who::Nobody, put("/w", "k")),
            expected_status: StatusCode::UNAUTHORIZED,
            expected_code: "unknown_device",
        },
        Test {
            name: "unknown token",
            request: req(Who::Token("kal_0000".into()), put("/w", "k")),
            expected_status: StatusCode::UNAUTHORIZED,
            expected_code: "unknown_device",
        },
        Test {
            name: "revoked device",
            request: req(tok(&gone), put("/w", "k")),
            expected_status: StatusCode::UNAUTHORIZED,
            expected_code: "revoked_device",
        },
        Test {
            name: "no grant on the address",
            request: req(tok(&writer), put("/other", "k")),
            expected_status: StatusCode::FORBIDDEN,
            expected_code: "forbidden",
        },
        Test {
            name: "read-only grant",
            request: req(tok(&reader), put("/w", "k")),
            expected_status: StatusCode::FORBIDDEN,
            expected_code: "forbidden",
        },
        Test {
            name: "grant prefix is segment-bounded (/w does not cover /wx)",
            request: req(tok(&writer), put("/wx", "k")),
            expected_status: StatusCode::FORBIDDEN,
            expected_code: "forbidden",
        },
        Test {
            name: "body_b64 of 8193 bytes",
            request: req(tok(&writer), json!({ "address": "/w", "key": "k", "body_b64": b64(&[0; 8193]) })),
            expected_status: StatusCode::PAYLOAD_TOO_LARGE,
            expected_code: "too_large",
        },
        Test {
            name: "JSON body over 8 KB once serialized",
            request: req(tok(&writer), json!({ "address": "/w", "key": "k", "body": "x".repeat(9000) })),
            expected_status: StatusCode::PAYLOAD_TOO_LARGE,
            expected_code: "too_large",
        },
        Test {
            name: "not JSON",
            request: raw(tok(&writer), "{\"address\": \"/w\", \"key\": "),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "malformed",
        },
        Test {
            name: "missing key field",
            request: req(tok(&writer), json!({ "address": "/w", "body": 1 })),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "malformed",
        },
        Test {
            name: "unknown field",
            request: req(tok(&writer), json!({ "address": "/w", "key": "k", "body": 1, "colour": "red" })),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "malformed",
        },
        Test {
            name: "both body and body_b64",
            request: req(tok(&writer), json!({ "address": "/w", "key": "k", "body": 1, "body_b64": "AQ==" })),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "malformed",
        },
        Test {
            name: "address without leading slash",
            request: req(tok(&admin), put("w", "k")),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_address",
        },
        Test {
            name: "root address",
            request: req(tok(&admin), put("/", "k")),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_address",
        },
        Test {
            name: "empty address segment",
            request: req(tok(&admin), put("/a//b", "k")),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_address",
        },
        Test {
            name: "trailing slash",
            request: req(tok(&admin), put("/a/", "k")),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_address",
        },
        Test {
            name: "address character outside the key rule",
            request: req(tok(&admin), put("/a?b", "k")),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_address",
        },
        Test {
            name: "empty key",
            request: req(tok(&writer), put("/w", "")),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_key",
        },
        Test {
            name: "key with #",
            request: req(tok(&writer), put("/w", "a#b")),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_key",
        },
        Test {
            name: "key with a non-ASCII letter",
            request: req(tok(&writer), put("/w", "température")),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_key",
        },
        Test {
            name: "key with a tab",
            request: req(tok(&writer), put("/w", "a\tb")),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_key",
        },
        Test {
            name: "key over 128 bytes",
            request: req(tok(&writer), put("/w", &"k".repeat(129))),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_key",
        },
        Test {
            name: "body_b64 not base64",
            request: req(tok(&writer), json!({ "address": "/w", "key": "k", "body_b64": "***" })),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_field",
        },
        Test {
            name: "ttl over ten years",
            request: req(tok(&writer), json!({ "address": "/w", "key": "k", "body": 1, "ttl": 4_000_000_000_u32 })),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_field",
        },
        Test {
            name: "duplicate idempotency key",
            request: req(tok(&writer), json!({ "address": "/w", "key": "k2", "body": 2, "idempotency_key": "once" })),
            expected_status: StatusCode::CONFLICT,
            expected_code: "duplicate_idempotency_key",
        },
        Test {
            name: "signature over other content",
            request: req(tok(&signer), bad_sig),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "bad_signature",
        },
        Test {
            name: "signature made for another device id",
            request: req(tok(&signer), signed_request(&sample_content("signer", b"21.5"), Some(as_other))),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "bad_signature",
        },
        Test {
            name: "signature from a device with no key",
            request: req(tok(&writer), {
                let mut r = signed_request(&sample_content("writer", b"1"), Some(signed_other));
                r["address"] = json!("/w");
                r
            }),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "bad_signature",
        },
        Test {
            name: "signature that is not 128 hex digits",
            request: req(tok(&signer), {
                let mut r = signed_request(&sample_content("signer", b"1"), None);
                r["signature"] = json!("abcd");
                r
            }),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_field",
        },
        Test {
            name: "signature required but absent",
            request: req(tok(&strict), signed_request(&sample_content("strict", b"21.5"), None)),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "signature_required",
        },
        Test {
            name: "signed write without an idempotency key (replayable)",
            request: req(tok(&signer), {
                let content = TxContent { idempotency_key: String::new(), ..sample_content("signer", b"5") };
                signed_request(&content, Some(sign(&sk, &content)))
            }),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "invalid_field",
        },
        Test {
            name: "signature made for another chain",
            request: req(tok(&signer), {
                let content = sample_content("signer", b"6");
                let sig = sk.sign(&content.signing_bytes("another-chain")).to_bytes();
                signed_request(&content, Some(sig))
            }),
            expected_status: StatusCode::BAD_REQUEST,
            expected_code: "bad_signature",
        },
    ];

    let size = tree_size(&node).await;
    for t in tests {
        let before = node.metrics().await;
        let auth = match &t.request.who {
            Who::Nobody => None,
            Who::Token(tk) => Some(format!("Bearer {tk}")),
        };
        let (s, v) = node.call_raw(Method::POST, "/api/v1/tx", auth, Some(t.request.body)).await;
        assert_eq!(s, t.expected_status, "{}: status (body {v})", t.name);
        assert_eq!(v["error"]["code"], json!(t.expected_code), "{}: code in {v}", t.name);
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}: message in {v}", t.name);
        let after = node.metrics().await;
        assert_eq!(
            rejected(&after, t.expected_code) - rejected(&before, t.expected_code),
            1.0,
            "{}: kalima_writes_rejected_total{{reason=\"{}\",interface=\"rest\"}} +1",
            t.name,
            t.expected_code
        );
    }
    assert_eq!(tree_size(&node).await, size, "no rejected write reached the chain");
    assert!(values(&node, &admin, "/s/line").await.is_empty());
    assert_eq!(values(&node, &admin, "/w").await.len(), 1, "only the setup write");

    let report = kalima_core::verify::verify_chain(node.state.chain.store(), "test", |_| {})
        .await
        .expect("the chain verifies after every rejection");
    assert_eq!(report.transactions, size);
    stop(node).await;
}

#[tokio::test]
async fn a_validly_signed_write_is_accepted_and_verifiable_by_anyone() {
    let node = TestNode::new().await;
    let sk = SigningKey::from_bytes(&[9; 32]);
    let pk = sk.verifying_key().to_bytes();
    let strict = register(&node, "strict", Some(&pk), true, &[("/s", true, true)]).await;
    let mut content = sample_content("strict", b"{\"t\":21.5}");
    content.idempotency_key = "sig-1".into();
    content.ttl_secs = 3600;
    let sig = sign(&sk, &content);
    let r = write_ok(&node, &strict, signed_request(&content, Some(sig))).await;

    let t = tx_ok(&node, &strict, r["id"].as_str().expect("id")).await;
    assert_eq!(t["transaction"]["signature"], json!(hex::encode(sig)));
    assert_eq!(t["transaction"]["device_id"], json!("strict"));
    assert_eq!(t["transaction"]["body"], json!({ "t": 21.5 }));
    // A third party rebuilds the signed bytes from the served transaction alone.
    let d = decode_tx(&unb64(&t["tx_bytes"]));
    let rebuilt = TxContent {
        device_id: d.device_id,
        address: d.address,
        key: d.key,
        body: d.body,
        props: d.props,
        ttl_secs: d.ttl_secs,
        client_time_ms: t["transaction"]["client_time_ms"].as_i64(),
        idempotency_key: d.idempotency_key,
        signature: None,
    };
    assert_eq!(d.signature.as_deref(), Some(&sig[..]));
    sk.verifying_key()
        .verify(&rebuilt.signing_bytes(CHAIN), &ed25519_dalek::Signature::from_bytes(&sig))
        .expect("the stored signature verifies against the device key");

    // The same signed request again is refused by its idempotency key, not stored twice.
    let (s, v) = post_tx(&node, &strict, signed_request(&content, Some(sig))).await;
    assert_error(s, &v, StatusCode::CONFLICT, "duplicate_idempotency_key");
    stop(node).await;
}

#[tokio::test]
async fn idempotency_keys_are_per_device() {
    let node = TestNode::new().await;
    let a = node.device("dev-a", &[("/i", true, true)]).await;
    let b = node.device("dev-b", &[("/i", true, true)]).await;
    let req = json!({ "address": "/i", "key": "k", "body": 1, "idempotency_key": "job-42" });
    let first = write_ok(&node, &a, req.clone()).await;
    write_ok(&node, &b, req.clone()).await;
    let (s, v) = post_tx(&node, &a, req).await;
    assert_error(s, &v, StatusCode::CONFLICT, "duplicate_idempotency_key");
    assert!(
        v["error"]["message"].as_str().is_some_and(|m| m.contains(first["id"].as_str().expect("id"))),
        "the refusal names the transaction that used the key: {v}"
    );
    stop(node).await;
}

/// A refused batch whose duplicate idempotency keys only the sequencer sees must count once,
/// like every other refusal: `sum(kalima_writes_rejected_total)` is what dashboards chart.
#[tokio::test]
async fn a_duplicate_idempotency_key_inside_one_batch_is_counted_once() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let before = node.metrics().await;
    let (s, v) = node
        .call(
            Method::POST,
            "/api/v1/tx/batch",
            Some(&admin),
            Some(json!({ "transactions": [
                { "address": "/d", "key": "a", "body": 1, "idempotency_key": "same" },
                { "address": "/d", "key": "b", "body": 2, "idempotency_key": "same" },
            ] })),
        )
        .await;
    assert_error(s, &v, StatusCode::CONFLICT, "duplicate_idempotency_key");
    let after = node.metrics().await;
    assert_eq!(rejected(&after, "duplicate_idempotency_key") - rejected(&before, "duplicate_idempotency_key"), 1.0);
    assert_eq!(
        series_sum(&after, "kalima_writes_rejected_total") - series_sum(&before, "kalima_writes_rejected_total"),
        1.0,
        "one refusal, one count across all series:\n{}",
        after.lines().filter(|l| l.starts_with("kalima_writes_rejected_total")).collect::<Vec<_>>().join("\n")
    );
    stop(node).await;
}

/// A request body over `[api] max_request_bytes` is refused as too large (413), not as
/// malformed JSON.
#[tokio::test]
async fn a_request_over_the_request_size_limit_is_413_too_large() {
    let node = TestNode::with_config(|c| c.api.max_request_bytes = 16 * 1024).await;
    let admin = node.admin.clone();
    let items: Vec<_> =
        (0..40).map(|i| json!({ "address": "/big", "key": format!("k{i}"), "body": "x".repeat(1000) })).collect();
    let body = json!({ "transactions": items }).to_string();
    assert!(body.len() > 16 * 1024);
    let before = node.metrics().await;
    let (s, v) = node.call_raw(Method::POST, "/api/v1/tx/batch", Some(format!("Bearer {admin}")), Some(body)).await;
    assert_error(s, &v, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    let after = node.metrics().await;
    assert_eq!(rejected(&after, "too_large") - rejected(&before, "too_large"), 1.0);
    assert!(values(&node, &admin, "/big").await.is_empty());
    stop(node).await;
}
