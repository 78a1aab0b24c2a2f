//! Invariant 1 (an acknowledged write is durable) and 2 (the chain verifies) under SIGKILL:
//! concurrent writers post single writes and batches, the node is killed mid-load several
//! times, `kalima verify` runs while it is down, and at the end every acknowledged write is
//! found once, with the body it was written with and an inclusion proof that checks out.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use kalima_e2e::{Node, assert_verifies};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Kill/restart cycles.
const ROUNDS: usize = 4;
/// Concurrent writer tasks per round.
const WRITERS: usize = 4;
/// Load before each SIGKILL.
const LOAD: Duration = Duration::from_millis(1500);
/// Pause of a writer between requests: keeps the number of writes to check afterwards (one
/// GET with a proof each, ~10 ms in a debug build) within the time budget, while four
/// writers still keep commits in flight all the time.
const PAUSE: Duration = Duration::from_millis(10);

/// A write the node answered 2xx.
#[derive(Debug, Clone)]
struct Acked {
    id: String,
    global_sequence: u64,
    address: String,
    key: String,
    body: Value,
    idempotency_key: String,
}

/// Posts writes until stopped or the node is gone; returns what was acknowledged. Every
/// third request is a batch of 2 to 4 writes. Any non-2xx answer fails the test.
async fn writer(
    http: reqwest::Client,
    base: String,
    token: String,
    round: usize,
    w: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Acked> {
    let mut acked = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let batch = i % 3 == 2;
        let n = if batch { 2 + (i / 3) % 3 } else { 1 };
        let items: Vec<Value> = (0..n)
            .map(|j| {
                json!({
                    "address": format!("/e2e/writer-{w}"),
                    "key": format!("k{}", (i + j) % 5),
                    "body": { "round": round, "writer": w, "i": i, "j": j },
                    "idempotency_key": format!("r{round}-w{w}-{i}-{j}"),
                })
            })
            .collect();
        let (path, payload) = if batch {
            ("/api/v1/tx/batch", json!({ "transactions": items }))
        } else {
            ("/api/v1/tx", items[0].clone())
        };
        // A transport error or a cut-off answer means the node died: not acknowledged.
        let Ok(resp) = http.post(format!("{base}{path}")).bearer_auth(&token).json(&payload).send().await else {
            break;
        };
        let status = resp.status();
        let Ok(body) = resp.json::<Value>().await else {
            break;
        };
        assert!(status.is_success(), "POST {path} answered {status}: {body}");
        let receipts =
            if batch { body["receipts"].as_array().cloned().unwrap_or_default() } else { vec![body.clone()] };
        assert_eq!(receipts.len(), items.len(), "receipts of {path}: {body}");
        for (r, item) in receipts.iter().zip(&items) {
            acked.push(Acked {
                id: r["id"].as_str().expect("receipt id").to_string(),
                global_sequence: r["global_sequence"].as_u64().expect("receipt sequence"),
                address: item["address"].as_str().unwrap_or_default().to_string(),
                key: item["key"].as_str().unwrap_or_default().to_string(),
                body: item["body"].clone(),
                idempotency_key: item["idempotency_key"].as_str().unwrap_or_default().to_string(),
            });
        }
        i += 1;
        tokio::time::sleep(PAUSE).await;
    }
    acked
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn hex32(v: &Value) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(v.as_str().unwrap_or_default(), &mut out).unwrap_or_else(|_| panic!("not 32 hex bytes: {v}"));
    out
}

/// RFC 9162 section 2.1.3.2: checks an inclusion proof with nothing but SHA-256.
fn inclusion_holds(proof: &Value, leaf: [u8; 32]) -> bool {
    let (Some(index), Some(size), Some(path)) =
        (proof["leaf_index"].as_u64(), proof["tree_size"].as_u64(), proof["audit_path"].as_array())
    else {
        return false;
    };
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = leaf;
    for p in path {
        let p = hex32(p);
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = sha256(&[&[1], &p, &r]);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = sha256(&[&[1], &r, &p]);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == hex32(&proof["root"])
}

/// Checks one acknowledged write against `GET /api/v1/tx/{id}`; returns a problem, if any.
async fn check(node: &Node, a: &Acked) -> Result<u64, String> {
    let (status, v) = node.get_json(&format!("/api/v1/tx/{}", a.id)).await;
    if status != StatusCode::OK {
        return Err(format!("{}: GET answered {status}: {v}", a.idempotency_key));
    }
    let t = &v["transaction"];
    let seq = t["global_sequence"].as_u64().unwrap_or(u64::MAX);
    let same = t["id"] == a.id
        && seq == a.global_sequence
        && t["address"] == a.address
        && t["key"] == a.key
        && t["body"] == a.body
        && t["idempotency_key"] == a.idempotency_key;
    if !same {
        return Err(format!("{}: stored {t} differs from {a:?}", a.idempotency_key));
    }
    let bytes = B64
        .decode(v["tx_bytes"].as_str().unwrap_or_default())
        .map_err(|e| format!("{}: tx_bytes: {e}", a.idempotency_key))?;
    let leaf = sha256(&[&[0], &bytes]);
    if hex::encode(leaf) != a.id || v["proof"]["leaf_hash"] != a.id {
        return Err(format!("{}: SHA-256(0x00 || tx_bytes) is not the id", a.idempotency_key));
    }
    if v["proof"]["leaf_index"].as_u64() != Some(a.global_sequence) || !inclusion_holds(&v["proof"], leaf) {
        return Err(format!("{}: inclusion proof does not check out: {}", a.idempotency_key, v["proof"]));
    }
    Ok(seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durability_under_kill9() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let mut acked: Vec<Acked> = Vec::new();
    for round in 0..ROUNDS {
        let node = Node::start(&dir, &[]).await;
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                tokio::spawn(writer(
                    node.http().clone(),
                    node.url(""),
                    node.token().to_string(),
                    round,
                    w,
                    stop.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(LOAD).await;
        // Killed while the writers still have requests in flight.
        node.kill9();
        stop.store(true, Ordering::Relaxed);
        let before = acked.len();
        for t in tasks {
            acked.extend(t.await.expect("writer task"));
        }
        assert!(acked.len() > before, "round {round}: no write was acknowledged in {LOAD:?}");
        eprintln!("round {round}: {} writes acknowledged before SIGKILL", acked.len() - before);
        assert_verifies(&dir, &[]).await;
    }

    let node = Node::start(&dir, &[]).await;
    let results: Vec<Result<u64, String>> =
        futures::stream::iter(&acked).map(|a| check(&node, a)).buffer_unordered(4).collect().await;
    let problems: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        problems.is_empty(),
        "{} of {} acknowledged writes are not as acknowledged after {ROUNDS} SIGKILLs; first ones:\n{}",
        problems.len(),
        acked.len(),
        problems.iter().take(10).map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
    let sequences: HashSet<u64> = results.iter().filter_map(|r| r.clone().ok()).collect();
    assert_eq!(sequences.len(), acked.len(), "two acknowledged writes share a global sequence");
    let ids: HashSet<&str> = acked.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids.len(), acked.len(), "two acknowledged writes share an id");
    node.stop().await;
    assert_verifies(&dir, &[]).await;
    eprintln!("{} acknowledged writes durable through {ROUNDS} SIGKILLs in {:?}", acked.len(), started.elapsed());
}
