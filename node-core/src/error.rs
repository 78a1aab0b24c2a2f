//! The core's error type.

use std::path::Path;

use crate::merkle::MerkleError;
use crate::tx::{DecodeError, FieldError};

/// Result alias of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A write was refused; the reason is for the sender.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The database failed.
    #[error("storage: {0}")]
    Db(#[from] sqlx::Error),
    /// A schema migration failed.
    #[error("storage migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Stored bytes do not parse.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Merkle proof computation failed.
    #[error(transparent)]
    Merkle(#[from] MerkleError),
    /// Encryption or decryption failed.
    #[error("crypto: {0}")]
    Crypto(String),
    /// A record names a data key the ring does not hold.
    #[error("data key {0} is not in the key ring")]
    UnknownDataKey(u32),
    /// The stored chain does not verify.
    #[error("chain corrupt at height {height}: {reason}")]
    Corrupt {
        /// First height at which the fault shows.
        height: u64,
        /// What does not match.
        reason: String,
    },
    /// Configuration or key files are wrong.
    #[error("config: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The durable write of a commit failed; nothing of it was stored.
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// The chain cannot continue safely (e.g. a commit whose outcome is unknown).
    #[error("fatal: {0}")]
    Fatal(String),
    /// The write could not be ordered now (no cluster leader reachable, leadership changed);
    /// the text says whether it may still commit.
    #[error("{0}")]
    Unavailable(String),
    /// A node link or the cluster's Raft storage failed.
    #[error("cluster: {0}")]
    Link(String),
    /// The outbox of a client node failed or does not verify.
    #[error("outbox: {0}")]
    Outbox(String),
    /// The node is stopping and takes no more work.
    #[error("the node is shutting down")]
    ShuttingDown,
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.display().to_string(), source }
    }
}

/// Why a write was refused, in the order ingest checks (DESIGN.md).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No device holds the presented token.
    #[error("unknown device or token")]
    UnknownDevice,
    /// The device was revoked.
    #[error("device {0} is revoked")]
    Revoked(String),
    /// The device holds no write (or read) grant covering the address.
    #[error("device {device} holds no {access} grant for {address}")]
    Forbidden {
        /// The device.
        device: String,
        /// `read` or `write`.
        access: &'static str,
        /// The address it asked for.
        address: String,
    },
    /// Only the admin may do this.
    #[error("this call needs the admin token")]
    AdminOnly,
    /// Body over the limit.
    #[error("body of {size} bytes is over the {limit}-byte limit")]
    TooLarge {
        /// Body size sent.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// A field is malformed.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// The request is not valid JSON or misses fields.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The signature does not verify against the device's registered key.
    #[error("signature does not verify against the public key of device {0}")]
    BadSignature(String),
    /// The device's policy requires a signature and none was sent.
    #[error("device {0} must sign its transactions")]
    SignatureRequired(String),
    /// The idempotency key was already used by this device.
    #[error("idempotency key {key:?} was already used by transaction {existing}")]
    DuplicateIdempotencyKey {
        /// The repeated key.
        key: String,
        /// Id (hex) of the transaction that used it.
        existing: String,
    },
    /// The device already exists (registration).
    #[error("device {0} already exists")]
    DeviceExists(String),
    /// The referenced device does not exist (admin calls).
    #[error("device {0} does not exist")]
    NoSuchDevice(String),
    /// The batch is empty or too big.
    #[error("batch must hold 1..={max} transactions, got {got}")]
    BatchSize {
        /// Transactions sent.
        got: usize,
        /// Limit.
        max: usize,
    },
    /// The write queue is full; retry later.
    #[error("the node is overloaded; retry later")]
    Overloaded,
    /// The KLX ledger refused the instruction.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
}

impl Rejection {
    /// Bounded label for metrics and the error code of API bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::UnknownDevice => "unknown_device",
            Rejection::Revoked(_) => "revoked_device",
            Rejection::Forbidden { .. } => "forbidden",
            Rejection::AdminOnly => "admin_only",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::Invalid(f) => match f.field {
                "address" | "prefix" => "invalid_address",
                "key" => "invalid_key",
                "topic" => "invalid_topic",
                _ => "invalid_field",
            },
            Rejection::Malformed(_) => "malformed",
            Rejection::BadSignature(_) => "bad_signature",
            Rejection::SignatureRequired(_) => "signature_required",
            Rejection::DuplicateIdempotencyKey { .. } => "duplicate_idempotency_key",
            Rejection::DeviceExists(_) => "device_exists",
            Rejection::NoSuchDevice(_) => "no_such_device",
            Rejection::BatchSize { .. } => "batch_size",
            Rejection::Overloaded => "overloaded",
            Rejection::Ledger(e) => e.code(),
        }
    }
}
