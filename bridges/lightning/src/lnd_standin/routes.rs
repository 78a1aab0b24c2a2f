//! The HTTP routes of LND's REST API that the stand-in serves: the router, LND's macaroon check,
//! and the unary invoice calls (`AddInvoice`, `LookupInvoice`, `ListInvoices`) with their
//! request parsing and injected faults.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::answers::{corrupt, fault_status, gateway_error, hang, json_response};
use super::invoice::Stored;
use super::state::Shared;
use super::streams::{subscribe_invoices, subscribe_single_invoice};
use super::{Fault, Route};
use crate::lnd::MACAROON_HEADER;
use crate::types::InvoiceState;

/// LND's default expiry when a request gives 0.
const DEFAULT_EXPIRY_SECS: u64 = 86_400;
/// LND's `MaxMemoSize`.
const MAX_MEMO_SIZE: usize = 1024;

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/invoices", post(add_invoice).get(list_invoices))
        .route("/v1/invoice/{r_hash_str}", get(lookup_invoice))
        .route("/v1/invoices/subscribe", get(subscribe_invoices))
        .route("/v2/invoices/subscribe/{r_hash}", get(subscribe_single_invoice))
        .fallback(|| async { gateway_error(StatusCode::NOT_FOUND, 5, "Not Found", false) })
        .layer(axum::middleware::from_fn_with_state(shared.clone(), check_macaroon))
        .with_state(shared)
}

/// LND's macaroon check: exactly one, hex, and the one it baked.
async fn check_macaroon(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let stream = req.uri().path().contains("/subscribe");
    let values: Vec<&HeaderValue> = req.headers().get_all(MACAROON_HEADER).iter().collect();
    if values.len() != 1 {
        let msg = format!("expected 1 macaroon, got {}", values.len());
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &msg, stream);
    }
    let Some(bytes) = values[0].to_str().ok().and_then(|v| hex::decode(v).ok()) else {
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, "encoding/hex: invalid byte", stream);
    };
    if bytes != shared.macaroon {
        return gateway_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            2,
            "verification failed: signature mismatch after caveat verification",
            stream,
        );
    }
    next.run(req).await
}

/// A protojson 64-bit integer of a request: string or number; absent is 0.
fn request_u64(body: &Value, field: &str) -> std::result::Result<u64, String> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => s.parse().map_err(|_| format!("invalid value for int64 field {field}: {s:?}")),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| format!("invalid value for int64 field {field}: {n}")),
        Some(other) => Err(format!("invalid value for int64 field {field}: {other}")),
    }
}

async fn add_invoice(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let fault = shared.take_fault(Route::AddInvoice);
    if fault == Some(Fault::Hang) {
        return hang().await;
    }
    if let Some(resp) = fault.and_then(|f| fault_status(f, false)) {
        return resp;
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return gateway_error(StatusCode::BAD_REQUEST, 3, "unexpected token in request body", false),
    };
    let memo = match body.get("memo") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            let msg = format!("invalid value for string field memo: {other}");
            return gateway_error(StatusCode::BAD_REQUEST, 3, &msg, false);
        }
    };
    let numbers = (request_u64(&body, "value"), request_u64(&body, "value_msat"), request_u64(&body, "expiry"));
    let (value, value_msat, expiry) = match numbers {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return gateway_error(StatusCode::BAD_REQUEST, 3, &e, false);
        }
    };
    if value != 0 && value_msat != 0 {
        let msg = "value and value_msat are mutually exclusive";
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, msg, false);
    }
    if memo.len() > MAX_MEMO_SIZE {
        let msg = format!("memo too large: {} bytes (maxsize={MAX_MEMO_SIZE})", memo.len());
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &msg, false);
    }
    let value_msat = if value != 0 { value.saturating_mul(1000) } else { value_msat };
    let expiry = if expiry == 0 { DEFAULT_EXPIRY_SECS } else { expiry };
    let stored = match shared.add_invoice(memo, value_msat, expiry) {
        Ok(s) => s,
        Err(msg) => return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &msg, false),
    };
    let answer = json!({
        "r_hash": STANDARD.encode(stored.hash),
        "payment_request": stored.payment_request,
        "add_index": stored.add_index.to_string(),
        "payment_addr": STANDARD.encode(stored.payment_addr),
    });
    let text = match fault {
        Some(f) => corrupt(answer, f, "r_hash"),
        None => answer.to_string(),
    };
    json_response(StatusCode::OK, text)
}

async fn lookup_invoice(State(shared): State<Arc<Shared>>, UrlPath(r_hash_str): UrlPath<String>) -> Response {
    let fault = shared.take_fault(Route::LookupInvoice);
    if fault == Some(Fault::Hang) {
        return hang().await;
    }
    if let Some(resp) = fault.and_then(|f| fault_status(f, false)) {
        return resp;
    }
    let hash = match hex::decode(&r_hash_str) {
        Ok(h) => h,
        Err(e) => return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &format!("encoding/hex: {e}"), false),
    };
    if hash.len() != 32 {
        let msg = format!("payment hash must be exactly 32 bytes, is instead {}", hash.len());
        return gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, &msg, false);
    }
    let found = {
        let state = shared.state.lock();
        state.by_hash.get(hash.as_slice()).map(|&i| state.invoices[i].to_json())
    };
    match (found, fault) {
        (None, _) => gateway_error(StatusCode::NOT_FOUND, 5, "unable to locate invoice", false),
        (Some(v), Some(f)) => json_response(StatusCode::OK, corrupt(v, f, "r_hash")),
        (Some(v), None) => json_response(StatusCode::OK, v.to_string()),
    }
}

async fn list_invoices(State(shared): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let fault = shared.take_fault(Route::ListInvoices);
    if fault == Some(Fault::Hang) {
        return hang().await;
    }
    if let Some(resp) = fault.and_then(|f| fault_status(f, false)) {
        return resp;
    }
    let number = |k: &str| q.get(k).map(|v| v.parse::<u64>()).transpose();
    let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    let (Ok(offset), Ok(max)) = (number("index_offset"), number("num_max_invoices")) else {
        return gateway_error(StatusCode::BAD_REQUEST, 3, "invalid value for uint64 query parameter", false);
    };
    let offset = offset.unwrap_or(0);
    let max = match max.unwrap_or(0) {
        0 => 100,
        n => n,
    } as usize;
    let (reversed, pending_only) = (flag("reversed"), flag("pending_only"));
    let state = shared.state.lock();
    let wanted = |inv: &&Stored| !pending_only || matches!(inv.state, InvoiceState::Open | InvoiceState::Accepted);
    let page: Vec<&Stored> = if reversed {
        let below = |inv: &&Stored| offset == 0 || inv.add_index < offset;
        let mut p: Vec<&Stored> = state.invoices.iter().rev().filter(below).filter(wanted).take(max).collect();
        p.reverse();
        p
    } else {
        state.invoices.iter().filter(|inv| inv.add_index > offset).filter(wanted).take(max).collect()
    };
    let first = page.first().map_or(0, |i| i.add_index);
    let last = page.last().map_or(0, |i| i.add_index);
    let mut answer = json!({
        "invoices": page.iter().map(|i| i.to_json()).collect::<Vec<_>>(),
        "last_index_offset": last.to_string(),
        "first_index_offset": first.to_string(),
    });
    drop(state);
    if let Some(f) = fault {
        if let Some(first_invoice) = answer["invoices"].get_mut(0) {
            let corrupted = corrupt(first_invoice.take(), f, "r_hash");
            // A corrupted invoice that is still JSON stays in place; otherwise the body breaks.
            match serde_json::from_str(&corrupted) {
                Ok(v) => *first_invoice = v,
                Err(_) => return json_response(StatusCode::OK, corrupted),
            }
        } else {
            return json_response(StatusCode::OK, corrupt(answer, f, "r_hash"));
        }
    }
    json_response(StatusCode::OK, answer.to_string())
}
