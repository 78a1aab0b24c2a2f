//! `/api/v1/adapters/...`: status of the field adapters and set-point writes to field devices.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kalima_adapter_modbus::{DeviceStatus, SetpointError, SetpointOutcome};
use kalima_core::Rejection;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, Auth};

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/adapters/modbus/devices", get(modbus_devices))
        .route("/adapters/modbus/devices/{name}/points/{key}", post(modbus_setpoint))
        .route("/adapters/lorawan", get(lorawan_status))
}

/// LoRaWAN devices and gateways as the adapter has seen them.
#[derive(Debug, Serialize, ToSchema)]
pub struct LorawanStatus {
    /// Whether `[lorawan] listen` is set.
    pub enabled: bool,
    /// Devices whose address the caller may read (all for admins).
    pub devices: Vec<kalima_adapter_lorawan::status::DeviceStatus>,
    /// Allow-listed gateways (admins only; empty for other devices).
    pub gateways: Vec<kalima_adapter_lorawan::status::GatewayStatus>,
}

/// Status of the LoRaWAN adapter: per device whether it joined, its counters, when and through
/// which gateway it was last heard; per gateway its last contact and whether downlinks can
/// reach it.
#[utoipa::path(get, path = "/api/v1/adapters/lorawan", tag = "adapters",
    responses((status = 200, body = LorawanStatus)),
    security(("bearer" = [])))]
pub async fn lorawan_status(State(state): State<AppState>, auth: Auth) -> Json<LorawanStatus> {
    let Some(l) = &state.lorawan else {
        return Json(LorawanStatus { enabled: false, devices: Vec::new(), gateways: Vec::new() });
    };
    let s = l.status();
    let admin = auth.0.is_admin();
    Json(LorawanStatus {
        enabled: true,
        devices: s.devices.into_iter().filter(|d| admin || auth.0.can_read(&d.address)).collect(),
        gateways: if admin { s.gateways } else { Vec::new() },
    })
}

/// Modbus devices the caller may read.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModbusDevices {
    /// One entry per configured device whose addresses the caller can read.
    pub devices: Vec<DeviceStatus>,
}

/// Status of the configured Modbus devices: health, poll counters, last error, backoff.
/// Admins see every device; other devices see those writing where they hold a read grant.
#[utoipa::path(get, path = "/api/v1/adapters/modbus/devices", tag = "adapters",
    responses((status = 200, body = ModbusDevices)),
    security(("bearer" = [])))]
pub async fn modbus_devices(State(state): State<AppState>, auth: Auth) -> Json<ModbusDevices> {
    let devices = match &state.modbus {
        None => Vec::new(),
        Some(m) => m
            .status()
            .into_iter()
            .filter(|d| auth.0.is_admin() || m.addresses(&d.name).iter().any(|a| auth.0.can_read(a)))
            .collect(),
    };
    Json(ModbusDevices { devices })
}

/// A set-point in engineering units (scale and offset of the point are undone before writing).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Setpoint {
    /// A number, or `true`/`false` for coils and bool points.
    pub value: serde_json::Value,
}

/// Path of a set-point.
#[derive(Debug, Deserialize)]
pub struct PointPath {
    name: String,
    key: String,
}

fn count_bad(reason: &'static str) {
    metrics::counter!("kalima_writes_rejected_total", "reason" => reason, "interface" => "rest").increment(1);
}

/// Write a set-point to a `writable` point of a Modbus device. Needs a write grant on the
/// point's address. The request and its outcome are recorded on the chain as
/// `<key>.setpoint` at that address, written by the caller; 502 when the device did not
/// take it (still recorded).
#[utoipa::path(post, path = "/api/v1/adapters/modbus/devices/{name}/points/{key}", tag = "adapters",
    params(("name" = String, Path, description = "Modbus device name from the config"), ("key" = String, Path, description = "Point key")),
    request_body = Setpoint,
    responses(
        (status = 200, description = "The device acknowledged the write", body = SetpointOutcome),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The point is not writable", body = ErrorBody),
        (status = 502, description = "The device did not take the write (recorded as failed)", body = SetpointOutcome),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn modbus_setpoint(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(p): ApiPath<PointPath>,
    ApiJson(body): ApiJson<Setpoint>,
) -> Result<Response, ApiError> {
    let Some(m) = &state.modbus else {
        count_bad("not_found");
        return Err(ApiError::NotFound(format!(
            "no Modbus device named {:?} (no [modbus] devices configured)",
            p.name
        )));
    };
    match m.write_setpoint(&auth.0, &p.name, &p.key, &body.value).await {
        Ok(out) => {
            let status = if out.outcome == "written" { StatusCode::OK } else { StatusCode::BAD_GATEWAY };
            Ok((status, Json(out)).into_response())
        }
        Err(SetpointError::NotFound(msg)) => {
            count_bad("not_found");
            Err(ApiError::NotFound(msg))
        }
        Err(SetpointError::Forbidden { device, address }) => {
            let r = Rejection::Forbidden { device, access: "write", address };
            kalima_core::ingest::count_rejection("rest", &r);
            Err(ApiError::Rejected(r))
        }
        Err(e @ SetpointError::NotWritable(_)) => {
            count_bad("not_writable");
            Err(ApiError::Conflict("not_writable", e.to_string()))
        }
        Err(e @ SetpointError::Invalid(_)) => {
            count_bad("invalid_value");
            Err(ApiError::BadRequest("invalid_value", e.to_string()))
        }
        Err(SetpointError::Record(e)) => Err(e.into()),
    }
}
