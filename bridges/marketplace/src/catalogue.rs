//! The catalogue buyers browse: listed feeds with filters, and each provider's reputation
//! computed from what the chain records of its sales and deliveries.

use std::collections::HashMap;

use kalima_core::Chain;
use kalima_core::ledger::market::{
    Currency, DELIVERIES_ADDRESS, FEEDS_ADDRESS, Feed, Period, STATEMENTS_ADDRESS, SUBSCRIPTIONS_ADDRESS, Statement,
    Subscription,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::delivery::DeliveryRecord;
use kalima_core::now_ms;

/// What buyers filter the catalogue by (all optional, combined with AND).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct FeedFilter {
    /// Feeds whose prefix lies under this address prefix (or covers it).
    pub prefix: Option<String>,
    /// One provider's feeds.
    pub provider: Option<String>,
    /// Feeds priced in this currency.
    pub currency: Option<Currency>,
    /// Feeds sold by this period.
    pub period: Option<Period>,
    /// Feeds with a price (in `currency`, per `period` when given) at most this.
    pub max_price: Option<u128>,
    /// Text searched in the id, title and description (case-insensitive).
    pub q: Option<String>,
    /// Include delisted feeds.
    pub include_delisted: bool,
}

/// A provider's track record, from the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Reputation {
    /// Purchases and renewals of the provider's feeds.
    pub purchases: u64,
    /// Subscriptions renewed at least once.
    pub renewed_subscriptions: u64,
    /// Subscriptions still running.
    pub active_subscriptions: u64,
    /// Readings delivered to buyers, as recorded on the chain.
    pub readings_delivered: u64,
    /// Feeds listed now.
    pub listed_feeds: u64,
}

/// A feed as the catalogue shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FeedView {
    /// The feed.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub feed: Feed,
    /// Its provider's reputation.
    pub reputation: Reputation,
    /// The transaction that recorded the feed as it is now (for its proof).
    pub tx_id: String,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
    serde_json::from_slice(body).ok()
}

/// Every provider's reputation.
fn reputations(chain: &Chain, feeds: &[Feed]) -> HashMap<String, Reputation> {
    let mut out: HashMap<String, Reputation> = HashMap::new();
    let provider_of: HashMap<&str, &str> = feeds.iter().map(|f| (f.spec.id.as_str(), f.provider.as_str())).collect();
    let listed: std::collections::HashSet<&str> =
        feeds.iter().filter(|f| f.listed).map(|f| f.spec.id.as_str()).collect();
    for f in feeds.iter().filter(|f| f.listed) {
        out.entry(f.provider.clone()).or_default().listed_feeds += 1;
    }
    for c in chain.memcache().values(STATEMENTS_ADDRESS) {
        if let Some(s) = parse::<Statement>(&c.tx.content.body) {
            out.entry(c.tx.content.key.clone()).or_default().purchases = s.purchases;
        }
    }
    let now = now_ms();
    for c in chain.memcache().values(SUBSCRIPTIONS_ADDRESS) {
        let Some(s) = parse::<Subscription>(&c.tx.content.body) else { continue };
        let Some(p) = provider_of.get(s.feed.as_str()) else { continue };
        let r = out.entry((*p).to_string()).or_default();
        r.renewed_subscriptions += u64::from(s.purchases > 1);
        // A delisted feed's subscriptions no longer give access.
        r.active_subscriptions += u64::from(s.expires_at_ms > now && listed.contains(s.feed.as_str()));
    }
    for c in chain.memcache().values(DELIVERIES_ADDRESS) {
        let Some(d) = parse::<DeliveryRecord>(&c.tx.content.body) else { continue };
        if let Some(p) = provider_of.get(d.feed.as_str()) {
            out.entry((*p).to_string()).or_default().readings_delivered += d.total_readings;
        }
    }
    out
}

fn all_feeds(chain: &Chain) -> Vec<(Feed, String)> {
    chain
        .memcache()
        .values(FEEDS_ADDRESS)
        .iter()
        .filter_map(|c| parse::<Feed>(&c.tx.content.body).map(|f| (f, hex::encode(c.id))))
        .collect()
}

fn matches(f: &Feed, filter: &FeedFilter) -> bool {
    if !f.listed && !filter.include_delisted {
        return false;
    }
    if let Some(p) = &filter.prefix
        && !kalima_core::tx::prefix_matches(p, &f.spec.prefix)
        && !kalima_core::tx::prefix_matches(&f.spec.prefix, p)
    {
        return false;
    }
    if filter.provider.as_ref().is_some_and(|p| *p != f.provider) {
        return false;
    }
    let priced = f.spec.prices.iter().any(|p| {
        filter.currency.is_none_or(|c| c == p.currency)
            && filter.period.is_none_or(|x| x == p.period)
            && filter.max_price.is_none_or(|m| p.amount <= m)
    });
    if !priced {
        return false;
    }
    if let Some(q) = &filter.q {
        let q = q.to_lowercase();
        let hay = format!("{} {} {}", f.spec.id, f.spec.title, f.spec.description).to_lowercase();
        if !hay.contains(&q) {
            return false;
        }
    }
    true
}

/// The feeds matching `filter`, by id.
pub fn catalogue(chain: &Chain, filter: &FeedFilter) -> Vec<FeedView> {
    let feeds = all_feeds(chain);
    let plain: Vec<Feed> = feeds.iter().map(|(f, _)| f.clone()).collect();
    let reps = reputations(chain, &plain);
    let mut out: Vec<FeedView> = feeds
        .into_iter()
        .filter(|(f, _)| matches(f, filter))
        .map(|(feed, tx_id)| FeedView {
            reputation: reps.get(&feed.provider).cloned().unwrap_or_default(),
            feed,
            tx_id,
        })
        .collect();
    out.sort_by(|a, b| a.feed.spec.id.cmp(&b.feed.spec.id));
    out
}

/// One feed (listed or not), with its provider's reputation.
pub fn feed_view(chain: &Chain, id: &str) -> Option<FeedView> {
    let c = chain.memcache().get(FEEDS_ADDRESS, id)?;
    let feed: Feed = parse(&c.tx.content.body)?;
    let plain: Vec<Feed> = all_feeds(chain).into_iter().map(|(f, _)| f).collect();
    let reputation = reputations(chain, &plain).remove(&feed.provider).unwrap_or_default();
    Some(FeedView { feed, reputation, tx_id: hex::encode(c.id) })
}
