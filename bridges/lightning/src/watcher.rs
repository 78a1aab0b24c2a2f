//! [`SettlementWatcher`]: a supervised task that follows every settled invoice of a backend and
//! hands each one, in settle-index order, to a [`SettlementHandler`].
//!
//! The handler stores what a settlement means (a purchase paid) together with the invoice's
//! `settle_index`, and the node passes the highest stored index back at start. The watcher
//! subscribes from that index; when the stream ends or fails it subscribes again, after an
//! exponential backoff (capped), from the last index the handler accepted. A settlement at or
//! below that index is never handed over again, and a handler error is retried on the same
//! invoice, never skipped. Delivery is thus exactly once per run and in order, and at least
//! once across a crash between the handler's work and its storing of the index, which is why
//! the handler stores both in one transaction.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::InvoiceBackend;
use crate::config::LightningSection;
use crate::error::{Error, Result, error_chain};
use crate::telemetry;
use crate::types::Invoice;

/// The error a [`SettlementHandler`] returns: anything, it is logged and the call retried.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What the node does with a settled invoice.
#[async_trait]
pub trait SettlementHandler: Send + Sync + 'static {
    /// Handles one settled invoice. `Ok` means it is done and `invoice.settle_index` stored, so
    /// it will not be handed over again; `Err` makes the watcher retry it after a backoff.
    async fn handle(&self, invoice: Invoice) -> std::result::Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut> SettlementHandler for F
where
    F: Fn(Invoice) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, invoice: Invoice) -> std::result::Result<(), HandlerError> {
        self(invoice).await
    }
}

/// Backoff of the watcher between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatcherOptions {
    /// First wait after a failure (and the wait after a stream that ended cleanly).
    pub initial_backoff: Duration,
    /// Longest wait; each failure in a row doubles the wait up to this.
    pub max_backoff: Duration,
}

impl Default for WatcherOptions {
    fn default() -> Self {
        WatcherOptions { initial_backoff: Duration::from_millis(500), max_backoff: Duration::from_secs(30) }
    }
}

impl WatcherOptions {
    /// The options of the `[lightning]` section.
    pub fn from_section(section: &LightningSection) -> Self {
        WatcherOptions {
            initial_backoff: Duration::from_millis(section.reconnect_initial_backoff_ms.max(1)),
            max_backoff: Duration::from_millis(
                section.reconnect_max_backoff_ms.max(section.reconnect_initial_backoff_ms.max(1)),
            ),
        }
    }
}

/// What the watcher has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatcherStatus {
    /// Highest settle index the handler accepted (the `from` given at start before any).
    pub last_settle_index: u64,
    /// Settlements the handler accepted in this run.
    pub handled: u64,
    /// Subscriptions opened again after the first.
    pub reconnects: u64,
    /// Errors met (stream and handler).
    pub errors: u64,
    /// The last error, with its cause chain.
    pub last_error: Option<String>,
    /// Whether the task has stopped.
    pub stopped: bool,
}

/// A running settlement watcher. Dropping it stops the task (between two handler calls);
/// [`SettlementWatcher::shutdown`] also waits for it.
pub struct SettlementWatcher {
    status: watch::Receiver<WatcherStatus>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for SettlementWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettlementWatcher").field("status", &*self.status.borrow()).finish()
    }
}

impl SettlementWatcher {
    /// Starts following settlements above `from_settle_index` (the last one stored; 0 at first)
    /// on the current tokio runtime.
    pub fn spawn(
        backend: Arc<dyn InvoiceBackend>,
        from_settle_index: u64,
        handler: impl SettlementHandler,
        options: WatcherOptions,
    ) -> SettlementWatcher {
        telemetry::register();
        let (status_tx, status) =
            watch::channel(WatcherStatus { last_settle_index: from_settle_index, ..Default::default() });
        let (stop, stop_rx) = watch::channel(false);
        let run = Run {
            backend,
            handler: Box::new(handler),
            options,
            last: from_settle_index,
            backoff: options.initial_backoff,
            status: status_tx,
            stop: stop_rx,
        };
        let task = tokio::spawn(run.run());
        SettlementWatcher { status, stop, task }
    }

    /// The current status.
    pub fn status(&self) -> WatcherStatus {
        self.status.borrow().clone()
    }

    /// A receiver of every status change (e.g. to wait for a settle index with `wait_for`).
    pub fn subscribe_status(&self) -> watch::Receiver<WatcherStatus> {
        self.status.clone()
    }

    /// Whether the task has ended (only after a stop, or a panic of the handler).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the task without interrupting a handler call, waits for it, and returns the last
    /// settle index the handler accepted.
    pub async fn shutdown(self) -> Result<u64> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(()) => Ok(self.status.borrow().last_settle_index),
            Err(e) if e.is_panic() => Err(Error::Task(format!("settlement watcher panicked: {e}"))),
            Err(e) => Err(Error::Task(format!("settlement watcher: {e}"))),
        }
    }
}

struct Run {
    backend: Arc<dyn InvoiceBackend>,
    handler: Box<dyn SettlementHandler>,
    options: WatcherOptions,
    last: u64,
    backoff: Duration,
    status: watch::Sender<WatcherStatus>,
    stop: watch::Receiver<bool>,
}

/// Why one subscription ended.
enum Ended {
    Stopped,
    Cleanly,
    Failed(Error),
}

impl Run {
    async fn run(mut self) {
        tracing::info!(target: "bridge::lightning", from_settle_index = self.last, "Settlement watcher started.");
        let mut first = true;
        loop {
            if !first {
                metrics::counter!(telemetry::STREAM_RECONNECTS).increment(1);
                self.status.send_modify(|s| s.reconnects += 1);
            }
            first = false;
            match self.follow().await {
                Ended::Stopped => break,
                Ended::Cleanly => {
                    tracing::debug!(target: "bridge::lightning", last_settle_index = self.last, "Settlement stream ended; subscribing again.");
                }
                Ended::Failed(e) => {
                    // Counted in kalima_lightning_errors_total by the backend that met it.
                    self.record_error(&e);
                    tracing::warn!(target: "bridge::lightning", last_settle_index = self.last, retry_in_ms = self.backoff.as_millis() as u64, error = %format!("{e:#}"), "Settlement stream failed; subscribing again.");
                }
            }
            if !self.pause().await {
                break;
            }
        }
        self.status.send_modify(|s| s.stopped = true);
        tracing::info!(target: "bridge::lightning", last_settle_index = self.last, "Settlement watcher stopped.");
    }

    /// One subscription, from the last accepted index, until it ends, fails or the watcher stops.
    async fn follow(&mut self) -> Ended {
        let subscribe = self.backend.subscribe_settled(self.last);
        let mut settled = tokio::select! {
            biased;
            _ = stopped(&mut self.stop) => return Ended::Stopped,
            s = subscribe => match s {
                Ok(s) => s,
                Err(e) => return Ended::Failed(e),
            },
        };
        loop {
            let item = tokio::select! {
                biased;
                _ = stopped(&mut self.stop) => return Ended::Stopped,
                item = settled.next() => item,
            };
            let invoice = match item {
                None => return Ended::Cleanly,
                Some(Err(e)) => return Ended::Failed(e),
                Some(Ok(invoice)) => invoice,
            };
            // The subscription works: the next failure starts the backoff afresh.
            self.backoff = self.options.initial_backoff;
            if invoice.settle_index <= self.last {
                continue;
            }
            if !self.deliver(invoice).await {
                return Ended::Stopped;
            }
        }
    }

    /// Hands one settlement to the handler until it accepts it; false when stopped meanwhile.
    async fn deliver(&mut self, invoice: Invoice) -> bool {
        let settle_index = invoice.settle_index;
        loop {
            // Not raced against the stop signal: a handler call is never cut in the middle.
            match self.handler.handle(invoice.clone()).await {
                Ok(()) => {
                    self.last = settle_index;
                    self.backoff = self.options.initial_backoff;
                    metrics::counter!(telemetry::SETTLEMENTS).increment(1);
                    self.status.send_modify(|s| {
                        s.last_settle_index = settle_index;
                        s.handled += 1;
                    });
                    tracing::debug!(target: "bridge::lightning", settle_index, payment_hash = %invoice.payment_hash, amt_paid_msat = invoice.amt_paid_msat, "Handled settlement.");
                    return true;
                }
                Err(e) => {
                    let err = Error::Handler { settle_index, message: error_chain(e.as_ref()) };
                    telemetry::error(&err);
                    self.record_error(&err);
                    tracing::warn!(target: "bridge::lightning", settle_index, retry_in_ms = self.backoff.as_millis() as u64, error = %err, "Settlement handler failed; retrying.");
                    if !self.pause().await {
                        return false;
                    }
                }
            }
        }
    }

    /// Waits the current backoff and doubles it (capped); false when stopped meanwhile.
    async fn pause(&mut self) -> bool {
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(self.options.max_backoff);
        tokio::select! {
            biased;
            _ = stopped(&mut self.stop) => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    fn record_error(&self, err: &Error) {
        let text = format!("{err:#}");
        self.status.send_modify(|s| {
            s.errors += 1;
            s.last_error = Some(text);
        });
    }
}

/// Resolves once a stop is asked for, or the [`SettlementWatcher`] is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use futures::stream;
    use parking_lot::Mutex;

    use super::*;
    use crate::backend::InvoiceStream;
    use crate::types::{InvoiceState, NewInvoice, PaymentHash};

    fn settled(i: u64) -> Invoice {
        Invoice {
            payment_hash: PaymentHash([i as u8; 32]),
            payment_request: String::new(),
            value_msat: 1000,
            memo: String::new(),
            state: InvoiceState::Settled,
            add_index: i,
            settle_index: i,
            amt_paid_msat: 1000,
            creation_date: 0,
            expiry_secs: 0,
            settle_date: 0,
        }
    }

    /// A backend serving scripted subscriptions and recording the `after` of each.
    struct Scripted {
        scripts: Mutex<VecDeque<Result<Vec<Result<Invoice>>>>>,
        asked: Mutex<Vec<u64>>,
    }

    #[async_trait]
    impl InvoiceBackend for Scripted {
        async fn create_invoice(&self, _: NewInvoice) -> Result<Invoice> {
            unreachable!()
        }
        async fn lookup_invoice(&self, _: &PaymentHash) -> Result<Option<Invoice>> {
            unreachable!()
        }
        async fn subscribe_invoice(&self, _: &PaymentHash) -> Result<InvoiceStream> {
            unreachable!()
        }
        async fn subscribe_settled(&self, after: u64) -> Result<InvoiceStream> {
            self.asked.lock().push(after);
            let mut scripts = self.scripts.lock();
            match scripts.pop_front() {
                // The last script stays open, as a live stream with nothing new.
                Some(Ok(items)) if scripts.is_empty() => Ok(stream::iter(items).chain(stream::pending()).boxed()),
                Some(Ok(items)) => Ok(stream::iter(items).boxed()),
                Some(Err(e)) => Err(e),
                None => Ok(stream::pending().boxed()),
            }
        }
    }

    fn fast() -> WatcherOptions {
        WatcherOptions { initial_backoff: Duration::from_millis(1), max_backoff: Duration::from_millis(4) }
    }

    #[tokio::test]
    async fn resumes_after_failures_from_the_last_accepted_index_without_repeats() {
        let backend = Arc::new(Scripted {
            scripts: Mutex::new(VecDeque::from([
                Ok(vec![Ok(settled(4)), Ok(settled(5))]),
                Err(Error::Transport { endpoint: "e", message: "refused".into() }),
                Ok(vec![Ok(settled(5)), Ok(settled(6)), Err(Error::malformed("e", "line", "cut"))]),
                Ok(vec![Ok(settled(6)), Ok(settled(7))]),
            ])),
            asked: Mutex::new(Vec::new()),
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(1));
        let handler = {
            let seen = seen.clone();
            let failures = failures.clone();
            move |inv: Invoice| {
                let seen = seen.clone();
                let failures = failures.clone();
                async move {
                    // The first call on settle index 6 fails: it must come back, not be skipped.
                    if inv.settle_index == 6 && std::mem::take(&mut *failures.lock()) > 0 {
                        return Err("database busy".into());
                    }
                    seen.lock().push(inv.settle_index);
                    Ok(())
                }
            }
        };
        let watcher = SettlementWatcher::spawn(backend.clone(), 3, handler, fast());
        let mut status = watcher.subscribe_status();
        let done = status.wait_for(|s| s.last_settle_index == 7);
        tokio::time::timeout(Duration::from_secs(30), done).await.expect("watcher stalled").unwrap();
        assert_eq!(*seen.lock(), [4, 5, 6, 7]);
        assert_eq!(*backend.asked.lock(), [3, 5, 5, 6]);
        let status = watcher.status();
        assert_eq!((status.handled, status.reconnects, status.errors), (4, 3, 3));
        assert_eq!(watcher.shutdown().await.unwrap(), 7);
    }

    #[tokio::test]
    async fn shutdown_reports_a_panicking_handler() {
        let backend = Arc::new(Scripted {
            scripts: Mutex::new(VecDeque::from([Ok(vec![Ok(settled(1))])])),
            asked: Mutex::new(Vec::new()),
        });
        let watcher = SettlementWatcher::spawn(
            backend,
            0,
            |inv: Invoice| async move {
                if inv.settle_index == 1 {
                    panic!("bug in handler");
                }
                Ok(())
            },
            fast(),
        );
        let mut status = watcher.subscribe_status();
        // The status sender is dropped by the panic, which ends wait_for with an error.
        let _ = tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| s.stopped)).await;
        let err = watcher.shutdown().await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
    }

    #[test]
    fn options_follow_the_section() {
        let s =
            LightningSection { reconnect_initial_backoff_ms: 20, reconnect_max_backoff_ms: 10, ..Default::default() };
        let o = WatcherOptions::from_section(&s);
        assert_eq!((o.initial_backoff, o.max_backoff), (Duration::from_millis(20), Duration::from_millis(20)));
    }
}
