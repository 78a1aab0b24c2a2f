//! Ledger instructions: what holders, relayers and the admin write, where each is written,
//! and the bytes a holder signs.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::market::{
    FeedSpec, INVOICES_ADDRESS, InvoiceSettled, MARKET_OPS_ADDRESS, MarketConfig, SignedPurchase, purchase_bytes,
};
use super::records::{BridgeChain, Deposit, amount};
use super::{ADMIN_OPS_ADDRESS, LedgerError, OPS_ADDRESS, bridge_address};
use crate::keys::NodeKey;
use crate::tx::TxContent;

/// Domain separator of holder signatures (distinct from transaction signatures).
const ACCOUNT_SIGNING_DOMAIN: &[u8] = b"kalima-klx-v1\0";
/// Domain separator of withdrawal ids.
const WITHDRAWAL_ID_DOMAIN: &[u8] = b"kalima-withdrawal-v1\0";

/// A native account: an Ed25519 public key, written as 64 lowercase hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountKey(pub [u8; 32]);

impl AccountKey {
    /// Parses 64 hex characters that encode a valid Ed25519 public key.
    pub fn from_hex(s: &str) -> Result<Self, LedgerError> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).map_err(|_| {
            LedgerError::Invalid(format!("account {s:?} must be 64 hex characters (an Ed25519 public key)"))
        })?;
        VerifyingKey::from_bytes(&b)
            .map_err(|_| LedgerError::Invalid(format!("account {s} is not a valid Ed25519 public key")))?;
        Ok(Self(b))
    }

    /// Parses 64 hex characters without checking that they encode a curve point: a deposit
    /// names its recipient on another chain, which cannot check it, and refusing it would
    /// block every later deposit (they mint in nonce order). KLX credited to a non-key is
    /// unspendable, like tokens sent to a burn address.
    pub(crate) fn from_hex_unchecked(s: &str) -> Result<Self, LedgerError> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b)
            .map_err(|_| LedgerError::Invalid(format!("account {s:?} must be 64 hex characters")))?;
        if b == [0u8; 32] {
            return Err(LedgerError::Invalid("the recipient must not be zero".into()));
        }
        Ok(Self(b))
    }

    /// The account of a signing key.
    pub fn of(key: &SigningKey) -> Self {
        Self(key.verifying_key().to_bytes())
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn verify(&self, msg: &[u8], signature_hex: &str) -> Result<(), LedgerError> {
        let mut sig = [0u8; 64];
        hex::decode_to_slice(signature_hex, &mut sig)
            .map_err(|_| LedgerError::Invalid("signature must be 128 hex characters".into()))?;
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| LedgerError::BadAccountSignature(self.to_hex()))?;
        key.verify_strict(msg, &Signature::from_bytes(&sig))
            .map_err(|_| LedgerError::BadAccountSignature(self.to_hex()))
    }
}

/// A holder's transfer, signed with the `from` account's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SignedTransfer {
    /// Paying account (64 hex).
    pub from: String,
    /// Receiving account (64 hex).
    pub to: String,
    /// Base units.
    #[serde(with = "amount")]
    #[schema(value_type = String, example = "1000000000000000000")]
    pub amount: u128,
    /// The paying account's nonce + 1.
    pub nonce: u64,
    /// Ed25519 signature (128 hex) over the account signing bytes.
    pub signature: String,
}

/// A holder's withdrawal: burn on this chain, release on a bridged chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SignedWithdrawal {
    /// Account burned from (64 hex).
    pub from: String,
    /// Bridge name (`ethereum`, `polygon`, ...).
    pub chain: String,
    /// ERC20 recipient (`0x` + 40 hex).
    pub recipient: String,
    /// Base units.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub amount: u128,
    /// The account's nonce + 1.
    pub nonce: u64,
    /// Ed25519 signature (128 hex) over the account signing bytes.
    pub signature: String,
}

impl SignedTransfer {
    /// A transfer signed with `key` for `chain`.
    pub fn sign(chain: &str, key: &SigningKey, to: &AccountKey, amount: u128, nonce: u64) -> Self {
        let mut t =
            Self { from: AccountKey::of(key).to_hex(), to: to.to_hex(), amount, nonce, signature: String::new() };
        let bytes = transfer_bytes(chain, &AccountKey::of(key), to, amount, nonce);
        t.signature = hex::encode(key.sign(&bytes).to_bytes());
        t
    }
}

impl SignedWithdrawal {
    /// A withdrawal signed with `key` for `chain` (this chain's name) to `bridge`.
    pub fn sign(chain: &str, key: &SigningKey, bridge: &str, recipient: &str, amount: u128, nonce: u64) -> Self {
        let from = AccountKey::of(key);
        let recipient = recipient.to_ascii_lowercase();
        let bytes = withdrawal_bytes(chain, &from, bridge, &recipient, amount, nonce).unwrap_or_default();
        Self {
            from: from.to_hex(),
            chain: bridge.to_string(),
            recipient,
            amount,
            nonce,
            signature: hex::encode(key.sign(&bytes).to_bytes()),
        }
    }
}

/// Every ledger instruction (the JSON body of the instruction transaction, tagged by `op`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LedgerOp {
    /// A holder pays another account.
    Transfer(SignedTransfer),
    /// A holder burns KLX to have it released on a bridged chain.
    Withdraw(SignedWithdrawal),
    /// The admin creates or replaces a bridge's configuration.
    ConfigureBridge {
        /// Bridge name.
        name: String,
        /// Its configuration.
        config: BridgeChain,
    },
    /// The admin lifts a halt.
    ResumeBridge {
        /// Bridge name.
        name: String,
    },
    /// The admin registers an exchange, managed by `device`.
    RegisterExchange {
        /// Exchange id (device-id characters).
        id: String,
        /// Its managing device.
        device: String,
    },
    /// An exchange's device (or the admin) registers native addresses to it.
    AddExchangeAddresses {
        /// Exchange id.
        exchange: String,
        /// Accounts (64 hex), at most 1,000 per call.
        accounts: Vec<String>,
    },
    /// A relayer attests a deposit it saw in a finalized block.
    AttestDeposit {
        /// Bridge name.
        chain: String,
        /// What it saw.
        deposit: Deposit,
    },
    /// A relayer's EIP-712 signature of a withdrawal's release.
    SignRelease {
        /// Bridge name.
        chain: String,
        /// Withdrawal id (64 hex).
        withdrawal: String,
        /// 65-byte signature (`0x` + 130 hex).
        signature: String,
    },
    /// A relayer saw the release of a withdrawal in a finalized block.
    ReportRelease {
        /// Bridge name.
        chain: String,
        /// Withdrawal id (64 hex).
        withdrawal: String,
        /// Release transaction hash.
        tx_hash: String,
        /// Its block.
        block_number: u64,
    },
    /// A relayer saw a withdrawal's expiry pass in a final block with no release: once a
    /// quorum agrees, the burned KLX is credited back.
    ExpireWithdrawal {
        /// Bridge name.
        chain: String,
        /// Withdrawal id (64 hex).
        withdrawal: String,
    },
    /// A relayer stops the bridge: its reconciliation found a breach.
    Halt {
        /// Bridge name.
        chain: String,
        /// What it found.
        reason: String,
    },
    /// The admin sets the marketplace's economics.
    ConfigureMarket {
        /// The economics.
        config: MarketConfig,
    },
    /// A provider lists a feed, or updates its own.
    ListFeed {
        /// The feed.
        feed: FeedSpec,
    },
    /// A provider (or the admin) delists a feed.
    DelistFeed {
        /// Feed id.
        feed: String,
    },
    /// A buyer pays for periods of a feed in KLX.
    Purchase(SignedPurchase),
    /// The node saw a Lightning invoice of a purchase settle (idempotent on the payment hash).
    SettleInvoice(InvoiceSettled),
}

impl LedgerOp {
    /// Where the instruction is written (address, key) when `device` writes it.
    pub fn placement(&self, device: &str) -> (String, String) {
        match self {
            LedgerOp::Transfer(t) => (OPS_ADDRESS.into(), t.from.clone()),
            LedgerOp::Withdraw(w) => (OPS_ADDRESS.into(), w.from.clone()),
            LedgerOp::Purchase(p) => (OPS_ADDRESS.into(), p.buyer.clone()),
            LedgerOp::SettleInvoice(s) => (format!("{INVOICES_ADDRESS}/settlements"), s.payment_hash.clone()),
            LedgerOp::ListFeed { .. } | LedgerOp::DelistFeed { .. } => (MARKET_OPS_ADDRESS.into(), device.to_string()),
            LedgerOp::ConfigureMarket { .. }
            | LedgerOp::ConfigureBridge { .. }
            | LedgerOp::ResumeBridge { .. }
            | LedgerOp::RegisterExchange { .. }
            | LedgerOp::AddExchangeAddresses { .. } => (ADMIN_OPS_ADDRESS.into(), device.to_string()),
            LedgerOp::AttestDeposit { chain, .. }
            | LedgerOp::SignRelease { chain, .. }
            | LedgerOp::ReportRelease { chain, .. }
            | LedgerOp::ExpireWithdrawal { chain, .. }
            | LedgerOp::Halt { chain, .. } => (bridge_address(chain, "attestations"), device.to_string()),
        }
    }

    /// True for the instructions only a bridge's relayers may write.
    pub fn is_relayer_op(&self) -> bool {
        matches!(
            self,
            LedgerOp::AttestDeposit { .. }
                | LedgerOp::SignRelease { .. }
                | LedgerOp::ReportRelease { .. }
                | LedgerOp::ExpireWithdrawal { .. }
                | LedgerOp::Halt { .. }
        )
    }

    /// The unsigned instruction transaction `device` submits.
    pub fn instruction(&self, device: &str, idempotency_key: String) -> TxContent {
        let (address, key) = self.placement(device);
        TxContent {
            device_id: device.to_string(),
            address,
            key,
            // Serialising these plain structs cannot fail.
            body: serde_json::to_vec(self).unwrap_or_default(),
            idempotency_key,
            ..TxContent::default()
        }
    }

    /// Checks a holder's signature (transfers and withdrawals) for `chain`.
    pub(crate) fn verify_holder(&self, chain: &str) -> Result<AccountKey, LedgerError> {
        match self {
            LedgerOp::Transfer(t) => {
                let from = AccountKey::from_hex(&t.from)?;
                let to = AccountKey::from_hex(&t.to)?;
                from.verify(&transfer_bytes(chain, &from, &to, t.amount, t.nonce), &t.signature)?;
                Ok(from)
            }
            LedgerOp::Withdraw(w) => {
                let from = AccountKey::from_hex(&w.from)?;
                let bytes = withdrawal_bytes(chain, &from, &w.chain, &w.recipient, w.amount, w.nonce)?;
                from.verify(&bytes, &w.signature)?;
                Ok(from)
            }
            LedgerOp::Purchase(p) => {
                let (buyer, bytes) = purchase_bytes(chain, p)?;
                buyer.verify(&bytes, &p.signature)?;
                Ok(buyer)
            }
            _ => Err(LedgerError::Invalid("only transfers, withdrawals and purchases carry a holder signature".into())),
        }
    }
}

/// A relayer's signed instruction: `op` written by `device`, signed with its device key.
pub fn relayer_instruction(
    chain: &str,
    op: &LedgerOp,
    device: &str,
    idempotency_key: String,
    key: &NodeKey,
) -> TxContent {
    let mut content = op.instruction(device, idempotency_key);
    content.signature = Some(key.sign(&content.signing_bytes(chain)));
    content
}

/// The bytes a holder signs for `op` on `chain` (documented in the OpenAPI description):
/// `"kalima-klx-v1\0"`, u16 length + chain name, then for a transfer `0x01`, from (32),
/// to (32), amount (u128 big-endian), nonce (u64 big-endian); for a withdrawal `0x02`,
/// from (32), u16 length + bridge name, recipient (20), amount, nonce.
pub fn account_signing_bytes(chain: &str, op: &LedgerOp) -> Result<Vec<u8>, LedgerError> {
    match op {
        LedgerOp::Transfer(t) => {
            Ok(transfer_bytes(chain, &AccountKey::from_hex(&t.from)?, &AccountKey::from_hex(&t.to)?, t.amount, t.nonce))
        }
        LedgerOp::Withdraw(w) => {
            withdrawal_bytes(chain, &AccountKey::from_hex(&w.from)?, &w.chain, &w.recipient, w.amount, w.nonce)
        }
        LedgerOp::Purchase(p) => Ok(purchase_bytes(chain, p)?.1),
        _ => Err(LedgerError::Invalid("only transfers, withdrawals and purchases are signed by a holder".into())),
    }
}

pub(crate) fn signing_prefix(chain: &str, tag: u8, from: &AccountKey) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    b.extend_from_slice(ACCOUNT_SIGNING_DOMAIN);
    b.extend_from_slice(&(chain.len() as u16).to_be_bytes());
    b.extend_from_slice(chain.as_bytes());
    b.push(tag);
    b.extend_from_slice(&from.0);
    b
}

fn transfer_bytes(chain: &str, from: &AccountKey, to: &AccountKey, amount: u128, nonce: u64) -> Vec<u8> {
    let mut b = signing_prefix(chain, 1, from);
    b.extend_from_slice(&to.0);
    b.extend_from_slice(&amount.to_be_bytes());
    b.extend_from_slice(&nonce.to_be_bytes());
    b
}

fn withdrawal_bytes(
    chain: &str,
    from: &AccountKey,
    bridge: &str,
    recipient: &str,
    amount: u128,
    nonce: u64,
) -> Result<Vec<u8>, LedgerError> {
    let mut b = signing_prefix(chain, 2, from);
    b.extend_from_slice(&(bridge.len() as u16).to_be_bytes());
    b.extend_from_slice(bridge.as_bytes());
    b.extend_from_slice(&eth_bytes::<20>(recipient, "recipient")?);
    b.extend_from_slice(&amount.to_be_bytes());
    b.extend_from_slice(&nonce.to_be_bytes());
    Ok(b)
}

/// The id of withdrawal `seq` of bridge `bridge` on chain `chain` (64 hex): SHA-256 of a
/// domain separator, both names and the sequence, so ids never repeat across bridges or chains.
pub fn withdrawal_id(chain: &str, bridge: &str, seq: u64) -> String {
    let mut h = Sha256::new();
    h.update(WITHDRAWAL_ID_DOMAIN);
    h.update((chain.len() as u16).to_be_bytes());
    h.update(chain.as_bytes());
    h.update((bridge.len() as u16).to_be_bytes());
    h.update(bridge.as_bytes());
    h.update(seq.to_be_bytes());
    hex::encode(h.finalize())
}

/// Parses `0x` + hex of exactly N bytes (any case).
pub(crate) fn eth_bytes<const N: usize>(s: &str, field: &str) -> Result<[u8; N], LedgerError> {
    let hex_part =
        s.strip_prefix("0x").ok_or_else(|| LedgerError::Invalid(format!("{field} {s:?} must start with 0x")))?;
    let mut b = [0u8; N];
    hex::decode_to_slice(hex_part, &mut b)
        .map_err(|_| LedgerError::Invalid(format!("{field} {s:?} must be 0x + {} hex characters", 2 * N)))?;
    Ok(b)
}

/// Checks an Ethereum address (non-zero) and returns it in lowercase.
pub(crate) fn eth_address(s: &str, field: &str) -> Result<String, LedgerError> {
    let b = eth_bytes::<20>(s, field)?;
    if b == [0u8; 20] {
        return Err(LedgerError::Invalid(format!("{field} must not be the zero address")));
    }
    Ok(format!("0x{}", hex::encode(b)))
}
