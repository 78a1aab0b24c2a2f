//! The Tezos bridge's error type.

/// Result alias of the Tezos bridge.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop an anchor, a forge or a read-back.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration or an argument is unusable.
    #[error("{0}")]
    Config(String),
    /// The key file is missing, unreadable or not an Ed25519 key.
    #[error("key file {path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A value cannot be encoded or decoded (Micheline, base58check, binary operation).
    #[error("encoding: {0}")]
    Encoding(String),
    /// The Octez node failed or answered something unusable.
    #[error("Octez RPC {what}: {message}")]
    Rpc {
        /// The call (`GET /chains/main/blocks/head/header`).
        what: String,
        /// What failed.
        message: String,
    },
    /// The node simulated the anchor and it did not apply (a FAILWITH, a lack of funds...).
    #[error("the simulation of the anchor failed: {0}")]
    Simulation(String),
    /// The node refused to inject the signed operation.
    #[error("the node refused the operation: {0}")]
    Injection(String),
    /// The fees the simulation calls for are above the configured cap.
    #[error("the anchor needs {fee} mutez of fees, above fee_cap_mutez = {cap}")]
    FeeCap {
        /// Fees needed, in mutez.
        fee: u64,
        /// The cap, in mutez.
        cap: u64,
    },
    /// The operation read back is not an applied call of the anchoring contract.
    #[error("operation {op}: {reason}")]
    NotAnchor {
        /// Operation hash.
        op: String,
        /// Why it does not count as an anchor.
        reason: String,
    },
    /// The anchor could not be confirmed after every attempt.
    #[error("{0}")]
    NotConfirmed(String),
    /// The chain core failed (writing a key file).
    #[error(transparent)]
    Core(#[from] kalima_core::Error),
}

impl Error {
    pub(crate) fn rpc(what: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Rpc { what: what.into(), message: message.to_string() }
    }

    pub(crate) fn encoding(message: impl std::fmt::Display) -> Self {
        Error::Encoding(message.to_string())
    }
}
