//! `/api/v1/anchors`: checkpoints anchored on public chains, and anchoring on demand.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use kalima_core::anchor::{ANCHORS_ADDRESS, AnchorRecord};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiQuery, Auth};

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new().route("/anchors", get(list).post(anchor_now))
}

/// Query of the anchor list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AnchorQuery {
    /// One target's anchors, newest first (default: the latest anchor of every target).
    pub target: Option<String>,
    /// Most anchors returned with `target` (1..=1000, default 100).
    pub limit: Option<u32>,
}

/// Anchors, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AnchorList {
    /// The anchors.
    pub anchors: Vec<AnchorRecord>,
}

/// Anchoring started.
#[derive(Debug, Serialize, ToSchema)]
pub struct AnchorStarted {
    /// The targets that will anchor the latest checkpoint.
    pub targets: Vec<String>,
    /// Tree size of the checkpoint just signed for them.
    pub tree_size: u64,
}

/// Anchored checkpoints: each target's latest, or one target's history.
#[utoipa::path(get, path = "/api/v1/anchors", tag = "anchors", params(AnchorQuery),
    responses((status = 200, body = AnchorList)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    _auth: Auth,
    ApiQuery(q): ApiQuery<AnchorQuery>,
) -> Result<Json<AnchorList>, ApiError> {
    let parse = |body: &[u8]| serde_json::from_slice::<AnchorRecord>(body).ok();
    let anchors = match q.target {
        None => {
            state.chain.memcache().values(ANCHORS_ADDRESS).iter().filter_map(|c| parse(&c.tx.content.body)).collect()
        }
        Some(target) => {
            let limit = q.limit.unwrap_or(100);
            if !(1..=1000).contains(&limit) {
                return Err(ApiError::BadRequest("invalid_field", "limit must be 1..=1000".into()));
            }
            let key = kalima_core::tx::validate_key(&target).map(|_| target).map_err(kalima_core::Rejection::from)?;
            state
                .chain
                .store()
                .history(ANCHORS_ADDRESS, &key, u64::MAX, limit)
                .await?
                .iter()
                .filter_map(|c| parse(&c.tx.content.body))
                .collect()
        }
    };
    Ok(Json(AnchorList { anchors }))
}

/// Signs a checkpoint now and anchors it on every target (admin); the anchors appear in
/// `GET /api/v1/anchors` once confirmed.
#[utoipa::path(post, path = "/api/v1/anchors", tag = "anchors",
    responses((status = 202, body = AnchorStarted), (status = 403, body = ErrorBody), (status = 404, description = "This node anchors nowhere ([anchor] targets)", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn anchor_now(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<(StatusCode, Json<AnchorStarted>), ApiError> {
    auth.require_admin()?;
    let service = state
        .anchors
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("this node anchors nowhere ([anchor] targets)".into()))?;
    let cp = state.chain.checkpoint_now().await?;
    service.anchor_now();
    Ok((StatusCode::ACCEPTED, Json(AnchorStarted { targets: service.targets.clone(), tree_size: cp.tree_size })))
}
