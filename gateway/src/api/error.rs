//! The API's one error type: `{"error":{"code","message"}}` with an explicit status per
//! cause; internal causes are logged, not returned.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kalima_core::ledger::LedgerError;
use kalima_core::merkle::MerkleError;
use kalima_core::{Error, Rejection};
use serde::Serialize;
use utoipa::ToSchema;

/// Error body of every failing call.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Machine-readable code and human-readable message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code, e.g. `forbidden`, `invalid_key`, `too_large`.
    pub code: String,
    /// What was wrong, for the sender.
    pub message: String,
}

/// An API failure.
#[derive(Debug)]
pub enum ApiError {
    /// A write or read refused by the core's checks.
    Rejected(Rejection),
    /// Nothing at that id/address.
    NotFound(String),
    /// A malformed request that the core never saw.
    BadRequest(&'static str, String),
    /// The request conflicts with how the resource is configured.
    Conflict(&'static str, String),
    /// The node cannot serve right now.
    Unavailable(String),
    /// The request body is over `[api] max_request_bytes`.
    TooLarge(String),
    /// The path exists but not with this method.
    MethodNotAllowed,
    /// The caller holds too many of a bounded resource (live streams).
    TooMany(String),
    /// Missing or unknown credentials that are not a device token (a buyer's access token).
    Unauthorized(&'static str, String),
    /// Known credentials that do not allow this.
    Forbidden(&'static str, String),
    /// A fault inside the node (logged).
    Internal(String),
}

impl ApiError {
    /// Status and code of this error.
    pub fn status_code(&self) -> (StatusCode, &str) {
        match self {
            ApiError::Rejected(r) => (rejection_status(r), r.code()),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(code, _) => (StatusCode::BAD_REQUEST, code),
            ApiError::Conflict(code, _) => (StatusCode::CONFLICT, code),
            ApiError::Unauthorized(code, _) => (StatusCode::UNAUTHORIZED, code),
            ApiError::Forbidden(code, _) => (StatusCode::FORBIDDEN, code),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_streams"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The message for the sender.
    pub fn message(&self) -> String {
        match self {
            ApiError::Rejected(r) => r.to_string(),
            ApiError::NotFound(m)
            | ApiError::BadRequest(_, m)
            | ApiError::Conflict(_, m)
            | ApiError::Unauthorized(_, m)
            | ApiError::Forbidden(_, m)
            | ApiError::Unavailable(m)
            | ApiError::TooLarge(m)
            | ApiError::TooMany(m) => m.clone(),
            ApiError::MethodNotAllowed => "this path does not take that method; see /docs".into(),
            ApiError::Internal(_) => "internal error; see the node's log".into(),
        }
    }
}

/// HTTP status of each rejection.
pub fn rejection_status(r: &Rejection) -> StatusCode {
    match r {
        Rejection::UnknownDevice | Rejection::Revoked(_) => StatusCode::UNAUTHORIZED,
        Rejection::Forbidden { .. } | Rejection::AdminOnly => StatusCode::FORBIDDEN,
        Rejection::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Rejection::DuplicateIdempotencyKey { .. } | Rejection::DeviceExists(_) => StatusCode::CONFLICT,
        Rejection::NoSuchDevice(_) => StatusCode::NOT_FOUND,
        Rejection::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        Rejection::Invalid(_)
        | Rejection::Malformed(_)
        | Rejection::BadSignature(_)
        | Rejection::SignatureRequired(_)
        | Rejection::BatchSize { .. } => StatusCode::BAD_REQUEST,
        Rejection::Ledger(e) => ledger_status(e),
    }
}

/// HTTP status of each ledger refusal.
pub fn ledger_status(e: &LedgerError) -> StatusCode {
    match e {
        LedgerError::Invalid(_) | LedgerError::BadAccountSignature(_) => StatusCode::BAD_REQUEST,
        LedgerError::NotRelayer { .. } | LedgerError::AdminOnly | LedgerError::NotProvider { .. } => {
            StatusCode::FORBIDDEN
        }
        LedgerError::UnknownBridge(_) | LedgerError::UnknownWithdrawal(_) | LedgerError::UnknownFeed(_) => {
            StatusCode::NOT_FOUND
        }
        LedgerError::PriceMismatch { .. } | LedgerError::MarketNotConfigured | LedgerError::AlreadySettled(_) => {
            StatusCode::CONFLICT
        }
        LedgerError::BadNonce { .. }
        | LedgerError::AlreadyMinted { .. }
        | LedgerError::AlreadyAttested { .. }
        | LedgerError::Halted { .. } => StatusCode::CONFLICT,
        LedgerError::InsufficientFunds { .. }
        | LedgerError::SupplyCap { .. }
        | LedgerError::OutOfWindow { .. }
        | LedgerError::OverCap { .. } => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        ApiError::Rejected(r)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Rejected(r) => ApiError::Rejected(r),
            Error::ShuttingDown => ApiError::Unavailable("the node is shutting down".into()),
            Error::CommitFailed(m) => ApiError::Unavailable(format!("the write was not stored: {m}")),
            Error::Unavailable(m) => ApiError::Unavailable(m),
            // Sizes and indexes come from the request; chunk faults mean the store disagrees
            // with the tree, which is the node's problem, not the caller's.
            Error::Merkle(
                m @ (MerkleError::IndexOutOfRange { .. }
                | MerkleError::SizeOutOfRange { .. }
                | MerkleError::SizesReversed { .. }
                | MerkleError::EmptyFirstTree),
            ) => ApiError::BadRequest("invalid_proof_request", m.to_string()),
            other => ApiError::Internal(format!("{other:#}")),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            metrics::counter!("kalima_writes_rejected_total", "reason" => "too_large", "interface" => super::INTERFACE)
                .increment(1);
            return ApiError::TooLarge(r.body_text());
        }
        let rej = Rejection::Malformed(r.body_text());
        kalima_core::ingest::count_rejection("rest", &rej);
        ApiError::Rejected(rej)
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::BadRequest("invalid_path", r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::BadRequest("invalid_query", r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_code();
        if let ApiError::Internal(cause) = &self {
            tracing::error!(target: "api", cause = %cause, "Request failed.");
        }
        let body = ErrorBody { error: ErrorDetail { code: code.to_string(), message: self.message() } };
        (status, Json(body)).into_response()
    }
}
