//! Kalima's published REST API, served as-is so its existing clients keep working.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::AppState;

/// Routes of the compatibility surface.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new()
}

/// Kalima answers 405 to a request it does not know.
pub async fn unknown_request() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(serde_json::json!({"error": "unknown request"})),
    )
        .into_response()
}
