//! Buyers' tokens: the token whose hash a purchase carried opens the feed; anything else is
//! refused with the reason a buyer can act on, and a renewal's new token replaces the old one.

use kalima_core::ledger::market::{Period, subscription_id};
use kalima_marketplace::{Error, authorize, new_token};

use crate::common::{Market, PROVIDER, spec};

#[tokio::test]
async fn the_token_of_a_purchase_opens_its_feed_and_nothing_else_does() {
    let m = Market::start().await;
    m.list(PROVIDER, spec("line-1-temp", "/plant-1/line-1", &["temp"], &m.payout)).await;
    m.list(PROVIDER, spec("line-2-temp", "/plant-1/line-2", &["temp"], &m.payout)).await;
    let alice = m.subscribe("line-1-temp").await;
    let bob = m.subscribe("line-1-temp").await;
    let bob_elsewhere = m.subscribe("line-2-temp").await;

    // The token is `<subscription id>.<secret>` and opens exactly its subscription.
    let (id, secret) = alice.token.split_once('.').expect("id.secret");
    assert_eq!(id, subscription_id("line-1-temp", &alice.buyer.account));
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(new_token("line-1-temp", &alice.buyer.account), alice.token, "every token is new");
    let a = &alice.access;
    assert_eq!((a.subscription.id.as_str(), a.subscription.feed.as_str()), (id, "line-1-temp"));
    assert_eq!(a.subscription.buyer, alice.buyer.account);
    assert_eq!((a.feed.spec.id.as_str(), a.feed.provider.as_str(), a.feed.listed), ("line-1-temp", PROVIDER, true));
    assert!(a.subscription.expires_at_ms > a.feed.listed_at_ms);
    assert_eq!(authorize(&m.t.chain, &bob.token).expect("bob's token").subscription.buyer, bob.buyer.account);

    let (bob_id, bob_secret) = bob.token.split_once('.').expect("id.secret");
    let other_feed_id = bob_elsewhere.id().to_string();
    let refused: Vec<(&str, String, Error)> = vec![
        ("a wrong secret", format!("{id}.{}", "0".repeat(64)), Error::UnknownToken),
        ("a secret of another subscription", format!("{id}.{bob_secret}"), Error::UnknownToken),
        ("another buyer's subscription id", format!("{bob_id}.{secret}"), Error::UnknownToken),
        ("the buyer's id on another feed", format!("{other_feed_id}.{secret}"), Error::UnknownToken),
        (
            "an id no purchase made",
            format!("{}.{secret}", subscription_id("line-1-temp", &"ab".repeat(32))),
            Error::UnknownToken,
        ),
        ("no dot", id.to_string(), Error::MalformedToken),
        ("an empty secret", format!("{id}."), Error::MalformedToken),
        ("an id that is not hex", format!("{}.{secret}", "zz".repeat(32)), Error::MalformedToken),
        ("a short id", format!("{}.{secret}", &id[..62]), Error::MalformedToken),
        ("a long id", format!("{id}00.{secret}"), Error::MalformedToken),
        ("nothing", String::new(), Error::MalformedToken),
    ];
    for (what, token, expected) in refused {
        let err = authorize(&m.t.chain, &token).expect_err(what);
        assert_eq!(err, expected, "{what}");
        assert!(matches!(err.code(), "unknown_token" | "malformed_token"), "{what}: {}", err.code());
    }
    // Refusals change nothing: the right tokens still work.
    authorize(&m.t.chain, &alice.token).expect("alice's token still opens the feed");
    authorize(&m.t.chain, &bob_elsewhere.token).expect("bob's other token");
}

#[tokio::test]
async fn a_renewal_with_a_new_token_retires_the_old_one() {
    let m = Market::start().await;
    m.list(PROVIDER, spec("line-1-temp", "/plant-1/line-1", &["temp"], &m.payout)).await;
    let s = m.subscribe("line-1-temp").await;
    let first = s.access.subscription.clone();
    assert_eq!(first.purchases, 1);

    let renewed_token = new_token("line-1-temp", &s.buyer.account);
    let renewed = m.buy(&s.buyer, "line-1-temp", 2, &renewed_token).await;
    assert_eq!(renewed.id, first.id, "a renewal extends the same subscription");
    assert_eq!(renewed.purchases, 2);
    assert_eq!(renewed.expires_at_ms, first.expires_at_ms + 2 * Period::Hour.millis(), "extended from its expiry");

    assert_eq!(authorize(&m.t.chain, &s.token), Err(Error::UnknownToken), "the old token is retired");
    let access = authorize(&m.t.chain, &renewed_token).expect("the new token opens the feed");
    assert_eq!(access.subscription, renewed);
}

#[tokio::test]
async fn delisting_closes_every_subscription_of_the_feed() {
    let m = Market::start().await;
    m.list(PROVIDER, spec("line-1-temp", "/plant-1/line-1", &["temp"], &m.payout)).await;
    m.list(PROVIDER, spec("line-2-temp", "/plant-1/line-2", &["temp"], &m.payout)).await;
    let a = m.subscribe("line-1-temp").await;
    let b = m.subscribe("line-1-temp").await;
    let other = m.subscribe("line-2-temp").await;

    m.delist(PROVIDER, "line-1-temp").await;
    for s in [&a, &b] {
        let err = authorize(&m.t.chain, &s.token).expect_err("a delisted feed is closed");
        assert_eq!(err, Error::Delisted("line-1-temp".into()));
        assert_eq!(err.code(), "feed_delisted");
    }
    authorize(&m.t.chain, &other.token).expect("the provider's other feed stays open");
    // A wrong token is still told it is wrong, not that the feed is delisted.
    let (id, _) = a.token.split_once('.').expect("id.secret");
    assert_eq!(authorize(&m.t.chain, &format!("{id}.nope")), Err(Error::UnknownToken));
}
