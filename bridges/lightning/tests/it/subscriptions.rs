//! Following invoices: one invoice's state changes, and every settlement after a settle index
//! (replayed first, then live, in settle-index order).

use std::time::Duration;

use futures::StreamExt;
use kalima_bridge_lightning::lnd_standin::{Fault, LndStandin, Route};
use kalima_bridge_lightning::{Invoice, InvoiceBackend, InvoiceState, LndRest, NewInvoice, PaymentHash};

use crate::{next_invoice, within};

async fn create(lnd: &LndRest, n: usize, expiry_secs: u64) -> Vec<Invoice> {
    let mut out = Vec::new();
    for i in 0..n {
        let amount = 1_000 * (i as u64 + 1);
        out.push(
            lnd.create_invoice(NewInvoice::new(amount, format!("invoice {i}"), expiry_secs)).await.expect("created"),
        );
    }
    out
}

#[tokio::test]
async fn subscribe_invoice_sees_open_then_settled_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    let invoice = lnd.create_invoice(NewInvoice::new(42_000, "one feed", 600)).await.unwrap();
    let mut updates = lnd.subscribe_invoice(&invoice.payment_hash).await.unwrap();

    let open = next_invoice(&mut updates, "current state").await;
    assert_eq!(open, invoice);
    standin.settle(&invoice.payment_hash).unwrap();
    let settled = next_invoice(&mut updates, "settlement").await;
    assert_eq!(settled.state, InvoiceState::Settled);
    assert_eq!((settled.settle_index, settled.amt_paid_msat), (1, 42_000));
    assert_eq!(settled.payment_request, invoice.payment_request);
    // A final state closes the subscription, as LND does.
    assert!(within("end of stream", updates.next()).await.is_none());

    // Subscribing to an invoice already final gives its state and the end.
    let mut again = lnd.subscribe_invoice(&invoice.payment_hash).await.unwrap();
    assert_eq!(next_invoice(&mut again, "final state").await.state, InvoiceState::Settled);
    assert!(within("end of stream", again.next()).await.is_none());
}

#[tokio::test]
async fn cancel_and_expiry_give_canceled_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    let invoices = create(&lnd, 3, 3600).await;

    // Canceled by the node.
    let mut updates = lnd.subscribe_invoice(&invoices[0].payment_hash).await.unwrap();
    assert_eq!(next_invoice(&mut updates, "open").await.state, InvoiceState::Open);
    standin.cancel(&invoices[0].payment_hash).unwrap();
    assert_eq!(next_invoice(&mut updates, "canceled").await.state, InvoiceState::Canceled);
    assert!(within("end of stream", updates.next()).await.is_none());

    // Expired: the stand-in's clock moves past the expiry.
    let mut updates = lnd.subscribe_invoice(&invoices[1].payment_hash).await.unwrap();
    assert_eq!(next_invoice(&mut updates, "open").await.state, InvoiceState::Open);
    standin.advance_time(Duration::from_secs(3601));
    let expired = next_invoice(&mut updates, "expired").await;
    assert_eq!((expired.state, expired.settle_index, expired.amt_paid_msat), (InvoiceState::Canceled, 0, 0));
    assert_eq!(lnd.lookup_invoice(&invoices[2].payment_hash).await.unwrap().unwrap().state, InvoiceState::Canceled);
    assert!(standin.settle(&invoices[1].payment_hash).is_err(), "an expired invoice cannot be paid");
}

#[tokio::test]
async fn an_invoice_expires_on_the_real_clock_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    let invoice = lnd.create_invoice(NewInvoice::new(1_000, "short", 1)).await.unwrap();
    let mut updates = lnd.subscribe_invoice(&invoice.payment_hash).await.unwrap();
    let first = next_invoice(&mut updates, "first state").await;
    if first.state == InvoiceState::Open {
        assert_eq!(next_invoice(&mut updates, "expiry").await.state, InvoiceState::Canceled);
    } else {
        // The second may already have passed before the subscription.
        assert_eq!(first.state, InvoiceState::Canceled);
    }
}

#[tokio::test]
async fn subscribe_settled_replays_exactly_the_later_settlements_then_live_ones_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    let inv = create(&lnd, 7, 3600).await;
    // Settlement order differs from creation order: settle index 1..=4 = invoices 3, 0, 5, 1.
    for i in [3, 0, 5, 1] {
        standin.settle(&inv[i].payment_hash).unwrap();
    }
    standin.cancel(&inv[6].payment_hash).unwrap();

    let mut settled = lnd.subscribe_settled(2).await.unwrap();
    let replayed = [next_invoice(&mut settled, "replay 1").await, next_invoice(&mut settled, "replay 2").await];
    assert_eq!(
        replayed.clone().map(|i| (i.settle_index, i.payment_hash)),
        [(3, inv[5].payment_hash), (4, inv[1].payment_hash)]
    );
    assert!(replayed.iter().all(|i| i.state == InvoiceState::Settled && i.amt_paid_msat == i.value_msat));

    // Live: a new invoice (an add event, not a settlement) and two settlements.
    within("subscription registered", standin.wait_for_streams(Route::SubscribeInvoices, 1)).await;
    let extra = lnd.create_invoice(NewInvoice::new(9_000, "extra", 3600)).await.unwrap();
    standin.settle(&extra.payment_hash).unwrap();
    standin.settle(&inv[2].payment_hash).unwrap();
    let live = [next_invoice(&mut settled, "live 1").await, next_invoice(&mut settled, "live 2").await];
    assert_eq!(live.map(|i| (i.settle_index, i.payment_hash)), [(5, extra.payment_hash), (6, inv[2].payment_hash)]);
}

#[tokio::test]
async fn subscribe_settled_from_zero_replays_every_settlement_though_lnd_does_not_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    let inv = create(&lnd, 4, 3600).await;
    standin.settle(&inv[2].payment_hash).unwrap();
    standin.settle(&inv[0].payment_hash).unwrap();

    let mut settled = lnd.subscribe_settled(0).await.unwrap();
    let replayed = [next_invoice(&mut settled, "replay 1").await, next_invoice(&mut settled, "replay 2").await];
    assert_eq!(
        replayed.map(|i| (i.settle_index, i.payment_hash)),
        [(1, inv[2].payment_hash), (2, inv[0].payment_hash)]
    );
    // The subscription after the listing opens when the stream is polled past the listing.
    let live = tokio::spawn(async move { next_invoice(&mut settled, "live").await });
    within("subscription registered", standin.wait_for_streams(Route::SubscribeInvoices, 1)).await;
    standin.settle(&inv[3].payment_hash).unwrap();
    let live = within("live", live).await.unwrap();
    assert_eq!((live.settle_index, live.payment_hash), (3, inv[3].payment_hash));
}

#[tokio::test]
async fn subscribe_settled_from_zero_on_a_node_with_nothing_settled_sees_the_first_settlement_against_the_lnd_rest_standin()
 {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    let inv = create(&lnd, 2, 3600).await;
    let mut settled = lnd.subscribe_settled(0).await.unwrap();
    let first = tokio::spawn(async move { next_invoice(&mut settled, "first settlement").await });
    within("subscription registered", standin.wait_for_streams(Route::SubscribeInvoices, 1)).await;
    standin.settle(&inv[1].payment_hash).unwrap();
    let first = within("first settlement", first).await.unwrap();
    assert_eq!((first.settle_index, first.payment_hash), (1, inv[1].payment_hash));
}

#[tokio::test]
async fn a_first_settlement_lnd_does_not_stream_is_found_by_listing_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    let inv = create(&lnd, 1, 3600).await;
    // The subscription from 0 never gets through, as if LND registered it too late.
    standin.inject(Route::SubscribeInvoices, Fault::Hang);
    let mut settled = lnd.subscribe_settled(0).await.unwrap();
    let first = tokio::spawn(async move { next_invoice(&mut settled, "first settlement").await });
    within("subscription sent", standin.wait_for_faults_given(Route::SubscribeInvoices)).await;
    standin.settle(&inv[0].payment_hash).unwrap();
    let first = within("first settlement", first).await.unwrap();
    assert_eq!((first.settle_index, first.payment_hash), (1, inv[0].payment_hash));
}

#[tokio::test]
async fn a_subscription_to_an_unknown_invoice_waits_for_it_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    let mut updates = lnd.subscribe_invoice(&PaymentHash([5; 32])).await.unwrap();
    let waiting = tokio::spawn(async move { updates.next().await.map(|r| r.map(|i| i.state)) });
    within("subscription registered", standin.wait_for_streams(Route::SubscribeSingleInvoice, 1)).await;
    // Unrelated activity reaches no one on that subscription; cutting it ends the wait.
    lnd.create_invoice(NewInvoice::new(1_000, "other", 60)).await.unwrap();
    standin.end_streams();
    assert!(within("end of stream", waiting).await.unwrap().is_none());
}
