//! The ledger's records as the chain stores them (JSON bodies of node-written values).
//! Amounts are decimal strings of base units, so no JSON reader loses precision.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Serde for `u128` amounts as decimal strings.
pub mod amount {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Writes the decimal string.
    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Reads a decimal string of base units (digits only, no sign, no exponent).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(D::Error::custom)
    }

    /// Parses a decimal string of base units.
    pub fn parse(s: &str) -> Result<u128, String> {
        if s.is_empty() || s.len() > 39 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("amount {s:?} must be a decimal string of base units (digits only)"));
        }
        s.parse::<u128>().map_err(|_| format!("amount {s} does not fit in 128 bits"))
    }
}

/// A native KLX account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Account {
    /// Balance in base units (18 decimals).
    #[serde(with = "amount")]
    #[schema(value_type = String, example = "1000000000000000000")]
    pub balance: u128,
    /// Number of instructions the account has signed; the next must carry `nonce + 1`.
    pub nonce: u64,
}

/// Native supply, in base units.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Supply {
    /// Minted by bridges for deposits.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub minted: u128,
    /// Burned by withdrawals.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub burned: u128,
    /// Burned as the burn share of marketplace gas (locked on the bridged chains for good).
    #[serde(with = "amount", default)]
    #[schema(value_type = String)]
    pub fees_burned: u128,
}

impl Supply {
    /// KLX in circulation on the chain.
    pub fn circulating(&self) -> u128 {
        self.minted.saturating_sub(self.burned).saturating_sub(self.fees_burned)
    }
}

/// A relayer of a bridge: the device that signs its attestations on this chain, and the
/// Ethereum address whose EIP-712 signatures the bridge contract accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Relayer {
    /// Device id (registered, with an Ed25519 public key).
    pub device: String,
    /// Its Ethereum address (`0x` + 40 hex).
    pub eth_address: String,
}

/// Configuration of one bridged chain (an Ethereum or Polygon `KlxBridge` contract).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BridgeChain {
    /// EVM chain id (1 Ethereum, 137 Polygon, 31337 anvil).
    pub chain_id: u64,
    /// `KlxBridge` contract address.
    pub bridge: String,
    /// KLX ERC20 token address the bridge locks.
    pub token: String,
    /// The relayer set (at most 32).
    pub relayers: Vec<Relayer>,
    /// Matching attestations needed to mint; more than half of the relayers, at most all.
    pub threshold: u32,
    /// Seconds a release signature stays valid after the burn.
    pub release_ttl_secs: u64,
    /// Largest single withdrawal (the contract's per-transaction cap), in base units.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub max_withdrawal: u128,
}

impl BridgeChain {
    /// The relayer entry of `device`.
    pub fn relayer(&self, device: &str) -> Option<&Relayer> {
        self.relayers.iter().find(|r| r.device == device)
    }
}

/// Why and by whom a bridge was halted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Halt {
    /// What was found.
    pub reason: String,
    /// Relayer (or `_node`) that halted it.
    pub by: String,
    /// Chain time of the halt, ms since the Unix epoch.
    pub at_ms: i64,
}

/// Totals and cursors of one bridge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BridgeState {
    /// Nonce of the next deposit to mint; every lower nonce is minted.
    pub next_deposit: u64,
    /// Sequence of the next withdrawal.
    pub next_withdrawal: u64,
    /// Minted for deposits of this bridge.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub minted: u128,
    /// Burned by withdrawals to this bridge.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub burned: u128,
    /// Released on the bridged chain, as reported by relayers.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub released: u128,
    /// Set when a relayer found a breach; no mint, burn or release signature until an admin
    /// resumes the bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<Halt>,
}

/// A `Deposit` event of the bridge contract, as a relayer saw it in a finalized block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Deposit {
    /// The contract's gap-free deposit nonce.
    pub nonce: u64,
    /// Source transaction hash (`0x` + 64 hex).
    pub tx_hash: String,
    /// Index of the log in its block.
    pub log_index: u64,
    /// Block number of the source transaction.
    pub block_number: u64,
    /// Depositor (`0x` + 40 hex).
    pub from: String,
    /// Native account credited (Ed25519 public key, 64 hex).
    pub recipient: String,
    /// Amount in base units.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub amount: u128,
    /// Token the contract locked (`0x` + 40 hex).
    pub token: String,
}

/// Where a deposit stands on this chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DepositStatus {
    /// Attested by fewer relayers than the threshold, or waiting for an earlier nonce.
    Pending,
    /// Minted to the recipient.
    Minted,
}

/// A deposit's record on this chain (key = nonce).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DepositRecord {
    /// The contract's nonce.
    pub nonce: u64,
    /// Pending or minted.
    pub status: DepositStatus,
    /// What each relayer attested (relayer device -> deposit).
    pub votes: BTreeMap<String, Deposit>,
    /// The deposit minted, once minted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minted: Option<Deposit>,
    /// Chain time of the mint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minted_at_ms: Option<i64>,
}

/// Where a withdrawal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawalStatus {
    /// Burned; relayers are signing the release.
    Signing,
    /// At least the threshold of relayers signed; the release can be submitted.
    Ready,
    /// Released on the bridged chain.
    Released,
    /// Expired unreleased on the bridged chain (as a quorum of relayers saw in a final
    /// block), and credited back to the account.
    Refunded,
}

/// A relayer's report that a release landed in a finalized block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReleaseReport {
    /// Release transaction hash.
    pub tx_hash: String,
    /// Its block.
    pub block_number: u64,
    /// Relayer that reported it.
    pub reported_by: String,
    /// Chain time of the report.
    pub at_ms: i64,
}

/// A withdrawal (native burn -> ERC20 release), key = its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WithdrawalRecord {
    /// Withdrawal id (64 hex), the `withdrawalId` of the release.
    pub id: String,
    /// Sequence within the bridge.
    pub seq: u64,
    /// Bridge name.
    pub chain: String,
    /// EVM chain id the release is for.
    pub chain_id: u64,
    /// Bridge contract the release is for.
    pub bridge: String,
    /// Token released.
    pub token: String,
    /// Native account burned from.
    pub from: String,
    /// ERC20 recipient (`0x` + 40 hex).
    pub recipient: String,
    /// Amount in base units.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub amount: u128,
    /// Release deadline, Unix seconds (bound into the signatures).
    pub expiry: u64,
    /// Chain time of the burn.
    pub requested_at_ms: i64,
    /// EIP-712 release signatures by relayer device (`0x` + 130 hex).
    pub signatures: BTreeMap<String, String>,
    /// Signing, ready or released.
    pub status: WithdrawalStatus,
    /// Where it was released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseReport>,
    /// Relayers that saw it expire unreleased in a final block.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub expired_votes: std::collections::BTreeSet<String>,
}

impl WithdrawalRecord {
    /// True until it is released or refunded.
    pub fn is_pending(&self) -> bool {
        matches!(self.status, WithdrawalStatus::Signing | WithdrawalStatus::Ready)
    }
}

/// A registered exchange (key = its id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Exchange {
    /// Device that manages its addresses.
    pub device: String,
    /// Native addresses registered to it.
    pub addresses: u64,
    /// Minted by bridges to its addresses, base units.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub deposited: u128,
    /// Withdrawn from its addresses through bridges, base units.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub withdrawn: u128,
    /// Chain time of the registration.
    pub registered_at_ms: i64,
}
