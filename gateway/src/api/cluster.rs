//! `/api/v1/cluster`: this node's view of the master cluster (admin).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::Auth;

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new().route("/cluster", get(status))
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
