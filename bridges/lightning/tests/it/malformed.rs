//! Malformed answers from LND: every one gives a clear error naming the endpoint and the field,
//! never a panic, and the next call works.

use futures::StreamExt;
use kalima_bridge_lightning::lnd_standin::{Fault, LndStandin, Route};
use kalima_bridge_lightning::{Error, InvoiceBackend, LndRest, NewInvoice, PaymentHash};

use crate::within;

struct Case {
    route: Route,
    fault: Fault,
    expect: &'static str,
}

/// Runs the call that goes to `route` and returns its error.
async fn call(lnd: &LndRest, route: Route, known: &PaymentHash) -> Error {
    let item = match route {
        Route::AddInvoice => {
            return lnd.create_invoice(NewInvoice::new(2_000, "x", 60)).await.expect_err("a broken answer");
        }
        Route::LookupInvoice => return lnd.lookup_invoice(known).await.expect_err("a broken answer"),
        Route::ListInvoices | Route::SubscribeInvoices => {
            // From 0 the client lists first; from 1 it only subscribes.
            let after = if route == Route::ListInvoices { 0 } else { 1 };
            let mut s = lnd.subscribe_settled(after).await.expect("a lazy stream");
            within("stream error", s.next()).await
        }
        Route::SubscribeSingleInvoice => {
            let mut s = lnd.subscribe_invoice(known).await.expect("a lazy stream");
            within("stream error", s.next()).await
        }
    };
    match item {
        Some(Err(e)) => e,
        Some(Ok(inv)) => panic!("{route:?}: expected an error, got {inv:?}"),
        None => panic!("{route:?}: expected an error, the stream ended"),
    }
}

#[tokio::test]
async fn malformed_answers_give_clear_errors_against_the_lnd_rest_standin() {
    use Fault::*;
    use Route::*;
    let cases = [
        Case { route: AddInvoice, fault: NotJson, expect: "POST /v1/invoices answered malformed data: body: not JSON" },
        Case {
            route: AddInvoice,
            fault: BadBase64Hash,
            expect: "POST /v1/invoices answered malformed data: r_hash: not base64",
        },
        Case { route: AddInvoice, fault: ShortHash, expect: "r_hash: expected 32 bytes, got 16" },
        Case { route: AddInvoice, fault: NonNumericIndex, expect: "add_index: not a decimal integer: \"12abc\"" },
        Case {
            route: AddInvoice,
            fault: Status500,
            expect: "POST /v1/invoices answered HTTP 500 (gRPC code 2): injected failure",
        },
        Case { route: AddInvoice, fault: Truncated, expect: "body: not JSON (EOF while parsing" },
        Case {
            route: LookupInvoice,
            fault: NotJson,
            expect: "GET /v1/invoice/{r_hash_str} answered malformed data: body: not JSON",
        },
        Case { route: LookupInvoice, fault: BadBase64Hash, expect: "r_hash: not base64" },
        Case { route: LookupInvoice, fault: ShortHash, expect: "r_hash: expected 32 bytes, got 16" },
        Case { route: LookupInvoice, fault: NonNumericIndex, expect: "add_index: not a decimal integer" },
        Case { route: LookupInvoice, fault: Status500, expect: "answered HTTP 500 (gRPC code 2): injected failure" },
        Case { route: ListInvoices, fault: Status500, expect: "GET /v1/invoices answered HTTP 500 (gRPC code 2)" },
        Case {
            route: ListInvoices,
            fault: BadBase64Hash,
            expect: "GET /v1/invoices answered malformed data: invoices[0].r_hash: not base64",
        },
        Case {
            route: ListInvoices,
            fault: Truncated,
            expect: "GET /v1/invoices answered malformed data: body: not JSON",
        },
        Case {
            route: SubscribeInvoices,
            fault: NotJson,
            expect: "GET /v1/invoices/subscribe answered malformed data: line: not JSON",
        },
        Case { route: SubscribeInvoices, fault: BadBase64Hash, expect: "result.r_hash: not base64" },
        Case { route: SubscribeInvoices, fault: ShortHash, expect: "result.r_hash: expected 32 bytes, got 16" },
        Case { route: SubscribeInvoices, fault: NonNumericIndex, expect: "result.add_index: not a decimal integer" },
        Case {
            route: SubscribeInvoices,
            fault: Status500,
            expect: "GET /v1/invoices/subscribe answered HTTP 500 (gRPC code 2): injected failure",
        },
        Case { route: SubscribeInvoices, fault: Truncated, expect: "line: stream ended inside a line" },
        Case {
            route: SubscribeInvoices,
            fault: StreamError,
            expect: "GET /v1/invoices/subscribe stream error (gRPC code 2): injected stream error",
        },
        Case {
            route: SubscribeSingleInvoice,
            fault: NotJson,
            expect: "GET /v2/invoices/subscribe/{r_hash} answered malformed data: line: not JSON",
        },
        Case { route: SubscribeSingleInvoice, fault: ShortHash, expect: "result.r_hash: expected 32 bytes, got 16" },
        Case { route: SubscribeSingleInvoice, fault: Truncated, expect: "line: stream ended inside a line" },
        Case {
            route: SubscribeSingleInvoice,
            fault: StreamError,
            expect: "stream error (gRPC code 2): injected stream error",
        },
    ];
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    let known = lnd.create_invoice(NewInvoice::new(1_000, "known", 3600)).await.unwrap();
    standin.settle(&known.payment_hash).unwrap();
    for case in cases {
        standin.inject(case.route, case.fault);
        let err = call(&lnd, case.route, &known.payment_hash).await.to_string();
        assert!(
            err.contains(case.expect),
            "{:?} {:?}: {err}\n  does not contain {}",
            case.route,
            case.fault,
            case.expect
        );
        // The client is not left broken: the same call works once the answers are right again.
        assert_eq!(lnd.lookup_invoice(&known.payment_hash).await.unwrap().unwrap().settle_index, 1);
    }
}

#[tokio::test]
async fn a_stream_cut_mid_way_is_a_transport_error_against_the_lnd_rest_standin() {
    let standin = LndStandin::start().await.unwrap();
    let lnd = standin.client().unwrap();
    let inv = lnd.create_invoice(NewInvoice::new(1_000, "x", 3600)).await.unwrap();
    let mut updates = lnd.subscribe_invoice(&inv.payment_hash).await.unwrap();
    assert!(within("open", updates.next()).await.unwrap().is_ok());
    standin.drop_streams();
    let err = within("cut", updates.next()).await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Transport { endpoint: "GET /v2/invoices/subscribe/{r_hash}", .. }), "{err}");
    assert!(within("after the error", updates.next()).await.is_none(), "a stream ends after its error");
}
