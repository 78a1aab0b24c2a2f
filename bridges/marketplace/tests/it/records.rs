//! Delivery records: what each subscription was delivered is written on the chain by the node,
//! in batches whose running totals add up, whichever streams of the subscription delivered it.

use std::time::Duration;

use kalima_core::ledger::market::DELIVERIES_ADDRESS;
use kalima_core::registry::NODE_DEVICE_ID;
use kalima_marketplace::{DeliveryRecord, FeedStream, follow};

use crate::common::{Market, PROVIDER, Subscribed, check_reading, eventually, next_reading, spec};

/// Short, so every delivery is recorded at the stream's next turn.
const SOON: Duration = Duration::from_millis(1);

fn latest(m: &Market, s: &Subscribed) -> Option<DeliveryRecord> {
    m.read(DELIVERIES_ADDRESS, s.id())
}

/// Waits for the subscription's record to reach `readings` in total.
async fn recorded(m: &Market, s: &Subscribed, readings: u64) -> DeliveryRecord {
    eventually(
        &format!("{readings} readings recorded"),
        || latest(m, s).filter(|r| r.total_readings == readings),
        || format!("{:?}", latest(m, s)),
    )
    .await
}

/// Every batch recorded for `s`, oldest first, checked to add up; returns them.
async fn batches(m: &Market, s: &Subscribed) -> Vec<DeliveryRecord> {
    let mut out = Vec::new();
    let mut history = m.t.history(DELIVERIES_ADDRESS, s.id()).await;
    history.reverse();
    let (mut readings, mut items) = (0, 0);
    for c in history {
        assert_eq!(c.tx.content.device_id, NODE_DEVICE_ID, "recorded by the node");
        let r: DeliveryRecord = serde_json::from_slice(&c.tx.content.body).expect("a delivery record");
        assert_eq!((r.subscription.as_str(), r.feed.as_str()), (s.id(), s.access.feed.spec.id.as_str()));
        assert!(r.items > 0, "no empty batch is recorded: {r:?}");
        readings += r.readings;
        items += r.items;
        assert_eq!((r.total_readings, r.total_items), (readings, items), "running totals: {r:?}");
        out.push(r);
    }
    out
}

async fn deliver(m: &Market, streams: &mut [&mut FeedStream], value: &str) -> u64 {
    let r = m.write("/plant-1/line-1", "temp", value).await;
    for s in streams.iter_mut() {
        check_reading(&next_reading(s, value).await, &r, "/plant-1/line-1", "temp", value);
    }
    r.global_sequence
}

#[tokio::test]
async fn deliveries_are_recorded_per_subscription_with_running_totals() {
    let m = Market::start().await;
    m.list(PROVIDER, spec("line-1-temp", "/plant-1/line-1", &["temp"], &m.payout)).await;
    let s = m.subscribe("line-1-temp").await;
    let other = m.subscribe("line-1-temp").await;
    let mut stream = follow(&m.t.chain, s.access.clone(), None, "sse", SOON);

    for v in ["1", "2", "3"] {
        deliver(&m, &mut [&mut stream], v).await;
    }
    let rec = recorded(&m, &s, 3).await;
    assert_eq!((rec.channel.as_str(), rec.total_items), ("sse", 3));

    let batch = m
        .write_all(&[
            ("/plant-1/line-1", "temp", "4"),
            ("/plant-1/line-1", "humidity", "9"),
            ("/plant-1/line-1", "temp", "5"),
        ])
        .await;
    for (r, v) in [(&batch[0], "4"), (&batch[2], "5")] {
        check_reading(&next_reading(&mut stream, v).await, r, "/plant-1/line-1", "temp", v);
    }
    let rec = recorded(&m, &s, 5).await;
    assert_eq!(rec.last_sequence, batch[2].global_sequence, "the newest reading delivered");
    let all = batches(&m, &s).await;
    assert_eq!(all.last(), Some(&rec));
    assert!(all.iter().all(|r| r.items == r.readings && r.channel == "sse"), "raw: one reading per item: {all:?}");
    assert!(latest(&m, &other).is_none(), "a subscription with no stream has no record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_of_one_subscription_add_up() {
    let m = Market::start().await;
    m.list(PROVIDER, spec("line-1-temp", "/plant-1/line-1", &["temp"], &m.payout)).await;
    let s = m.subscribe("line-1-temp").await;
    // The same buyer on two channels at once: both streams record into the same totals.
    let mut sse = follow(&m.t.chain, s.access.clone(), None, "sse", SOON);
    let mut ws = follow(&m.t.chain, s.access.clone(), None, "ws", SOON);
    let mut last = 0;
    for i in 0..10 {
        last = deliver(&m, &mut [&mut sse, &mut ws], &i.to_string()).await;
    }
    let rec = recorded(&m, &s, 20).await;
    assert_eq!(rec.total_items, 20);
    assert_eq!(rec.last_sequence, last);
    let all = batches(&m, &s).await;
    for channel in ["sse", "ws"] {
        let sum: u64 = all.iter().filter(|r| r.channel == channel).map(|r| r.readings).sum();
        assert_eq!(sum, 10, "{channel}'s batches: {all:?}");
    }
}
