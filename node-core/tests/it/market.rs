//! The marketplace on the chain: providers list feeds they may write, buyers pay the exact
//! price in KLX with a signed purchase, the gas is burned in part and split 20/20/60, the
//! provider gets the rest, subscriptions extend on renewal, and the ledger still adds up.

use ed25519_dalek::SigningKey;
use kalima_core::ledger::market::{
    AggregateFn, Aggregation, Currency, FEEDS_ADDRESS, Feed, FeedSpec, MarketConfig, Period, Price, STATEMENTS_ADDRESS,
    SUBSCRIPTIONS_ADDRESS, SignedPurchase, Statement, Subscription, subscription_id,
};
use kalima_core::ledger::{AccountKey, KLX, LedgerError, LedgerOp};

use crate::ledger::{Bridge, CHAIN, account, deposit, ledger_refusal, with_wallet};

struct Market {
    b: Bridge,
    buyer: SigningKey,
    payout: SigningKey,
    foundation: SigningKey,
    masters: SigningKey,
    dapp: SigningKey,
}

fn spec(id: &str, prefix: &str, payout: &SigningKey, klx_per_day: u128) -> FeedSpec {
    FeedSpec {
        id: id.into(),
        title: "Line 1 temperatures".into(),
        description: "Every temperature of line 1, as measured".into(),
        prefix: prefix.into(),
        keys: vec!["temp".into()],
        aggregation: Aggregation::Raw,
        prices: vec![
            Price { period: Period::Day, currency: Currency::Klx, amount: klx_per_day },
            Price { period: Period::Hour, currency: Currency::Sats, amount: 500 },
        ],
        licence: "Internal use only".into(),
        sample: serde_json::json!({"temp": 21.5}),
        payout: AccountKey::of(payout).to_hex(),
    }
}

impl Market {
    async fn start() -> Market {
        let b = with_wallet(3, 2).await;
        let buyer = account();
        b.attest(0, &deposit(0, &buyer, 100 * KLX)).await.expect("vote");
        b.attest(1, &deposit(0, &buyer, 100 * KLX)).await.expect("vote");
        b.t.register("provider", &[("/plant-1", true, true)]).await;
        b.t.register("other", &[("/plant-1", true, true)]).await;
        b.t.register("stranger", &[("/elsewhere", true, true)]).await;
        Market { b, buyer, payout: account(), foundation: account(), masters: account(), dapp: account() }
    }

    fn config(&self) -> MarketConfig {
        MarketConfig {
            gas_micro_eur_per_kb: 250,
            // 1 EUR = 1,000 KLX: a 1 kB purchase costs 0.25 KLX of gas.
            klx_per_eur: 1000 * KLX,
            sats_per_eur: 1000,
            burn_bps: 100,
            foundation: AccountKey::of(&self.foundation).to_hex(),
            masters: AccountKey::of(&self.masters).to_hex(),
            dapp_fund: AccountKey::of(&self.dapp).to_hex(),
        }
    }

    async fn provider(&self, device: &str, op: LedgerOp) -> kalima_core::Result<Vec<kalima_core::Receipt>> {
        self.b.t.ledger(op.instruction(device, String::new())).await
    }

    fn buy(&self, feed: &str, count: u32, amount: u128, nonce: u64, token: &str) -> LedgerOp {
        LedgerOp::Purchase(SignedPurchase::sign(CHAIN, &self.buyer, feed, Period::Day, count, amount, token, nonce))
    }

    fn read<T: serde::de::DeserializeOwned>(&self, address: &str, key: &str) -> Option<T> {
        let c = self.b.t.chain.memcache().get(address, key)?;
        serde_json::from_slice(&c.tx.content.body).ok()
    }
}

#[tokio::test]
async fn providers_list_only_what_they_may_write_and_only_their_own_feeds() {
    let m = Market::start().await;
    let f = spec("line-1-temp", "/plant-1/line-1", &m.payout, 5 * KLX);
    let err = ledger_refusal(m.provider("stranger", LedgerOp::ListFeed { feed: f.clone() }).await);
    assert!(matches!(&err, LedgerError::Invalid(msg) if msg.contains("write grant")), "{err:?}");
    m.provider("provider", LedgerOp::ListFeed { feed: f.clone() }).await.expect("listed");
    let feed: Feed = m.read(FEEDS_ADDRESS, "line-1-temp").expect("recorded");
    assert_eq!((feed.provider.as_str(), feed.listed), ("provider", true));

    // Another provider cannot take it over, or delist it.
    let mut takeover = f.clone();
    takeover.payout = AccountKey::of(&account()).to_hex();
    let err = ledger_refusal(m.provider("other", LedgerOp::ListFeed { feed: takeover }).await);
    assert!(matches!(err, LedgerError::NotProvider { .. }), "{err:?}");
    let err = ledger_refusal(m.provider("other", LedgerOp::DelistFeed { feed: f.id.clone() }).await);
    assert!(matches!(err, LedgerError::NotProvider { .. }), "{err:?}");

    // Bad listings are refused by name.
    type Change = fn(&mut FeedSpec);
    let changes: [(Change, &str); 7] = [
        (|s| s.id = "Bad Id".into(), "feed id"),
        (|s| s.prices.clear(), "at least one price"),
        (|s| s.prices[0].amount = 0, "above 0"),
        (|s| s.prefix = "/_kalima/klx".into(), "prefix"),
        (|s| s.licence = String::new(), "licence"),
        (|s| s.payout = "00".into(), "64 hex"),
        (|s| s.aggregation = Aggregation::Window { function: AggregateFn::Mean, window_secs: 0 }, "window_secs"),
    ];
    for (change, needle) in changes {
        let mut bad = f.clone();
        change(&mut bad);
        let err = ledger_refusal(m.provider("provider", LedgerOp::ListFeed { feed: bad }).await);
        assert!(matches!(&err, LedgerError::Invalid(msg) if msg.contains(needle)), "{needle}: {err:?}");
    }

    // An update keeps the first listing time; delisting marks it.
    let mut update = f.clone();
    update.title = "Line 1 temperatures (calibrated)".into();
    m.provider("provider", LedgerOp::ListFeed { feed: update }).await.expect("updated");
    let updated: Feed = m.read(FEEDS_ADDRESS, "line-1-temp").expect("recorded");
    assert_eq!(updated.listed_at_ms, feed.listed_at_ms);
    assert!(updated.spec.title.ends_with("(calibrated)"));
    m.provider("provider", LedgerOp::DelistFeed { feed: f.id.clone() }).await.expect("delisted");
    assert!(!m.read::<Feed>(FEEDS_ADDRESS, "line-1-temp").expect("recorded").listed);
}

#[tokio::test]
async fn a_purchase_pays_the_provider_minus_the_gas_split_and_extends_the_subscription() {
    let m = Market::start().await;
    let f = spec("line-1-temp", "/plant-1/line-1", &m.payout, 5 * KLX);
    m.provider("provider", LedgerOp::ListFeed { feed: f }).await.expect("listed");
    let buyer = AccountKey::of(&m.buyer).to_hex();
    let token = format!("{}.secret-1", subscription_id("line-1-temp", &buyer));

    // Not before the admin sets the economics.
    let err = ledger_refusal(m.b.holder(m.buy("line-1-temp", 2, 10 * KLX, 1, &token)).await);
    assert_eq!(err, LedgerError::MarketNotConfigured);
    let err = ledger_refusal(m.provider("provider", LedgerOp::ConfigureMarket { config: m.config() }).await);
    assert_eq!(err, LedgerError::AdminOnly);
    m.b.admin(LedgerOp::ConfigureMarket { config: m.config() }).await.expect("configured");

    // The wrong price, an unknown feed, a forged signature: refused, nothing moves.
    let err = ledger_refusal(m.b.holder(m.buy("line-1-temp", 2, 9 * KLX, 1, &token)).await);
    assert!(matches!(err, LedgerError::PriceMismatch { .. }), "{err:?}");
    let err = ledger_refusal(m.b.holder(m.buy("nope", 1, 5 * KLX, 1, &token)).await);
    assert!(matches!(err, LedgerError::UnknownFeed(_)), "{err:?}");
    let mut forged = SignedPurchase::sign(CHAIN, &m.buyer, "line-1-temp", Period::Day, 2, 10 * KLX, &token, 1);
    forged.count = 3;
    forged.amount = 15 * KLX;
    let err = ledger_refusal(m.b.holder(LedgerOp::Purchase(forged)).await);
    assert!(matches!(err, LedgerError::BadAccountSignature(_)), "{err:?}");
    let err = ledger_refusal(m.b.holder(m.buy("line-1-temp", 25, 125 * KLX, 1, &token)).await);
    assert!(matches!(&err, LedgerError::Invalid(msg) if msg.contains("count")), "{err:?}");
    assert_eq!(m.b.balance(&m.buyer), 100 * KLX);

    m.b.holder(m.buy("line-1-temp", 2, 10 * KLX, 1, &token)).await.expect("purchase");
    let st: Statement = m.read(STATEMENTS_ADDRESS, "provider").expect("statement");
    let s = &st.klx;
    // A purchase instruction is under 1 kB: one kB of gas, 0.25 KLX; 1% burned.
    assert_eq!(s.gas, KLX / 4);
    assert_eq!(s.burned, KLX / 400);
    let rest = s.gas - s.burned;
    assert_eq!((s.foundation, s.masters, s.dapp_fund), (rest / 5, rest / 5, rest - 2 * (rest / 5)));
    assert_eq!(m.b.balance(&m.buyer), 90 * KLX);
    assert_eq!(m.b.balance(&m.payout), 10 * KLX - KLX / 4);
    assert_eq!(m.b.balance(&m.foundation), s.foundation);
    assert_eq!(m.b.balance(&m.masters), s.masters);
    assert_eq!(m.b.balance(&m.dapp), s.dapp_fund);
    let supply = m.b.ledger().supply();
    assert_eq!(supply.fees_burned, s.burned);
    m.b.assert_conserved();

    let sub: Subscription =
        m.read(SUBSCRIPTIONS_ADDRESS, &subscription_id("line-1-temp", &buyer)).expect("subscription");
    assert!(sub.token_matches(&token) && !sub.token_matches("another"));
    let first_expiry = sub.expires_at_ms;

    // A replay of the same signed purchase is refused (nonce).
    let err = ledger_refusal(m.b.holder(m.buy("line-1-temp", 2, 10 * KLX, 1, &token)).await);
    assert!(matches!(err, LedgerError::BadNonce { .. }), "{err:?}");
    // A renewal extends from the current expiry and takes the new token.
    let token2 = format!("{}.secret-2", sub.id);
    m.b.holder(m.buy("line-1-temp", 1, 5 * KLX, 2, &token2)).await.expect("renewal");
    let sub: Subscription = m.read(SUBSCRIPTIONS_ADDRESS, &sub.id).expect("subscription");
    assert_eq!(sub.expires_at_ms, first_expiry + Period::Day.millis());
    assert_eq!(sub.purchases, 2);
    assert!(sub.token_matches(&token2) && !sub.token_matches(&token));
    let st: Statement = m.read(STATEMENTS_ADDRESS, "provider").expect("statement");
    assert_eq!((st.purchases, st.klx.gross), (2, 15 * KLX));
    assert_eq!(m.b.balance(&m.payout), st.klx.provider);

    // Not more than the buyer holds; not a delisted feed.
    let err = ledger_refusal(m.b.holder(m.buy("line-1-temp", 24, 120 * KLX, 3, &token2)).await);
    assert!(matches!(err, LedgerError::InsufficientFunds { .. }), "{err:?}");
    m.provider("provider", LedgerOp::DelistFeed { feed: "line-1-temp".into() }).await.expect("delisted");
    let err = ledger_refusal(m.b.holder(m.buy("line-1-temp", 1, 5 * KLX, 3, &token2)).await);
    assert!(matches!(err, LedgerError::UnknownFeed(_)), "{err:?}");
    m.b.assert_conserved();
    let report =
        kalima_core::verify::verify_chain(m.b.t.chain.store(), CHAIN, |_| {}).await.expect("the chain verifies");
    assert!(report.transactions > 20, "{report:?}");
}

#[tokio::test]
async fn a_settled_lightning_invoice_grants_its_period_once_and_only_when_fully_paid() {
    use kalima_core::ledger::market::{INVOICES_ADDRESS, InvoiceRecord, InvoiceSettled, PURCHASES_ADDRESS};
    use kalima_core::registry::NODE_DEVICE_ID;
    let m = Market::start().await;
    m.provider("provider", LedgerOp::ListFeed { feed: spec("line-1-temp", "/plant-1/line-1", &m.payout, 5 * KLX) })
        .await
        .expect("listed");
    m.b.admin(LedgerOp::ConfigureMarket { config: m.config() }).await.expect("configured");
    let hash = "ab".repeat(32);
    let token = "buyer-token";
    let invoice = InvoiceRecord {
        payment_hash: hash.clone(),
        payment_request: "lnbcrt5u1...".into(),
        feed: "line-1-temp".into(),
        period: Period::Hour,
        count: 2,
        buyer: "ln:alice".into(),
        token_hash: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes())),
        amount_msat: 1_000_000,
        expires_at_ms: i64::MAX,
        settled: None,
    };
    let record = kalima_core::tx::TxContent {
        device_id: NODE_DEVICE_ID.into(),
        address: INVOICES_ADDRESS.into(),
        key: hash.clone(),
        body: serde_json::to_vec(&invoice).expect("json"),
        ..Default::default()
    };
    m.b.t.chain.submit(vec![record], None).await.expect("invoice recorded");
    let settle = |paid: u64| {
        LedgerOp::SettleInvoice(InvoiceSettled { payment_hash: hash.clone(), settle_index: 7, amt_paid_msat: paid })
    };

    // Only the node reports settlements; an underpayment grants nothing.
    let err = ledger_refusal(m.provider("provider", settle(1_000_000)).await);
    assert!(matches!(&err, LedgerError::Invalid(msg) if msg.contains("only the node")), "{err:?}");
    let err = ledger_refusal(m.b.t.ledger(settle(999_000).instruction(NODE_DEVICE_ID, String::new())).await);
    assert!(matches!(&err, LedgerError::Invalid(msg) if msg.contains("paid")), "{err:?}");

    m.b.t.ledger(settle(1_000_000).instruction(NODE_DEVICE_ID, String::new())).await.expect("settled");
    let sub: Subscription =
        m.read(SUBSCRIPTIONS_ADDRESS, &subscription_id("line-1-temp", "ln:alice")).expect("subscription");
    assert!(sub.token_matches(token));
    assert_eq!(sub.purchases, 1);
    let inv: InvoiceRecord = m.read(INVOICES_ADDRESS, &hash).expect("invoice");
    assert_eq!(inv.settled.as_ref().map(|s| s.settle_index), Some(7));
    let st: Statement = m.read(STATEMENTS_ADDRESS, "provider").expect("statement");
    assert_eq!(st.sats.gross, 1_000);
    assert_eq!(st.sats.provider + st.sats.gas, 1_000);
    let p: kalima_core::ledger::market::PurchaseRecord = m.read(PURCHASES_ADDRESS, "provider").expect("purchase");
    assert_eq!(p.currency, Currency::Sats);

    // The same settlement seen again (a restart, another master) grants nothing more.
    let err = ledger_refusal(m.b.t.ledger(settle(1_000_000).instruction(NODE_DEVICE_ID, String::new())).await);
    assert_eq!(err, LedgerError::AlreadySettled(hash.clone()));
    let again: Subscription = m.read(SUBSCRIPTIONS_ADDRESS, &sub.id).expect("subscription");
    assert_eq!((again.expires_at_ms, again.purchases), (sub.expires_at_ms, 1));
    // A settlement of an invoice the node never issued is refused.
    let other =
        LedgerOp::SettleInvoice(InvoiceSettled { payment_hash: "cd".repeat(32), settle_index: 8, amt_paid_msat: 5 });
    let err = ledger_refusal(m.b.t.ledger(other.instruction(NODE_DEVICE_ID, String::new())).await);
    assert!(matches!(&err, LedgerError::Invalid(msg) if msg.contains("no invoice")), "{err:?}");
    m.b.assert_conserved();
    kalima_core::verify::verify_chain(m.b.t.chain.store(), CHAIN, |_| {}).await.expect("the chain verifies");
}
