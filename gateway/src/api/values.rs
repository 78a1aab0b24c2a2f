//! `/api/v1/values`, `/api/v1/addresses` and `/api/v1/history`: current values from the
//! memcache and paged history from the store, filtered by the device's read grants.

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use kalima_core::Rejection;
use kalima_core::tx::{validate_address, validate_key, validate_prefix};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiQuery, Auth};
use super::model::TxJson;

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/values", get(values))
        .route("/addresses", get(addresses))
        .route("/history", get(history))
}

/// `?address=A[&key=K]`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ValuesQuery {
    /// Address, e.g. `/plant-1/line-2`.
    #[param(pattern = "^(/[A-Za-z0-9 :.@+_-]+)+$", max_length = 256)]
    pub address: String,
    /// One key; all keys when absent.
    #[param(pattern = "^[A-Za-z0-9 :.@+_/-]+$", min_length = 1, max_length = 128)]
    pub key: Option<String>,
}

/// Current values of an address.
#[derive(Debug, Serialize, ToSchema)]
pub struct Values {
    /// The address.
    pub address: String,
    /// Highest per-address sequence.
    pub sequence: u64,
    /// Live values, by key order.
    pub values: Vec<TxJson>,
}

/// Current value(s) of an address: every key, or the one asked for (from the memcache).
#[utoipa::path(get, path = "/api/v1/values", tag = "values", params(ValuesQuery),
    responses((status = 200, body = Values), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, description = "No value for that key", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn values(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<ValuesQuery>,
) -> Result<Json<Values>, ApiError> {
    validate_address(&q.address).map_err(Rejection::from)?;
    auth.require_read(&q.address)?;
    Ok(Json(current_values(state.chain.memcache(), q)?))
}

/// The answer to `GET /api/v1/values` from `cache`, once the caller may read the address.
pub fn current_values(cache: &kalima_core::memcache::Memcache, q: ValuesQuery) -> Result<Values, ApiError> {
    let values = match &q.key {
        Some(k) => {
            validate_key(k).map_err(Rejection::from)?;
            let v = cache
                .get(&q.address, k)
                .ok_or_else(|| ApiError::NotFound(format!("no value at {} key {k}", q.address)))?;
            vec![TxJson::from(v.as_ref())]
        }
        None => cache.values(&q.address).iter().map(|c| TxJson::from(c.as_ref())).collect(),
    };
    Ok(Values { sequence: cache.sequence(&q.address), address: q.address, values })
}

/// `?prefix=P`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AddressesQuery {
    /// Address prefix (`/` for all).
    #[param(pattern = "^(/|(/[A-Za-z0-9 :.@+_-]+)+)$", max_length = 256)]
    pub prefix: Option<String>,
}

/// Addresses holding values.
#[derive(Debug, Serialize, ToSchema)]
pub struct Addresses {
    /// Addresses under the prefix that the device may read.
    pub addresses: Vec<String>,
}

/// Addresses under a prefix that hold at least one value and that the device may read.
#[utoipa::path(get, path = "/api/v1/addresses", tag = "values", params(AddressesQuery),
    responses((status = 200, body = Addresses), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
pub async fn addresses(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<AddressesQuery>,
) -> Result<Json<Addresses>, ApiError> {
    let prefix = q.prefix.unwrap_or_else(|| "/".into());
    validate_prefix(&prefix).map_err(Rejection::from)?;
    let addresses = state.chain.memcache().addresses(&prefix).into_iter().filter(|a| auth.0.can_read(a)).collect();
    Ok(Json(Addresses { addresses }))
}

/// `?address=A&key=K[&before=S][&limit=N]`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Address.
    #[param(pattern = "^(/[A-Za-z0-9 :.@+_-]+)+$", max_length = 256)]
    pub address: String,
    /// Key.
    #[param(pattern = "^[A-Za-z0-9 :.@+_/-]+$", min_length = 1, max_length = 128)]
    pub key: String,
    /// Only transactions with a global sequence below this (the `next_before` of the previous page).
    pub before: Option<u64>,
    /// Page size, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// One page of history, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryPage {
    /// Transactions, newest first.
    pub items: Vec<TxJson>,
    /// Pass as `before` to get the next (older) page; absent on the last page.
    pub next_before: Option<u64>,
}

/// Every transaction of one address and key, newest first, paged.
#[utoipa::path(get, path = "/api/v1/history", tag = "values", params(HistoryQuery),
    responses((status = 200, body = HistoryPage), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
pub async fn history(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Json<HistoryPage>, ApiError> {
    validate_address(&q.address).map_err(Rejection::from)?;
    validate_key(&q.key).map_err(Rejection::from)?;
    auth.require_read(&q.address)?;
    let limit = super::model::page_limit(q.limit, 100)?;
    let before = q.before.unwrap_or(u64::MAX >> 1);
    let txs = state.chain.store().history(&q.address, &q.key, before, limit).await?;
    let next_before = (txs.len() == limit as usize).then(|| txs.last().map(|t| t.tx.global_sequence)).flatten();
    Ok(Json(HistoryPage { items: txs.iter().map(TxJson::from).collect(), next_before }))
}
