//! The bus: in-process fan-out of committed transactions. Built on a bounded broadcast
//! channel so a slow subscriber can never hold the chain back: when it falls more than the
//! channel's capacity behind it is told it lagged, and the subscriber layer drops it and
//! counts the drop.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::store::CommittedTx;

/// One commit's worth of transactions, in chain order.
pub type CommittedBatch = Arc<Vec<Arc<CommittedTx>>>;

/// Fan-out of committed batches.
#[derive(Debug, Clone)]
pub struct Bus {
    tx: broadcast::Sender<CommittedBatch>,
    capacity: usize,
}

/// Why a subscription ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionEnd {
    /// The subscriber fell behind by more than the bus capacity.
    Lagged,
    /// The node is shutting down.
    Closed,
}

impl SubscriptionEnd {
    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            SubscriptionEnd::Lagged => "lagged",
            SubscriptionEnd::Closed => "closed",
        }
    }
}

/// A subscriber's end of the bus.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<CommittedBatch>,
    // The broadcast channel rounds its size up to a power of two; this is the configured limit.
    capacity: usize,
    ended: Option<SubscriptionEnd>,
}

impl Subscription {
    /// Next batch, or why the subscription ended (a lagged subscriber is dropped, not resumed).
    pub async fn next(&mut self) -> Result<CommittedBatch, SubscriptionEnd> {
        if let Some(end) = self.ended {
            return Err(end);
        }
        let res = if self.rx.len() > self.capacity {
            Err(SubscriptionEnd::Lagged)
        } else {
            match self.rx.recv().await {
                Ok(b) => Ok(b),
                Err(broadcast::error::RecvError::Lagged(_)) => Err(SubscriptionEnd::Lagged),
                Err(broadcast::error::RecvError::Closed) => Err(SubscriptionEnd::Closed),
            }
        };
        if let Err(end) = res {
            if end == SubscriptionEnd::Lagged {
                metrics::counter!("kalima_bus_subscribers_dropped_total", "reason" => "lagged").increment(1);
            }
            self.ended = Some(end);
        }
        res
    }
}

impl Bus {
    /// A bus that buffers `capacity` commits per subscriber.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(capacity);
        Self { tx, capacity }
    }

    /// Publishes a batch; never waits for subscribers.
    pub fn publish(&self, batch: CommittedBatch) {
        // No receiver is not an error: nobody is listening right now.
        let _ = self.tx.send(batch);
    }

    /// A new subscription starting at the next commit.
    pub fn subscribe(&self) -> Subscription {
        Subscription { rx: self.tx.subscribe(), capacity: self.capacity, ended: None }
    }

    /// Current number of subscribers.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}
