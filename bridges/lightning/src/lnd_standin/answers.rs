//! grpc-gateway's answers, shared by the unary and the streaming routes: error bodies, JSON
//! responses, and the malformed answers, hangs and failures an injected [`Fault`] makes.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::Fault;

/// A grpc-gateway error answer; on a stream, the error is wrapped as a stream line would be.
pub(super) fn gateway_error(status: StatusCode, code: i64, message: &str, stream: bool) -> Response {
    let status_json = json!({"code": code, "message": message, "details": []});
    let body = if stream { json!({"error": status_json}) } else { status_json };
    json_response(status, body.to_string())
}

pub(super) fn json_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The JSON of an invoice answer, with a fault applied to it.
pub(super) fn corrupt(mut v: Value, fault: Fault, hash_field: &str) -> String {
    match fault {
        Fault::NotJson => return "this is not JSON".to_string(),
        Fault::BadBase64Hash => v[hash_field] = json!("!!not-base64!!"),
        Fault::ShortHash => v[hash_field] = json!(STANDARD.encode([7u8; 16])),
        Fault::NonNumericIndex => {
            v["add_index"] = json!("12abc");
            if v.get("settle_index").is_some() {
                v["settle_index"] = json!("12abc");
            }
        }
        Fault::Truncated => {
            let s = v.to_string();
            return s[..s.len() / 2].to_string();
        }
        Fault::Status500 | Fault::StreamError | Fault::Hang => {}
    }
    v.to_string()
}

/// Never answers (the connection stays open until the client drops it).
pub(super) async fn hang() -> Response {
    std::future::pending().await
}

pub(super) fn fault_status(fault: Fault, stream: bool) -> Option<Response> {
    match fault {
        Fault::Status500 => Some(gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, "injected failure", stream)),
        Fault::StreamError if !stream => {
            Some(gateway_error(StatusCode::INTERNAL_SERVER_ERROR, 2, "injected failure", false))
        }
        _ => None,
    }
}
