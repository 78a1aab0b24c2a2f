//! `/api/v1/cluster`: this node's view of the master cluster (admin).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::routing::{delete, get};
use kalima_core::cluster::{Master, MembershipChange, parse_public};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, Auth};

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/cluster", get(status))
        .route("/cluster/members", axum::routing::post(add_member))
        .route("/cluster/members/{id}", delete(remove_member))
}

/// A master to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMaster {
    /// Raft id, never used before in this cluster.
    #[schema(minimum = 1)]
    pub id: u64,
    /// `host:port` of its node link.
    #[schema(max_length = 255)]
    pub addr: String,
    /// Its link public key (64 hex digits, from its `link.key`).
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    pub link_key: String,
    /// Its node public key (64 hex digits).
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    pub node_key: String,
}

fn cluster_of(state: &AppState) -> Result<&std::sync::Arc<kalima_core::cluster::Cluster>, ApiError> {
    state.cluster.as_ref().ok_or_else(|| {
        ApiError::Conflict("not_a_cluster", "this node is not a master ([cluster] role = \"single\")".into())
    })
}

/// Adds a master: it catches up (from a snapshot when the log was purged), then votes. The
/// call returns once it votes; the change is recorded on the chain under `/_kalima/cluster`.
#[utoipa::path(post, path = "/api/v1/cluster/members", tag = "cluster", request_body = NewMaster,
    responses((status = 200, body = ClusterJson), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn add_member(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(req): ApiJson<NewMaster>,
) -> Result<Json<ClusterJson>, ApiError> {
    auth.require_admin()?;
    let cluster = cluster_of(&state)?;
    if req.id == 0 {
        return Err(ApiError::BadRequest("invalid_field", "id must be at least 1".into()));
    }
    if req.addr.parse::<std::net::SocketAddr>().is_err() && !req.addr.contains(':') {
        return Err(ApiError::BadRequest("invalid_field", format!("addr {:?} is not host:port", req.addr)));
    }
    for (field, k) in [("link_key", &req.link_key), ("node_key", &req.node_key)] {
        parse_public(k).map_err(|e| ApiError::BadRequest("invalid_field", format!("{field}: {e}")))?;
    }
    if cluster.status().members.contains_key(&req.id) {
        return Err(ApiError::Conflict("member_exists", format!("master {} is already a member", req.id)));
    }
    let master =
        Master { addr: req.addr, link_key: req.link_key.to_lowercase(), node_key: req.node_key.to_lowercase() };
    cluster.change_membership(MembershipChange::Add(req.id, master)).await?;
    status(State(state), auth).await
}

/// Removes a master from the cluster; the change is recorded on the chain.
#[utoipa::path(delete, path = "/api/v1/cluster/members/{id}", tag = "cluster", params(("id" = u64, Path, description = "Master id")),
    responses((status = 200, body = ClusterJson), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove_member(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<ClusterJson>, ApiError> {
    auth.require_admin()?;
    let cluster = cluster_of(&state)?;
    let s = cluster.status();
    if !s.members.contains_key(&id) {
        return Err(ApiError::NotFound(format!("master {id} is not a member")));
    }
    if s.voters.len() <= 1 && s.voters.contains(&id) {
        return Err(ApiError::Conflict("last_master", "the last voting master cannot be removed".into()));
    }
    cluster.change_membership(MembershipChange::Remove(id)).await?;
    status(State(state), auth).await
}

/// A master as the membership records it.
#[derive(Debug, Serialize, ToSchema)]
pub struct MasterJson {
    /// Node-link address.
    pub addr: String,
    /// Link public key (hex).
    pub link_key: String,
    /// Whether it votes (false for a learner catching up).
    pub voter: bool,
}

/// The cluster as this node sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterJson {
    /// `single` for a node on its own, else `master`.
    pub role: String,
    /// This master's id (absent on a single node).
    pub id: Option<u64>,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown` (masters only).
    pub state: Option<String>,
    /// The leader this node knows of.
    pub leader: Option<u64>,
    /// Raft term.
    pub term: Option<u64>,
    /// Index of the last Raft log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to the chain.
    pub last_applied: Option<u64>,
    /// Chain height of this node.
    pub height: u64,
    /// Hash of this node's head block (hex).
    pub head_hash: String,
    /// Masters by id.
    pub members: BTreeMap<u64, MasterJson>,
}

/// This node's view of the cluster: role, leader, term, Raft log and chain positions.
#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    responses((status = 200, body = ClusterJson), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn status(State(state): State<AppState>, auth: Auth) -> Result<Json<ClusterJson>, ApiError> {
    auth.require_admin()?;
    let head = state.chain.head();
    let mut out = ClusterJson {
        role: "single".into(),
        id: None,
        state: None,
        leader: None,
        term: None,
        last_log_index: None,
        last_applied: None,
        height: head.block.header.height,
        head_hash: hex::encode(head.block.hash),
        members: BTreeMap::new(),
    };
    if let Some(c) = &state.cluster {
        let s = c.status();
        out.role = "master".into();
        out.id = Some(s.id);
        out.state = Some(s.role);
        out.leader = s.leader;
        out.term = Some(s.term);
        out.last_log_index = s.last_log_index;
        out.last_applied = s.last_applied;
        out.members = s
            .members
            .into_iter()
            .map(|(id, m)| (id, MasterJson { addr: m.addr, link_key: m.link_key, voter: s.voters.contains(&id) }))
            .collect();
    }
    Ok(Json(out))
}
