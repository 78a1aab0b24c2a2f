//! The bus: subscribers see every committed batch once, in chain order, right after the
//! commit; a subscriber that stops reading is dropped with `SubscriptionEnd::Lagged` once it
//! is more than `bus_capacity` commits behind, and never holds the chain back.

use futures::future::join_all;
use kalima_core::ChainConfig;
use kalima_core::bus::SubscriptionEnd;

use crate::common::{TestDb, backend_tests, put, submit_one, test_config};

backend_tests!(
    acknowledged_commit_is_already_published,
    subscribers_see_commits_in_order,
    slow_subscriber_is_dropped_with_lagged,
    lag_limit_is_exactly_bus_capacity
);

async fn subscribers_see_commits_in_order(db: TestDb) {
    let c = db.chain().await;
    let chain = &c.chain;
    // Only commits after subscribing are delivered. (A barrier subscriber makes sure the
    // earlier commit was published before `sub` subscribes.)
    let mut barrier = chain.bus().subscribe();
    submit_one(chain, put("admin", "/plant-1", "before", b"0")).await;
    barrier.next().await.expect("published");
    drop(barrier);
    let mut sub = chain.bus().subscribe();
    let mut late = None;
    assert_eq!(chain.bus().subscribers(), 1);

    // Sequential commits: one batch each, in order, with what the receipts say. The late
    // subscriber joins once commit 2 was delivered, so it must start at commit 3.
    let mut receipts = Vec::new();
    for i in 0..5 {
        let r = submit_one(chain, put("admin", "/plant-1/line-2", "temp", format!("2{i}").as_bytes())).await;
        let batch = sub.next().await.expect("batch");
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].id, r.id);
        assert_eq!(batch[0].tx.global_sequence, r.global_sequence);
        assert_eq!(batch[0].height, r.height);
        receipts.push(r);
        if i == 2 {
            late = Some(chain.bus().subscribe());
            assert_eq!(chain.bus().subscribers(), 2);
        }
    }
    let mut late = late.expect("late subscriber");
    for r in &receipts[3..] {
        assert_eq!(late.next().await.expect("batch")[0].id, r.id, "a late subscriber starts at the next commit");
    }

    // Concurrent writers: every transaction arrives exactly once, in global order, and each
    // batch is already in the memcache when it arrives.
    let n = 200u64;
    let start = chain.tree_size();
    let futs = (0..n).map(|i| chain.submit(vec![put("admin", &format!("/plant-{}", i % 4), "v", b"x")], None));
    for r in join_all(futs).await {
        r.unwrap();
    }
    let mut next = start;
    while next < start + n {
        let batch = sub.next().await.expect("batch");
        for t in batch.iter() {
            assert_eq!(t.tx.global_sequence, next, "bus order is chain order");
            next += 1;
        }
        let last = batch.last().expect("batches are never empty");
        let stored = chain.store().tx_by_id(&last.id).await.unwrap().expect("durable before it is published");
        assert_eq!(stored.id, last.id);
    }
    assert_eq!(next, chain.tree_size());
}

async fn slow_subscriber_is_dropped_with_lagged(db: TestDb) {
    check_lag_limit(&db, 4).await;
}

/// `ChainConfig::bus_capacity` is documented as the number of commits a subscriber may fall
/// behind; it must hold for any value, not only for powers of two.
async fn lag_limit_is_exactly_bus_capacity(db: TestDb) {
    check_lag_limit(&db, 5).await;
}

async fn check_lag_limit(db: &TestDb, capacity: usize) {
    let c = db.chain_with(ChainConfig { bus_capacity: capacity, ..test_config() }).await;
    let chain = &c.chain;

    // `at_limit` falls exactly `capacity` commits behind: still served, in order.
    // `over` falls far behind: dropped. `reader` keeps up throughout.
    let mut at_limit = chain.bus().subscribe();
    let mut over = chain.bus().subscribe();
    let mut reader = chain.bus().subscribe();
    let mut receipts = Vec::new();
    for i in 0..capacity {
        receipts.push(submit_one(chain, put("admin", "/plant-1", "v", format!("{i}").as_bytes())).await);
        assert_eq!(reader.next().await.expect("reader keeps up")[0].id, receipts[i].id);
    }
    for r in &receipts {
        assert_eq!(at_limit.next().await.expect("within capacity")[0].id, r.id, "capacity {capacity}");
    }
    // Meanwhile the chain commits on, whatever `over` does.
    let size = chain.tree_size();
    for i in 0..capacity * 3 {
        let r = submit_one(chain, put("admin", "/plant-1", "w", format!("{i}").as_bytes())).await;
        assert_eq!(reader.next().await.expect("reader keeps up")[0].id, r.id);
    }
    assert_eq!(chain.tree_size(), size + capacity as u64 * 3);
    assert_eq!(
        over.next().await.err(),
        Some(SubscriptionEnd::Lagged),
        "capacity {capacity}: a subscriber {} commits behind must be dropped",
        capacity * 4
    );

    // One commit over the limit is enough.
    let mut edge = chain.bus().subscribe();
    for i in 0..=capacity {
        let r = submit_one(chain, put("admin", "/plant-1", "x", format!("{i}").as_bytes())).await;
        // `reader` doubles as a barrier: once it has the batch, the bus has published it.
        assert_eq!(reader.next().await.expect("reader keeps up")[0].id, r.id);
    }
    let got = edge.next().await;
    assert_eq!(
        got.as_ref().err(),
        Some(&SubscriptionEnd::Lagged),
        "bus_capacity = {capacity}: a subscriber {} commits behind must be dropped, but it was served {:?}",
        capacity + 1,
        got.as_ref().ok().map(|b| b[0].tx.global_sequence)
    );
}

/// chain.rs: the sequencer "updates the memcache, the registry and the bus and answers the
/// writers". So when `submit` returns, the batch is already on the bus: a subscriber made
/// earlier can take it without waiting, and one made afterwards never sees it.
async fn acknowledged_commit_is_already_published(db: TestDb) {
    use futures::FutureExt;
    let c = db.chain().await;
    let chain = &c.chain;
    let mut sub = chain.bus().subscribe();
    let mut late_hits = Vec::new();
    for i in 0..100 {
        let r = submit_one(chain, put("admin", "/plant-1", "v", format!("{i}").as_bytes())).await;
        let mut after = chain.bus().subscribe();
        match sub.next().now_or_never() {
            Some(Ok(batch)) => assert_eq!(batch[0].id, r.id),
            Some(Err(e)) => panic!("subscription ended: {e:?}"),
            None => late_hits.push(i),
        }
        if let Some(Ok(batch)) = after.next().now_or_never() {
            panic!(
                "commit {i} was acknowledged before it was published: a subscriber made after the acknowledgement received it ({:?})",
                batch[0].tx.global_sequence
            );
        }
        if !late_hits.is_empty() {
            panic!("commits {late_hits:?} were acknowledged before they were on the bus");
        }
    }
}
