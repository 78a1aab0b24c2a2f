//! LND's REST JSON (grpc-gateway, protojson) read strictly: 64-bit integers arrive as decimal
//! strings, bytes as base64, enums by name, and a field left out means its zero value. Every
//! departure from that is an [`Error::Malformed`] naming the endpoint and the field.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::types::{Invoice, InvoiceState, PaymentHash};

/// The fields of one JSON object, read with the endpoint and a path prefix for error messages.
struct Fields<'a> {
    endpoint: &'static str,
    path: &'a str,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn of(endpoint: &'static str, path: &'a str, value: &'a Value) -> Result<Self> {
        match value {
            Value::Object(obj) => Ok(Fields { endpoint, path, obj }),
            other => {
                Err(Error::malformed(endpoint, display_path(path), format!("expected an object, got {}", kind(other))))
            }
        }
    }

    fn name(&self, field: &str) -> String {
        if self.path.is_empty() { field.to_string() } else { format!("{}.{field}", self.path) }
    }

    fn bad(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::malformed(self.endpoint, self.name(field), reason)
    }

    /// A present, non-null value.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    /// A protojson 64-bit unsigned integer: a decimal string (as LND writes it) or a JSON integer.
    fn u64(&self, field: &str) -> Result<u64> {
        match self.get(field) {
            None => Ok(0),
            Some(Value::String(s)) => parse_decimal(s).map_err(|r| self.bad(field, r)),
            Some(Value::Number(n)) => {
                n.as_u64().ok_or_else(|| self.bad(field, format!("not an unsigned integer: {n}")))
            }
            Some(other) => Err(self.bad(field, format!("expected a decimal string, got {}", kind(other)))),
        }
    }

    fn string(&self, field: &str) -> Result<String> {
        match self.get(field) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.bad(field, format!("expected a string, got {}", kind(other)))),
        }
    }

    fn bytes(&self, field: &str) -> Result<Vec<u8>> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => decode_base64(s).map_err(|r| self.bad(field, r)),
            Some(other) => Err(self.bad(field, format!("expected a base64 string, got {}", kind(other)))),
        }
    }

    fn hash(&self, field: &str) -> Result<PaymentHash> {
        let bytes = self.bytes(field)?;
        PaymentHash::from_slice(&bytes).map_err(|_| self.bad(field, format!("expected 32 bytes, got {}", bytes.len())))
    }

    fn state(&self, field: &str) -> Result<InvoiceState> {
        let state = match self.get(field) {
            // protojson leaves out an enum at its zero value, which is OPEN.
            None => InvoiceState::Open,
            Some(Value::String(s)) => match s.as_str() {
                "OPEN" => InvoiceState::Open,
                "SETTLED" => InvoiceState::Settled,
                "CANCELED" => InvoiceState::Canceled,
                "ACCEPTED" => InvoiceState::Accepted,
                other => return Err(self.bad(field, format!("unknown invoice state {other:?}"))),
            },
            Some(Value::Number(n)) => match n.as_u64() {
                Some(0) => InvoiceState::Open,
                Some(1) => InvoiceState::Settled,
                Some(2) => InvoiceState::Canceled,
                Some(3) => InvoiceState::Accepted,
                _ => return Err(self.bad(field, format!("unknown invoice state {n}"))),
            },
            Some(other) => return Err(self.bad(field, format!("expected a state name, got {}", kind(other)))),
        };
        Ok(state)
    }

    fn object(&self, field: &str) -> Result<Option<&'a Value>> {
        match self.get(field) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(v)),
            Some(other) => Err(self.bad(field, format!("expected an object, got {}", kind(other)))),
        }
    }
}

fn display_path(path: &str) -> String {
    if path.is_empty() { "body".to_string() } else { path.to_string() }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Digits only, no sign, no spaces, within u64.
fn parse_decimal(s: &str) -> std::result::Result<u64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("not a decimal integer: {:?}", truncate(s, 40)));
    }
    s.parse::<u64>().map_err(|_| format!("out of range: {:?}", truncate(s, 40)))
}

/// protojson writes standard base64 with padding and reads either alphabet, padded or not.
fn decode_base64(s: &str) -> std::result::Result<Vec<u8>, String> {
    let engines = [&STANDARD, &URL_SAFE, &STANDARD_NO_PAD, &URL_SAFE_NO_PAD];
    engines.iter().find_map(|e| e.decode(s).ok()).ok_or_else(|| format!("not base64: {:?}", truncate(s, 60)))
}

pub(crate) fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars { s.to_string() } else { s.chars().take(max_chars).collect::<String>() + "..." }
}

/// Parses a whole JSON body.
pub(crate) fn parse_json(endpoint: &'static str, body: &[u8]) -> Result<Value> {
    serde_json::from_slice(body).map_err(|e| {
        Error::malformed(
            endpoint,
            "body",
            format!("not JSON ({e}): {:?}", truncate(&String::from_utf8_lossy(body), 80)),
        )
    })
}

/// An LND `Invoice` message (lookup, list, streams). `path` prefixes field names in errors.
pub(crate) fn invoice(endpoint: &'static str, path: &str, value: &Value) -> Result<Invoice> {
    let f = Fields::of(endpoint, path, value)?;
    Ok(Invoice {
        payment_hash: f.hash("r_hash")?,
        payment_request: f.string("payment_request")?,
        value_msat: f.u64("value_msat")?,
        memo: f.string("memo")?,
        state: f.state("state")?,
        add_index: f.u64("add_index")?,
        settle_index: f.u64("settle_index")?,
        amt_paid_msat: f.u64("amt_paid_msat")?,
        creation_date: f.u64("creation_date")?,
        expiry_secs: f.u64("expiry")?,
        settle_date: f.u64("settle_date")?,
    })
}

/// The answer of `POST /v1/invoices` (`AddInvoiceResponse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AddInvoiceResponse {
    pub(crate) payment_hash: PaymentHash,
    pub(crate) payment_request: String,
    pub(crate) add_index: u64,
}

pub(crate) fn add_invoice_response(endpoint: &'static str, value: &Value) -> Result<AddInvoiceResponse> {
    let f = Fields::of(endpoint, "", value)?;
    let payment_request = f.string("payment_request")?;
    if payment_request.is_empty() {
        return Err(f.bad("payment_request", "missing"));
    }
    let add_index = f.u64("add_index")?;
    if add_index == 0 {
        return Err(f.bad("add_index", "missing or 0"));
    }
    // Checked for its shape only: the payment address is inside the BOLT11 request too.
    f.bytes("payment_addr")?;
    Ok(AddInvoiceResponse { payment_hash: f.hash("r_hash")?, payment_request, add_index })
}

/// One page of `GET /v1/invoices` (`ListInvoiceResponse`): the invoices and the last add index.
pub(crate) fn list_invoices_response(endpoint: &'static str, value: &Value) -> Result<(Vec<Invoice>, u64)> {
    let f = Fields::of(endpoint, "", value)?;
    let invoices = match f.get("invoices") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| invoice(endpoint, &format!("invoices[{i}]"), item))
            .collect::<Result<Vec<_>>>()?,
        Some(other) => return Err(f.bad("invoices", format!("expected an array, got {}", kind(other)))),
    };
    Ok((invoices, f.u64("last_index_offset")?))
}

/// One line of a grpc-gateway stream: `{"result": <Invoice>}` or `{"error": <Status>}`.
pub(crate) fn stream_line(endpoint: &'static str, line: &[u8]) -> Result<Invoice> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        Error::malformed(
            endpoint,
            "line",
            format!("not JSON ({e}): {:?}", truncate(&String::from_utf8_lossy(line), 80)),
        )
    })?;
    let f = Fields::of(endpoint, "", &value)?;
    if let Some(err) = f.get("error") {
        let status = error_status(err);
        return Err(Error::Stream { endpoint, code: status.code, message: status.message });
    }
    match f.object("result")? {
        Some(result) => invoice(endpoint, "result", result),
        None => Err(f.bad("result", "missing: a stream line holds a result or an error")),
    }
}

/// A grpc-gateway error: gRPC code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrorStatus {
    pub(crate) code: Option<i64>,
    pub(crate) message: String,
}

/// Reads an error object in the shapes grpc-gateway writes: v2 `{"code","message","details"}`,
/// v1 `{"error": "...", "code", "message"}`, or `{"grpc_code", "http_code", "message"}`.
fn error_status(v: &Value) -> ErrorStatus {
    match v {
        Value::Object(obj) => {
            let code = ["code", "grpc_code"].iter().find_map(|k| obj.get(*k).and_then(Value::as_i64));
            let message = ["message", "error"]
                .iter()
                .find_map(|k| obj.get(*k).and_then(Value::as_str).filter(|s| !s.is_empty()))
                .unwrap_or("")
                .to_string();
            ErrorStatus { code, message }
        }
        Value::String(s) => ErrorStatus { code: None, message: s.clone() },
        other => ErrorStatus { code: None, message: truncate(&other.to_string(), 200) },
    }
}

/// The error in a non-2xx body: grpc-gateway JSON (top level, or under `error`), or else the
/// start of the body as text.
pub(crate) fn error_body(body: &[u8]) -> ErrorStatus {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => match obj.get("error") {
            Some(inner @ Value::Object(_)) => error_status(inner),
            _ => error_status(&Value::Object(obj)),
        },
        _ => ErrorStatus { code: None, message: truncate(String::from_utf8_lossy(body).trim(), 200) },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const E: &str = "GET /v1/invoice/{r_hash_str}";

    fn lnd_invoice() -> Value {
        // Shape of LND's JSON: protojson with proto names and unpopulated fields emitted.
        json!({
            "memo": "feed /plant-1 for 1 day",
            "r_preimage": STANDARD.encode([7u8; 32]),
            "r_hash": STANDARD.encode([0xfbu8; 32]),
            "value": "1500",
            "value_msat": "1500000",
            "settled": true,
            "creation_date": "1700000000",
            "settle_date": "1700000100",
            "payment_request": "lnbcrt15u1p...",
            "description_hash": "",
            "expiry": "3600",
            "fallback_addr": "",
            "cltv_expiry": "80",
            "route_hints": [],
            "private": false,
            "add_index": "12",
            "settle_index": "4",
            "amt_paid": "1500000",
            "amt_paid_sat": "1500",
            "amt_paid_msat": "1500000",
            "state": "SETTLED",
            "htlcs": [],
            "features": {},
            "is_keysend": false,
            "payment_addr": STANDARD.encode([1u8; 32]),
            "is_amp": false,
            "amp_invoice_state": {}
        })
    }

    #[test]
    fn reads_an_lnd_invoice() {
        let inv = invoice(E, "", &lnd_invoice()).unwrap();
        assert_eq!(inv.payment_hash, PaymentHash([0xfb; 32]));
        assert_eq!(inv.value_msat, 1_500_000);
        assert_eq!(inv.state, InvoiceState::Settled);
        assert_eq!((inv.add_index, inv.settle_index, inv.amt_paid_msat), (12, 4, 1_500_000));
        assert_eq!((inv.creation_date, inv.expiry_secs, inv.settle_date), (1_700_000_000, 3600, 1_700_000_100));
        assert_eq!(inv.memo, "feed /plant-1 for 1 day");
    }

    #[test]
    fn missing_fields_are_zero_values_and_numbers_are_accepted() {
        let v = json!({"r_hash": URL_SAFE_NO_PAD.encode([2u8; 32]), "value_msat": 5, "state": 3});
        let inv = invoice(E, "", &v).unwrap();
        assert_eq!(inv.value_msat, 5);
        assert_eq!(inv.state, InvoiceState::Accepted);
        assert_eq!(inv.settle_index, 0);
        assert_eq!(inv.memo, "");
    }

    /// Table of broken invoices: each must fail naming its field, never panic.
    #[test]
    fn malformed_invoices_name_the_field() {
        struct Case {
            field: &'static str,
            value: Value,
            expect: &'static str,
        }
        let cases = [
            Case { field: "r_hash", value: json!("!!not base64!!"), expect: "r_hash: not base64" },
            Case {
                field: "r_hash",
                value: json!(STANDARD.encode([1u8; 16])),
                expect: "r_hash: expected 32 bytes, got 16",
            },
            Case { field: "r_hash", value: json!(42), expect: "r_hash: expected a base64 string" },
            Case { field: "value_msat", value: json!("12abc"), expect: "value_msat: not a decimal integer" },
            Case { field: "value_msat", value: json!("-5"), expect: "value_msat: not a decimal integer" },
            Case { field: "value_msat", value: json!(" 5"), expect: "value_msat: not a decimal integer" },
            Case { field: "value_msat", value: json!(1.5), expect: "value_msat: not an unsigned integer" },
            Case { field: "add_index", value: json!("99999999999999999999999"), expect: "add_index: out of range" },
            Case { field: "settle_index", value: json!(true), expect: "settle_index: expected a decimal string" },
            Case { field: "state", value: json!("PAID"), expect: "state: unknown invoice state" },
            Case { field: "state", value: json!(9), expect: "state: unknown invoice state" },
            Case { field: "memo", value: json!(["x"]), expect: "memo: expected a string" },
        ];
        for case in cases {
            let mut v = lnd_invoice();
            v[case.field] = case.value;
            let err = invoice(E, "result", &v).unwrap_err().to_string();
            let want = format!("malformed data: result.{}", case.expect);
            assert!(err.contains(&want), "{}: {err} does not contain {want}", case.field);
        }
        let err = invoice(E, "", &json!([1])).unwrap_err().to_string();
        assert!(err.contains("body: expected an object, got an array"), "{err}");
    }

    #[test]
    fn add_invoice_response_needs_its_fields() {
        let ok = json!({
            "r_hash": STANDARD.encode([3u8; 32]),
            "payment_request": "lnbcrt1...",
            "add_index": "7",
            "payment_addr": STANDARD.encode([4u8; 32])
        });
        let r = add_invoice_response("POST /v1/invoices", &ok).unwrap();
        assert_eq!((r.payment_hash, r.add_index), (PaymentHash([3; 32]), 7));
        for (field, value, expect) in [
            ("payment_request", json!(""), "payment_request: missing"),
            ("add_index", json!("x"), "add_index: not a decimal integer"),
            ("payment_addr", json!("%%"), "payment_addr: not base64"),
            ("r_hash", Value::Null, "r_hash: expected 32 bytes, got 0"),
        ] {
            let mut v = ok.clone();
            v[field] = value;
            let err = add_invoice_response("POST /v1/invoices", &v).unwrap_err().to_string();
            assert!(err.contains(expect), "{field}: {err}");
        }
    }

    #[test]
    fn stream_lines_carry_results_or_errors() {
        let line = serde_json::to_vec(&json!({"result": lnd_invoice()})).unwrap();
        assert_eq!(stream_line(E, &line).unwrap().settle_index, 4);

        let v2 = br#"{"error":{"code":2,"message":"invoice subscription closed","details":[]}}"#;
        match stream_line(E, v2).unwrap_err() {
            Error::Stream { code, message, .. } => {
                assert_eq!(code, Some(2));
                assert_eq!(message, "invoice subscription closed");
            }
            other => panic!("{other}"),
        }
        let v1 = br#"{"error":{"grpc_code":14,"http_code":503,"message":"unavailable","http_status":"Service Unavailable"}}"#;
        assert!(matches!(stream_line(E, v1), Err(Error::Stream { code: Some(14), .. })));

        for (line, expect) in [
            (&br#"{"result": {"r_hash": "#[..], "line: not JSON"),
            (&b"[]"[..], "body: expected an object"),
            (&br#"{"other": 1}"#[..], "result: missing"),
            (&br#"{"result": 5}"#[..], "result: expected an object"),
        ] {
            let err = stream_line(E, line).unwrap_err().to_string();
            assert!(err.contains(expect), "{err}");
        }
    }

    #[test]
    fn error_bodies_in_every_gateway_shape() {
        assert_eq!(
            error_body(br#"{"code":5,"message":"unable to locate invoice","details":[]}"#),
            ErrorStatus { code: Some(5), message: "unable to locate invoice".into() }
        );
        assert_eq!(
            error_body(br#"{"error":"expected 1 macaroon, got 0","code":2}"#),
            ErrorStatus { code: Some(2), message: "expected 1 macaroon, got 0".into() }
        );
        assert_eq!(
            error_body(br#"{"error":{"code":2,"message":"verification failed","details":[]}}"#),
            ErrorStatus { code: Some(2), message: "verification failed".into() }
        );
        assert_eq!(error_body(b"<html>bad gateway</html>\n").message, "<html>bad gateway</html>");
    }

    #[test]
    fn list_response_reads_every_invoice() {
        let v =
            json!({"invoices": [lnd_invoice(), lnd_invoice()], "last_index_offset": "12", "first_index_offset": "12"});
        let (invoices, last) = list_invoices_response("GET /v1/invoices", &v).unwrap();
        assert_eq!((invoices.len(), last), (2, 12));
        let mut bad = v.clone();
        bad["invoices"][1]["state"] = json!("NOPE");
        let err = list_invoices_response("GET /v1/invoices", &bad).unwrap_err().to_string();
        assert!(err.contains("invoices[1].state"), "{err}");
    }
}
