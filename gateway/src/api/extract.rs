//! Extractors: JSON and query strings whose rejections use the API error format, and the
//! authenticated device from `Authorization: Bearer <token>` (or the bare token, as
//! Kalima's own clients send it).

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use kalima_core::registry::Device;

use super::AppState;
use super::error::ApiError;

/// `axum::Json` with API-format rejections.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `axum::extract::Query` with API-format rejections.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// `axum::extract::Path` with API-format rejections.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// The device that authenticated the request.
#[derive(Debug, Clone)]
pub struct Auth(pub Arc<Device>);

/// The token from an `Authorization` header, with or without the `Bearer` scheme.
pub fn bearer(parts: &Parts) -> Option<&str> {
    bearer_header(&parts.headers)
}

/// The token of an `Authorization` header in `headers`, with or without the `Bearer` scheme.
pub fn bearer_header(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?.trim();
    Some(v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v).trim())
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer(parts);
        Ok(Auth(state.ingest.authenticate("rest", token)?))
    }
}

impl Auth {
    /// Refuses non-admin devices.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.0.is_admin() { Ok(()) } else { Err(ApiError::Rejected(kalima_core::Rejection::AdminOnly)) }
    }

    /// Refuses reads outside the device's grants.
    pub fn require_read(&self, address: &str) -> Result<(), ApiError> {
        if self.0.can_read(address) {
            Ok(())
        } else {
            Err(ApiError::Rejected(kalima_core::Rejection::Forbidden {
                device: self.0.id.clone(),
                access: "read",
                address: address.to_string(),
            }))
        }
    }
}
