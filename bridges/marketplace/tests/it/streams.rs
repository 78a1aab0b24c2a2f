//! How a buyer's stream ends: the provider delists the feed, the subscription runs out (unless
//! it was renewed), the buyer goes away, or the buyer reads too slowly. Each end is told to the
//! buyer with its reason, and what was delivered up to it is recorded.

use std::time::Duration;

use kalima_core::ledger::market::{DELIVERIES_ADDRESS, Period};
use kalima_marketplace::{DeliveryRecord, Error, authorize, follow, new_token};

use crate::common::{
    Market, PROVIDER, Subscribed, check_reading, end, eventually, expire_at, next_reading, now_ms, spec,
};

const NO_RECORDS: Duration = Duration::from_secs(3600);

fn record(m: &Market, s: &Subscribed) -> Option<DeliveryRecord> {
    m.read(DELIVERIES_ADDRESS, s.id())
}

#[tokio::test]
async fn delisting_ends_the_stream_with_the_reason() {
    let m = Market::start().await;
    m.list(PROVIDER, spec("line-1-temp", "/plant-1/line-1", &["temp"], &m.payout)).await;
    m.list(PROVIDER, spec("line-2-temp", "/plant-1/line-2", &["temp"], &m.payout)).await;
    let s = m.subscribe("line-1-temp").await;
    let other = m.subscribe("line-2-temp").await;
    let mut stream = follow(&m.t.chain, s.access.clone(), None, "sse", NO_RECORDS);
    let mut unaffected = follow(&m.t.chain, other.access.clone(), None, "sse", NO_RECORDS);
    let r = m.write("/plant-1/line-1", "temp", "21.5").await;
    check_reading(&next_reading(&mut stream, "before delisting").await, &r, "/plant-1/line-1", "temp", "21.5");

    m.delist(PROVIDER, "line-1-temp").await;
    let (before, reason) = end(&mut stream, "after delisting").await;
    assert_eq!(reason, "delisted");
    assert!(before.is_empty(), "nothing was written in between: {before:?}");

    // The provider's other feed goes on.
    let r = m.write("/plant-1/line-2", "temp", "22").await;
    check_reading(&next_reading(&mut unaffected, "other feed").await, &r, "/plant-1/line-2", "temp", "22");
}

#[tokio::test]
async fn a_buyer_going_away_ends_its_stream_and_its_deliveries_are_recorded() {
    let m = Market::start().await;
    m.list(PROVIDER, spec("line-1-temp", "/plant-1/line-1", &["temp"], &m.payout)).await;
    let s = m.subscribe("line-1-temp").await;
    let mut stream = follow(&m.t.chain, s.access.clone(), None, "ws", NO_RECORDS);
    let mut last = 0;
    for v in ["1", "2"] {
        let r = m.write("/plant-1/line-1", "temp", v).await;
        check_reading(&next_reading(&mut stream, "before leaving").await, &r, "/plant-1/line-1", "temp", v);
        last = r.global_sequence;
    }
    assert!(record(&m, &s).is_none(), "nothing recorded before the batch is due");

    drop(stream);
    // The stream's task notices on its own and records what it delivered on its way out.
    let rec = eventually("the record of the ended stream", || record(&m, &s), || "none".into()).await;
    assert_eq!(
        rec,
        DeliveryRecord {
            subscription: s.id().into(),
            feed: "line-1-temp".into(),
            channel: "ws".into(),
            readings: 2,
            items: 2,
            last_sequence: last,
            total_readings: 2,
            total_items: 2,
        }
    );

    // The buyer may come back with the same token.
    let access = authorize(&m.t.chain, &s.token).expect("still subscribed");
    let mut again = follow(&m.t.chain, access, None, "ws", NO_RECORDS);
    let r = m.write("/plant-1/line-1", "temp", "3").await;
    check_reading(&next_reading(&mut again, "back").await, &r, "/plant-1/line-1", "temp", "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_subscription_runs_out_unless_it_was_renewed() {
    let m = Market::start().await;
    m.list(PROVIDER, spec("line-1-temp", "/plant-1/line-1", &["temp"], &m.payout)).await;
    let lapsing = m.subscribe("line-1-temp").await;
    let renewing = m.subscribe("line-1-temp").await;
    let runs_out = now_ms() + 1500;
    for s in [&lapsing, &renewing] {
        expire_at(&m, &s.access.subscription, runs_out).await;
    }
    let mut streams = Vec::new();
    for s in [&lapsing, &renewing] {
        let access = authorize(&m.t.chain, &s.token).expect("not run out yet");
        assert_eq!(access.subscription.expires_at_ms, runs_out);
        streams.push(follow(&m.t.chain, access, None, "sse", NO_RECORDS));
    }
    let mut renewed_stream = streams.pop().expect("two streams");
    let mut lapsing_stream = streams.pop().expect("two streams");
    let renewed = m.buy(&renewing.buyer, "line-1-temp", 1, &renewing.token).await;
    assert_eq!(renewed.expires_at_ms, runs_out + Period::Hour.millis(), "the renewal extends the period");

    let (before, reason) = end(&mut lapsing_stream, "the lapsing stream").await;
    assert_eq!((before.len(), reason), (0, "expired"));
    assert!(now_ms() >= runs_out);
    let err = authorize(&m.t.chain, &lapsing.token).expect_err("run out");
    assert_eq!(err, Error::Expired { feed: "line-1-temp".into(), expired_at_ms: runs_out });
    assert_eq!(err.code(), "subscription_expired");

    // Past the first expiry, the renewed stream still delivers.
    let r = m.write("/plant-1/line-1", "temp", "21.5").await;
    check_reading(&next_reading(&mut renewed_stream, "renewed").await, &r, "/plant-1/line-1", "temp", "21.5");

    // Buying again after the end starts a new period from now, under the new token.
    let token = new_token("line-1-temp", &lapsing.buyer.account);
    let bought_at = now_ms();
    let sub = m.buy(&lapsing.buyer, "line-1-temp", 1, &token).await;
    assert!(sub.expires_at_ms >= bought_at + Period::Hour.millis(), "a new period, not the rest of the old one");
    assert_eq!(authorize(&m.t.chain, &token).expect("bought again").subscription, sub);
}
