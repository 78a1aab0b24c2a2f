//! `/api/v1/blocks`, `/api/v1/checkpoints` and `/api/v1/proofs`: the chain itself.

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use kalima_core::block::BlockHeader;
use kalima_core::checkpoint::CheckpointJson;
use kalima_core::merkle::ConsistencyProof;
use kalima_core::store::BlockRecord;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiPath, ApiQuery, Auth};

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/blocks", get(list_blocks))
        .route("/blocks/{height}", get(block))
        .route("/checkpoints/latest", get(latest_checkpoint))
        .route("/checkpoints", post(new_checkpoint))
        .route("/proofs/consistency", get(consistency))
}

/// A block header with its hash.
#[derive(Debug, Serialize, ToSchema)]
pub struct BlockJson {
    /// Height (0: genesis).
    pub height: u64,
    /// SHA-256 of the canonical header (hex).
    pub hash: String,
    /// Hash of the previous header (hex).
    pub prev_hash: String,
    /// Leader time (ms since the Unix epoch).
    pub timestamp_ms: i64,
    /// Transactions in the block.
    pub tx_count: u32,
    /// Global sequence of its first transaction.
    pub first_sequence: u64,
    /// Global Merkle tree size after this block.
    pub tree_size: u64,
    /// Global Merkle root at `tree_size` (hex).
    pub merkle_root: String,
    /// Public key (hex) of the node that built it.
    pub leader: String,
    /// Canonical header bytes (hex); SHA-256 of them is `hash`.
    pub header_bytes: String,
}

impl From<&BlockRecord> for BlockJson {
    fn from(b: &BlockRecord) -> Self {
        let h: &BlockHeader = &b.header;
        BlockJson {
            height: h.height,
            hash: hex::encode(b.hash),
            prev_hash: hex::encode(h.prev_hash),
            timestamp_ms: h.timestamp_ms,
            tx_count: h.tx_count,
            first_sequence: h.first_sequence(),
            tree_size: h.tree_size,
            merkle_root: hex::encode(h.merkle_root),
            leader: h.leader.clone(),
            header_bytes: hex::encode(h.encode()),
        }
    }
}

/// `?before=H&limit=N`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BlocksQuery {
    /// Only blocks at or below this height (default: the head).
    pub before: Option<u64>,
    /// Page size, 1..=1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// A page of blocks, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct BlocksPage {
    /// Blocks, newest first.
    pub blocks: Vec<BlockJson>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    pub next_before: Option<u64>,
}

/// Block headers, newest first, paged.
#[utoipa::path(get, path = "/api/v1/blocks", tag = "chain", params(BlocksQuery),
    responses((status = 200, body = BlocksPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
pub async fn list_blocks(
    State(state): State<AppState>,
    _auth: Auth,
    ApiQuery(q): ApiQuery<BlocksQuery>,
) -> Result<Json<BlocksPage>, ApiError> {
    let limit = super::model::page_limit(q.limit, 50)?;
    let top = q.before.unwrap_or(u64::MAX >> 1);
    let blocks = state.chain.store().blocks_desc(top, limit).await?;
    let next_before =
        blocks.last().filter(|b| blocks.len() == limit as usize && b.header.height > 0).map(|b| b.header.height - 1);
    Ok(Json(BlocksPage { blocks: blocks.iter().map(BlockJson::from).collect(), next_before }))
}

/// A block with the ids of its transactions.
#[derive(Debug, Serialize, ToSchema)]
pub struct BlockWithTxs {
    /// The header.
    pub block: BlockJson,
    /// Ids (hex) of its transactions, in order: all of them for the admin, those the device
    /// may read otherwise.
    pub transactions: Vec<String>,
}

/// One block and the ids of its transactions (those the device may read).
#[utoipa::path(get, path = "/api/v1/blocks/{height}", tag = "chain", params(("height" = u64, Path, description = "Block height")),
    responses((status = 200, body = BlockWithTxs), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn block(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(height): ApiPath<u64>,
) -> Result<Json<BlockWithTxs>, ApiError> {
    let b = state
        .chain
        .store()
        .block(height)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no block at height {height}")))?;
    // Ids of transactions the device may not read would tell it who writes what and when.
    let ids: Vec<String> = if auth.0.is_admin() {
        state
            .chain
            .store()
            .leaf_hashes(b.header.first_sequence(), b.header.tree_size)
            .await?
            .iter()
            .map(hex::encode)
            .collect()
    } else {
        let txs =
            state.chain.store().txs_between(b.header.first_sequence(), b.header.tree_size, b.header.tx_count).await?;
        txs.iter().filter(|c| auth.0.can_read(&c.tx.content.address)).map(|c| hex::encode(c.id)).collect()
    };
    Ok(Json(BlockWithTxs { block: BlockJson::from(&b), transactions: ids }))
}

/// The latest signed checkpoint (signed tree head).
#[utoipa::path(get, path = "/api/v1/checkpoints/latest", tag = "chain",
    responses((status = 200, body = inline(Object)), (status = 404, description = "No checkpoint yet", body = ErrorBody)), security(("bearer" = [])))]
pub async fn latest_checkpoint(State(state): State<AppState>, _auth: Auth) -> Result<Json<CheckpointJson>, ApiError> {
    // On a master, the latest checkpoint co-signed by a quorum (recorded on the chain) is the
    // chain's checkpoint; the master's own is served only until the first one exists.
    if let Some(c) = state.cluster.as_ref().and_then(|_| kalima_core::cluster::cosign::latest(&state.chain)) {
        return Ok(Json(c));
    }
    let cp = state.chain.latest_checkpoint().await?.ok_or_else(|| ApiError::NotFound("no checkpoint yet".into()))?;
    Ok(Json(cp.to_json()))
}

/// Signs a checkpoint of the current head now (admin).
#[utoipa::path(post, path = "/api/v1/checkpoints", tag = "chain",
    responses((status = 200, body = inline(Object)), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
pub async fn new_checkpoint(State(state): State<AppState>, auth: Auth) -> Result<Json<CheckpointJson>, ApiError> {
    auth.require_admin()?;
    Ok(Json(state.chain.checkpoint_now().await?.to_json()))
}

/// `?first=N&second=M`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsistencyQuery {
    /// Earlier tree size (>= 1).
    #[param(minimum = 1)]
    pub first: u64,
    /// Later tree size (<= current size; default: current size).
    pub second: Option<u64>,
}

/// RFC 6962 consistency proof between two tree sizes.
#[utoipa::path(get, path = "/api/v1/proofs/consistency", tag = "chain", params(ConsistencyQuery),
    responses((status = 200, body = inline(Object)), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
pub async fn consistency(
    State(state): State<AppState>,
    _auth: Auth,
    ApiQuery(q): ApiQuery<ConsistencyQuery>,
) -> Result<Json<ConsistencyProof>, ApiError> {
    let second = q.second.unwrap_or_else(|| state.chain.tree_size());
    Ok(Json(state.chain.consistency_proof(q.first, second).await?))
}
