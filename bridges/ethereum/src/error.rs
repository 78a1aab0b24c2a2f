//! The bridge crate's error type.

/// Result alias of the bridge crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop one round of a relayer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The JSON-RPC node failed or answered something unusable.
    #[error("RPC of {chain}: {message}")]
    Rpc {
        /// Bridge name.
        chain: String,
        /// What failed.
        message: String,
    },
    /// The chain core refused or failed.
    #[error(transparent)]
    Core(#[from] kalima_core::Error),
    /// Local and on-chain configuration disagree, or a key is unusable.
    #[error("{0}")]
    Config(String),
    /// Signing or checking a release signature failed.
    #[error(transparent)]
    Signature(#[from] crate::contracts::ContractError),
}

impl Error {
    pub(crate) fn rpc(chain: &str, e: impl std::fmt::Display) -> Self {
        Error::Rpc { chain: chain.to_string(), message: format!("{e:#}") }
    }
}
