//! Invariant 2 on disk: `kalima verify` names the height of one flipped byte in a block or
//! block body row (edited behind the node's back with the `sqlite3` CLI), and the storage
//! triggers refuse every UPDATE and DELETE of chain rows.

use std::path::Path;

use kalima_e2e::{Node, assert_verifies, copy_dir, describe, sqlite3, sqlite3_query, stderr, stdout, verify};
use reqwest::StatusCode;
use serde_json::json;

/// Heights of a small chain written by [`small_chain`].
struct Chain {
    /// A block in the middle (neither genesis nor the tip) holding several transactions.
    middle: u64,
    /// The last block.
    last: u64,
    /// The height recorded in the checkpoint taken by the test.
    checkpoint: u64,
    /// Its tree size (the row's key).
    checkpoint_tree_size: u64,
}

/// Writes single values and a batch, takes a checkpoint, writes more, and stops the node.
async fn small_chain(dir: &Path) -> Chain {
    Node::init(dir).await;
    let node = Node::start(dir, &[]).await;
    for i in 0..3 {
        node.put("/plant-1/line-1", "temp", json!(20 + i)).await;
    }
    let batch: Vec<_> = (0..5)
        .map(|i| json!({ "address": format!("/plant-1/line-{i}"), "key": "pressure", "body": { "bar": i } }))
        .collect();
    let (status, receipts) = node.post_json("/api/v1/tx/batch", &json!({ "transactions": batch })).await;
    assert_eq!(status, StatusCode::OK, "{receipts}");
    let middle = receipts["receipts"][0]["height"].as_u64().expect("batch height");
    let (status, cp) = node.post_json("/api/v1/checkpoints", &json!({})).await;
    assert!(status.is_success(), "POST /api/v1/checkpoints: {status} {cp}");
    let checkpoint = cp["height"].as_u64().unwrap_or_else(|| panic!("checkpoint without height: {cp}"));
    let checkpoint_tree_size = cp["tree_size"].as_u64().unwrap_or_else(|| panic!("checkpoint without tree_size: {cp}"));
    let mut last = 0;
    for i in 0..3 {
        last = node.put("/plant-1/line-2", "temp", json!(30 + i)).await["height"].as_u64().expect("height");
    }
    node.stop().await;
    assert!(0 < middle && middle < last, "middle {middle}, last {last}");
    assert_verifies(dir, &[]).await;
    Chain { middle, last, checkpoint, checkpoint_tree_size }
}

/// Which byte of a stored column to flip.
#[derive(Clone, Copy, Debug)]
enum Byte {
    First,
    Middle,
    Last,
}

/// Which block's row.
#[derive(Clone, Copy, Debug)]
enum At {
    Genesis,
    Middle,
    Last,
    Checkpoint,
}

struct Tamper {
    name: &'static str,
    table: &'static str,
    column: &'static str,
    at: At,
    byte: Byte,
}

const TAMPERS: &[Tamper] = &[
    Tamper { name: "block header byte", table: "blocks", column: "header", at: At::Middle, byte: Byte::Middle },
    Tamper { name: "genesis block header byte", table: "blocks", column: "header", at: At::Genesis, byte: Byte::Last },
    Tamper { name: "block hash", table: "blocks", column: "hash", at: At::Middle, byte: Byte::First },
    Tamper {
        name: "block body byte (ciphertext)",
        table: "block_txs",
        column: "sealed",
        at: At::Middle,
        byte: Byte::Middle,
    },
    Tamper {
        name: "block body byte (nonce) in the last block",
        table: "block_txs",
        column: "sealed",
        at: At::Last,
        byte: Byte::First,
    },
    Tamper { name: "leaf hash", table: "block_txs", column: "leaves", at: At::Middle, byte: Byte::Last },
    Tamper {
        name: "checkpoint signature",
        table: "checkpoints",
        column: "signature",
        at: At::Checkpoint,
        byte: Byte::Middle,
    },
];

/// Flips one bit of one stored byte in `db`; returns the block height it belongs to.
async fn flip(db: &Path, t: &Tamper, chain: &Chain) -> u64 {
    let height = match t.at {
        At::Genesis => 0,
        At::Middle => chain.middle,
        At::Last => chain.last,
        At::Checkpoint => chain.checkpoint,
    };
    let row = match t.table {
        "blocks" | "block_txs" => format!("height = {height}"),
        _ => format!("tree_size = {}", chain.checkpoint_tree_size),
    };
    let select = format!("SELECT hex({}) FROM {} WHERE {row}", t.column, t.table);
    let before = sqlite3_query(db, &select).await;
    let mut bytes = hex::decode(&before).unwrap_or_else(|e| panic!("{}: `{select}` gave {before:?}: {e}", t.name));
    assert!(!bytes.is_empty(), "{}: no row for `{select}`", t.name);
    let i = match t.byte {
        Byte::First => 0,
        Byte::Middle => bytes.len() / 2,
        Byte::Last => bytes.len() - 1,
    };
    bytes[i] ^= 0x01;
    let sql = format!(
        "DROP TRIGGER blocks_no_update; DROP TRIGGER block_txs_no_update; DROP TRIGGER checkpoints_no_update; \
         UPDATE {} SET {} = X'{}' WHERE {row};",
        t.table,
        t.column,
        hex::encode(&bytes)
    );
    let o = sqlite3(db, &sql).await;
    assert!(o.status.success(), "{}: tampering failed:\n{}", t.name, describe(&o));
    let after = sqlite3_query(db, &select).await;
    assert_ne!(after, before, "{}: the UPDATE changed nothing", t.name);
    assert_eq!(after, hex::encode_upper(&bytes), "{}: unexpected stored value", t.name);
    height
}

#[tokio::test]
async fn verify_detects_tampering() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    let chain = small_chain(&dir).await;
    let mut failures = Vec::new();
    for (n, t) in TAMPERS.iter().enumerate() {
        let copy = tmp.path().join(format!("copy-{n}"));
        copy_dir(&dir, &copy);
        let height = flip(&copy.join("kalima.db"), t, &chain).await;
        let o = verify(&copy, &[]).await;
        let text = format!("{}{}", stdout(&o), stderr(&o));
        let wanted = format!("chain CORRUPT at height {height}");
        eprintln!("{}: {}, {}", t.name, o.status, text.trim());
        if o.status.success() || !text.contains(&wanted) {
            failures.push(format!(
                "{} at height {height}: expected a non-zero exit and `{wanted}`, got:\n{}",
                t.name,
                describe(&o)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // The untouched original still verifies.
    assert_verifies(&dir, &[]).await;
}

#[tokio::test]
async fn immutability_triggers() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    small_chain(&dir).await;
    let db = dir.join("kalima.db");
    // The lookup indexes live in their own file beside the chain's.
    let index = dir.join("kalima.db-index");
    let counts = "SELECT (SELECT count(*) FROM blocks) || ' ' || (SELECT count(*) FROM block_txs) || ' ' || \
                  (SELECT count(*) FROM checkpoints)";
    let index_counts = "SELECT (SELECT count(*) FROM tx_ids) || ' ' || (SELECT count(*) FROM tx_by_stream) || ' ' || \
                        (SELECT count(*) FROM tx_by_address)";
    let before = sqlite3_query(&db, counts).await;
    let index_before = sqlite3_query(&index, index_counts).await;
    assert!(!index_before.starts_with("0 "), "the index file holds rows: {index_before}");
    let statements = [
        (&db, "UPDATE blocks SET tx_count = tx_count + 1 WHERE height = 1"),
        (&db, "UPDATE blocks SET hash = zeroblob(32)"),
        (&db, "DELETE FROM blocks WHERE height = (SELECT max(height) FROM blocks)"),
        (&db, "DELETE FROM blocks"),
        (&db, "UPDATE block_txs SET key_id = 9 WHERE height = 2"),
        (&db, "UPDATE block_txs SET sealed = X'00'"),
        (&db, "DELETE FROM block_txs WHERE height = (SELECT max(height) FROM block_txs)"),
        (&db, "DELETE FROM block_txs"),
        (&index, "UPDATE tx_by_stream SET height = 0 WHERE global_seq = 2"),
        (&index, "DELETE FROM tx_by_address"),
        (&index, "DELETE FROM tx_ids WHERE global_seq = 1"),
        (&db, "UPDATE checkpoints SET root = zeroblob(32)"),
        (&db, "DELETE FROM checkpoints"),
    ];
    let mut failures = Vec::new();
    for (file, sql) in statements {
        let o = sqlite3(file, sql).await;
        if o.status.success() || !stderr(&o).contains("immutable") {
            failures.push(format!("`{sql}` was not refused as immutable:\n{}", describe(&o)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(sqlite3_query(&db, counts).await, before, "rows changed");
    assert_eq!(sqlite3_query(&index, index_counts).await, index_before, "index rows changed");
    assert_verifies(&dir, &[]).await;
}
