//! `/api/v1/feeds` and `/api/v1/market`: the oracle marketplace. Providers list, update and
//! delist feeds; buyers browse the catalogue, purchase periods in KLX (a holder-signed
//! instruction) and receive the feed over SSE or WebSocket with their access token, each
//! reading with its inclusion proof; providers read their statement; the admin sets the
//! economics.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use kalima_core::ledger::LedgerOp;
use kalima_core::ledger::market::{
    Currency, FeedSpec, MARKET_CONFIG_ADDRESS, MARKET_CONFIG_KEY, MarketConfig, PURCHASES_ADDRESS, Period,
    PurchaseRecord, STATEMENTS_ADDRESS, SUBSCRIPTIONS_ADDRESS, SignedPurchase, Statement, Subscription,
};
use kalima_marketplace::{Access, Delivered, FeedFilter, FeedStream, FeedView};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Auth};
use super::klx::submit;
use super::model::TxReceipt;
use kalima_core::now_ms;

/// How often delivery batches are recorded on the chain.
const RECORD_EVERY: Duration = Duration::from_secs(30);

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/feeds", get(list).post(list_feed))
        .route("/feeds/{id}", get(one).delete(delist))
        .route("/feeds/{id}/purchases", post(purchase))
        .route("/feeds/{id}/invoices", post(invoice))
        .route("/market/invoices/{hash}", get(invoice_status))
        .route("/feeds/{id}/stream", get(stream))
        .route("/feeds/{id}/ws", get(ws))
        .route("/market/subscriptions/{id}", get(subscription))
        .route("/market/subscriptions/{id}/webhook", axum::routing::put(set_webhook).delete(remove_webhook))
        .route("/market/statements/{provider}", get(statement))
        .route("/market/config", get(config).put(set_config))
}

/// Catalogue filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FeedQuery {
    /// Feeds whose prefix lies under (or covers) this address prefix.
    pub prefix: Option<String>,
    /// One provider's feeds (its device id).
    pub provider: Option<String>,
    /// Priced in `klx` or `sats`.
    pub currency: Option<Currency>,
    /// Sold per `hour`, `day` or `month`.
    pub period: Option<Period>,
    /// At most this price (base units or sats, decimal string), with `currency`.
    pub max_price: Option<String>,
    /// Text in the id, title or description.
    pub q: Option<String>,
    /// Include delisted feeds (default false).
    pub include_delisted: Option<bool>,
}

/// The catalogue.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedList {
    /// Matching feeds, by id.
    pub feeds: Vec<FeedView>,
}

/// A listing, update or delisting recorded.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedChanged {
    /// The feed as recorded now.
    pub feed: FeedView,
    /// The instruction's transaction.
    pub receipt: TxReceipt,
}

/// A purchase recorded.
#[derive(Debug, Serialize, ToSchema)]
pub struct PurchaseDone {
    /// The subscription, extended (its token is the one whose hash the purchase carried).
    pub subscription: Subscription,
    /// How the payment was divided.
    pub purchase: PurchaseRecord,
    /// The instruction's transaction.
    pub receipt: TxReceipt,
}

/// A provider's statement.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatementJson {
    /// Provider device.
    pub provider: String,
    /// Running totals per currency.
    pub totals: Statement,
    /// Latest purchases, newest first.
    pub purchases: Vec<PurchaseRecord>,
}

/// `?limit=`
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LimitQuery {
    /// Most purchases listed (1..=1000, default 100).
    pub limit: Option<u32>,
}

/// `?after=` for WebSocket resumes.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AfterQuery {
    /// Resume raw feeds after this global sequence (SSE clients send `Last-Event-ID`).
    pub after: Option<u64>,
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::BadRequest("invalid_field", m.into())
}

/// The catalogue of feeds, with each provider's reputation.
#[utoipa::path(get, path = "/api/v1/feeds", tag = "marketplace", params(FeedQuery),
    responses((status = 200, body = FeedList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    _auth: Auth,
    ApiQuery(q): ApiQuery<FeedQuery>,
) -> Result<Json<FeedList>, ApiError> {
    let max_price = match q.max_price {
        // KLX base units and sats are not comparable: a price bound names its currency.
        Some(_) if q.currency.is_none() => return Err(bad("max_price needs currency (klx or sats)")),
        Some(p) => Some(kalima_core::ledger::amount::parse(&p).map_err(bad)?),
        None => None,
    };
    let filter = FeedFilter {
        prefix: q.prefix,
        provider: q.provider,
        currency: q.currency,
        period: q.period,
        max_price,
        q: q.q,
        include_delisted: q.include_delisted.unwrap_or(false),
    };
    Ok(Json(FeedList { feeds: kalima_marketplace::catalogue(&state.chain, &filter) }))
}

/// One feed (listed or delisted), with its sample and its provider's reputation.
#[utoipa::path(get, path = "/api/v1/feeds/{id}", tag = "marketplace", params(("id" = String, Path, description = "Feed id")),
    responses((status = 200, body = FeedView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn one(
    State(state): State<AppState>,
    _auth: Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<FeedView>, ApiError> {
    kalima_marketplace::feed_view(&state.chain, &id)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no feed {id}")))
}

async fn changed(state: &AppState, op: LedgerOp, device: &str, id: &str) -> Result<Json<FeedChanged>, ApiError> {
    let receipts = submit(state, &op, device).await?;
    let receipt = receipts.first().map(TxReceipt::from).ok_or_else(|| ApiError::Internal("no receipt".into()))?;
    let feed = kalima_marketplace::feed_view(&state.chain, id)
        .ok_or_else(|| ApiError::Internal(format!("feed {id} not readable after its commit")))?;
    Ok(Json(FeedChanged { feed, receipt }))
}

/// Lists a feed, or updates one of this device's feeds (the device needs a write grant on
/// the feed's prefix). Recorded on the chain.
#[utoipa::path(post, path = "/api/v1/feeds", tag = "marketplace", request_body = FeedSpec,
    responses((status = 200, body = FeedChanged), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "Another provider's feed", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_feed(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(feed): ApiJson<FeedSpec>,
) -> Result<Json<FeedChanged>, ApiError> {
    let id = feed.id.clone();
    changed(&state, LedgerOp::ListFeed { feed }, &auth.0.id, &id).await
}

/// Delists a feed (its provider or the admin): no new purchases, and its streams end.
#[utoipa::path(delete, path = "/api/v1/feeds/{id}", tag = "marketplace", params(("id" = String, Path, description = "Feed id")),
    responses((status = 200, body = FeedChanged), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delist(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<FeedChanged>, ApiError> {
    changed(&state, LedgerOp::DelistFeed { feed: id.clone() }, &auth.0.id, &id).await
}

/// Buys (or renews) periods of a feed in KLX. The purchase is signed by the buyer's account
/// (signing bytes in `openapi/ENCODING.md`) and carries the SHA-256 of the access token the
/// buyer chose (`<subscription id>.<secret>`); the buyer then streams with that token.
#[utoipa::path(post, path = "/api/v1/feeds/{id}/purchases", tag = "marketplace", params(("id" = String, Path, description = "Feed id")),
    request_body = SignedPurchase,
    responses((status = 200, body = PurchaseDone), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "No listed feed", body = ErrorBody),
        (status = 409, description = "Wrong nonce or price, or the marketplace is not configured", body = ErrorBody),
        (status = 422, description = "Insufficient funds", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn purchase(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(id): ApiPath<String>,
    ApiJson(p): ApiJson<SignedPurchase>,
) -> Result<Json<PurchaseDone>, ApiError> {
    if p.feed != id {
        return Err(bad(format!("the purchase is for feed {}, not {id}", p.feed)));
    }
    let sub_id = kalima_core::ledger::market::subscription_id(&p.feed, &p.buyer);
    let receipts = submit(&state, &LedgerOp::Purchase(p), &auth.0.id).await?;
    let receipt = receipts.first().map(TxReceipt::from).ok_or_else(|| ApiError::Internal("no receipt".into()))?;
    let subscription: Subscription = read(&state, SUBSCRIPTIONS_ADDRESS, &sub_id)
        .ok_or_else(|| ApiError::Internal("subscription not readable after its commit".into()))?;
    let provider = kalima_marketplace::feed_view(&state.chain, &id).map(|f| f.feed.provider).unwrap_or_default();
    // The provider's latest purchase is this one unless another landed since; then the
    // statement has it.
    let purchase: PurchaseRecord = read(&state, PURCHASES_ADDRESS, &provider)
        .filter(|p: &PurchaseRecord| p.subscription == subscription.id)
        .ok_or_else(|| ApiError::Internal("purchase not readable after its commit".into()))?;
    Ok(Json(PurchaseDone { subscription, purchase, receipt }))
}

/// A Lightning purchase to invoice.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvoiceBody {
    /// Period bought.
    pub period: Period,
    /// Number of periods (1..=24, default 1).
    pub count: Option<u32>,
    /// The buyer's chosen id (1..=64 of a-z, 0-9, '-', '_'); the subscription is this id's.
    pub buyer: String,
    /// SHA-256 (64 hex) of the access token the buyer chose (`<subscription id>.<secret>`).
    pub token_hash: String,
    /// To renew a running subscription: its current access token (a renewal replaces it).
    pub current_token: Option<String>,
}

/// An invoice to pay.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceIssued {
    /// The BOLT11 payment request.
    pub payment_request: String,
    /// Its payment hash (hex): follow it at `GET /api/v1/market/invoices/{hash}`.
    pub payment_hash: String,
    /// Amount, in millisatoshis.
    pub amount_msat: u64,
    /// Pay before (ms); an expired invoice grants nothing.
    pub expires_at_ms: i64,
    /// The subscription it extends once paid.
    pub subscription: String,
}

/// An invoice's state.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceStatus {
    /// `open`, `settled` (the subscription was extended), `expired`, `canceled`, or
    /// `paid_not_recorded_yet` (settled on the Lightning node; recorded within moments).
    pub status: String,
    /// The invoice as recorded.
    pub invoice: kalima_core::ledger::market::InvoiceRecord,
}

/// Invoices a purchase over Lightning (BOLT11). Paying it extends the buyer's subscription
/// (`ln:<buyer>`) once the node sees the settlement; its access token is the one whose hash
/// this request carries. A running subscription is renewed only with its current token.
#[utoipa::path(post, path = "/api/v1/feeds/{id}/invoices", tag = "marketplace", params(("id" = String, Path, description = "Feed id")),
    request_body = InvoiceBody,
    responses((status = 201, body = InvoiceIssued), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "No listed feed, or this node takes no Lightning payments", body = ErrorBody),
        (status = 503, description = "The Lightning node did not answer", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn invoice(
    State(state): State<AppState>,
    _auth: Auth,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<InvoiceBody>,
) -> Result<(StatusCode, Json<InvoiceIssued>), ApiError> {
    use kalima_marketplace::lightning::{InvoiceError, InvoiceRequest, invoice_subscription, open_invoice};
    let backend = state
        .invoices
        .clone()
        .ok_or_else(|| ApiError::NotFound("this node takes no Lightning payments ([lightning] enabled)".into()))?;
    let req = InvoiceRequest {
        feed: id,
        period: body.period,
        count: body.count.unwrap_or(1),
        buyer: body.buyer,
        token_hash: body.token_hash.to_ascii_lowercase(),
    };
    let sub_id = invoice_subscription(&req);
    if let Some(sub) = read::<Subscription>(&state, SUBSCRIPTIONS_ADDRESS, &sub_id)
        && sub.expires_at_ms > now_ms()
        && !body.current_token.as_deref().is_some_and(|t| sub.token_matches(t))
    {
        return Err(ApiError::Unauthorized(
            "unknown_token",
            format!("subscription {sub_id} is running: renew it with its current token (current_token)"),
        ));
    }
    let record = open_invoice(&state.chain, backend.as_ref(), &req, state.config.lightning.invoice_expiry_secs)
        .await
        .map_err(|e| match e {
        InvoiceError::Invalid(m) => bad(m),
        InvoiceError::UnknownFeed(f) => ApiError::NotFound(format!("no listed feed {f}")),
        InvoiceError::Backend(e) => ApiError::Unavailable(format!("the Lightning node: {e}")),
        InvoiceError::Chain(e) => e.into(),
    })?;
    Ok((
        StatusCode::CREATED,
        Json(InvoiceIssued {
            payment_request: record.payment_request,
            payment_hash: record.payment_hash,
            amount_msat: record.amount_msat,
            expires_at_ms: record.expires_at_ms,
            subscription: sub_id,
        }),
    ))
}

/// A Lightning purchase's invoice: open, settled (the subscription was extended) or expired.
#[utoipa::path(get, path = "/api/v1/market/invoices/{hash}", tag = "marketplace", params(("hash" = String, Path, description = "Payment hash (hex)")),
    responses((status = 200, body = InvoiceStatus), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn invoice_status(
    State(state): State<AppState>,
    _auth: Auth,
    ApiPath(hash): ApiPath<String>,
) -> Result<Json<InvoiceStatus>, ApiError> {
    let invoice: kalima_core::ledger::market::InvoiceRecord =
        read(&state, kalima_core::ledger::market::INVOICES_ADDRESS, &hash.to_ascii_lowercase())
            .ok_or_else(|| ApiError::NotFound(format!("no purchase invoice {hash}")))?;
    let mut status = if invoice.settled.is_some() {
        "settled"
    } else if kalima_marketplace::lightning::is_expired(&invoice) {
        "expired"
    } else {
        "open"
    };
    // The Lightning node knows of cancellations (and of a payment not recorded yet).
    if status == "open"
        && let (Some(backend), Ok(hash)) =
            (&state.invoices, invoice.payment_hash.parse::<kalima_bridge_lightning::PaymentHash>())
        && let Ok(Some(live)) = backend.lookup_invoice(&hash).await
    {
        match live.state {
            kalima_bridge_lightning::InvoiceState::Canceled => status = "canceled",
            kalima_bridge_lightning::InvoiceState::Settled => status = "paid_not_recorded_yet",
            _ => {}
        }
    }
    Ok(Json(InvoiceStatus { status: status.into(), invoice }))
}

fn read<T: serde::de::DeserializeOwned>(state: &AppState, address: &str, key: &str) -> Option<T> {
    state.chain.memcache().get(address, key).and_then(|c| serde_json::from_slice(&c.tx.content.body).ok())
}

fn access(state: &AppState, headers: &HeaderMap, feed: &str) -> Result<Access, ApiError> {
    let token = super::extract::bearer_header(headers)
        .ok_or_else(|| market_error(kalima_marketplace::Error::MalformedToken))?;
    let a = kalima_marketplace::authorize(&state.chain, token).map_err(market_error)?;
    if a.feed.spec.id != feed {
        return Err(market_error(kalima_marketplace::Error::UnknownToken));
    }
    Ok(a)
}

fn market_error(e: kalima_marketplace::Error) -> ApiError {
    use kalima_marketplace::Error as E;
    metrics::counter!("kalima_market_access_refused_total", "reason" => e.code()).increment(1);
    match e {
        E::MalformedToken | E::UnknownToken => ApiError::Unauthorized(e.code(), e.to_string()),
        E::Expired { .. } => ApiError::Forbidden(e.code(), e.to_string()),
        E::Delisted(_) | E::UnknownFeed(_) => ApiError::NotFound(e.to_string()),
    }
}

fn event_json(d: &Delivered) -> String {
    serde_json::to_string(d).unwrap_or_default()
}

/// The feed as server-sent events (`Authorization: Bearer <access token>`): `event: reading`
/// or `event: aggregate`, `id:` the last global sequence it covers, `data:` the delivery
/// with its inclusion proof(s); `event: end` with the reason when the subscription expires,
/// the feed is delisted or the buyer falls behind. Raw feeds resume with `Last-Event-ID`.
#[utoipa::path(get, path = "/api/v1/feeds/{id}/stream", tag = "marketplace", params(("id" = String, Path, description = "Feed id")),
    responses((status = 200, description = "text/event-stream of deliveries", content_type = "text/event-stream", body = String),
        (status = 401, description = "Missing or unknown access token", body = ErrorBody),
        (status = 403, description = "The subscription expired", body = ErrorBody),
        (status = 404, description = "Delisted feed", body = ErrorBody)),
    security(("access_token" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let a = access(&state, &headers, &id)?;
    let after = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    let s = kalima_marketplace::follow(&state.chain, a, after, "sse", RECORD_EVERY);
    let events = futures::stream::unfold(s, |mut s: FeedStream| async move {
        let ev = match s.next().await? {
            Ok(d) => {
                let kind = if matches!(d, Delivered::Reading { .. }) { "reading" } else { "aggregate" };
                Event::default().event(kind).id(d.last_sequence().to_string()).data(event_json(&d))
            }
            Err(reason) => Event::default().event("end").data(format!("{{\"reason\":\"{reason}\"}}")),
        };
        Some((Ok(ev), s))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(state.config.api.stream_keepalive_secs.max(1)))))
}

/// The feed over a WebSocket (`Authorization: Bearer <access token>`): one text frame per
/// delivery (JSON with its proofs); closed with the end reason.
#[utoipa::path(get, path = "/api/v1/feeds/{id}/ws", tag = "marketplace", params(("id" = String, Path, description = "Feed id"), AfterQuery),
    responses((status = 101, description = "Switching protocols; text frames of deliveries"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("access_token" = [])))]
pub async fn ws(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<AfterQuery>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let a = access(&state, &headers, &id)?;
    let upgrade = upgrade.map_err(|r| ApiError::BadRequest("not_websocket", r.body_text()))?;
    let s = kalima_marketplace::follow(&state.chain, a, q.after, "ws", RECORD_EVERY);
    Ok(upgrade.on_upgrade(move |socket| pump(socket, s)).into_response())
}

async fn pump(mut socket: WebSocket, mut s: FeedStream) {
    loop {
        tokio::select! {
            item = s.next() => match item {
                Some(Ok(d)) => {
                    if socket.send(Message::Text(event_json(&d).into())).await.is_err() {
                        return;
                    }
                }
                Some(Err(reason)) => {
                    let frame = axum::extract::ws::CloseFrame { code: 1000, reason: reason.into() };
                    let _ = socket.send(Message::Close(Some(frame))).await;
                    return;
                }
                None => return,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// A webhook to register.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// Where deliveries are POSTed (http or https).
    pub url: String,
    /// HMAC-SHA256 key (16..=128 bytes) the node signs each delivery with.
    pub secret: String,
}

/// The subscription `id` when `headers` carry its access token (expired or not).
fn own_subscription(state: &AppState, headers: &HeaderMap, id: &str) -> Result<Subscription, ApiError> {
    let token = super::extract::bearer_header(headers).unwrap_or_default();
    read::<Subscription>(state, SUBSCRIPTIONS_ADDRESS, id).filter(|s| s.token_matches(token)).ok_or_else(|| {
        metrics::counter!("kalima_market_access_refused_total", "reason" => "unknown_token").increment(1);
        ApiError::Unauthorized("unknown_token", "the access token matches no such subscription".into())
    })
}

async fn write_webhook(state: &AppState, id: &str, body: Vec<u8>) -> Result<TxReceipt, ApiError> {
    let content = kalima_core::tx::TxContent {
        device_id: kalima_core::registry::NODE_DEVICE_ID.into(),
        address: kalima_marketplace::webhook::WEBHOOKS_ADDRESS.into(),
        key: id.to_string(),
        body,
        ..Default::default()
    };
    let receipts = state.chain.submit(vec![content], None).await?;
    receipts.first().map(TxReceipt::from).ok_or_else(|| ApiError::Internal("no receipt".into()))
}

/// Registers (or replaces) the webhook of a subscription (with its access token). Each
/// delivery is POSTed as JSON with `Kalima-Delivery-Id`, `Kalima-Timestamp` and
/// `Kalima-Signature: v1=<hex HMAC-SHA256(secret, timestamp "." body)>`, retried with
/// backoff until a 2xx answer, in order; drop repeats by delivery id.
#[utoipa::path(put, path = "/api/v1/market/subscriptions/{id}/webhook", tag = "marketplace",
    params(("id" = String, Path, description = "Subscription id")), request_body = WebhookRequest,
    responses((status = 200, body = TxReceipt), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("access_token" = [])))]
pub async fn set_webhook(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<WebhookRequest>,
) -> Result<Json<TxReceipt>, ApiError> {
    let sub = own_subscription(&state, &headers, &id)?;
    kalima_marketplace::webhook::validate(&req.url, &req.secret).map_err(bad)?;
    let after = state.chain.tree_size().saturating_sub(1);
    let hook = kalima_marketplace::Webhook { subscription: sub.id, url: req.url, secret: req.secret, after };
    let body = serde_json::to_vec(&hook).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(write_webhook(&state, &id, body).await?))
}

/// Removes the webhook of a subscription (with its access token).
#[utoipa::path(delete, path = "/api/v1/market/subscriptions/{id}/webhook", tag = "marketplace",
    params(("id" = String, Path, description = "Subscription id")),
    responses((status = 200, body = TxReceipt), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("access_token" = [])))]
pub async fn remove_webhook(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<TxReceipt>, ApiError> {
    own_subscription(&state, &headers, &id)?;
    if state.chain.memcache().get(kalima_marketplace::webhook::WEBHOOKS_ADDRESS, &id).is_none() {
        return Err(ApiError::NotFound(format!("subscription {id} has no webhook")));
    }
    Ok(Json(write_webhook(&state, &id, Vec::new()).await?))
}

/// A subscription, shown to the holder of its access token (expired or not).
#[utoipa::path(get, path = "/api/v1/market/subscriptions/{id}", tag = "marketplace", params(("id" = String, Path, description = "Subscription id")),
    responses((status = 200, body = Subscription), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("access_token" = [])))]
pub async fn subscription(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<Subscription>, ApiError> {
    Ok(Json(own_subscription(&state, &headers, &id)?))
}

/// A provider's statement: totals per currency (gross, gas, burn, the foundation / masters /
/// DApp fund split, net) and the latest purchases. For the provider's device or the admin.
#[utoipa::path(get, path = "/api/v1/market/statements/{provider}", tag = "marketplace",
    params(("provider" = String, Path, description = "Provider device id"), LimitQuery),
    responses((status = 200, body = StatementJson), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn statement(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(provider): ApiPath<String>,
    ApiQuery(q): ApiQuery<LimitQuery>,
) -> Result<Json<StatementJson>, ApiError> {
    if auth.0.id != provider && !auth.0.is_admin() {
        return Err(ApiError::Forbidden("not_provider", format!("only {provider} or the admin reads this statement")));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(bad("limit must be 1..=1000"));
    }
    kalima_core::registry::validate_device_id(&provider).map_err(|e| bad(format!("provider: {}", e.reason)))?;
    let totals: Statement = state
        .chain
        .memcache()
        .get(STATEMENTS_ADDRESS, &provider)
        .and_then(|c| serde_json::from_slice(&c.tx.content.body).ok())
        .unwrap_or_default();
    let purchases = state
        .chain
        .store()
        .history(PURCHASES_ADDRESS, &provider, u64::MAX, limit)
        .await?
        .iter()
        .filter_map(|c| serde_json::from_slice(&c.tx.content.body).ok())
        .collect();
    Ok(Json(StatementJson { provider, totals, purchases }))
}

/// The marketplace's economics.
#[utoipa::path(get, path = "/api/v1/market/config", tag = "marketplace",
    responses((status = 200, body = MarketConfig), (status = 401, body = ErrorBody), (status = 404, description = "Not configured yet", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn config(State(state): State<AppState>, _auth: Auth) -> Result<Json<MarketConfig>, ApiError> {
    state
        .chain
        .memcache()
        .get(MARKET_CONFIG_ADDRESS, MARKET_CONFIG_KEY)
        .and_then(|c| serde_json::from_slice(&c.tx.content.body).ok())
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("the marketplace's economics are not configured yet".into()))
}

/// Sets the marketplace's economics (admin): gas price, exchange rates, burn and the three
/// accounts of the gas split.
#[utoipa::path(put, path = "/api/v1/market/config", tag = "marketplace", request_body = MarketConfig,
    responses((status = 200, body = TxReceipt), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_config(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(config): ApiJson<MarketConfig>,
) -> Result<(StatusCode, Json<TxReceipt>), ApiError> {
    auth.require_admin()?;
    let receipts = submit(&state, &LedgerOp::ConfigureMarket { config }, &auth.0.id).await?;
    let r = receipts.first().map(TxReceipt::from).ok_or_else(|| ApiError::Internal("no receipt".into()))?;
    Ok((StatusCode::OK, Json(r)))
}
