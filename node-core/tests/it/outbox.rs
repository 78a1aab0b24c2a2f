//! The outbox of a client node: durable appends in order, outcomes recorded in order, a
//! repeated idempotency key refused, pruning that keeps the hash chain checkable, and any
//! change to the stored entries found when the outbox is opened.

use std::path::Path;
use std::sync::Arc;

use kalima_core::client::outbox::{OUTBOX_FILE, Outbox, Outcome};
use kalima_core::cluster::WireRejection;
use kalima_core::keys::DataKeys;
use kalima_core::tx::TxContent;
use kalima_core::{Error, Receipt, Rejection};
use sqlx::sqlite::SqlitePoolOptions;

fn put(n: u64) -> TxContent {
    TxContent {
        device_id: "sensor-1".into(),
        address: "/edge/line-1".into(),
        key: "temp".into(),
        body: n.to_string().into_bytes(),
        idempotency_key: format!("k{n}"),
        ..TxContent::default()
    }
}

fn receipt(n: u64) -> Receipt {
    Receipt { id: [n as u8; 32], global_sequence: n, sequence: n, height: n }
}

async fn keys(dir: &Path) -> Arc<DataKeys> {
    let path = dir.join("data.keys");
    Arc::new(if path.exists() { DataKeys::load(&path).unwrap() } else { DataKeys::create(&path).unwrap() })
}

/// Runs `sql` on the outbox file directly, as someone with access to the disk would.
async fn tamper(dir: &Path, sql: &str) {
    let url = format!("sqlite://{}", dir.join(OUTBOX_FILE).display());
    let pool = SqlitePoolOptions::new().max_connections(1).connect(&url).await.unwrap();
    sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    pool.close().await;
}

#[tokio::test]
async fn groups_come_back_in_order_and_outcomes_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), keys(dir.path()).await).await.unwrap();
    assert_eq!(ob.append(vec![put(1), put(2)]).await.unwrap(), (1, 2));
    assert_eq!(ob.append(vec![put(3)]).await.unwrap(), (3, 3));
    assert_eq!(ob.append(vec![put(4), put(5), put(6)]).await.unwrap(), (4, 6));
    let groups = ob.pending(100).await.unwrap();
    let shape: Vec<(u64, u64, usize)> = groups.iter().map(|g| (g.id, g.last_seq, g.items.len())).collect();
    assert_eq!(shape, vec![(1, 2, 2), (3, 3, 1), (4, 6, 3)]);
    assert_eq!(groups[2].items[1], put(5));

    // Out of order is refused; in order is recorded.
    let err = ob.record(&[(groups[1].clone(), Outcome::Committed(vec![receipt(3)]))]).await.unwrap_err();
    assert!(err.to_string().contains("out of order"), "{err}");
    let refused = WireRejection::Forbidden { device: "sensor-1".into(), address: "/edge/line-1".into() };
    ob.record(&[
        (groups[0].clone(), Outcome::Committed(vec![receipt(1), receipt(2)])),
        (groups[1].clone(), Outcome::Rejected(refused.clone())),
    ])
    .await
    .unwrap();
    assert_eq!(ob.pending_count(), 3);
    ob.close().await;

    let ob = Outbox::open(dir.path(), keys(dir.path()).await).await.unwrap();
    let counts = ob.counts().await.unwrap();
    assert_eq!((counts.appended, counts.pending, counts.delivered_seq, counts.rejected_groups), (6, 3, 3, 1));
    assert_eq!(ob.outcome(1).await.unwrap(), Some(Outcome::Committed(vec![receipt(1), receipt(2)])));
    assert_eq!(ob.outcome(4).await.unwrap(), None);
    let rejections = ob.rejections(10).await.unwrap();
    assert_eq!(rejections.len(), 1);
    assert_eq!((rejections[0].0, rejections[0].1), (3, 3));
    assert_eq!(rejections[0].2, Rejection::from(refused));
    let rest = ob.pending(100).await.unwrap();
    assert_eq!(rest.iter().map(|g| g.id).collect::<Vec<_>>(), vec![4]);
    // The sequence continues after a reopen.
    assert_eq!(ob.append(vec![put(7)]).await.unwrap(), (7, 7));
}

#[tokio::test]
async fn a_repeated_idempotency_key_is_refused_and_the_rest_of_the_commit_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), keys(dir.path()).await).await.unwrap();
    ob.append(vec![put(1)]).await.unwrap();
    // Concurrent appends share one database transaction: the bad one must not sink the others.
    let (a, b, c) = tokio::join!(ob.append(vec![put(2)]), ob.append(vec![put(1)]), ob.append(vec![put(3), put(3)]));
    assert!(a.is_ok(), "{a:?}");
    for r in [b, c] {
        match r {
            Err(Error::Rejected(Rejection::DuplicateIdempotencyKey { .. })) => {}
            other => panic!("expected a duplicate idempotency key, got {other:?}"),
        }
    }
    let items: Vec<TxContent> = ob.pending(100).await.unwrap().into_iter().flat_map(|g| g.items).collect();
    assert_eq!(items, vec![put(1), put(2)]);
}

#[tokio::test]
async fn a_group_larger_than_the_page_is_read_whole_and_a_cut_group_is_left_for_later() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), keys(dir.path()).await).await.unwrap();
    ob.append((1..=5).map(put).collect()).await.unwrap();
    ob.append((6..=8).map(put).collect()).await.unwrap();
    let g = ob.pending(2).await.unwrap();
    assert_eq!(g.iter().map(|g| (g.id, g.items.len())).collect::<Vec<_>>(), vec![(1, 5)]);
    let g = ob.pending(6).await.unwrap();
    assert_eq!(g.iter().map(|g| (g.id, g.items.len())).collect::<Vec<_>>(), vec![(1, 5)]);
    let g = ob.pending(8).await.unwrap();
    assert_eq!(g.iter().map(|g| (g.id, g.items.len())).collect::<Vec<_>>(), vec![(1, 5), (6, 3)]);
}

#[tokio::test]
async fn pruning_keeps_the_chain_checkable_from_its_new_base() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), keys(dir.path()).await).await.unwrap();
    for n in 1..=10 {
        ob.append(vec![put(n)]).await.unwrap();
    }
    let groups = ob.pending(100).await.unwrap();
    let done: Vec<_> = groups[..8].iter().map(|g| (g.clone(), Outcome::Committed(vec![receipt(g.id)]))).collect();
    ob.record(&done).await.unwrap();
    assert_eq!(ob.prune(3).await.unwrap(), 5);
    ob.close().await;
    let ob = Outbox::open(dir.path(), keys(dir.path()).await).await.unwrap();
    assert_eq!(ob.pending(100).await.unwrap().iter().map(|g| g.id).collect::<Vec<_>>(), vec![9, 10]);
    assert_eq!(ob.append(vec![put(11)]).await.unwrap(), (11, 11));
    ob.close().await;
    // The first entry after the base is checked against the base hash.
    tamper(dir.path(), "DROP TRIGGER outbox_entries_immutable; UPDATE outbox_entries SET enqueued_ms = 0, hash = zeroblob(32) WHERE seq = 6;").await;
    let err = Outbox::open(dir.path(), keys(dir.path()).await).await.unwrap_err();
    assert!(err.to_string().contains("entry 6"), "{err}");
}

#[tokio::test]
async fn every_kind_of_change_to_stored_entries_stops_the_outbox_naming_the_entry() {
    let cases = [
        (
            "a flipped byte",
            "UPDATE outbox_entries SET sealed = CAST(sealed AS BLOB) || x'00' WHERE seq = 3;",
            "entry 3",
        ),
        ("a removed entry", "DELETE FROM outbox_entries WHERE seq = 2;", "entry 2"),
        (
            "entries swapped",
            "UPDATE outbox_entries SET seq = 100 WHERE seq = 2; UPDATE outbox_entries SET seq = 2 WHERE seq = 3; UPDATE outbox_entries SET seq = 3 WHERE seq = 100;",
            "entry 2",
        ),
        ("an entry moved to another group", "UPDATE outbox_entries SET grp = 1 WHERE seq = 4;", "entry 4"),
        (
            "an outcome for nothing",
            "INSERT INTO outbox_outcomes (grp, last_seq, outcome, done_ms) VALUES (9, 9, x'00', 0);",
            "entry 9",
        ),
    ];
    for (what, sql, named) in cases {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path(), keys(dir.path()).await).await.unwrap();
        for n in 1..=4 {
            ob.append(vec![put(n)]).await.unwrap();
        }
        ob.close().await;
        tamper(
            dir.path(),
            &format!("DROP TRIGGER outbox_entries_immutable; DROP TRIGGER outbox_outcomes_immutable; {sql}"),
        )
        .await;
        match Outbox::open(dir.path(), keys(dir.path()).await).await {
            Err(e) => assert!(e.to_string().contains(named), "{what}: {e}"),
            Ok(_) => panic!("{what} was not detected"),
        }
    }
}

#[tokio::test]
async fn stored_entries_cannot_be_updated_through_sql() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), keys(dir.path()).await).await.unwrap();
    ob.append(vec![put(1)]).await.unwrap();
    ob.close().await;
    let url = format!("sqlite://{}", dir.path().join(OUTBOX_FILE).display());
    let pool = SqlitePoolOptions::new().max_connections(1).connect(&url).await.unwrap();
    let err = sqlx::query("UPDATE outbox_entries SET sealed = x'00'").execute(&pool).await.unwrap_err();
    assert!(err.to_string().contains("immutable"), "{err}");
    // The payload is not stored in clear.
    let bytes = std::fs::read(dir.path().join(OUTBOX_FILE)).unwrap();
    assert!(!bytes.windows(12).any(|w| w == b"/edge/line-1"), "the address is readable in the outbox file");
}
