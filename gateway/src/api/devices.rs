//! `/api/v1/devices`: registration, grants and revocation (admin only). Each change is a
//! transaction under `/_kalima`, so the registry's history is on the chain.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use kalima_core::Rejection;
use kalima_core::chain::Guard;
use kalima_core::registry::{
    ADMIN_ID, DEVICES_ADDRESS, Device, DeviceRecord, GrantRecord, grants_address, new_token, token_digest,
    validate_device_id, validate_grant_prefix,
};
use kalima_core::tx::{FieldError, TxContent, validate_key};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiQuery, Auth};
use super::model::TxReceipt;

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/devices", post(register).get(list))
        .route("/devices/{id}", get(show).delete(revoke))
        .route("/devices/{id}/grants", post(grant).delete(remove_grant))
}

/// Register a device.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// Device id (key characters, no `/`, not starting with `_`).
    #[schema(pattern = "^[A-Za-z0-9 :.@+-][A-Za-z0-9 :.@+_-]*$", min_length = 1, max_length = 64)]
    pub id: String,
    /// Ed25519 public key (64 hex digits); signed writes are verified against it.
    #[serde(default)]
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    pub public_key: Option<String>,
    /// Refuse unsigned writes from this device.
    #[serde(default)]
    pub require_signature: bool,
}

/// A registered device and its token (shown once).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceCreated {
    /// Device id.
    pub id: String,
    /// API token: `Authorization: Bearer <token>`. Only its SHA-256 is stored.
    pub token: String,
    /// The registration transaction.
    pub receipt: TxReceipt,
}

/// A device as the admin sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceJson {
    /// Device id.
    pub id: String,
    /// Ed25519 public key (hex).
    pub public_key: Option<String>,
    /// Unsigned writes refused.
    pub require_signature: bool,
    /// Admin device.
    pub admin: bool,
    /// Revoked.
    pub revoked: bool,
    /// Grants.
    pub grants: Vec<GrantJson>,
}

/// A prefix grant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantJson {
    /// Address prefix (`/` for all).
    #[schema(pattern = "^(/|(/[A-Za-z0-9 :.@+_-]+)+)$", max_length = 128)]
    pub prefix: String,
    /// Read access (values, history, streams, proofs).
    pub read: bool,
    /// Write access.
    pub write: bool,
}

impl From<&Device> for DeviceJson {
    fn from(d: &Device) -> Self {
        DeviceJson {
            id: d.id.clone(),
            public_key: d.record.public_key.clone(),
            require_signature: d.record.require_signature,
            admin: d.record.admin,
            revoked: d.record.revoked,
            grants: d
                .grants
                .iter()
                .map(|g| GrantJson { prefix: g.prefix.clone(), read: g.read, write: g.write })
                .collect(),
        }
    }
}

async fn system_write(
    state: &AppState,
    auth: &Auth,
    address: String,
    key: String,
    body: Vec<u8>,
    guard: Guard,
) -> Result<TxReceipt, ApiError> {
    let content = TxContent { device_id: auth.0.id.clone(), address, key, body, ..TxContent::default() };
    let receipts = state.chain.submit(vec![content], Some(guard)).await?;
    receipts.first().map(TxReceipt::from).ok_or_else(|| ApiError::Internal("no receipt".into()))
}

fn record_body(r: &DeviceRecord) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(r).map_err(|e| ApiError::Internal(e.to_string()))
}

/// Registers a device and returns its token (admin).
#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", request_body = NewDevice,
    responses((status = 201, body = DeviceCreated), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, description = "Id taken (or revoked)", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn register(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(req): ApiJson<NewDevice>,
) -> Result<(StatusCode, Json<DeviceCreated>), ApiError> {
    auth.require_admin()?;
    validate_device_id(&req.id).map_err(Rejection::from)?;
    if let Some(pk) = &req.public_key {
        let mut b = [0u8; 32];
        hex::decode_to_slice(pk, &mut b)
            .map_err(|_| Rejection::from(FieldError::new("public_key", "must be 64 hex digits")))?;
        ed25519_dalek::VerifyingKey::from_bytes(&b)
            .map_err(|_| Rejection::from(FieldError::new("public_key", "is not a valid Ed25519 point")))?;
    }
    if req.require_signature && req.public_key.is_none() {
        return Err(Rejection::from(FieldError::new("require_signature", "needs a public_key")).into());
    }
    let token = new_token();
    let record = DeviceRecord {
        token_sha256: token_digest(&token),
        public_key: req.public_key.map(|k| k.to_lowercase()),
        require_signature: req.require_signature,
        admin: false,
        revoked: false,
    };
    let receipt = system_write(
        &state,
        &auth,
        DEVICES_ADDRESS.into(),
        req.id.clone(),
        record_body(&record)?,
        Guard::DeviceAbsent(req.id.clone()),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(DeviceCreated { id: req.id, token, receipt })))
}

/// Devices, sorted by id.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceList {
    /// Every registered device, revoked ones included.
    pub devices: Vec<DeviceJson>,
}

/// Every device with its grants (admin).
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", responses((status = 200, body = DeviceList), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, auth: Auth) -> Result<Json<DeviceList>, ApiError> {
    auth.require_admin()?;
    Ok(Json(DeviceList {
        devices: state.chain.registry().list().iter().map(|d| DeviceJson::from(d.as_ref())).collect(),
    }))
}

fn find(state: &AppState, id: &str) -> Result<std::sync::Arc<Device>, ApiError> {
    state.chain.registry().get(id).ok_or_else(|| ApiError::Rejected(Rejection::NoSuchDevice(id.to_string())))
}

/// One device (admin, or the device itself).
#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "Device id")),
    responses((status = 200, body = DeviceJson), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn show(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<DeviceJson>, ApiError> {
    if auth.0.id != id {
        auth.require_admin()?;
    }
    Ok(Json(DeviceJson::from(find(&state, &id)?.as_ref())))
}

/// Revokes a device: its token stops working everywhere at once; the id cannot be reused (admin).
#[utoipa::path(delete, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "Device id")),
    responses((status = 200, body = TxReceipt), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<TxReceipt>, ApiError> {
    auth.require_admin()?;
    if id == ADMIN_ID || id == auth.0.id {
        return Err(ApiError::BadRequest("invalid_field", "the admin device cannot revoke itself".into()));
    }
    let dev = find(&state, &id)?;
    let mut record = dev.record.clone();
    record.revoked = true;
    Ok(Json(
        system_write(
            &state,
            &auth,
            DEVICES_ADDRESS.into(),
            id.clone(),
            record_body(&record)?,
            Guard::DevicePresent(id),
        )
        .await?,
    ))
}

/// Grants (or, with read and write both false, removes) access to an address prefix (admin).
#[utoipa::path(post, path = "/api/v1/devices/{id}/grants", tag = "devices", params(("id" = String, Path, description = "Device id")), request_body = GrantJson,
    responses((status = 200, body = TxReceipt), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn grant(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(g): ApiJson<GrantJson>,
) -> Result<Json<TxReceipt>, ApiError> {
    auth.require_admin()?;
    validate_grant_prefix(&g.prefix).map_err(Rejection::from)?;
    validate_key(&g.prefix).map_err(|e| Rejection::from(FieldError::new("prefix", e.reason)))?;
    find(&state, &id)?;
    let body = if g.read || g.write {
        serde_json::to_vec(&GrantRecord { read: g.read, write: g.write })
            .map_err(|e| ApiError::Internal(e.to_string()))?
    } else {
        Vec::new()
    };
    Ok(Json(system_write(&state, &auth, grants_address(&id), g.prefix, body, Guard::DevicePresent(id)).await?))
}

/// `?prefix=P`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PrefixQuery {
    /// The granted prefix to remove.
    pub prefix: String,
}

/// Removes a grant (admin).
#[utoipa::path(delete, path = "/api/v1/devices/{id}/grants", tag = "devices", params(("id" = String, Path, description = "Device id"), PrefixQuery),
    responses((status = 200, body = TxReceipt), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn remove_grant(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PrefixQuery>,
) -> Result<Json<TxReceipt>, ApiError> {
    auth.require_admin()?;
    let dev = find(&state, &id)?;
    if !dev.grants.iter().any(|g| g.prefix == q.prefix) {
        return Err(ApiError::NotFound(format!("device {id} has no grant on {}", q.prefix)));
    }
    Ok(Json(system_write(&state, &auth, grants_address(&id), q.prefix, Vec::new(), Guard::DevicePresent(id)).await?))
}
