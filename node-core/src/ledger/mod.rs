//! Native KLX: accounts, transfers, and the MainChain side of the Ethereum/Polygon bridge.
//!
//! Every change of the ledger starts as an *instruction*, an ordinary transaction written
//! under a reserved address (a holder's signed transfer or withdrawal, a relayer's signed
//! attestation, an admin's bridge configuration). The applier turns an instruction into the
//! node-written transactions that carry the new balances, supply and bridge state
//! ([`apply`]), in the same block and under the same checks on every master, so balances
//! are part of the chain (and of its proofs) and nothing outside the sequencer can move
//! them. The memcache holds the current records; this module reads them back.

mod apply;
mod audit;
mod error;
pub mod market;
mod ops;
mod records;

pub(crate) use apply::{Context as LedgerContext, Overlay, expand};
pub(crate) use audit::Audit;
pub use error::LedgerError;
pub use ops::{
    AccountKey, LedgerOp, SignedTransfer, SignedWithdrawal, account_signing_bytes, relayer_instruction, withdrawal_id,
};
pub use records::{
    Account, BridgeChain, BridgeState, Deposit, DepositRecord, DepositStatus, Exchange, Halt, Relayer, ReleaseReport,
    Supply, WithdrawalRecord, WithdrawalStatus, amount,
};

use serde::de::DeserializeOwned;

use crate::memcache::Memcache;

/// KLX has 18 decimals, like the ERC20.
pub const KLX_DECIMALS: u32 = 18;
/// One KLX in base units.
pub const KLX: u128 = 1_000_000_000_000_000_000;
/// Total supply cap: 480,000,000,000 KLX in base units.
pub const KLX_SUPPLY_CAP: u128 = 480_000_000_000 * KLX;

/// Address of account records (key = account public key, hex).
pub const ACCOUNTS_ADDRESS: &str = "/_kalima/klx/accounts";
/// Address of the supply record (key [`SUPPLY_KEY`]).
pub const SUPPLY_ADDRESS: &str = "/_kalima/klx/supply";
/// Key of the supply record.
pub const SUPPLY_KEY: &str = "total";
/// Address of holders' signed instructions (key = the signing account).
pub const OPS_ADDRESS: &str = "/_kalima/klx/ops";
/// Address of admin instructions (key = admin device id).
pub const ADMIN_OPS_ADDRESS: &str = "/_kalima/klx/admin";
/// Address of registered exchanges (key = exchange id).
pub const EXCHANGES_ADDRESS: &str = "/_kalima/klx/exchanges";
/// Address mapping a native account to the exchange it is registered to (key = account).
pub const EXCHANGE_OF_ADDRESS: &str = "/_kalima/klx/exchange-of";
/// Most exchanges that may register.
pub const MAX_EXCHANGES: usize = 100;
/// Most addresses one exchange may register.
pub const MAX_EXCHANGE_ADDRESSES: u64 = 1_000_000;
/// Most addresses one registration call carries.
pub const MAX_ADDRESSES_PER_CALL: usize = 1_000;
/// Address of bridge configurations (key = bridge name).
pub const BRIDGES_ADDRESS: &str = "/_kalima/bridge/chains";
/// Key of a bridge's state record under [`bridge_address`]`(name, "state")`.
pub const STATE_KEY: &str = "totals";
/// Most deposits ahead of the next one to mint that relayers may attest.
pub const MAX_PENDING_DEPOSITS: u64 = 1024;
/// Seconds a finished deposit or withdrawal record stays in memory; its history stays.
pub const FINISHED_RECORD_TTL_SECS: u32 = 7 * 24 * 3600;

/// Address of one part of a bridge: `state`, `deposits`, `withdrawals` or `attestations`.
pub fn bridge_address(name: &str, part: &str) -> String {
    format!("/_kalima/bridge/{name}/{part}")
}

/// Checks a bridge name: 1..=32 bytes of `a-z`, `0-9`, `-`.
pub fn validate_bridge_name(name: &str) -> Result<(), LedgerError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(()) } else { Err(LedgerError::Invalid(format!("bridge name {name:?} must be 1..=32 of a-z, 0-9, '-'"))) }
}

/// A record read from the memcache, or `None` when absent or unreadable.
fn read<T: DeserializeOwned>(cache: &Memcache, address: &str, key: &str) -> Option<T> {
    let c = cache.get(address, key)?;
    serde_json::from_slice(&c.tx.content.body).ok()
}

/// Read-only view of the ledger in a memcache (a master's, or a client node's synced one).
#[derive(Clone, Copy)]
pub struct Ledger<'a> {
    cache: &'a Memcache,
}

impl<'a> Ledger<'a> {
    /// The ledger held in `cache`.
    pub fn new(cache: &'a Memcache) -> Self {
        Self { cache }
    }

    /// An account (zero balance and nonce when it never held KLX).
    pub fn account(&self, key: &AccountKey) -> Account {
        read(self.cache, ACCOUNTS_ADDRESS, &key.to_hex()).unwrap_or_default()
    }

    /// Native supply: minted, burned, in circulation.
    pub fn supply(&self) -> Supply {
        read(self.cache, SUPPLY_ADDRESS, SUPPLY_KEY).unwrap_or_default()
    }

    /// Every account holding a record, with its balance (for conservation checks).
    pub fn accounts(&self) -> Vec<(String, Account)> {
        self.cache
            .values(ACCOUNTS_ADDRESS)
            .iter()
            .filter_map(|c| Some((c.tx.content.key.clone(), serde_json::from_slice(&c.tx.content.body).ok()?)))
            .collect()
    }

    /// A registered exchange.
    pub fn exchange(&self, id: &str) -> Option<Exchange> {
        read(self.cache, EXCHANGES_ADDRESS, id)
    }

    /// The exchange an account is registered to.
    pub fn exchange_of(&self, account: &str) -> Option<String> {
        read(self.cache, EXCHANGE_OF_ADDRESS, account)
    }

    /// A bridge's configuration.
    pub fn bridge(&self, name: &str) -> Option<BridgeChain> {
        read(self.cache, BRIDGES_ADDRESS, name)
    }

    /// Every configured bridge, by name.
    pub fn bridges(&self) -> Vec<(String, BridgeChain)> {
        self.cache
            .values(BRIDGES_ADDRESS)
            .iter()
            .filter_map(|c| Some((c.tx.content.key.clone(), serde_json::from_slice(&c.tx.content.body).ok()?)))
            .collect()
    }

    /// A bridge's totals and cursors.
    pub fn bridge_state(&self, name: &str) -> BridgeState {
        read(self.cache, &bridge_address(name, "state"), STATE_KEY).unwrap_or_default()
    }

    /// A deposit still in memory (pending, or minted within [`FINISHED_RECORD_TTL_SECS`]).
    pub fn deposit(&self, name: &str, nonce: u64) -> Option<DepositRecord> {
        read(self.cache, &bridge_address(name, "deposits"), &nonce.to_string())
    }

    /// Deposits attested but not yet minted, by nonce.
    pub fn pending_deposits(&self, name: &str) -> Vec<DepositRecord> {
        let mut v: Vec<DepositRecord> = self
            .cache
            .values(&bridge_address(name, "deposits"))
            .iter()
            .filter_map(|c| serde_json::from_slice::<DepositRecord>(&c.tx.content.body).ok())
            .filter(|d| d.status == DepositStatus::Pending)
            .collect();
        v.sort_by_key(|d| d.nonce);
        v
    }

    /// A withdrawal still in memory.
    pub fn withdrawal(&self, name: &str, id: &str) -> Option<WithdrawalRecord> {
        read(self.cache, &bridge_address(name, "withdrawals"), id)
    }

    /// Withdrawals burned but not yet reported released, by sequence.
    pub fn pending_withdrawals(&self, name: &str) -> Vec<WithdrawalRecord> {
        let mut v: Vec<WithdrawalRecord> = self
            .cache
            .values(&bridge_address(name, "withdrawals"))
            .iter()
            .filter_map(|c| serde_json::from_slice::<WithdrawalRecord>(&c.tx.content.body).ok())
            .filter(WithdrawalRecord::is_pending)
            .collect();
        v.sort_by_key(|w| w.seq);
        v
    }
}
