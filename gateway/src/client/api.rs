//! The REST API of a client node: writes (through the outbox), current values of the synced
//! addresses, and the client's status. The same paths and bodies as a full node's API, so a
//! program written against one works against the other; reads that need the chain (history,
//! proofs, blocks) are served by the masters.

use std::time::Duration;

use axum::Json;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kalima_core::client::{ClientNode, ClientStatus};
use kalima_core::ingest::Written;
use kalima_core::tx::{TxContent, prefix_matches, validate_address};
use kalima_core::{Ingest, Rejection};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tower_http::timeout::TimeoutLayer;

use crate::api::error::ApiError;
use crate::api::extract::{ApiJson, ApiQuery, Auth, bearer};
use crate::api::model::{Accepted, TxReceipt, TxRequest, WaitParam};
use crate::api::tx::{BatchReceipt, BatchRequest};
use crate::api::values::{Values, ValuesQuery, current_values};
use crate::config::Config;

const INTERFACE: &str = "rest";

/// State of the client API.
#[derive(Clone)]
pub struct ClientApi {
    /// The client node.
    pub node: ClientNode,
    /// Its write path.
    pub ingest: Ingest,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

impl FromRequestParts<ClientApi> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ClientApi) -> Result<Self, Self::Rejection> {
        Ok(Auth(state.ingest.authenticate(INTERFACE, bearer(parts))?))
    }
}

/// A write kept in the outbox: durable on this node, delivered to the masters when one is
/// reachable.
#[derive(Debug, Serialize)]
pub struct Queued {
    /// Always `queued`.
    pub status: &'static str,
    /// Writes queued.
    pub count: u64,
    /// Outbox sequence of the first.
    pub outbox_first: u64,
    /// Outbox sequence of the last.
    pub outbox_last: u64,
}

/// A refused outbox group.
#[derive(Debug, Serialize)]
pub struct RefusedGroup {
    /// Outbox sequence of its first write.
    pub outbox_first: u64,
    /// Outbox sequence of its last write.
    pub outbox_last: u64,
    /// Error code, as a full node would answer.
    pub code: String,
    /// Why.
    pub message: String,
}

/// `GET /api/v1/client`.
#[derive(Debug, Serialize)]
pub struct StatusBody {
    /// The client node's state.
    #[serde(flatten)]
    pub status: ClientStatus,
    /// The latest groups the masters refused (newest first).
    pub refused: Vec<RefusedGroup>,
}

/// The client API router.
pub fn router(state: ClientApi, config: &Config) -> axum::Router {
    let api = axum::Router::new()
        .route("/tx", post(write_one))
        .route("/tx/batch", post(write_batch))
        .route("/values", get(values))
        .route("/client", get(status))
        .fallback(not_here);
    axum::Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(not_here)
        .layer(DefaultBodyLimit::max(config.api.max_request_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(config.api.request_timeout_secs),
        ))
        .with_state(state)
}

async fn not_here() -> ApiError {
    ApiError::NotFound(
        "not served by a client node: it serves /api/v1/tx, /api/v1/tx/batch, /api/v1/values and /api/v1/client; ask a master for the rest".into(),
    )
}

fn answer(written: Written, one: bool) -> Result<Response, ApiError> {
    Ok(match written {
        Written::Committed(receipts) if one => {
            let r = receipts.first().ok_or_else(|| ApiError::Internal("no receipt for a committed write".into()))?;
            Json(TxReceipt::from(r)).into_response()
        }
        Written::Committed(receipts) => {
            Json(BatchReceipt { receipts: receipts.iter().map(TxReceipt::from).collect() }).into_response()
        }
        Written::Queued { first, last } => (
            StatusCode::ACCEPTED,
            Json(Queued { status: "queued", count: last - first + 1, outbox_first: first, outbox_last: last }),
        )
            .into_response(),
    })
}

fn content(auth: &Auth, req: TxRequest) -> Result<TxContent, ApiError> {
    req.into_content(&auth.0.id).map_err(|r| {
        kalima_core::ingest::count_rejection(INTERFACE, &r);
        ApiError::Rejected(r)
    })
}

async fn write(
    state: &ClientApi,
    auth: &Auth,
    wait: bool,
    items: Vec<TxContent>,
    one: bool,
) -> Result<Response, ApiError> {
    if !wait {
        let n = items.len();
        state.ingest.write_nowait(INTERFACE, &auth.0, items).await?;
        return Ok((StatusCode::ACCEPTED, Json(Accepted { status: "accepted".into(), count: n })).into_response());
    }
    answer(state.ingest.write(INTERFACE, &auth.0, items).await?, one)
}

/// One write: 200 with its receipt once the masters committed it, or 202 once it is durable
/// in the outbox and no master answered within `[client] ack_wait_ms`.
async fn write_one(
    State(state): State<ClientApi>,
    auth: Auth,
    ApiQuery(w): ApiQuery<WaitParam>,
    ApiJson(req): ApiJson<TxRequest>,
) -> Result<Response, ApiError> {
    let item = content(&auth, req)?;
    write(&state, &auth, w.wait.unwrap_or(true), vec![item], true).await
}

/// Many writes, committed together (all or none), with the same answers as one write.
async fn write_batch(
    State(state): State<ClientApi>,
    auth: Auth,
    ApiQuery(w): ApiQuery<WaitParam>,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<Response, ApiError> {
    let items = req.transactions.into_iter().map(|r| content(&auth, r)).collect::<Result<Vec<_>, _>>()?;
    write(&state, &auth, w.wait.unwrap_or(true), items, false).await
}

/// Current values of a synced address.
async fn values(
    State(state): State<ClientApi>,
    auth: Auth,
    ApiQuery(q): ApiQuery<ValuesQuery>,
) -> Result<Json<Values>, ApiError> {
    validate_address(&q.address).map_err(Rejection::from)?;
    auth.require_read(&q.address)?;
    let synced = state.node.prefixes();
    if !synced.iter().any(|p| prefix_matches(p, &q.address)) {
        return Err(ApiError::NotFound(format!(
            "{} is not among the addresses this client node syncs ({}); ask a master",
            q.address,
            synced.join(", ")
        )));
    }
    Ok(Json(current_values(state.node.memcache(), q)?))
}

/// The client node's masters, sync and outbox.
async fn status(State(state): State<ClientApi>, _auth: Auth) -> Result<Json<StatusBody>, ApiError> {
    let status = state.node.status().await?;
    let refused = state
        .node
        .outbox()
        .rejections(20)
        .await?
        .into_iter()
        .map(|(first, last, r)| RefusedGroup {
            outbox_first: first,
            outbox_last: last,
            code: r.code().to_string(),
            message: r.to_string(),
        })
        .collect();
    Ok(Json(StatusBody { status, refused }))
}

/// Ready once the memcache holds the masters' values (synced now or before a restart).
async fn readyz(State(state): State<ClientApi>) -> impl IntoResponse {
    if state.node.is_synced() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not synced yet") }
}

async fn metrics_text(State(state): State<ClientApi>) -> impl IntoResponse {
    metrics::gauge!("kalima_memcache_values").set(state.node.memcache().len() as f64);
    metrics::gauge!("kalima_client_outbox_pending").set(state.node.outbox().pending_count() as f64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
