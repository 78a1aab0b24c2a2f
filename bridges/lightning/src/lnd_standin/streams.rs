//! The streaming routes (`SubscribeInvoices`, `SubscribeSingleInvoice`) as grpc-gateway serves
//! them: newline-delimited `{"result": ...}` lines, the replayed backlog then live events, the
//! response head sent with the first line, cuts on the handle's request, and open-stream counts.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::answers::{corrupt, fault_status, gateway_error, hang};
use super::invoice::Stored;
use super::state::{Cut, Event, EventKind, Shared};
use super::{Fault, Route};

/// Which updates a stream forwards.
#[derive(Debug, Clone, Copy)]
enum Follow {
    /// `SubscribeInvoices`: adds and settles.
    All,
    /// `SubscribeSingleInvoice`: every change of one invoice, until a final state.
    One([u8; 32]),
}

fn result_line(inv: &Stored) -> Bytes {
    Bytes::from(format!("{}\n", json!({"result": inv.to_json()})))
}

/// A stream line carrying `fault`, built on `sample` (an invoice to corrupt).
fn fault_line(fault: Fault, sample: Option<&Stored>) -> Bytes {
    match fault {
        Fault::StreamError => Bytes::from(format!(
            "{}\n",
            json!({"error": {"code": 2, "message": "injected stream error", "details": []}})
        )),
        Fault::Truncated => {
            let line =
                sample.map(result_line).unwrap_or_else(|| Bytes::from_static(b"{\"result\":{\"r_hash\":\"AAAA\"}}\n"));
            line.slice(..line.len() / 2)
        }
        other => {
            let invoice = sample.map(Stored::to_json).unwrap_or_else(|| json!({"r_hash": STANDARD.encode([0u8; 32])}));
            let corrupted = corrupt(invoice, other, "r_hash");
            match serde_json::from_str::<Value>(&corrupted) {
                Ok(v) => Bytes::from(format!("{}\n", json!({"result": v}))),
                Err(_) => Bytes::from(format!("{corrupted}\n")),
            }
        }
    }
}

/// Counts a stream as open while its body lives.
struct OpenStream {
    shared: Arc<Shared>,
    route: Route,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.shared.stream_closed(self.route);
    }
}

enum Step {
    Cut(bool),
    Event(Box<std::result::Result<Event, broadcast::error::RecvError>>),
}

struct StreamBody {
    backlog: VecDeque<Bytes>,
    events: Option<broadcast::Receiver<Event>>,
    follow: Follow,
    cut: watch::Receiver<Cut>,
    generation: u64,
    done: bool,
    _open: OpenStream,
}

/// A streaming answer: `backlog` lines first, then matching events until a cut or the end.
/// As grpc-gateway, it sends the response head only with the first line.
async fn stream_response(
    shared: &Arc<Shared>,
    route: Route,
    backlog: VecDeque<Bytes>,
    events: Option<broadcast::Receiver<Event>>,
    follow: Follow,
) -> Response {
    shared.stream_opened(route);
    let cut = shared.cut.subscribe();
    let generation = cut.borrow().generation;
    let state = StreamBody {
        backlog,
        done: events.is_none(),
        events,
        follow,
        cut,
        generation,
        _open: OpenStream { shared: shared.clone(), route },
    };
    let body = futures::stream::unfold(state, |mut st| async move {
        if let Some(line) = st.backlog.pop_front() {
            return Some((Ok::<Bytes, std::io::Error>(line), st));
        }
        if st.done {
            return None;
        }
        loop {
            let events = st.events.as_mut()?;
            let generation = st.generation;
            let step = tokio::select! {
                cut = st.cut.wait_for(|c| c.generation > generation) => Step::Cut(cut.map(|c| c.abort).unwrap_or(true)),
                event = events.recv() => Step::Event(Box::new(event)),
            };
            match step {
                Step::Cut(abort) => {
                    st.done = true;
                    if abort {
                        return Some((Err(std::io::Error::other("stream cut by the LND stand-in")), st));
                    }
                    return None;
                }
                Step::Event(event) => match *event {
                    Ok(ev) => {
                        let forward = match st.follow {
                            Follow::All => matches!(ev.kind, EventKind::Added | EventKind::Settled),
                            Follow::One(hash) => ev.invoice.hash == hash,
                        };
                        if !forward {
                            continue;
                        }
                        if let Follow::One(_) = st.follow {
                            st.done = ev.invoice.state.is_final();
                        }
                        return Some((Ok(result_line(&ev.invoice)), st));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        st.done = true;
                        let message = format!("subscriber lagged by {n} events");
                        let line = json!({"error": {"code": 8, "message": message, "details": []}});
                        return Some((Ok(Bytes::from(format!("{line}\n"))), st));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    });
    let mut body = Box::pin(body.fuse());
    let first = body.next().await;
    let mut resp = Response::new(Body::from_stream(futures::stream::iter(first).chain(body)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// An answer on a streaming route that carries a fault: status, or one line and the end.
async fn stream_fault(shared: &Arc<Shared>, route: Route, fault: Fault) -> Response {
    if fault == Fault::Hang {
        return hang().await;
    }
    if let Some(resp) = fault_status(fault, true) {
        return resp;
    }
    let sample = shared.state.lock().invoices.last().cloned();
    stream_response(shared, route, VecDeque::from([fault_line(fault, sample.as_ref())]), None, Follow::All).await
}

pub(super) async fn subscribe_invoices(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(fault) = shared.take_fault(Route::SubscribeInvoices) {
        return stream_fault(&shared, Route::SubscribeInvoices, fault).await;
    }
    let number = |k: &str| q.get(k).map(|v| v.parse::<u64>()).transpose();
    let (Ok(add_index), Ok(settle_index)) = (number("add_index"), number("settle_index")) else {
        return gateway_error(StatusCode::BAD_REQUEST, 3, "invalid value for uint64 query parameter", false);
    };
    let (add_index, settle_index) = (add_index.unwrap_or(0), settle_index.unwrap_or(0));
    let (backlog, events) = {
        // Registered under the lock, so that no change falls between the replay and the live part.
        let state = shared.state.lock();
        let mut backlog = VecDeque::new();
        // As LND's InvoicesAddedSince / InvoicesSettledSince: index 0 replays nothing.
        if add_index > 0 {
            backlog.extend(state.invoices.iter().filter(|i| i.add_index > add_index).map(result_line));
        }
        if settle_index > 0 {
            let mut settled: Vec<&Stored> = state.invoices.iter().filter(|i| i.settle_index > settle_index).collect();
            settled.sort_by_key(|i| i.settle_index);
            backlog.extend(settled.into_iter().map(result_line));
        }
        (backlog, shared.events.subscribe())
    };
    stream_response(&shared, Route::SubscribeInvoices, backlog, Some(events), Follow::All).await
}

pub(super) async fn subscribe_single_invoice(
    State(shared): State<Arc<Shared>>,
    UrlPath(r_hash): UrlPath<String>,
) -> Response {
    if let Some(fault) = shared.take_fault(Route::SubscribeSingleInvoice) {
        return stream_fault(&shared, Route::SubscribeSingleInvoice, fault).await;
    }
    // grpc-gateway decodes a bytes path parameter as padded standard, then URL-safe, base64.
    let hash = match STANDARD.decode(&r_hash).or_else(|_| URL_SAFE.decode(&r_hash)) {
        Ok(h) => h,
        Err(e) => {
            let msg = format!("type mismatch, parameter: r_hash, error: {e}");
            return gateway_error(StatusCode::BAD_REQUEST, 3, &msg, false);
        }
    };
    let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
        let msg = format!("invalid hash length of {}, want 32", hash.len());
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &msg, true);
    };
    let (backlog, events) = {
        let state = shared.state.lock();
        // The current state first; an unknown invoice is waited for, as LND does.
        let current = state.by_hash.get(&hash).map(|&i| state.invoices[i].clone());
        let final_now = current.as_ref().is_some_and(|c| c.state.is_final());
        let backlog: VecDeque<Bytes> = current.iter().map(result_line).collect();
        (backlog, if final_now { None } else { Some(shared.events.subscribe()) })
    };
    stream_response(&shared, Route::SubscribeSingleInvoice, backlog, events, Follow::One(hash)).await
}
