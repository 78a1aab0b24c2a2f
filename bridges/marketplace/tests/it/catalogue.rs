//! The catalogue: each filter keeps what it names and drops the rest, and a provider's
//! reputation is what the chain records of its feeds, sales, renewals and deliveries.

use std::time::Duration;

use kalima_core::ledger::KLX;
use kalima_core::ledger::market::{Currency, FEEDS_ADDRESS, Period, Price};
use kalima_marketplace::{FeedFilter, Reputation, catalogue, feed_view, follow, new_token};

use crate::common::{Market, PROVIDER, RIVAL, check_reading, eventually, expire_at, next_reading, now_ms, spec};

fn price(period: Period, currency: Currency, amount: u128) -> Price {
    Price { period, currency, amount }
}

/// Four feeds: two of the provider's, the rival's, and a delisted one.
async fn shop(m: &Market) {
    let mut temp = spec("line-1-temp", "/plant-1/line-1", &["temp"], &m.payout);
    temp.title = "Line 1 temperatures".into();
    temp.description = "Every temperature of line 1".into();
    temp.prices = vec![price(Period::Hour, Currency::Klx, KLX), price(Period::Day, Currency::Sats, 500)];
    let mut pressure = spec("line-2-pressure", "/plant-1/line-2", &[], &m.payout);
    pressure.title = "Line 2 Pressure".into();
    pressure.prices = vec![price(Period::Day, Currency::Klx, 20 * KLX)];
    let mut energy = spec("plant-2-energy", "/plant-2", &["kwh"], &m.payout);
    energy.title = "Energy meter".into();
    energy.description = "Plant 2 consumption in kWh".into();
    energy.prices = vec![price(Period::Month, Currency::Sats, 90_000), price(Period::Hour, Currency::Klx, 3 * KLX)];
    let mut old = spec("old-line", "/plant-1/old", &[], &m.payout);
    old.title = "Retired line".into();
    m.list(PROVIDER, temp).await;
    m.list(PROVIDER, pressure).await;
    m.list(RIVAL, energy).await;
    m.list(PROVIDER, old).await;
    m.delist(PROVIDER, "old-line").await;
}

#[tokio::test]
async fn each_filter_keeps_what_it_names_and_drops_the_rest() {
    let m = Market::start().await;
    shop(&m).await;
    const ALL: &[&str] = &["line-1-temp", "line-2-pressure", "plant-2-energy"];
    struct Case {
        name: &'static str,
        filter: FeedFilter,
        expect: &'static [&'static str],
    }
    let f = FeedFilter::default;
    let cases = [
        Case { name: "no filter: every listed feed", filter: f(), expect: ALL },
        Case {
            name: "delisted included",
            filter: FeedFilter { include_delisted: true, ..f() },
            expect: &["line-1-temp", "line-2-pressure", "old-line", "plant-2-energy"],
        },
        Case {
            name: "feeds under a prefix",
            filter: FeedFilter { prefix: Some("/plant-1".into()), ..f() },
            expect: &["line-1-temp", "line-2-pressure"],
        },
        Case {
            name: "the feed covering an address",
            filter: FeedFilter { prefix: Some("/plant-1/line-1/east".into()), ..f() },
            expect: &["line-1-temp"],
        },
        Case {
            name: "prefixes match whole segments",
            filter: FeedFilter { prefix: Some("/plant".into()), ..f() },
            expect: &[],
        },
        Case {
            name: "a longer segment is another address",
            filter: FeedFilter { prefix: Some("/plant-1/line-10".into()), ..f() },
            expect: &[],
        },
        Case {
            name: "a delisted feed under a prefix, only when asked",
            filter: FeedFilter { prefix: Some("/plant-1/old".into()), ..f() },
            expect: &[],
        },
        Case {
            name: "a delisted feed under a prefix, asked",
            filter: FeedFilter { prefix: Some("/plant-1/old".into()), include_delisted: true, ..f() },
            expect: &["old-line"],
        },
        Case {
            name: "one provider",
            filter: FeedFilter { provider: Some(RIVAL.into()), ..f() },
            expect: &["plant-2-energy"],
        },
        Case {
            name: "an unknown provider",
            filter: FeedFilter { provider: Some("nobody".into()), ..f() },
            expect: &[],
        },
        Case {
            name: "priced in sats",
            filter: FeedFilter { currency: Some(Currency::Sats), ..f() },
            expect: &["line-1-temp", "plant-2-energy"],
        },
        Case {
            name: "sold by the month",
            filter: FeedFilter { period: Some(Period::Month), ..f() },
            expect: &["plant-2-energy"],
        },
        Case {
            name: "one price must match both period and currency",
            filter: FeedFilter { period: Some(Period::Day), currency: Some(Currency::Sats), ..f() },
            expect: &["line-1-temp"],
        },
        Case {
            name: "no month in KLX",
            filter: FeedFilter { period: Some(Period::Month), currency: Some(Currency::Klx), ..f() },
            expect: &[],
        },
        Case {
            name: "at most 1 KLX",
            filter: FeedFilter { currency: Some(Currency::Klx), max_price: Some(KLX), ..f() },
            expect: &["line-1-temp"],
        },
        Case {
            name: "at most 3 KLX",
            filter: FeedFilter { currency: Some(Currency::Klx), max_price: Some(3 * KLX), ..f() },
            expect: &["line-1-temp", "plant-2-energy"],
        },
        Case {
            name: "at most 20 KLX a day",
            filter: FeedFilter {
                currency: Some(Currency::Klx),
                period: Some(Period::Day),
                max_price: Some(20 * KLX),
                ..f()
            },
            expect: &["line-2-pressure"],
        },
        Case {
            name: "under 20 KLX a day",
            filter: FeedFilter {
                currency: Some(Currency::Klx),
                period: Some(Period::Day),
                max_price: Some(20 * KLX - 1),
                ..f()
            },
            expect: &[],
        },
        Case {
            name: "at most 500 sats",
            filter: FeedFilter { currency: Some(Currency::Sats), max_price: Some(500), ..f() },
            expect: &["line-1-temp"],
        },
        Case {
            name: "text in the title, any case",
            filter: FeedFilter { q: Some("PRESSURE".into()), ..f() },
            expect: &["line-2-pressure"],
        },
        Case {
            name: "text in the description",
            filter: FeedFilter { q: Some("kwh".into()), ..f() },
            expect: &["plant-2-energy"],
        },
        Case {
            name: "text in the id",
            filter: FeedFilter { q: Some("line-1".into()), ..f() },
            expect: &["line-1-temp"],
        },
        Case { name: "text found nowhere", filter: FeedFilter { q: Some("humidity".into()), ..f() }, expect: &[] },
        Case {
            name: "filters combine",
            filter: FeedFilter {
                provider: Some(PROVIDER.into()),
                currency: Some(Currency::Sats),
                q: Some("line".into()),
                ..f()
            },
            expect: &["line-1-temp"],
        },
    ];
    for c in cases {
        let got: Vec<String> = catalogue(&m.t.chain, &c.filter).into_iter().map(|v| v.feed.spec.id).collect();
        assert_eq!(got, c.expect, "{}: {:?}", c.name, c.filter);
    }

    // A filter is what a query string says.
    let filter: FeedFilter =
        serde_json::from_value(serde_json::json!({"currency": "sats", "period": "month"})).expect("filter");
    let got: Vec<String> = catalogue(&m.t.chain, &filter).into_iter().map(|v| v.feed.spec.id).collect();
    assert_eq!(got, ["plant-2-energy"]);

    // One feed, listed or not, with the transaction that recorded it as it is now.
    for id in ["line-1-temp", "old-line"] {
        let v = feed_view(&m.t.chain, id).expect("recorded");
        assert_eq!(v.feed, m.feed(id));
        let recorded = m.t.latest(FEEDS_ADDRESS, id).expect("recorded");
        assert_eq!(v.tx_id, hex::encode(recorded.id));
    }
    assert!(!feed_view(&m.t.chain, "old-line").expect("recorded").feed.listed);
    assert!(feed_view(&m.t.chain, "nope").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_reputation_is_what_the_chain_records_of_it() {
    let m = Market::start().await;
    shop(&m).await;
    let reputation = |id: &str| feed_view(&m.t.chain, id).expect("recorded").reputation;
    assert_eq!(reputation("line-1-temp"), Reputation { listed_feeds: 2, ..Reputation::default() });
    assert_eq!(reputation("plant-2-energy"), Reputation { listed_feeds: 1, ..Reputation::default() });
    assert_eq!(reputation("old-line"), reputation("line-1-temp"), "a provider's reputation, whichever feed");

    // Alice buys line 1 and renews; Bob buys line 1; Carol buys line 1 and her hour runs out;
    // Dave buys the rival's feed.
    let alice = m.subscribe("line-1-temp").await;
    m.buy(&alice.buyer, "line-1-temp", 2, &new_token("line-1-temp", &alice.buyer.account)).await;
    let bob = m.subscribe("line-1-temp").await;
    let carol = m.subscribe("line-1-temp").await;
    expire_at(&m, &carol.access.subscription, now_ms() - 1).await;
    m.subscribe("plant-2-energy").await;

    // Bob gets three readings, and the rival's buyers none.
    let mut stream = follow(&m.t.chain, bob.access.clone(), None, "sse", Duration::from_millis(1));
    for v in ["1", "2", "3"] {
        let r = m.write("/plant-1/line-1", "temp", v).await;
        check_reading(&next_reading(&mut stream, v).await, &r, "/plant-1/line-1", "temp", v);
    }
    let delivered = |r: &Reputation| (r.readings_delivered == 3).then_some(());
    eventually(
        "the deliveries in the reputation",
        || delivered(&reputation("line-1-temp")),
        || format!("{:?}", reputation("line-1-temp")),
    )
    .await;

    let provider = Reputation {
        purchases: 4,
        renewed_subscriptions: 1,
        active_subscriptions: 2,
        readings_delivered: 3,
        listed_feeds: 2,
    };
    assert_eq!(reputation("line-1-temp"), provider);
    let rival = Reputation { purchases: 1, active_subscriptions: 1, listed_feeds: 1, ..Reputation::default() };
    assert_eq!(reputation("plant-2-energy"), rival);
    for v in catalogue(&m.t.chain, &FeedFilter { include_delisted: true, ..FeedFilter::default() }) {
        let expected = if v.feed.provider == PROVIDER { &provider } else { &rival };
        assert_eq!(&v.reputation, expected, "{} shows its provider's reputation", v.feed.spec.id);
    }
}
