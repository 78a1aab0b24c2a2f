//! Why the marketplace refused a buyer.

/// A refused access or stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The token is not of the form `<subscription id>.<secret>`.
    #[error("the access token must be <subscription id>.<secret>")]
    MalformedToken,
    /// No subscription matches the token.
    #[error("the access token matches no subscription")]
    UnknownToken,
    /// The subscription's period is over.
    #[error("the subscription to feed {feed} expired at {expired_at_ms} ms; renew it with a purchase")]
    Expired {
        /// Feed id.
        feed: String,
        /// When (ms).
        expired_at_ms: i64,
    },
    /// The feed was delisted.
    #[error("feed {0} is delisted")]
    Delisted(String),
    /// The feed does not exist.
    #[error("no feed {0}")]
    UnknownFeed(String),
}

impl Error {
    /// Bounded label for metrics and API error codes.
    pub fn code(&self) -> &'static str {
        match self {
            Error::MalformedToken => "malformed_token",
            Error::UnknownToken => "unknown_token",
            Error::Expired { .. } => "subscription_expired",
            Error::Delisted(_) => "feed_delisted",
            Error::UnknownFeed(_) => "unknown_feed",
        }
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
