//! How a field-protocol front door (the MQTT server) delivers marketplace feeds to buyers
//! without knowing the marketplace: the marketplace implements [`FeedGate`], which checks a
//! buyer's credentials and streams the feed's deliveries, each a JSON document carrying its
//! inclusion proofs.

/// One delivery of a feed, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedItem {
    /// Address of the reading (or of the aggregated key).
    pub address: String,
    /// Its key.
    pub key: String,
    /// The delivery as JSON, with its proofs.
    pub payload: Vec<u8>,
}

/// A buyer's live feed: deliveries, then the reason it ended.
pub type FeedReceiver = tokio::sync::mpsc::Receiver<Result<FeedItem, &'static str>>;

/// Checks buyers' credentials and follows their feeds.
pub trait FeedGate: Send + Sync + 'static {
    /// The feed a buyer's credentials open: the subscription id as `user`, the access token
    /// as `password`; `None` when they open nothing (then they may be a device's).
    fn open(&self, user: &str, password: &str) -> Option<String>;

    /// Follows the feed of those credentials over `channel` (e.g. `mqtt`), from now on.
    fn follow(&self, user: &str, password: &str, channel: &'static str) -> Option<FeedReceiver>;
}
