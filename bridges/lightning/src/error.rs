//! The crate's error type: what can go wrong between the node and LND, named by endpoint and
//! field so that an operator can tell a bad macaroon from a broken answer.

/// Result alias of the Lightning bridge.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the Lightning bridge can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable: a bad URL, an unreadable or invalid macaroon or certificate.
    #[error("lightning config: {0}")]
    Config(String),
    /// An argument was refused before anything was sent (an amount of 0, a memo too long).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// LND could not be reached or the connection broke (TLS verification failures included).
    #[error("LND {endpoint}: {message}")]
    Transport {
        /// The endpoint called, e.g. `POST /v1/invoices`.
        endpoint: &'static str,
        /// The cause, with its whole chain.
        message: String,
    },
    /// LND did not answer within the request timeout.
    #[error("LND {endpoint}: no answer within {timeout_ms} ms")]
    Timeout {
        /// The endpoint called.
        endpoint: &'static str,
        /// The timeout that ran out.
        timeout_ms: u64,
    },
    /// LND refused the macaroon (missing, wrong, or without the needed permission).
    #[error("LND {endpoint} refused the macaroon: {message}")]
    Unauthorized {
        /// The endpoint called.
        endpoint: &'static str,
        /// LND's message.
        message: String,
    },
    /// LND answered with an error status.
    #[error("LND {endpoint} answered HTTP {status}{}: {message}", fmt_code(*code))]
    Lnd {
        /// The endpoint called.
        endpoint: &'static str,
        /// HTTP status.
        status: u16,
        /// gRPC status code from the grpc-gateway error body, when there was one.
        code: Option<i64>,
        /// LND's message, or the start of the body when it was not a grpc-gateway error.
        message: String,
    },
    /// An open stream carried an error object instead of a result.
    #[error("LND {endpoint} stream error{}: {message}", fmt_code(*code))]
    Stream {
        /// The streaming endpoint.
        endpoint: &'static str,
        /// gRPC status code, when given.
        code: Option<i64>,
        /// LND's message.
        message: String,
    },
    /// LND answered something that does not follow its documented API.
    #[error("LND {endpoint} answered malformed data: {field}: {reason}")]
    Malformed {
        /// The endpoint called.
        endpoint: &'static str,
        /// The field (or `body`, `line`) at fault.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The settlement handler refused a settled invoice; it is retried, never skipped.
    #[error("settlement handler failed on settle_index {settle_index}: {message}")]
    Handler {
        /// Settle index of the invoice being handled.
        settle_index: u64,
        /// The handler's error, with its chain.
        message: String,
    },
    /// A background task panicked or was cancelled.
    #[error("lightning task: {0}")]
    Task(String),
}

fn fmt_code(code: Option<i64>) -> String {
    code.map(|c| format!(" (gRPC code {c})")).unwrap_or_default()
}

impl Error {
    /// A short, bounded label for the `reason` of `kalima_lightning_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Transport { .. } => "transport",
            Error::Timeout { .. } => "timeout",
            Error::Unauthorized { .. } => "unauthorized",
            Error::Lnd { .. } => "lnd_status",
            Error::Stream { .. } => "stream_error",
            Error::Malformed { .. } => "malformed",
            Error::Handler { .. } => "handler",
            Error::Task(_) => "task",
        }
    }

    /// Every `reason` label [`Error::reason`] can return.
    pub const REASONS: [&'static str; 10] = [
        "config",
        "invalid_argument",
        "transport",
        "timeout",
        "unauthorized",
        "lnd_status",
        "stream_error",
        "malformed",
        "handler",
        "task",
    ];

    pub(crate) fn malformed(endpoint: &'static str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Malformed { endpoint, field: field.into(), reason: reason.into() }
    }

    /// A transport error with the whole cause chain (reqwest hides TLS causes in `source()`).
    pub(crate) fn transport(endpoint: &'static str, err: &(dyn std::error::Error + 'static)) -> Self {
        Error::Transport { endpoint, message: error_chain(err) }
    }
}

/// `outer: inner: innermost`, skipping a cause whose text the previous one already shows.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed() {
        let all = [
            Error::Config(String::new()),
            Error::InvalidArgument(String::new()),
            Error::Transport { endpoint: "e", message: String::new() },
            Error::Timeout { endpoint: "e", timeout_ms: 1 },
            Error::Unauthorized { endpoint: "e", message: String::new() },
            Error::Lnd { endpoint: "e", status: 500, code: None, message: String::new() },
            Error::Stream { endpoint: "e", code: Some(2), message: String::new() },
            Error::malformed("e", "f", "r"),
            Error::Handler { settle_index: 1, message: String::new() },
            Error::Task(String::new()),
        ];
        let reasons: Vec<_> = all.iter().map(Error::reason).collect();
        assert_eq!(reasons, Error::REASONS);
    }

    #[test]
    fn messages_name_the_endpoint_code_and_field() {
        let e =
            Error::Lnd { endpoint: "GET /v1/invoice/{r_hash_str}", status: 500, code: Some(2), message: "boom".into() };
        assert_eq!(e.to_string(), "LND GET /v1/invoice/{r_hash_str} answered HTTP 500 (gRPC code 2): boom");
        let e = Error::malformed("POST /v1/invoices", "r_hash", "expected 32 bytes, got 16");
        assert_eq!(e.to_string(), "LND POST /v1/invoices answered malformed data: r_hash: expected 32 bytes, got 16");
    }
}
