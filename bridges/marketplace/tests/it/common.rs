//! The harness: a chain whose one-relayer bridge funds buyers in KLX, with the market's
//! economics set by the admin; a provider allowed to write (and so to sell) `/plant-1`, a rival
//! provider on `/plant-2`, and a sensor writing readings under both. Buyers pay for feeds with
//! signed purchases carried by a wallet device, as the ledger API does, and every check of a
//! delivered reading is the one a buyer would make with nothing but the reading.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::SigningKey;
use kalima_core::keys::NodeKey;
use kalima_core::ledger::market::{
    AggregateFn, Aggregation, Currency, FEEDS_ADDRESS, Feed, FeedSpec, MarketConfig, Period, Price,
    SUBSCRIPTIONS_ADDRESS, SignedPurchase, Subscription,
};
use kalima_core::ledger::{AccountKey, BridgeChain, Deposit, KLX, Ledger, LedgerOp, Relayer, relayer_instruction};
use kalima_core::merkle::leaf_hash;
use kalima_core::registry::ADMIN_ID;
use kalima_core::testing::TestChain;
use kalima_core::tx::{Transaction, TxContent};
use kalima_core::{CommittedTx, Receipt};
use kalima_marketplace::delivery::EndReason;
use kalima_marketplace::{Access, Delivered, FeedStream, Source, authorize, new_token};

/// Chain name (purchases are signed for it).
pub(crate) const CHAIN: &str = "marketplace-it";
/// The provider selling `/plant-1`.
pub(crate) const PROVIDER: &str = "provider";
/// Another provider, selling `/plant-2`.
pub(crate) const RIVAL: &str = "rival";
/// The device writing readings.
pub(crate) const SENSOR: &str = "sensor";
/// The device that carries buyers' signed purchases.
const WALLET: &str = "wallet";
const RELAYER: &str = "relayer-0";
const TOKEN_CONTRACT: &str = "0x5fbdb2315678afecb367f032d93f642f64180aa3";
const BRIDGE_CONTRACT: &str = "0xe7f1725e7734ce288f8367e1bb143e90bb3f0512";

/// Price of an hour of every feed [`spec`] makes, in KLX base units.
pub(crate) const HOURLY: u128 = KLX;

/// A safety net only: every wait is for a signal, and this bounds a hang.
pub(crate) const SAFETY_NET: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test if it hangs.
pub(crate) async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(SAFETY_NET, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: still waiting after {SAFETY_NET:?}"),
    }
}

/// A buyer's KLX account.
pub(crate) struct Buyer {
    pub(crate) key: SigningKey,
    /// The account (64 hex), as subscriptions name it.
    pub(crate) account: String,
}

/// A buyer's paid subscription: the token it chose and the access it checks out to.
pub(crate) struct Subscribed {
    pub(crate) buyer: Buyer,
    pub(crate) token: String,
    pub(crate) access: Access,
}

impl Subscribed {
    pub(crate) fn id(&self) -> &str {
        &self.access.subscription.id
    }
}

pub(crate) struct Market {
    pub(crate) t: TestChain,
    relayer: NodeKey,
    deposits: AtomicU64,
    idem: AtomicU64,
    /// Where providers are paid.
    pub(crate) payout: String,
}

/// A raw feed of `prefix` (`keys` empty: every key) sold by the hour in KLX and by the day in sats.
pub(crate) fn spec(id: &str, prefix: &str, keys: &[&str], payout: &str) -> FeedSpec {
    FeedSpec {
        id: id.into(),
        title: format!("Readings of {prefix}"),
        description: String::new(),
        prefix: prefix.into(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        aggregation: Aggregation::Raw,
        prices: vec![
            Price { period: Period::Hour, currency: Currency::Klx, amount: HOURLY },
            Price { period: Period::Day, currency: Currency::Sats, amount: 500 },
        ],
        licence: "Internal use only".into(),
        sample: serde_json::json!(21.5),
        payout: payout.into(),
    }
}

/// The same feed with one aggregate per key and `window_secs` window.
pub(crate) fn windowed(mut s: FeedSpec, function: AggregateFn, window_secs: u32) -> FeedSpec {
    s.aggregation = Aggregation::Window { function, window_secs };
    s
}

impl Market {
    pub(crate) async fn start() -> Market {
        let t = TestChain::start(CHAIN).await;
        let relayer = t.register_signing(RELAYER).await;
        t.register(WALLET, &[]).await;
        t.register(PROVIDER, &[("/plant-1", true, true)]).await;
        t.register(RIVAL, &[("/plant-2", true, true)]).await;
        t.register(SENSOR, &[("/plant-1", true, true), ("/plant-2", true, true)]).await;
        let account = || AccountKey::of(&SigningKey::generate(&mut rand::rngs::OsRng)).to_hex();
        let m = Market { t, relayer, deposits: AtomicU64::new(0), idem: AtomicU64::new(0), payout: account() };
        let bridge = BridgeChain {
            chain_id: 31337,
            bridge: BRIDGE_CONTRACT.into(),
            token: TOKEN_CONTRACT.into(),
            relayers: vec![Relayer { device: RELAYER.into(), eth_address: format!("0x{:040x}", 1) }],
            threshold: 1,
            release_ttl_secs: 3600,
            max_withdrawal: 1_000 * KLX,
        };
        m.admin(LedgerOp::ConfigureBridge { name: "eth".into(), config: bridge }).await;
        let economics = MarketConfig {
            gas_micro_eur_per_kb: 250,
            klx_per_eur: 1000 * KLX,
            sats_per_eur: 1000,
            burn_bps: 100,
            foundation: account(),
            masters: account(),
            dapp_fund: account(),
        };
        m.admin(LedgerOp::ConfigureMarket { config: economics }).await;
        m
    }

    async fn admin(&self, op: LedgerOp) {
        let what = format!("{op:?}");
        self.t.ledger(op.instruction(ADMIN_ID, String::new())).await.unwrap_or_else(|e| panic!("{what}: {e:#}"));
    }

    /// A new buyer holding 100 KLX, minted from a deposit the relayer attests.
    pub(crate) async fn buyer(&self) -> Buyer {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let account = AccountKey::of(&key).to_hex();
        let nonce = self.deposits.fetch_add(1, Ordering::Relaxed);
        let deposit = Deposit {
            nonce,
            tx_hash: format!("0x{:064x}", 0xabc0 + nonce),
            log_index: 3,
            block_number: 100 + nonce,
            from: "0x70997970c51812dc3a010c7d01b50e0d17dc79c8".into(),
            recipient: account.clone(),
            amount: 100 * KLX,
            token: TOKEN_CONTRACT.into(),
        };
        let op = LedgerOp::AttestDeposit { chain: "eth".into(), deposit };
        let idem = format!("k{}", self.idem.fetch_add(1, Ordering::Relaxed));
        self.t.ledger(relayer_instruction(CHAIN, &op, RELAYER, idem, &self.relayer)).await.expect("deposit attested");
        assert_eq!(Ledger::new(self.t.chain.memcache()).account(&AccountKey::of(&key)).balance, 100 * KLX);
        Buyer { key, account }
    }

    /// Lists (or updates) a feed as `provider`.
    pub(crate) async fn list(&self, provider: &str, spec: FeedSpec) {
        let id = spec.id.clone();
        let op = LedgerOp::ListFeed { feed: spec };
        self.t.ledger(op.instruction(provider, String::new())).await.unwrap_or_else(|e| panic!("list {id}: {e:#}"));
    }

    /// Delists a feed as `provider`.
    pub(crate) async fn delist(&self, provider: &str, feed: &str) {
        let op = LedgerOp::DelistFeed { feed: feed.into() };
        self.t.ledger(op.instruction(provider, String::new())).await.unwrap_or_else(|e| panic!("delist {feed}: {e:#}"));
    }

    pub(crate) fn feed(&self, id: &str) -> Feed {
        self.read(FEEDS_ADDRESS, id).unwrap_or_else(|| panic!("feed {id} is not recorded"))
    }

    /// `buyer` buys `hours` hours of `feed` for `token` and returns its subscription.
    pub(crate) async fn buy(&self, buyer: &Buyer, feed: &str, hours: u32, token: &str) -> Subscription {
        let price = self.feed(feed).price(Period::Hour, Currency::Klx).expect("an hourly KLX price");
        let nonce = Ledger::new(self.t.chain.memcache()).account(&AccountKey::of(&buyer.key)).nonce + 1;
        let p =
            SignedPurchase::sign(CHAIN, &buyer.key, feed, Period::Hour, hours, price * u128::from(hours), token, nonce);
        let op = LedgerOp::Purchase(p);
        self.t.ledger(op.instruction(WALLET, String::new())).await.unwrap_or_else(|e| panic!("buy {feed}: {e:#}"));
        let id = kalima_core::ledger::market::subscription_id(feed, &buyer.account);
        self.read(SUBSCRIPTIONS_ADDRESS, &id).expect("the purchase records the subscription")
    }

    /// A new buyer's hour of `feed`, with a fresh token, checked out to its access.
    pub(crate) async fn subscribe(&self, feed: &str) -> Subscribed {
        let buyer = self.buyer().await;
        let token = new_token(feed, &buyer.account);
        self.buy(&buyer, feed, 1, &token).await;
        let access = authorize(&self.t.chain, &token).expect("a fresh purchase authorizes its token");
        Subscribed { buyer, token, access }
    }

    /// Writes readings as the sensor, one commit; their receipts.
    pub(crate) async fn write_all(&self, items: &[(&str, &str, &str)]) -> Vec<Receipt> {
        let dev = self.t.device(SENSOR);
        let contents = items
            .iter()
            .map(|(address, key, body)| TxContent {
                device_id: dev.id.clone(),
                address: (*address).into(),
                key: (*key).into(),
                body: body.as_bytes().to_vec(),
                ..TxContent::default()
            })
            .collect();
        let receipts = self.t.ingest.write("test", &dev, contents).await.expect("write").into_receipts();
        assert_eq!(receipts.len(), items.len(), "committed, one receipt each");
        receipts
    }

    /// Writes one reading as the sensor; its receipt.
    pub(crate) async fn write(&self, address: &str, key: &str, body: &str) -> Receipt {
        self.write_all(&[(address, key, body)]).await.remove(0)
    }

    /// The committed transaction at `global_sequence`.
    pub(crate) async fn tx(&self, global_sequence: u64) -> CommittedTx {
        let mut txs = self.t.chain.store().txs_between(global_sequence, global_sequence + 1, 1).await.expect("read");
        txs.pop().unwrap_or_else(|| panic!("no transaction {global_sequence}"))
    }

    pub(crate) fn read<T: serde::de::DeserializeOwned>(&self, address: &str, key: &str) -> Option<T> {
        let c = self.t.chain.memcache().get(address, key)?;
        serde_json::from_slice(&c.tx.content.body).ok()
    }
}

/// The next delivery of a stream, which must not end.
pub(crate) async fn next(stream: &mut FeedStream, what: &str) -> Delivered {
    match within(what, stream.next()).await {
        Some(Ok(d)) => d,
        Some(Err(reason)) => panic!("{what}: the stream ended: {reason}"),
        None => panic!("{what}: the stream closed without a reason"),
    }
}

/// The next delivered reading of a raw stream.
pub(crate) async fn next_reading(stream: &mut FeedStream, what: &str) -> Source {
    match next(stream, what).await {
        Delivered::Reading { reading, .. } => reading,
        other => panic!("{what}: expected a reading, got {other:?}"),
    }
}

/// Why a stream ended, with the deliveries it made before.
pub(crate) async fn end(stream: &mut FeedStream, what: &str) -> (Vec<Delivered>, EndReason) {
    let mut before = Vec::new();
    loop {
        match within(what, stream.next()).await {
            Some(Ok(d)) => before.push(d),
            Some(Err(reason)) => {
                assert!(within(what, stream.next()).await.is_none(), "{what}: nothing follows the end");
                return (before, reason);
            }
            None => panic!("{what}: the stream closed without a reason"),
        }
    }
}

/// What a buyer checks of a delivered reading, with nothing but the reading: the bytes hash to
/// the id, the proof verifies and proves that id at its sequence, and the decoded transaction
/// says what the delivery says. Returns the decoded transaction.
pub(crate) fn check_source(s: &Source) -> Transaction {
    let bytes = B64.decode(&s.tx_bytes).expect("tx_bytes is base64");
    assert_eq!(hex::encode(leaf_hash(&bytes)), s.id, "SHA-256(0x00 || tx_bytes) is the id");
    assert!(s.proof.verify(), "the inclusion proof of {} verifies", s.id);
    assert_eq!(s.proof.leaf_hash, s.id, "the proof is of this transaction");
    assert_eq!(s.proof.leaf_index, s.global_sequence, "the proof is at its sequence");
    assert!(s.proof.tree_size > s.global_sequence);
    let tx = Transaction::decode(&bytes).expect("tx_bytes decode");
    assert_eq!(tx.global_sequence, s.global_sequence);
    assert_eq!(tx.timestamp_ms, s.timestamp_ms);
    assert_eq!((tx.content.address.as_str(), tx.content.key.as_str()), (s.address.as_str(), s.key.as_str()));
    assert_eq!(s.value, serde_json::from_slice::<serde_json::Value>(&tx.content.body).ok(), "value is the body");
    tx
}

/// Checks `s` (as [`check_source`]) and that it is the reading of `receipt`, `address`/`key` = `body`.
pub(crate) fn check_reading(s: &Source, receipt: &Receipt, address: &str, key: &str, body: &str) {
    let tx = check_source(s);
    assert_eq!(s.id, hex::encode(receipt.id), "delivered {}/{} is the committed one", s.address, s.key);
    assert_eq!(s.global_sequence, receipt.global_sequence);
    assert_eq!((tx.content.address.as_str(), tx.content.key.as_str()), (address, key));
    assert_eq!(tx.content.body, body.as_bytes(), "{address}/{key}");
    assert_eq!(tx.content.device_id, SENSOR);
}

/// Wall-clock time (ms), the clock the node stamps commits and checks expiries with.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_millis() as i64
}

/// Rewrites a subscription's expiry as the node would see it once its period is over: the
/// ledger sells whole hours only, so a test cannot wait for one to run out.
pub(crate) async fn expire_at(m: &Market, sub: &Subscription, expires_at_ms: i64) {
    let s = Subscription { expires_at_ms, ..sub.clone() };
    let content = TxContent {
        device_id: kalima_core::registry::NODE_DEVICE_ID.into(),
        address: SUBSCRIPTIONS_ADDRESS.into(),
        key: s.id.clone(),
        body: serde_json::to_vec(&s).expect("json"),
        ..TxContent::default()
    };
    m.t.chain.submit(vec![content], None).await.expect("subscription rewritten");
}

/// Waits until `check` holds, polling; panics with `what` and the last state after the safety net.
pub(crate) async fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>, describe: impl Fn() -> String) -> T {
    kalima_core::testing::wait_for(SAFETY_NET, what, check, describe).await
}
