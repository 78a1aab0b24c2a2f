//! The settlement watcher against the stand-in: streams cut, the node restarted, the watcher
//! restarted from its stored index, handler failures and malformed answers; every settlement
//! is handled exactly once and in order.

use std::sync::Arc;
use std::time::Duration;

use kalima_bridge_lightning::lnd_standin::{Fault, LndStandin, Route};
use kalima_bridge_lightning::{
    HandlerError, Invoice, InvoiceBackend, LndRest, NewInvoice, PaymentHash, SettlementWatcher, WatcherOptions,
    WatcherStatus,
};
use parking_lot::Mutex;

use crate::within;

fn fast() -> WatcherOptions {
    WatcherOptions { initial_backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(200) }
}

/// What a node would keep: the settlements handled, whose highest index is the resume point.
#[derive(Clone, Default)]
struct Store {
    handled: Arc<Mutex<Vec<Invoice>>>,
    /// Settle indexes to refuse once each, as a database that is briefly unavailable.
    refuse_once: Arc<Mutex<Vec<u64>>>,
}

impl Store {
    fn last_index(&self) -> u64 {
        self.handled.lock().last().map_or(0, |i| i.settle_index)
    }

    fn handler(
        &self,
    ) -> impl Fn(Invoice) -> futures::future::BoxFuture<'static, Result<(), HandlerError>> + Send + Sync + 'static {
        let store = self.clone();
        move |invoice: Invoice| {
            let store = store.clone();
            Box::pin(async move {
                let mut refuse = store.refuse_once.lock();
                if let Some(pos) = refuse.iter().position(|&i| i == invoice.settle_index) {
                    refuse.remove(pos);
                    return Err(format!("database busy at settle_index {}", invoice.settle_index).into());
                }
                drop(refuse);
                store.handled.lock().push(invoice);
                Ok(())
            })
        }
    }

    fn indexes(&self) -> Vec<u64> {
        self.handled.lock().iter().map(|i| i.settle_index).collect()
    }

    fn hashes(&self) -> Vec<PaymentHash> {
        self.handled.lock().iter().map(|i| i.payment_hash).collect()
    }
}

async fn wait_for(watcher: &SettlementWatcher, what: &str, done: impl FnMut(&WatcherStatus) -> bool) -> WatcherStatus {
    let mut status = watcher.subscribe_status();
    let seen = within(what, status.wait_for(done)).await.unwrap_or_else(|_| panic!("{what}: watcher gone"));
    seen.clone()
}

async fn invoices(lnd: &LndRest, n: usize) -> Vec<PaymentHash> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            lnd.create_invoice(NewInvoice::new(10_000 + i as u64, format!("purchase {i}"), 3600))
                .await
                .expect("created")
                .payment_hash,
        );
    }
    out
}

/// Settles `hashes[range]` in order and records that order.
fn settle(standin: &LndStandin, hashes: &[PaymentHash], range: std::ops::Range<usize>, order: &mut Vec<PaymentHash>) {
    for hash in &hashes[range] {
        standin.settle(hash).expect("settled");
        order.push(*hash);
    }
}

#[tokio::test]
async fn every_settlement_is_handled_once_in_order_through_cuts_and_restarts_against_the_lnd_rest_standin() {
    let mut standin = LndStandin::start().await.unwrap();
    let client = standin.client().unwrap();
    let lnd: Arc<dyn InvoiceBackend> = Arc::new(client.clone());
    let hashes = invoices(&client, 14).await;
    let store = Store::default();
    let mut order = Vec::new();

    // Settled before the node first runs: picked up from index 0.
    settle(&standin, &hashes, 0..3, &mut order);
    let watcher = SettlementWatcher::spawn(lnd.clone(), store.last_index(), store.handler(), fast());
    wait_for(&watcher, "first three", |s| s.last_settle_index == 3).await;

    // Live settlements.
    within("subscription registered", standin.wait_for_streams(Route::SubscribeInvoices, 1)).await;
    settle(&standin, &hashes, 3..5, &mut order);
    wait_for(&watcher, "live ones", |s| s.last_settle_index == 5).await;

    // The connection is cut; settlements meanwhile are replayed on the next subscription.
    standin.drop_streams();
    settle(&standin, &hashes, 5..7, &mut order);
    wait_for(&watcher, "after a cut", |s| s.last_settle_index == 7).await;

    // The stream ends cleanly.
    standin.end_streams();
    settle(&standin, &hashes, 7..8, &mut order);
    wait_for(&watcher, "after an end", |s| s.last_settle_index == 8).await;

    // LND stops and comes back; invoices settled around the restart are not lost.
    standin.stop().await;
    settle(&standin, &hashes, 8..10, &mut order);
    standin.start_again().await.unwrap();
    wait_for(&watcher, "after LND restarted", |s| s.last_settle_index == 10).await;

    // The node restarts: the watcher stops, and a new one resumes from the stored index.
    let stopped_at = watcher.shutdown().await.unwrap();
    assert_eq!(stopped_at, store.last_index());
    settle(&standin, &hashes, 10..12, &mut order);
    let watcher = SettlementWatcher::spawn(lnd.clone(), store.last_index(), store.handler(), fast());
    wait_for(&watcher, "after the node restarted", |s| s.last_settle_index == 12).await;

    // LND restarts once more under the new watcher.
    standin.restart().await.unwrap();
    settle(&standin, &hashes, 12..14, &mut order);
    let status = wait_for(&watcher, "after another LND restart", |s| s.last_settle_index == 14).await;

    assert_eq!(store.indexes(), (1..=14).collect::<Vec<u64>>(), "each settle index once, in order");
    assert_eq!(store.hashes(), order, "the invoices in the order they were settled");
    assert!(store.handled.lock().iter().all(|i| i.amt_paid_msat == i.value_msat && i.is_settled()));
    assert!(status.reconnects >= 1, "{status:?}");
    assert!(!watcher.is_finished());
    assert_eq!(watcher.shutdown().await.unwrap(), 14);
}

#[tokio::test]
async fn a_handler_error_is_retried_not_skipped_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let client = standin.client().unwrap();
    let hashes = invoices(&client, 4).await;
    let store = Store::default();
    *store.refuse_once.lock() = vec![2, 2, 4];
    let watcher = SettlementWatcher::spawn(Arc::new(client), 0, store.handler(), fast());
    for hash in &hashes {
        standin.settle(hash).unwrap();
    }
    let status = wait_for(&watcher, "all four", |s| s.last_settle_index == 4).await;
    assert_eq!(store.indexes(), [1, 2, 3, 4]);
    assert_eq!(store.hashes(), hashes);
    assert_eq!((status.handled, status.errors), (4, 3), "{status:?}");
    assert!(status.last_error.unwrap().contains("database busy at settle_index 4"));
    assert!(store.refuse_once.lock().is_empty());
}

#[tokio::test]
async fn malformed_answers_leave_the_watcher_running_against_the_lnd_rest_standin() {
    let mut standin = LndStandin::start().await.unwrap();
    let client = standin.client().unwrap();
    let hashes = invoices(&client, 4).await;
    standin.settle(&hashes[0]).unwrap();

    // The catch-up from 0 lists first: its first two answers are broken.
    standin.inject(Route::ListInvoices, Fault::Status500);
    standin.inject(Route::ListInvoices, Fault::NotJson);
    let store = Store::default();
    let watcher = SettlementWatcher::spawn(Arc::new(client), 0, store.handler(), fast());
    let status = wait_for(&watcher, "catch-up", |s| s.last_settle_index == 1).await;
    assert_eq!(status.errors, 2, "{status:?}");

    // Every later subscription answer is broken once, in turn, the last one by never answering:
    // once the watcher's stream is open, the faults are queued and the stream is cut.
    within("subscription registered", standin.wait_for_streams(Route::SubscribeInvoices, 1)).await;
    let faults = [
        Fault::NotJson,
        Fault::BadBase64Hash,
        Fault::ShortHash,
        Fault::NonNumericIndex,
        Fault::Status500,
        Fault::Truncated,
        Fault::StreamError,
        Fault::Hang,
    ];
    for fault in faults {
        standin.inject(Route::SubscribeInvoices, fault);
    }
    standin.drop_streams();
    within("faults given", standin.wait_for_faults_given(Route::SubscribeInvoices)).await;
    // The hanging call is cut by a restart of LND.
    standin.restart().await.unwrap();
    for hash in &hashes[1..] {
        standin.settle(hash).unwrap();
    }
    let status = wait_for(&watcher, "the rest", |s| s.last_settle_index == 4).await;
    assert_eq!(store.indexes(), [1, 2, 3, 4]);
    assert!(!watcher.is_finished());
    // The cut, seven broken answers and the hang, on top of the two broken lists.
    assert!(status.errors > 2 + 1 + 7, "{status:?}");
    assert!(status.reconnects >= 9, "{status:?}");
}
