//! Paging: blocks newest-first down to genesis, and the history of one key newest-first, each
//! followed with `next_before` until exhausted.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::common::*;
use crate::support::TestNode;

#[tokio::test]
async fn block_pages_link_from_the_head_down_to_genesis() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    for i in 0..12 {
        put_ok(&node, &admin, "/blk", "k", json!(i)).await;
    }
    let head = latest_block(&node).await;
    let top = head["height"].as_u64().expect("height");
    assert!(top >= 12, "one block per committed write at least: {head}");

    let mut blocks: Vec<Value> = Vec::new();
    let mut uri = "/api/v1/blocks?limit=5".to_string();
    let mut pages = 0;
    loop {
        let (s, page) = get(&node, &admin, &uri).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let got = page["blocks"].as_array().expect("blocks").clone();
        assert!(got.len() <= 5);
        pages += 1;
        assert!(pages <= top / 5 + 2, "paging does not end");
        blocks.extend(got.iter().cloned());
        match page["next_before"].as_u64() {
            Some(nb) => {
                assert_eq!(
                    json!(nb + 1),
                    got.last().expect("a full page")["height"],
                    "next_before is just below the page"
                );
                uri = format!("/api/v1/blocks?limit=5&before={nb}");
            }
            None => break,
        }
    }
    let heights: Vec<u64> = blocks.iter().map(|b| b["height"].as_u64().expect("h")).collect();
    assert_eq!(heights, (0..=top).rev().collect::<Vec<_>>(), "every block once, newest first");
    for pair in blocks.windows(2) {
        assert_eq!(pair[0]["prev_hash"], pair[1]["hash"], "block {} links to {}", pair[0]["height"], pair[1]["height"]);
        let (upper, lower) = (&pair[0], &pair[1]);
        assert_eq!(
            upper["first_sequence"], lower["tree_size"],
            "block {} starts where {} ended",
            upper["height"], lower["height"]
        );
    }
    let genesis = blocks.last().expect("genesis");
    assert_eq!(genesis["prev_hash"], json!("0".repeat(64)));
    assert_eq!(genesis["first_sequence"], json!(0));
    for b in &blocks {
        // Block hash = SHA-256(header_bytes), checked without our code.
        let header = hex::decode(b["header_bytes"].as_str().expect("hex")).expect("hex");
        assert_eq!(json!(hex::encode(sha256(&[&header]))), b["hash"], "block {}", b["height"]);
        assert_eq!(
            b["tree_size"].as_u64().expect("size") - b["tx_count"].as_u64().expect("count"),
            b["first_sequence"].as_u64().expect("first")
        );
    }

    // `before` is inclusive; the page holding genesis is the last.
    let (_, p) = get(&node, &admin, "/api/v1/blocks?limit=2&before=3").await;
    let hs: Vec<_> = p["blocks"].as_array().expect("blocks").iter().map(|b| b["height"].clone()).collect();
    assert_eq!(hs, [json!(3), json!(2)]);
    assert_eq!(p["next_before"], json!(1));
    let (_, p) = get(&node, &admin, "/api/v1/blocks?limit=5&before=0").await;
    assert_eq!(p["blocks"].as_array().map(Vec::len), Some(1));
    assert_eq!(p["next_before"], Value::Null);
    for bad in ["limit=0", "limit=1001", "limit=x"] {
        let (s, v) = get(&node, &admin, &format!("/api/v1/blocks?{bad}")).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_query");
    }
    let (s, v) = get(&node, &admin, &format!("/api/v1/blocks/{}", top + 1)).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found");
    stop(node).await;
}

#[tokio::test]
async fn history_pages_newest_first_cover_every_write_once() {
    let node = TestNode::new().await;
    let admin = node.admin.clone();
    let mut written = Vec::new();
    for i in 0..23 {
        let r = put_ok(&node, &admin, "/hist", "k", json!(i)).await;
        written.push(r["id"].as_str().expect("id").to_string());
        // Other keys and addresses interleave and must not show up.
        put_ok(&node, &admin, "/hist", "other", json!(i)).await;
        put_ok(&node, &admin, "/hist/sub", "k", json!(i)).await;
    }
    // One delete is history too.
    let r = write_ok(&node, &admin, json!({ "address": "/hist", "key": "k" })).await;
    written.push(r["id"].as_str().expect("id").to_string());

    let mut seen: Vec<Value> = Vec::new();
    let mut uri = "/api/v1/history?address=/hist&key=k&limit=10".to_string();
    for _ in 0..10 {
        let (s, page) = get(&node, &admin, &uri).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 10);
        seen.extend(items.iter().cloned());
        match page["next_before"].as_u64() {
            Some(nb) => {
                assert_eq!(json!(nb), items.last().expect("a full page")["global_sequence"]);
                uri = format!("/api/v1/history?address=/hist&key=k&limit=10&before={nb}");
            }
            None => break,
        }
    }
    let ids: Vec<String> = seen.iter().map(|t| t["id"].as_str().expect("id").to_string()).collect();
    let mut newest_first = written.clone();
    newest_first.reverse();
    assert_eq!(ids, newest_first, "every write of the key once, newest first");
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "no duplicates");
    for t in &seen {
        assert_eq!((&t["address"], &t["key"]), (&json!("/hist"), &json!("k")));
    }
    // Each entry links to the next older one; the oldest to nothing.
    for pair in seen.windows(2) {
        assert_eq!(pair[0]["previous"], pair[1]["id"]);
    }
    assert_eq!(seen.last().expect("oldest")["previous"], json!("0".repeat(64)));
    assert_eq!(seen[0]["kind"], json!("delete"));

    for bad in ["limit=0", "limit=1001"] {
        let (s, v) = get(&node, &admin, &format!("/api/v1/history?address=/hist&key=k&{bad}")).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_query");
    }
    let (s, v) = get(&node, &admin, "/api/v1/history?address=/hist").await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_query");
    let (s, v) = get(&node, &admin, "/api/v1/history?address=/hist&key=a%23b").await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_key");
    let (s, v) = get(&node, &admin, "/api/v1/history?address=/never&key=k").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["items"], json!([]));
    assert_eq!(v["next_before"], Value::Null);
    stop(node).await;
}
