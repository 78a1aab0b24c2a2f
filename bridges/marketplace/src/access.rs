//! Buyers' access tokens. A token is `<subscription id>.<secret>`, chosen by the buyer: the
//! purchase carries only its SHA-256, so the node never stores a usable token, and any master
//! checks it against the subscription recorded on the chain. Access ends with the period.

use kalima_core::Chain;
use kalima_core::ledger::market::{FEEDS_ADDRESS, Feed, SUBSCRIPTIONS_ADDRESS, Subscription, subscription_id};

use crate::error::{Error, Result};
use kalima_core::now_ms;

/// A buyer's checked access to one feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The subscription.
    pub subscription: Subscription,
    /// Its feed.
    pub feed: Feed,
}

/// A new random token for `buyer`'s subscription to `feed` (what a buyer's client makes
/// before signing a purchase with its hash).
pub fn new_token(feed: &str, buyer: &str) -> String {
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    format!("{}.{}", subscription_id(feed, buyer), hex::encode(secret))
}

/// Checks `token` against the chain: a current subscription whose token it is, to a listed feed.
pub fn authorize(chain: &Chain, token: &str) -> Result<Access> {
    let (id, secret) = token.split_once('.').ok_or(Error::MalformedToken)?;
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
        return Err(Error::MalformedToken);
    }
    let read = |address: &str, key: &str| chain.memcache().get(address, key).map(|c| c.tx.content.body.clone());
    let sub: Subscription = read(SUBSCRIPTIONS_ADDRESS, &id.to_ascii_lowercase())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Error::UnknownToken)?;
    if !sub.token_matches(token) {
        return Err(Error::UnknownToken);
    }
    let feed: Feed = read(FEEDS_ADDRESS, &sub.feed)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| Error::UnknownFeed(sub.feed.clone()))?;
    if !feed.listed {
        return Err(Error::Delisted(feed.spec.id));
    }
    if sub.expires_at_ms <= now_ms() {
        return Err(Error::Expired { feed: sub.feed.clone(), expired_at_ms: sub.expires_at_ms });
    }
    Ok(Access { subscription: sub, feed })
}

/// The marketplace's [`kalima_core::feeds::FeedGate`]: buyers log in to a front door with
/// their subscription id and access token and receive their feed.
pub struct MarketGate {
    chain: Chain,
    record_every: std::time::Duration,
}

impl MarketGate {
    /// A gate over `chain`, recording delivery batches every `record_every`.
    pub fn new(chain: Chain, record_every: std::time::Duration) -> Self {
        Self { chain, record_every }
    }

    fn access(&self, user: &str, password: &str) -> Option<Access> {
        let a = authorize(&self.chain, password).ok()?;
        (a.subscription.id == user.to_ascii_lowercase()).then_some(a)
    }
}

impl kalima_core::feeds::FeedGate for MarketGate {
    fn open(&self, user: &str, password: &str) -> Option<String> {
        self.access(user, password).map(|a| a.feed.spec.id)
    }

    fn follow(&self, user: &str, password: &str, channel: &'static str) -> Option<kalima_core::feeds::FeedReceiver> {
        let access = self.access(user, password)?;
        let mut stream = crate::delivery::follow(&self.chain, access, None, channel, self.record_every);
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let out = item.map(|d| {
                    let (address, key) = match &d {
                        crate::Delivered::Reading { reading, .. } => (reading.address.clone(), reading.key.clone()),
                        crate::Delivered::Aggregate { address, key, .. } => (address.clone(), key.clone()),
                    };
                    kalima_core::feeds::FeedItem { address, key, payload: serde_json::to_vec(&d).unwrap_or_default() }
                });
                let end = out.is_err();
                if tx.send(out).await.is_err() || end {
                    return;
                }
            }
        });
        Some(rx)
    }
}
