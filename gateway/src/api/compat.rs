//! Kalima's published REST API, served as-is so its existing clients keep working. It owns
//! the paths below, their JSON shapes and Kalima's status convention: 200 on success, 405 for
//! a request it does not know (unknown path, or a known path with another method), 406 for
//! any error, with the body `{"error": "<message>", "code": "<code>"}` (Kalima documents
//! `{"error": "<message>"}`; `code` is the stable code of `/api/v1` errors, added for
//! programs). These routes are not in the OpenAPI document, which describes `/api/v1`.
//!
//! | request | answer |
//! |---|---|
//! | `GET /transaction?address=A&key=K` | the current transaction of that key |
//! | `GET /cache/list` | addresses holding values that the device may read |
//! | `GET /cache/keys?address=A` | keys holding a value at `A` |
//! | `GET /cache?address=A` | current transactions of `A`, by key |
//! | `GET /cache/after?address=A[&n=N][&seq=S]` | up to N transactions of `A` with per-address sequence above S (default 0), ascending |
//! | `GET /cache/before?address=A[&n=N][&seq=S]` | up to N transactions of `A` with per-address sequence below S (default: past the last), descending |
//! | `POST /transaction` `{address, key, body (base64), ttl?}` | the committed transaction (after the durable commit); an empty body deletes the key; `ttl` in seconds, 0 or negative for none |
//! | `POST /transaction/move` `{fromAddress, toAddress, key}` | the committed transaction at `toAddress` (a delete at the source and a put at the destination, in one commit) |
//! | `DELETE /transaction?address=A&key=K` | the committed delete |
//! | `DELETE /transaction?address=A` | the committed deletes of every key of `A`, in one commit (needs read and write grants) |
//! | `GET /ledger/bySequence?sequence=N` | the transaction at global sequence N (0-based) |
//! | `GET /ledger/betweenSequences?start=A&end=B[&pageSize=P]` | up to P readable transactions with global sequence in `[A, B]`, ascending |
//! | `GET /ledger/fromLast[?pageSize=P]` | the P newest readable transactions, newest first |
//!
//! `n` and `pageSize` default to 100 and range over 1..=1000. A transaction is
//! `{address, key, globalSequence, sequence, previous, body, hash, props, date, time}` in
//! Kalima's published encodings: `body` base64, `hash` the transaction id in base64, `previous`
//! the sequence before this one at the address (0 for the first), `props` base64 of a Java
//! properties text holding `date`, `time`, `ttl` (-1: none) and the transaction's own props;
//! `date` (`YYMMdd`) and `time` (`HHmmss`, UTC) are also given as plain fields.
//!
//! Auth is `Authorization: <token>` (Kalima's clients send the bare token) or
//! `Authorization: Bearer <token>`, with the same grants as `/api/v1`. Every write goes through
//! ingest under the interface label `kalima_rest`, so its checks and rejection counters apply;
//! writes refused before ingest (malformed JSON, bad base64) are counted here under that label.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose::STANDARD as B64};
use kalima_core::merkle::Hash;
use kalima_core::tx::{TxContent, validate_address, validate_key};
use kalima_core::{CommittedTx, Receipt, Rejection};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::StaticFormatDescription;
use time::macros::format_description;

use super::AppState;
use super::error::ApiError;
use super::extract::{Auth, bearer};
use super::tx::move_value;

/// Metrics label of writes through this surface.
pub const INTERFACE: &str = "kalima_rest";
/// Page size when `n` / `pageSize` is absent.
const DEFAULT_PAGE: u32 = 100;
/// Largest `n` / `pageSize`.
const MAX_PAGE: u32 = 1000;
/// Rows fetched per store query while filtering the ledger by read grants.
const SCAN_CHUNK: u32 = 1000;
/// Most ledger rows one request examines, so a device with a narrow grant cannot make the
/// node read the whole chain in one call; the page may then hold fewer than asked.
const MAX_SCAN: u64 = 100_000;
/// Kalima's clients encode with Java's `Base64`; accept input with or without padding.
const B64_IN: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const DATE: StaticFormatDescription = format_description!("[year repr:last_two][month][day]");
const TIME: StaticFormatDescription = format_description!("[hour][minute][second]");

/// Routes of the compatibility surface; another method on a known path answers like an
/// unknown request.
pub fn router() -> axum::Router<AppState> {
    fn known(m: MethodRouter<AppState>) -> MethodRouter<AppState> {
        m.fallback(unknown_request)
    }
    axum::Router::new()
        .route("/transaction", known(get(read_tx).post(write_tx).delete(delete_tx)))
        .route("/transaction/move", known(post(move_tx)))
        .route("/cache", known(get(cache_values)))
        .route("/cache/list", known(get(cache_list)))
        .route("/cache/keys", known(get(cache_keys)))
        .route("/cache/after", known(get(cache_after)))
        .route("/cache/before", known(get(cache_before)))
        .route("/ledger/bySequence", known(get(ledger_by_sequence)))
        .route("/ledger/betweenSequences", known(get(ledger_between)))
        .route("/ledger/fromLast", known(get(ledger_from_last)))
}

/// Kalima answers 405 to a request it does not know.
pub async fn unknown_request() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, Json(serde_json::json!({"error": "unknown request", "code": "unknown_request"})))
        .into_response()
}

/// An error of this surface: always 406, `{"error": message, "code": code}`.
#[derive(Debug)]
pub struct KalimaError {
    code: String,
    message: String,
}

impl KalimaError {
    fn new(code: &str, message: impl Into<String>) -> Self {
        KalimaError { code: code.to_string(), message: message.into() }
    }
}

impl IntoResponse for KalimaError {
    fn into_response(self) -> Response {
        (StatusCode::NOT_ACCEPTABLE, Json(serde_json::json!({"error": self.message, "code": self.code})))
            .into_response()
    }
}

impl From<ApiError> for KalimaError {
    fn from(e: ApiError) -> Self {
        if let ApiError::Internal(cause) = &e {
            tracing::error!(target: "api", cause = %cause, "Kalima REST request failed.");
        }
        KalimaError::new(e.status_code().1, e.message())
    }
}

impl From<Rejection> for KalimaError {
    fn from(r: Rejection) -> Self {
        ApiError::from(r).into()
    }
}

impl From<kalima_core::Error> for KalimaError {
    fn from(e: kalima_core::Error) -> Self {
        ApiError::from(e).into()
    }
}

impl From<QueryRejection> for KalimaError {
    fn from(r: QueryRejection) -> Self {
        KalimaError::new("invalid_query", r.body_text())
    }
}

/// A write refused before ingest saw it: counted like ingest's own rejections.
fn refuse(r: Rejection) -> KalimaError {
    kalima_core::ingest::count_rejection(INTERFACE, &r);
    r.into()
}

fn not_found(what: String) -> KalimaError {
    ApiError::NotFound(what).into()
}

/// The authenticated device; unknown and revoked tokens are refused (406) and counted.
pub struct KalimaAuth(pub Auth);

impl FromRequestParts<AppState> for KalimaAuth {
    type Rejection = KalimaError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let device = state.ingest.authenticate(INTERFACE, bearer(parts))?;
        Ok(KalimaAuth(Auth(device)))
    }
}

/// Query strings of reads; a bad one is a 406.
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(KalimaError))]
pub struct KalimaQuery<T>(pub T);

/// A transaction as Kalima's REST API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KalimaTx {
    /// Address.
    pub address: String,
    /// Key.
    pub key: String,
    /// Position in the chain (0-based).
    pub global_sequence: u64,
    /// Position among the transactions of the address (1-based).
    pub sequence: u64,
    /// The sequence before this one at the address (0 for the first), as Kalima numbers it.
    pub previous: u64,
    /// Body bytes, base64.
    pub body: String,
    /// Transaction id, base64 (the same 32 bytes as the hex id of `/api/v1`).
    pub hash: String,
    /// Base64 of a Java properties text: `date`, `time`, `ttl` and the transaction's props.
    pub props: String,
    /// Node date of the commit, UTC, `YYMMdd`.
    pub date: String,
    /// Node time of the commit, UTC, `HHmmss`.
    pub time: String,
}

impl From<&CommittedTx> for KalimaTx {
    fn from(c: &CommittedTx) -> Self {
        let t = &c.tx;
        let (date, time) = date_time(t.timestamp_ms);
        KalimaTx {
            address: t.content.address.clone(),
            key: t.content.key.clone(),
            global_sequence: t.global_sequence,
            sequence: t.sequence,
            previous: t.sequence.saturating_sub(1),
            body: B64.encode(&t.content.body),
            hash: B64.encode(c.id),
            props: B64.encode(properties_text(&t.content.props, &date, &time, t.content.ttl_secs)),
            date,
            time,
        }
    }
}

/// A Java properties text (what Kalima's clients parse), sorted by name; the node's own
/// `date`, `time` and `ttl` entries win over props of the same name.
fn properties_text(props: &BTreeMap<String, String>, date: &str, time: &str, ttl_secs: u32) -> String {
    let mut all: BTreeMap<&str, String> = props.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    all.insert("date", date.to_string());
    all.insert("time", time.to_string());
    all.insert("ttl", if ttl_secs == 0 { "-1".to_string() } else { ttl_secs.to_string() });
    let mut out = String::new();
    for (k, v) in all {
        out.push_str(&java_escape(k, true));
        out.push('=');
        out.push_str(&java_escape(&v, false));
        out.push('\n');
    }
    out
}

/// Escapes as `java.util.Properties.store` does (ISO 8859-1 output with `\uXXXX` escapes).
fn java_escape(s: &str, is_key: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{c}' => out.push_str("\\f"),
            '=' | ':' | '#' | '!' => {
                out.push('\\');
                out.push(c);
            }
            ' ' if is_key || i == 0 => out.push_str("\\ "),
            ' '..='~' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    out
}

/// `YYMMdd` and `HHmmss` in UTC of a timestamp in ms (empty when out of range).
fn date_time(ms: i64) -> (String, String) {
    match OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => (t.format(DATE).unwrap_or_default(), t.format(TIME).unwrap_or_default()),
        Err(_) => (String::new(), String::new()),
    }
}

fn page_size(n: Option<u32>, name: &str) -> Result<u32, KalimaError> {
    let n = n.unwrap_or(DEFAULT_PAGE);
    if (1..=MAX_PAGE).contains(&n) {
        Ok(n)
    } else {
        Err(KalimaError::new("invalid_query", format!("{name} must be 1..={MAX_PAGE}")))
    }
}

fn check_address(address: &str) -> Result<(), KalimaError> {
    Ok(validate_address(address).map_err(Rejection::from)?)
}

/// A read of a whole address on behalf of a write (delete all, move): refused and counted
/// as a rejected write when the device may not read it.
fn require_read_for_write(auth: &Auth, address: &str) -> Result<(), KalimaError> {
    auth.require_read(address).map_err(|e| match e {
        ApiError::Rejected(r) => refuse(r),
        other => other.into(),
    })
}

/// The JSON body of a write; malformed input is a counted rejection.
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, KalimaError> {
    let bytes = body.map_err(|e| refuse(Rejection::Malformed(e.body_text())))?;
    serde_json::from_slice(&bytes).map_err(|e| refuse(Rejection::Malformed(e.to_string())))
}

/// The content of a Kalima `POST /transaction` body (`{address, key, body (base64), ttl}`);
/// ingest checks the fields afterwards.
pub fn post_content(bytes: &[u8]) -> Result<TxContent, Rejection> {
    let req: PostTx = serde_json::from_slice(bytes).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let body = B64_IN
        .decode(req.body.as_bytes())
        .map_err(|e| Rejection::Malformed(format!("field `body` is not base64: {e}")))?;
    Ok(TxContent {
        address: req.address,
        key: req.key,
        body,
        // Kalima writes ttl=-1 for "none"; too large a TTL is refused by ingest's checks.
        ttl_secs: req.ttl.filter(|t| *t > 0).map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
        ..TxContent::default()
    })
}

/// Commits `items` through ingest and answers the committed transactions, in order.
async fn commit(state: &AppState, auth: &Auth, items: Vec<TxContent>) -> Result<Vec<KalimaTx>, KalimaError> {
    let written = state.ingest.write(INTERFACE, &auth.0, items).await?;
    committed(state, written.receipts()).await
}

/// The stored transactions of `receipts` (one store query over their global-sequence span).
async fn committed(state: &AppState, receipts: &[Receipt]) -> Result<Vec<KalimaTx>, KalimaError> {
    let seqs = receipts.iter().map(|r| r.global_sequence);
    let (Some(lo), Some(hi)) = (seqs.clone().min(), seqs.max()) else {
        return Ok(Vec::new());
    };
    let span = u32::try_from(hi - lo + 1).unwrap_or(u32::MAX);
    let rows = state.chain.store().txs_between(lo, hi.saturating_add(1), span).await?;
    let by_id: HashMap<Hash, &CommittedTx> = rows.iter().map(|c| (c.id, c)).collect();
    receipts
        .iter()
        .map(|r| {
            by_id.get(&r.id).map(|c| KalimaTx::from(*c)).ok_or_else(|| {
                ApiError::Internal(format!("committed transaction {} is not in the store", hex::encode(r.id))).into()
            })
        })
        .collect()
}

fn only(mut txs: Vec<KalimaTx>) -> Result<Json<KalimaTx>, KalimaError> {
    txs.pop().map(Json).ok_or_else(|| ApiError::Internal("a write answered no receipt".into()).into())
}

fn tombstone(address: &str, key: &str) -> TxContent {
    TxContent { address: address.to_string(), key: key.to_string(), ..TxContent::default() }
}

#[derive(Debug, Deserialize)]
struct AddressKey {
    address: String,
    key: String,
}

#[derive(Debug, Deserialize)]
struct AddressOnly {
    address: String,
}

#[derive(Debug, Deserialize)]
struct AddressRange {
    address: String,
    n: Option<u32>,
    seq: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    address: String,
    key: Option<String>,
}

/// `POST /transaction`. Unknown fields are ignored: Kalima's clients may send more.
#[derive(Debug, Deserialize)]
struct PostTx {
    address: String,
    key: String,
    body: String,
    #[serde(default)]
    ttl: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MoveTx {
    from_address: String,
    to_address: String,
    key: String,
}

#[derive(Debug, Deserialize)]
struct BySequence {
    sequence: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Between {
    start: u64,
    end: u64,
    page_size: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FromLast {
    page_size: Option<u32>,
}

async fn read_tx(
    State(state): State<AppState>,
    KalimaAuth(auth): KalimaAuth,
    KalimaQuery(q): KalimaQuery<AddressKey>,
) -> Result<Json<KalimaTx>, KalimaError> {
    check_address(&q.address)?;
    validate_key(&q.key).map_err(Rejection::from)?;
    auth.require_read(&q.address)?;
    let c = state
        .chain
        .memcache()
        .get(&q.address, &q.key)
        .ok_or_else(|| not_found(format!("no value at {} key {}", q.address, q.key)))?;
    Ok(Json(KalimaTx::from(c.as_ref())))
}

async fn cache_list(State(state): State<AppState>, KalimaAuth(auth): KalimaAuth) -> Json<Vec<String>> {
    let mut addresses = state.chain.memcache().addresses("/");
    addresses.retain(|a| auth.0.can_read(a));
    Json(addresses)
}

async fn cache_keys(
    State(state): State<AppState>,
    KalimaAuth(auth): KalimaAuth,
    KalimaQuery(q): KalimaQuery<AddressOnly>,
) -> Result<Json<Vec<String>>, KalimaError> {
    check_address(&q.address)?;
    auth.require_read(&q.address)?;
    Ok(Json(state.chain.memcache().keys(&q.address)))
}

async fn cache_values(
    State(state): State<AppState>,
    KalimaAuth(auth): KalimaAuth,
    KalimaQuery(q): KalimaQuery<AddressOnly>,
) -> Result<Json<Vec<KalimaTx>>, KalimaError> {
    check_address(&q.address)?;
    auth.require_read(&q.address)?;
    let values = state.chain.memcache().values(&q.address);
    Ok(Json(values.iter().map(|c| KalimaTx::from(c.as_ref())).collect()))
}

/// Transactions of an address by per-address sequence, from the store.
async fn cache_range(
    state: &AppState,
    auth: &Auth,
    q: AddressRange,
    descending: bool,
) -> Result<Json<Vec<KalimaTx>>, KalimaError> {
    check_address(&q.address)?;
    auth.require_read(&q.address)?;
    let n = page_size(q.n, "n")?;
    let (after, before) = match (descending, q.seq) {
        (false, seq) => (seq.unwrap_or(0), u64::MAX),
        (true, seq) => (0, seq.unwrap_or(u64::MAX)),
    };
    let txs = state.chain.store().address_range(&q.address, after, before, n, descending).await?;
    Ok(Json(txs.iter().map(KalimaTx::from).collect()))
}

async fn cache_after(
    State(state): State<AppState>,
    KalimaAuth(auth): KalimaAuth,
    KalimaQuery(q): KalimaQuery<AddressRange>,
) -> Result<Json<Vec<KalimaTx>>, KalimaError> {
    cache_range(&state, &auth, q, false).await
}

async fn cache_before(
    State(state): State<AppState>,
    KalimaAuth(auth): KalimaAuth,
    KalimaQuery(q): KalimaQuery<AddressRange>,
) -> Result<Json<Vec<KalimaTx>>, KalimaError> {
    cache_range(&state, &auth, q, true).await
}

async fn write_tx(
    State(state): State<AppState>,
    KalimaAuth(auth): KalimaAuth,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<KalimaTx>, KalimaError> {
    let bytes = body.map_err(|e| refuse(Rejection::Malformed(e.body_text())))?;
    let content = post_content(&bytes).map_err(refuse)?;
    only(commit(&state, &auth, vec![content]).await?)
}

async fn move_tx(
    State(state): State<AppState>,
    KalimaAuth(auth): KalimaAuth,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<KalimaTx>, KalimaError> {
    let req: MoveTx = parse_body(body)?;
    // move_value checks these too, but does not count them as rejected writes.
    for a in [&req.from_address, &req.to_address] {
        validate_address(a).map_err(|e| refuse(e.into()))?;
    }
    validate_key(&req.key).map_err(|e| refuse(e.into()))?;
    require_read_for_write(&auth, &req.from_address)?;
    let receipts = move_value(&state, &auth, INTERFACE, &req.from_address, &req.to_address, &req.key).await?;
    only(committed(&state, &receipts).await?)
}

async fn delete_tx(
    State(state): State<AppState>,
    KalimaAuth(auth): KalimaAuth,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<Response, KalimaError> {
    let Query(q) = q.map_err(|e| refuse(Rejection::Malformed(e.body_text())))?;
    if let Some(key) = &q.key {
        let tx = only(commit(&state, &auth, vec![tombstone(&q.address, key)]).await?)?;
        return Ok(tx.into_response());
    }
    validate_address(&q.address).map_err(|e| refuse(e.into()))?;
    // Deleting every key names them in the answer: a read of the address.
    require_read_for_write(&auth, &q.address)?;
    let keys = state.chain.memcache().keys(&q.address);
    if keys.is_empty() {
        return Err(not_found(format!("no value at {}", q.address)));
    }
    let items = keys.iter().map(|k| tombstone(&q.address, k)).collect();
    Ok(Json(commit(&state, &auth, items).await?).into_response())
}

async fn ledger_by_sequence(
    State(state): State<AppState>,
    KalimaAuth(auth): KalimaAuth,
    KalimaQuery(q): KalimaQuery<BySequence>,
) -> Result<Json<KalimaTx>, KalimaError> {
    let c = state
        .chain
        .store()
        .tx_by_sequence(q.sequence)
        .await?
        .ok_or_else(|| not_found(format!("no transaction at sequence {}", q.sequence)))?;
    auth.require_read(&c.tx.content.address)?;
    Ok(Json(KalimaTx::from(&c)))
}

async fn ledger_between(
    State(state): State<AppState>,
    KalimaAuth(auth): KalimaAuth,
    KalimaQuery(q): KalimaQuery<Between>,
) -> Result<Json<Vec<KalimaTx>>, KalimaError> {
    let n = page_size(q.page_size, "pageSize")?;
    if q.end < q.start {
        return Err(KalimaError::new("invalid_query", "end must not be below start"));
    }
    let end = q.end.saturating_add(1).min(state.chain.tree_size());
    Ok(Json(scan(&state, &auth, q.start, end, n, false).await?))
}

async fn ledger_from_last(
    State(state): State<AppState>,
    KalimaAuth(auth): KalimaAuth,
    KalimaQuery(q): KalimaQuery<FromLast>,
) -> Result<Json<Vec<KalimaTx>>, KalimaError> {
    let n = page_size(q.page_size, "pageSize")?;
    let end = state.chain.tree_size();
    Ok(Json(scan(&state, &auth, 0, end, n, true).await?))
}

/// Up to `n` transactions the device may read with global sequence in `[from, to)`,
/// ascending from `from` or descending from `to`, examining at most [`MAX_SCAN`] rows.
async fn scan(
    state: &AppState,
    auth: &Auth,
    mut from: u64,
    mut to: u64,
    n: u32,
    descending: bool,
) -> Result<Vec<KalimaTx>, KalimaError> {
    let want = n as usize;
    let chunk = if auth.0.is_admin() { n } else { SCAN_CHUNK };
    let mut out = Vec::with_capacity(want);
    let mut scanned = 0u64;
    while from < to && out.len() < want && scanned < MAX_SCAN {
        let (lo, hi) = if descending {
            (to.saturating_sub(u64::from(chunk)).max(from), to)
        } else {
            (from, from.saturating_add(u64::from(chunk)).min(to))
        };
        let mut rows = state.chain.store().txs_between(lo, hi, chunk).await?;
        if rows.is_empty() {
            break;
        }
        scanned += rows.len() as u64;
        if descending {
            rows.reverse();
            to = lo;
        } else {
            from = hi;
        }
        let readable = rows.iter().filter(|c| auth.0.can_read(&c.tx.content.address));
        out.extend(readable.take(want - out.len()).map(KalimaTx::from));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_and_time_are_utc_yymmdd_hhmmss() {
        // 2025-11-21T04:40:00.123Z
        assert_eq!(date_time(1_763_700_000_123), ("251121".to_string(), "044000".to_string()));
        assert_eq!(date_time(0), ("700101".to_string(), "000000".to_string()));
    }

    #[test]
    fn props_are_a_java_properties_text() {
        let props: BTreeMap<String, String> =
            [("unit".into(), "°C".into()), ("a=b".into(), " x:y".into()), ("ttl".into(), "spoofed".into())].into();
        let text = properties_text(&props, "221005", "155446", 0);
        assert_eq!(text, "a\\=b=\\ x\\:y\ndate=221005\ntime=155446\nttl=-1\nunit=\\u00B0C\n");
        assert!(properties_text(&BTreeMap::new(), "d", "t", 60).contains("ttl=60\n"));
    }

    #[test]
    fn base64_input_accepts_missing_padding() {
        assert_eq!(B64_IN.decode("MjEuNQ==").ok(), Some(b"21.5".to_vec()));
        assert_eq!(B64_IN.decode("MjEuNQ").ok(), Some(b"21.5".to_vec()));
        assert!(B64_IN.decode("not base64!").is_err());
    }
}
