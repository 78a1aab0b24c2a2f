//! `/api/v1/tx`: single and batch writes, moves, and reading a transaction with its bytes
//! and inclusion proof.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kalima_core::Rejection;
use kalima_core::merkle::InclusionProof;
use kalima_core::tx::{TxContent, validate_address, validate_key};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiQuery, Auth};
use super::model::{Accepted, TxJson, TxReceipt, TxRequest, WaitParam};
use super::{AppState, INTERFACE};

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/tx", post(write_one))
        .route("/tx/batch", post(write_batch))
        .route("/tx/move", post(move_key))
        .route("/tx/{id}", get(read_tx))
        .route("/tx/{id}/receipt", get(read_receipt))
}

/// Query of a receipt.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReceiptQuery {
    /// Size of the tree the inclusion proof is for, e.g. the `tree_size` of a proof already
    /// held (default: the tree the transaction was committed into, its index + 1).
    #[param(minimum = 1)]
    pub tree_size: Option<u64>,
}

/// Many writes committed together.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 10,000 writes; all are checked first and committed in one durable commit, or none is.
    #[schema(min_items = 1, max_items = 10000)]
    pub transactions: Vec<TxRequest>,
}

/// Receipts of a batch, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchReceipt {
    /// One receipt per write.
    pub receipts: Vec<TxReceipt>,
}

/// Move a key's current value to another address.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// Where the value is now.
    #[schema(pattern = "^(/[A-Za-z0-9 :.@+_-]+)+$", max_length = 256)]
    pub from_address: String,
    /// Where it goes.
    #[schema(pattern = "^(/[A-Za-z0-9 :.@+_-]+)+$", max_length = 256)]
    pub to_address: String,
    /// The key.
    #[schema(pattern = "^[A-Za-z0-9 :.@+_/-]+$", min_length = 1, max_length = 128)]
    pub key: String,
}

/// A transaction with its canonical bytes and inclusion proof.
#[derive(Debug, Serialize, ToSchema)]
pub struct TxWithProof {
    /// The transaction.
    pub transaction: TxJson,
    /// Canonical bytes (base64); SHA-256(0x00 || bytes) is the leaf hash.
    pub tx_bytes: String,
    /// RFC 6962 inclusion proof in the current tree.
    #[schema(value_type = Object)]
    pub proof: InclusionProof,
}

async fn queue(state: &AppState, auth: &Auth, items: Vec<TxContent>) -> Result<Response, ApiError> {
    let n = items.len();
    state.ingest.write_nowait(INTERFACE, &auth.0, items).await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { status: "accepted".into(), count: n })).into_response())
}

fn content(auth: &Auth, req: TxRequest) -> Result<TxContent, ApiError> {
    req.into_content(&auth.0.id).map_err(|r| {
        kalima_core::ingest::count_rejection(INTERFACE, &r);
        ApiError::Rejected(r)
    })
}

/// Write one value (or delete it with an empty body); answers after the durable commit.
#[utoipa::path(post, path = "/api/v1/tx", tag = "transactions", params(WaitParam), request_body = TxRequest,
    responses(
        (status = 200, description = "Committed durably", body = TxReceipt),
        (status = 202, description = "Queued (wait=false)", body = Accepted),
        (status = 400, description = "Invalid address, key, field, signature or JSON", body = ErrorBody),
        (status = 401, description = "Unknown or revoked device", body = ErrorBody),
        (status = 403, description = "No write grant", body = ErrorBody),
        (status = 409, description = "Idempotency key already used", body = ErrorBody),
        (status = 413, description = "Body over 8 KB", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn write_one(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(w): ApiQuery<WaitParam>,
    ApiJson(req): ApiJson<TxRequest>,
) -> Result<Response, ApiError> {
    let item = content(&auth, req)?;
    if !w.wait.unwrap_or(true) {
        return queue(&state, &auth, vec![item]).await;
    }
    let written = state.ingest.write(INTERFACE, &auth.0, vec![item]).await?;
    let r = written.receipts().first().ok_or_else(|| ApiError::Internal("no receipt for a committed write".into()))?;
    Ok(Json(TxReceipt::from(r)).into_response())
}

/// Write many values in one call and one durable commit (all or nothing).
#[utoipa::path(post, path = "/api/v1/tx/batch", tag = "transactions", params(WaitParam), request_body = BatchRequest,
    responses(
        (status = 200, description = "All committed durably", body = BatchReceipt),
        (status = 202, description = "Queued (wait=false)", body = Accepted),
        (status = 400, description = "A write is invalid (nothing committed)", body = ErrorBody),
        (status = 401, description = "Unknown or revoked device", body = ErrorBody),
        (status = 403, description = "A write lacks a grant (nothing committed)", body = ErrorBody),
        (status = 409, description = "An idempotency key was already used", body = ErrorBody),
        (status = 413, description = "A body is over 8 KB", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn write_batch(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(w): ApiQuery<WaitParam>,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<Response, ApiError> {
    let items = req.transactions.into_iter().map(|r| content(&auth, r)).collect::<Result<Vec<_>, _>>()?;
    if w.wait.unwrap_or(true) {
        let written = state.ingest.write(INTERFACE, &auth.0, items).await?;
        Ok(Json(BatchReceipt { receipts: written.receipts().iter().map(TxReceipt::from).collect() }).into_response())
    } else {
        queue(&state, &auth, items).await
    }
}

/// Move the current value of a key to another address: a delete at the source and a put at
/// the destination, in one commit.
#[utoipa::path(post, path = "/api/v1/tx/move", tag = "transactions", request_body = MoveRequest,
    responses(
        (status = 200, description = "Committed: the delete then the put", body = BatchReceipt),
        (status = 400, description = "Invalid address or key", body = ErrorBody),
        (status = 403, description = "No write grant on one of the addresses", body = ErrorBody),
        (status = 404, description = "No value at the source", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn move_key(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<BatchReceipt>, ApiError> {
    let receipts = move_value(&state, &auth, INTERFACE, &req.from_address, &req.to_address, &req.key).await?;
    Ok(Json(BatchReceipt { receipts: receipts.iter().map(TxReceipt::from).collect() }))
}

/// Shared by the REST and Kalima-compatible move.
pub async fn move_value(
    state: &AppState,
    auth: &Auth,
    interface: &'static str,
    from: &str,
    to: &str,
    key: &str,
) -> Result<Vec<kalima_core::Receipt>, ApiError> {
    for a in [from, to] {
        validate_address(a).map_err(Rejection::from)?;
    }
    validate_key(key).map_err(Rejection::from)?;
    auth.require_read(from)?;
    let current = state
        .chain
        .memcache()
        .get(from, key)
        .ok_or_else(|| ApiError::NotFound(format!("no value at {from} key {key}")))?;
    let c = &current.tx.content;
    let delete = TxContent {
        address: from.to_string(),
        key: key.to_string(),
        props: [("moved_to".to_string(), to.to_string())].into(),
        ..TxContent::default()
    };
    let mut props = c.props.clone();
    props.insert("moved_from".into(), from.to_string());
    // The TTL moves with the value (its countdown restarts at the destination).
    let put = TxContent {
        address: to.to_string(),
        key: key.to_string(),
        body: c.body.clone(),
        props,
        ttl_secs: c.ttl_secs,
        ..TxContent::default()
    };
    Ok(state.ingest.write(interface, &auth.0, vec![delete, put]).await?.receipts().to_vec())
}

/// A transaction by id, with its canonical bytes and an inclusion proof in the current tree.
#[utoipa::path(get, path = "/api/v1/tx/{id}", tag = "transactions",
    params(("id" = String, Path, description = "Transaction id (64 hex digits)", pattern = "^[0-9a-fA-F]{64}$")),
    responses(
        (status = 200, body = TxWithProof),
        (status = 400, description = "Not a transaction id", body = ErrorBody),
        (status = 403, description = "No read grant on its address", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn read_tx(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<TxWithProof>, ApiError> {
    let h = parse_id(&id)?;
    let c =
        state.chain.store().tx_by_id(&h).await?.ok_or_else(|| ApiError::NotFound(format!("no transaction {id}")))?;
    auth.require_read(&c.tx.content.address)?;
    // A row becomes readable a moment before the in-memory tree takes its leaf.
    for _ in 0..200 {
        if state.chain.tree_size() > c.tx.global_sequence {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let proof = state.chain.inclusion_proof(c.tx.global_sequence, None).await?;
    Ok(Json(TxWithProof { transaction: TxJson::from(&c), tx_bytes: B64.encode(c.tx.encode()), proof }))
}

fn parse_id(id: &str) -> Result<[u8; 32], ApiError> {
    let mut h = [0u8; 32];
    hex::decode_to_slice(id, &mut h)
        .map_err(|_| ApiError::BadRequest("invalid_id", "a transaction id is 64 hex digits".into()))?;
    Ok(h)
}

/// A self-contained receipt of a transaction: its bytes, inclusion proof, a consistency
/// proof to the latest anchored checkpoint (or the latest checkpoint while none is anchored),
/// the checkpoint's signatures and its anchors. `kalima verify-receipt` checks it offline;
/// the format is documented in `openapi/RECEIPT.md`.
#[utoipa::path(get, path = "/api/v1/tx/{id}/receipt", tag = "transactions",
    params(("id" = String, Path, description = "Transaction id (64 hex digits)", pattern = "^[0-9a-fA-F]{64}$"), ReceiptQuery),
    responses(
        (status = 200, description = "The receipt (format kalima-receipt-v1, see openapi/RECEIPT.md)", body = inline(Object)),
        (status = 400, description = "Not a transaction id, or a tree_size that does not hold it", body = ErrorBody),
        (status = 403, description = "No read grant on its address", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 409, description = "No checkpoint covers the transaction yet", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn read_receipt(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ReceiptQuery>,
) -> Result<Json<kalima_core::receipt::Receipt>, ApiError> {
    use kalima_core::receipt::BuildError;
    let h = parse_id(&id)?;
    let c =
        state.chain.store().tx_by_id(&h).await?.ok_or_else(|| ApiError::NotFound(format!("no transaction {id}")))?;
    auth.require_read(&c.tx.content.address)?;
    match kalima_core::receipt::build(&state.chain, &h, q.tree_size).await {
        Ok(r) => Ok(Json(r)),
        Err(BuildError::NotFound(m)) => Err(ApiError::NotFound(format!("no transaction {m}"))),
        Err(BuildError::BadSize(m)) => Err(ApiError::BadRequest("invalid_field", m)),
        Err(BuildError::NotCheckpointed(m)) => Err(ApiError::Conflict("not_checkpointed", m)),
        Err(BuildError::Chain(e)) => Err(e.into()),
    }
}
