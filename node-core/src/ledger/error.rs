//! Why the ledger refused an instruction.

/// A refused ledger instruction; `code()` is the API error code and the metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum LedgerError {
    /// A field is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The holder's signature does not verify.
    #[error("the signature does not verify against account {0}")]
    BadAccountSignature(String),
    /// The instruction's nonce is not the account's next one.
    #[error("account {account} expects nonce {expected}, got {got}")]
    BadNonce {
        /// The account.
        account: String,
        /// Its next nonce.
        expected: u64,
        /// The nonce sent.
        got: u64,
    },
    /// Not enough KLX.
    #[error("account {account} holds {balance} base units, {needed} needed")]
    InsufficientFunds {
        /// The account.
        account: String,
        /// Its balance.
        balance: String,
        /// The amount asked.
        needed: String,
    },
    /// Minting would pass the 480,000,000,000 KLX cap.
    #[error("minting {amount} would pass the supply cap")]
    SupplyCap {
        /// The amount.
        amount: String,
    },
    /// No bridge of that name is configured.
    #[error("no bridge named {0} is configured")]
    UnknownBridge(String),
    /// The bridge is halted.
    #[error("bridge {name} is halted: {reason}")]
    Halted {
        /// Bridge name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The writer is not a relayer of the bridge, or its instruction is not signed by it.
    #[error("device {device} is not a relayer of bridge {bridge} (or did not sign with its key)")]
    NotRelayer {
        /// The device.
        device: String,
        /// The bridge.
        bridge: String,
    },
    /// Deposits are minted in nonce order; this one is already minted.
    #[error("deposit {nonce} of bridge {bridge} is already minted")]
    AlreadyMinted {
        /// Bridge name.
        bridge: String,
        /// The nonce.
        nonce: u64,
    },
    /// The relayer attested this deposit, or signed or reported this release, already.
    #[error("relayer {relayer} already did this for {what}")]
    AlreadyAttested {
        /// The relayer.
        relayer: String,
        /// Deposit nonce or withdrawal id.
        what: String,
    },
    /// Too far ahead of the next deposit to mint.
    #[error("deposit {nonce} is more than {window} ahead of the next to mint ({next})")]
    OutOfWindow {
        /// The nonce.
        nonce: u64,
        /// Next to mint.
        next: u64,
        /// The window.
        window: u64,
    },
    /// The withdrawal is unknown (or no longer pending).
    #[error("withdrawal {0} is not pending on this bridge")]
    UnknownWithdrawal(String),
    /// Over the bridge's per-transaction cap.
    #[error("{amount} is over the bridge's per-withdrawal cap of {cap}")]
    OverCap {
        /// Amount asked.
        amount: String,
        /// The cap.
        cap: String,
    },
    /// Only the admin configures bridges and the marketplace.
    #[error("only the admin configures bridges and the marketplace")]
    AdminOnly,
    /// No listed feed of that id.
    #[error("no listed feed {0}")]
    UnknownFeed(String),
    /// The feed belongs to another provider.
    #[error("feed {feed} belongs to provider {provider}")]
    NotProvider {
        /// Feed id.
        feed: String,
        /// Its provider.
        provider: String,
    },
    /// The amount paid is not the feed's price times the periods bought.
    #[error("feed {feed} costs {due} base units for this purchase, {got} offered")]
    PriceMismatch {
        /// Feed id.
        feed: String,
        /// What is due.
        due: String,
        /// What was offered.
        got: String,
    },
    /// The invoice's settlement was recorded already.
    #[error("invoice {0} is already settled")]
    AlreadySettled(String),
    /// The admin has not set the marketplace's economics yet.
    #[error("the marketplace's economics are not configured yet (PUT /api/v1/market/config)")]
    MarketNotConfigured,
}

impl LedgerError {
    /// Bounded label for metrics and API error codes.
    pub fn code(&self) -> &'static str {
        match self {
            LedgerError::Invalid(_) => "invalid_field",
            LedgerError::BadAccountSignature(_) => "bad_account_signature",
            LedgerError::BadNonce { .. } => "bad_nonce",
            LedgerError::InsufficientFunds { .. } => "insufficient_funds",
            LedgerError::SupplyCap { .. } => "supply_cap",
            LedgerError::UnknownBridge(_) => "unknown_bridge",
            LedgerError::Halted { .. } => "bridge_halted",
            LedgerError::NotRelayer { .. } => "not_relayer",
            LedgerError::AlreadyMinted { .. } => "already_minted",
            LedgerError::AlreadyAttested { .. } => "already_attested",
            LedgerError::OutOfWindow { .. } => "out_of_window",
            LedgerError::UnknownWithdrawal(_) => "unknown_withdrawal",
            LedgerError::OverCap { .. } => "over_cap",
            LedgerError::AdminOnly => "admin_only",
            LedgerError::UnknownFeed(_) => "unknown_feed",
            LedgerError::NotProvider { .. } => "not_provider",
            LedgerError::PriceMismatch { .. } => "price_mismatch",
            LedgerError::MarketNotConfigured => "market_not_configured",
            LedgerError::AlreadySettled(_) => "already_settled",
        }
    }
}
