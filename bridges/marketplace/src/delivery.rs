//! Delivering a feed to a buyer: the feed's readings as they commit (after a replay from a
//! given sequence), or one aggregate per key and window, each reading with its canonical
//! bytes and inclusion proof so the buyer can check it (and later get a receipt to an
//! anchored checkpoint). The stream ends when the subscription expires (unless renewed),
//! the feed is delisted or the buyer falls behind. What was delivered is recorded on the
//! chain in batches, per subscription, with running totals.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kalima_core::ledger::market::{
    AggregateFn, Aggregation, DELIVERIES_ADDRESS, FEEDS_ADDRESS, Feed, SUBSCRIPTIONS_ADDRESS, Subscription,
};
use kalima_core::merkle::InclusionProof;
use kalima_core::registry::NODE_DEVICE_ID;
use kalima_core::tx::{TxContent, TxKind};
use kalima_core::{Chain, CommittedTx};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::ToSchema;

use crate::access::Access;
use kalima_core::now_ms;

/// Items buffered per buyer before it counts as too slow and is cut off.
const BUFFER: usize = 4096;
/// Transactions replayed per store read.
const REPLAY_PAGE: u32 = 1000;
/// Most source readings carried (with proofs) by one aggregate; the count covers all.
pub const MAX_AGGREGATE_SOURCES: usize = 100;

/// One reading as delivered: its bytes, its proof, and the decoded fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Source {
    /// Transaction id (hex).
    pub id: String,
    /// Its global sequence (the Merkle leaf index).
    pub global_sequence: u64,
    /// Address.
    pub address: String,
    /// Key.
    pub key: String,
    /// Commit time (ms).
    pub timestamp_ms: i64,
    /// The body as JSON, when it is JSON.
    pub value: Option<serde_json::Value>,
    /// Canonical transaction bytes (base64): SHA-256(0x00 || bytes) is `id`.
    pub tx_bytes: String,
    /// Inclusion proof in the tree at delivery time.
    #[schema(value_type = Object)]
    pub proof: InclusionProof,
}

/// What a buyer receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Delivered {
    /// One reading (raw feeds).
    Reading {
        /// Feed id.
        feed: String,
        /// The reading.
        reading: Source,
    },
    /// One window's aggregate of a key (aggregated feeds).
    Aggregate {
        /// Feed id.
        feed: String,
        /// Address.
        address: String,
        /// Key.
        key: String,
        /// Function applied.
        function: AggregateFn,
        /// Window start (ms, inclusive).
        window_start_ms: i64,
        /// Window end (ms, exclusive).
        window_end_ms: i64,
        /// The aggregate.
        value: f64,
        /// Numeric readings in the window.
        count: u64,
        /// The readings it was computed from, with proofs (at most 100; `count` covers all).
        sources: Vec<Source>,
    },
}

impl Delivered {
    /// Idempotency id of the delivery (stable across retries and resumes).
    pub fn delivery_id(&self, subscription: &str) -> String {
        match self {
            Delivered::Reading { reading, .. } => format!("{subscription}:{}", reading.id),
            Delivered::Aggregate { address, key, window_start_ms, .. } => {
                format!("{subscription}:{address}:{key}:{window_start_ms}")
            }
        }
    }

    /// The highest global sequence this delivery covers (what a buyer resumes after).
    pub fn last_sequence(&self) -> u64 {
        match self {
            Delivered::Reading { reading, .. } => reading.global_sequence,
            Delivered::Aggregate { sources, .. } => sources.iter().map(|s| s.global_sequence).max().unwrap_or(0),
        }
    }
}

/// A batch of deliveries to one subscription, recorded on the chain (running totals).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryRecord {
    /// Subscription id.
    pub subscription: String,
    /// Feed id.
    pub feed: String,
    /// Channel: `sse`, `ws`, `mqtt` or `webhook`.
    pub channel: String,
    /// Readings delivered in this batch (raw, or sources of aggregates).
    pub readings: u64,
    /// Items delivered in this batch.
    pub items: u64,
    /// Highest global sequence delivered in this batch.
    pub last_sequence: u64,
    /// Readings delivered to this subscription so far.
    pub total_readings: u64,
    /// Items delivered to this subscription so far.
    pub total_items: u64,
}

/// Why a feed stream ended.
pub type EndReason = &'static str;

/// A buyer's live feed.
pub struct FeedStream {
    rx: mpsc::Receiver<Result<Delivered, EndReason>>,
}

impl FeedStream {
    /// The next delivery, or why the stream ended (`None` once the end was returned).
    pub async fn next(&mut self) -> Option<Result<Delivered, EndReason>> {
        self.rx.recv().await
    }
}

async fn source(chain: &Chain, c: &CommittedTx) -> Option<Source> {
    let proof = chain.inclusion_proof(c.tx.global_sequence, None).await.ok()?;
    let content = &c.tx.content;
    Some(Source {
        id: hex::encode(c.id),
        global_sequence: c.tx.global_sequence,
        address: content.address.clone(),
        key: content.key.clone(),
        timestamp_ms: c.tx.timestamp_ms,
        value: serde_json::from_slice(&content.body).ok(),
        tx_bytes: B64.encode(c.tx.encode()),
        proof,
    })
}

fn number(body: &[u8]) -> Option<f64> {
    match serde_json::from_slice::<serde_json::Value>(body).ok()? {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        serde_json::Value::Object(o) => o.get("value").and_then(serde_json::Value::as_f64),
        _ => None,
    }
}

/// The readings of one key in the current window.
struct Window {
    start_ms: i64,
    values: Vec<f64>,
    sources: Vec<Arc<CommittedTx>>,
    count: u64,
}

impl Window {
    fn value(&self, f: AggregateFn) -> Option<f64> {
        let v = &self.values;
        match f {
            AggregateFn::Min => v.iter().copied().reduce(f64::min),
            AggregateFn::Max => v.iter().copied().reduce(f64::max),
            AggregateFn::Mean => (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64),
            AggregateFn::Last => v.last().copied(),
        }
    }
}

/// Batches deliveries into chain records.
struct Recorder {
    chain: Chain,
    record: DeliveryRecord,
    every: Duration,
    last_flush: tokio::time::Instant,
    /// Held from reading the subscription's totals to committing the new ones: several streams
    /// of one subscription (a buyer on two channels) would otherwise each add its batch to the
    /// same prior totals, and all but one batch would be lost.
    lock: Arc<tokio::sync::Mutex<()>>,
}

/// The lock of each subscription's delivery record, shared by its streams in this process.
fn record_lock(subscription: &str) -> Arc<tokio::sync::Mutex<()>> {
    type Locks = std::collections::HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>;
    static LOCKS: std::sync::LazyLock<std::sync::Mutex<Locks>> = std::sync::LazyLock::new(Default::default);
    let mut locks = LOCKS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(lock) = locks.get(subscription).and_then(std::sync::Weak::upgrade) {
        return lock;
    }
    // Subscriptions without a stream left drop out here, so the map stays as small as the
    // set of streamed subscriptions.
    locks.retain(|_, l| l.strong_count() > 0);
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    locks.insert(subscription.to_string(), Arc::downgrade(&lock));
    lock
}

impl Recorder {
    fn count(&mut self, d: &Delivered) {
        self.record.items += 1;
        self.record.readings += match d {
            Delivered::Reading { .. } => 1,
            Delivered::Aggregate { count, .. } => *count,
        };
        self.record.last_sequence = self.record.last_sequence.max(d.last_sequence());
    }

    async fn flush(&mut self, force: bool) {
        if self.record.items == 0 || (!force && self.last_flush.elapsed() < self.every) {
            return;
        }
        self.last_flush = tokio::time::Instant::now();
        let _serial = self.lock.lock().await;
        let sub = self.record.subscription.clone();
        let prior: DeliveryRecord = self
            .chain
            .memcache()
            .get(DELIVERIES_ADDRESS, &sub)
            .and_then(|c| serde_json::from_slice(&c.tx.content.body).ok())
            .unwrap_or_default();
        let mut r = self.record.clone();
        r.total_readings = prior.total_readings + r.readings;
        r.total_items = prior.total_items + r.items;
        let content = TxContent {
            device_id: NODE_DEVICE_ID.into(),
            address: DELIVERIES_ADDRESS.into(),
            key: sub,
            body: serde_json::to_vec(&r).unwrap_or_default(),
            ..TxContent::default()
        };
        match self.chain.submit(vec![content], None).await {
            Ok(_) => {
                self.record.items = 0;
                self.record.readings = 0;
            }
            // Kept for the next flush: the totals stay right, only later.
            Err(e) => tracing::warn!(target: "bridge::marketplace", error = %e, "Recording deliveries failed."),
        }
    }
}

/// Follows `access`'s feed for a buyer over `channel`: replays the feed's readings after
/// global sequence `after` (raw feeds), then delivers live ones until the subscription
/// ends. Delivery batches are recorded on the chain every `record_every`.
pub fn follow(
    chain: &Chain,
    access: Access,
    after: Option<u64>,
    channel: &'static str,
    record_every: Duration,
) -> FeedStream {
    let (tx, rx) = mpsc::channel(BUFFER);
    let mut bus = chain.bus().subscribe();
    let chain = chain.clone();
    tokio::spawn(async move {
        let Access { mut subscription, mut feed } = access;
        let sub_id = subscription.id.clone();
        let mut rec = Recorder {
            chain: chain.clone(),
            record: DeliveryRecord {
                subscription: sub_id.clone(),
                feed: feed.spec.id.clone(),
                channel: channel.into(),
                ..DeliveryRecord::default()
            },
            every: record_every,
            last_flush: tokio::time::Instant::now(),
            lock: record_lock(&sub_id),
        };
        metrics::gauge!("kalima_market_streams", "channel" => channel).increment(1.0);
        let reason = run(&chain, &tx, &mut bus, &mut subscription, &mut feed, after, &mut rec).await;
        rec.flush(true).await;
        metrics::gauge!("kalima_market_streams", "channel" => channel).decrement(1.0);
        metrics::counter!("kalima_market_streams_ended_total", "reason" => reason).increment(1);
        let _ = tx.try_send(Err(reason));
    });
    FeedStream { rx }
}

async fn send(
    tx: &mpsc::Sender<Result<Delivered, EndReason>>,
    rec: &mut Recorder,
    d: Delivered,
) -> Result<(), EndReason> {
    // The last slot is kept for the end, so a buyer cut off for being slow is told why.
    if tx.capacity() <= 1 && !tx.is_closed() {
        return Err("slow_client");
    }
    let permit = match tx.try_reserve() {
        Ok(p) => p,
        Err(mpsc::error::TrySendError::Full(())) => return Err("slow_client"),
        Err(mpsc::error::TrySendError::Closed(())) => return Err("closed"),
    };
    // Counted (and so recorded) only when it is handed to the buyer.
    rec.count(&d);
    permit.send(Ok(d));
    metrics::counter!("kalima_market_delivered_total", "channel" => rec.record.channel.clone()).increment(1);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run(
    chain: &Chain,
    tx: &mpsc::Sender<Result<Delivered, EndReason>>,
    bus: &mut kalima_core::bus::Subscription,
    sub: &mut Subscription,
    feed: &mut Feed,
    after: Option<u64>,
    rec: &mut Recorder,
) -> EndReason {
    let mut next = 0u64;
    if let (Some(after), Aggregation::Raw) = (after, feed.spec.aggregation) {
        next = after.saturating_add(1);
        let end = chain.tree_size();
        while next < end {
            let page = match chain.store().txs_between(next, end, REPLAY_PAGE).await {
                Ok(p) if !p.is_empty() => p,
                _ => return "replay_failed",
            };
            for c in page {
                next = c.tx.global_sequence + 1;
                if wanted(feed, &c) {
                    let Some(s) = source(chain, &c).await else { return "proof_failed" };
                    if let Err(r) = send(tx, rec, Delivered::Reading { feed: feed.spec.id.clone(), reading: s }).await {
                        return r;
                    }
                }
            }
        }
    }
    let mut windows: BTreeMap<(String, String), Window> = BTreeMap::new();
    loop {
        let until_expiry = Duration::from_millis((sub.expires_at_ms - now_ms()).max(0) as u64);
        let tick = match feed.spec.aggregation {
            Aggregation::Window { .. } => Duration::from_millis(200),
            Aggregation::Raw => Duration::from_secs(1),
        };
        let batch = tokio::select! {
            _ = tx.closed() => return "closed",
            _ = tokio::time::sleep(until_expiry.min(tick)) => None,
            b = bus.next() => match b {
                Ok(b) => Some(b),
                Err(end) => return end.label(),
            },
        };
        // Renewals and delisting show on the chain: read them back before going on.
        if let Some(s) = read(chain, SUBSCRIPTIONS_ADDRESS, &sub.id) {
            *sub = s;
        }
        if let Some(f) = read::<Feed>(chain, FEEDS_ADDRESS, &feed.spec.id) {
            if !f.listed {
                return "delisted";
            }
            *feed = f;
        }
        if sub.expires_at_ms <= now_ms() {
            return "expired";
        }
        if let Some(batch) = batch {
            for c in batch.iter() {
                if c.tx.global_sequence < next || !wanted(feed, c) {
                    continue;
                }
                match feed.spec.aggregation {
                    Aggregation::Raw => {
                        let Some(s) = source(chain, c).await else { return "proof_failed" };
                        if let Err(r) =
                            send(tx, rec, Delivered::Reading { feed: feed.spec.id.clone(), reading: s }).await
                        {
                            return r;
                        }
                    }
                    Aggregation::Window { function, window_secs } => {
                        let len = i64::from(window_secs) * 1000;
                        let start = c.tx.timestamp_ms.div_euclid(len) * len;
                        let slot = (c.tx.content.address.clone(), c.tx.content.key.clone());
                        if windows.get(&slot).is_some_and(|w| w.start_ms != start)
                            && let Some(w) = windows.remove(&slot)
                            && let Err(r) = emit(chain, tx, rec, feed, &slot, w, function, len).await
                        {
                            return r;
                        }
                        let w = windows.entry(slot).or_insert(Window {
                            start_ms: start,
                            values: Vec::new(),
                            sources: Vec::new(),
                            count: 0,
                        });
                        if let Some(v) = number(&c.tx.content.body) {
                            w.values.push(v);
                            w.count += 1;
                            if w.sources.len() < MAX_AGGREGATE_SOURCES {
                                w.sources.push(c.clone());
                            }
                        }
                    }
                }
            }
        }
        // Windows whose end has passed are delivered without waiting for the next reading.
        if let Aggregation::Window { function, window_secs } = feed.spec.aggregation {
            let len = i64::from(window_secs) * 1000;
            let now = now_ms();
            let closed: Vec<(String, String)> =
                windows.iter().filter(|(_, w)| w.start_ms + len <= now).map(|(k, _)| k.clone()).collect();
            for slot in closed {
                if let Some(w) = windows.remove(&slot)
                    && let Err(r) = emit(chain, tx, rec, feed, &slot, w, function, len).await
                {
                    return r;
                }
            }
        }
        rec.flush(false).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn emit(
    chain: &Chain,
    tx: &mpsc::Sender<Result<Delivered, EndReason>>,
    rec: &mut Recorder,
    feed: &Feed,
    slot: &(String, String),
    w: Window,
    function: AggregateFn,
    len: i64,
) -> Result<(), EndReason> {
    let Some(value) = w.value(function) else { return Ok(()) };
    let mut sources = Vec::with_capacity(w.sources.len());
    for c in &w.sources {
        sources.push(source(chain, c).await.ok_or("proof_failed")?);
    }
    let d = Delivered::Aggregate {
        feed: feed.spec.id.clone(),
        address: slot.0.clone(),
        key: slot.1.clone(),
        function,
        window_start_ms: w.start_ms,
        window_end_ms: w.start_ms + len,
        value,
        count: w.count,
        sources,
    };
    send(tx, rec, d).await
}

fn wanted(feed: &Feed, c: &CommittedTx) -> bool {
    let content = &c.tx.content;
    content.kind() == TxKind::Put && feed.covers(&content.address, &content.key)
}

fn read<T: serde::de::DeserializeOwned>(chain: &Chain, address: &str, key: &str) -> Option<T> {
    chain.memcache().get(address, key).and_then(|c| serde_json::from_slice(&c.tx.content.body).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(global_sequence: u64) -> Delivered {
        let proof = InclusionProof {
            leaf_index: global_sequence,
            tree_size: global_sequence + 1,
            leaf_hash: String::new(),
            audit_path: Vec::new(),
            root: String::new(),
        };
        let reading = Source {
            id: String::new(),
            global_sequence,
            address: "/a".into(),
            key: "k".into(),
            timestamp_ms: 0,
            value: None,
            tx_bytes: String::new(),
            proof,
        };
        Delivered::Reading { feed: "f".into(), reading }
    }

    #[tokio::test]
    async fn a_slow_buyer_is_told_why_and_only_what_it_got_is_counted() {
        let t = kalima_core::testing::TestChain::start("delivery-unit").await;
        let mut rec = Recorder {
            chain: t.chain.clone(),
            record: DeliveryRecord::default(),
            every: Duration::from_secs(3600),
            last_flush: tokio::time::Instant::now(),
            lock: record_lock("unit"),
        };
        let (tx, mut rx) = mpsc::channel(4);
        let mut sent = 0;
        let reason = loop {
            match send(&tx, &mut rec, reading(sent)).await {
                Ok(()) => sent += 1,
                Err(r) => break r,
            }
        };
        assert_eq!((reason, sent), ("slow_client", 3), "one slot is kept for the end");
        assert_eq!((rec.record.items, rec.record.readings, rec.record.last_sequence), (3, 3, 2));
        tx.try_send(Err(reason)).expect("the end has its slot");
        for i in 0..3 {
            assert!(matches!(rx.recv().await, Some(Ok(d)) if d.last_sequence() == i));
        }
        assert_eq!(rx.recv().await, Some(Err("slow_client")));

        drop(rx);
        assert_eq!(send(&tx, &mut rec, reading(9)).await, Err("closed"));
        assert_eq!(rec.record.items, 3, "nothing is counted for a buyer who is gone");
    }
}
