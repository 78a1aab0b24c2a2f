//! The oracle marketplace's records and rules on the chain: feeds listed by providers, the
//! economics configured by the admin, and purchases paid in KLX. A purchase is one
//! holder-signed instruction that the applier turns, atomically and identically on every
//! master, into the buyer's debit, the gas (a burn, then the 20/20/60 split of DESIGN.md's
//! chain economics), the provider's net revenue, the buyer's subscription (which carries the
//! hash of the buyer's access token and its expiry) and the provider's statement.

use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::LedgerError;
use super::ops::AccountKey;
use super::records::amount;

/// Address of feed records (key = feed id).
pub const FEEDS_ADDRESS: &str = "/_kalima/market/feeds";
/// Address of providers' instructions (key = provider device).
pub const MARKET_OPS_ADDRESS: &str = "/_kalima/market/ops";
/// Address of the economics record (key [`MARKET_CONFIG_KEY`]).
pub const MARKET_CONFIG_ADDRESS: &str = "/_kalima/market/config";
/// Key of the economics record.
pub const MARKET_CONFIG_KEY: &str = "economics";
/// Address of subscriptions (key = subscription id).
pub const SUBSCRIPTIONS_ADDRESS: &str = "/_kalima/market/subscriptions";
/// Address of purchases (key = provider device; its history is the provider's statement).
pub const PURCHASES_ADDRESS: &str = "/_kalima/market/purchases";
/// Address of providers' running totals (key = provider device).
pub const STATEMENTS_ADDRESS: &str = "/_kalima/market/statements";
/// Address of delivery records (key = subscription id; history = every batch delivered).
pub const DELIVERIES_ADDRESS: &str = "/_kalima/market/deliveries";
/// Address of Lightning invoices issued for purchases (key = payment hash, hex).
pub const INVOICES_ADDRESS: &str = "/_kalima/market/invoices";
/// Prefix of the buyer of a Lightning purchase, before the buyer's chosen id.
pub const LIGHTNING_BUYER_PREFIX: &str = "ln:";
/// Most periods one purchase may pay for.
pub const MAX_PERIODS: u32 = 24;
/// Most keys a feed may name.
pub const MAX_FEED_KEYS: usize = 64;
/// Longest licence, description or sample (bytes of JSON).
pub const MAX_FEED_TEXT: usize = 4096;
/// Gas per kB per transaction in DESIGN.md: 0.00025 EUR, in micro-EUR.
pub const DEFAULT_GAS_MICRO_EUR_PER_KB: u64 = 250;

/// Domain separator of subscription ids.
const SUBSCRIPTION_DOMAIN: &[u8] = b"kalima-subscription-v1\0";

/// How long a purchased period lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// 3,600 s.
    Hour,
    /// 86,400 s.
    Day,
    /// 30 days.
    Month,
}

impl Period {
    /// Length in milliseconds.
    pub fn millis(self) -> i64 {
        match self {
            Period::Hour => 3_600_000,
            Period::Day => 86_400_000,
            Period::Month => 30 * 86_400_000,
        }
    }

    fn tag(self) -> u8 {
        match self {
            Period::Hour => 1,
            Period::Day => 2,
            Period::Month => 3,
        }
    }
}

/// What a price is paid in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Currency {
    /// Native KLX (base units, 18 decimals).
    Klx,
    /// Bitcoin satoshis over Lightning.
    Sats,
}

/// One price of a feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// The period it buys.
    pub period: Period,
    /// The currency.
    pub currency: Currency,
    /// Amount per period: KLX base units, or sats.
    #[serde(with = "amount")]
    #[schema(value_type = String, example = "5000000000000000000")]
    pub amount: u128,
}

/// How readings are delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AggregateFn {
    /// Smallest value of the window.
    Min,
    /// Largest value of the window.
    Max,
    /// Arithmetic mean of the window.
    Mean,
    /// Last value of the window.
    Last,
}

/// Raw readings, or one aggregate per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Aggregation {
    /// Every reading as committed.
    Raw,
    /// One value per key and window of `window_secs` (numeric readings).
    Window {
        /// The function.
        function: AggregateFn,
        /// Window length, 1..=86,400 s.
        window_secs: u32,
    },
}

/// What a provider lists (and updates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedSpec {
    /// Feed id: 1..=64 of `a-z`, `0-9`, `-`, `_`, `.`.
    pub id: String,
    /// Short title.
    pub title: String,
    /// What the data is.
    #[serde(default)]
    pub description: String,
    /// Address prefix delivered (the provider needs a write grant on it).
    pub prefix: String,
    /// Keys delivered (empty: every key).
    #[serde(default)]
    pub keys: Vec<String>,
    /// Raw or aggregated delivery.
    #[serde(default = "raw")]
    pub aggregation: Aggregation,
    /// Prices, at most one per (period, currency).
    pub prices: Vec<Price>,
    /// Licence text the buyer accepts.
    pub licence: String,
    /// A sample reading (any JSON) shown in the catalogue.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub sample: serde_json::Value,
    /// KLX account (64 hex) credited with KLX revenue.
    pub payout: String,
}

fn raw() -> Aggregation {
    Aggregation::Raw
}

/// A listed (or delisted) feed as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Feed {
    /// What the provider listed.
    #[serde(flatten)]
    pub spec: FeedSpec,
    /// Provider device.
    pub provider: String,
    /// False once delisted: no new purchases, and streams stop.
    pub listed: bool,
    /// First listing time (ms).
    pub listed_at_ms: i64,
    /// Last change (ms).
    pub updated_at_ms: i64,
}

impl Feed {
    /// The price of `period` in `currency`, if offered.
    pub fn price(&self, period: Period, currency: Currency) -> Option<u128> {
        self.spec.prices.iter().find(|p| p.period == period && p.currency == currency).map(|p| p.amount)
    }

    /// True when a reading at `address`/`key` belongs to this feed.
    pub fn covers(&self, address: &str, key: &str) -> bool {
        crate::tx::prefix_matches(&self.spec.prefix, address)
            && (self.spec.keys.is_empty() || self.spec.keys.iter().any(|k| k == key))
    }
}

/// The marketplace's economics (admin), from DESIGN.md's chain economics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarketConfig {
    /// Gas per kB of a transaction, in micro-EUR (DESIGN.md: 0.00025 EUR = 250).
    #[serde(default = "default_gas")]
    pub gas_micro_eur_per_kb: u64,
    /// KLX base units per EUR, to price gas in KLX.
    #[serde(with = "amount")]
    #[schema(value_type = String, example = "100000000000000000000")]
    pub klx_per_eur: u128,
    /// Satoshis per EUR, to price gas of Lightning purchases.
    pub sats_per_eur: u64,
    /// Part of the gas burned, in basis points (PrivaChain 1% = 100, MainChain 10% = 1000).
    pub burn_bps: u32,
    /// Account (64 hex) of the foundation: 20% of the gas after the burn.
    pub foundation: String,
    /// Account of the master nodes: 20%.
    pub masters: String,
    /// Account of the DApp grant fund: 60%.
    pub dapp_fund: String,
}

fn default_gas() -> u64 {
    DEFAULT_GAS_MICRO_EUR_PER_KB
}

/// How one payment was divided.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Split {
    /// Paid by the buyer.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub gross: u128,
    /// Gas of the purchase transaction.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub gas: u128,
    /// Burned part of the gas.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub burned: u128,
    /// To the foundation.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub foundation: u128,
    /// To the master nodes.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub masters: u128,
    /// To the DApp grant fund.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub dapp_fund: u128,
    /// To the provider: gross minus gas.
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub provider: u128,
}

impl MarketConfig {
    /// Gas of a transaction of `bytes` bytes (whole kB, at least one) in `currency`, and how
    /// `gross` is divided with it (the gas never exceeds `gross`).
    pub fn split(&self, currency: Currency, bytes: usize, gross: u128) -> Split {
        let kb = bytes.div_ceil(1024).max(1) as u128;
        let per_eur = match currency {
            Currency::Klx => self.klx_per_eur,
            Currency::Sats => u128::from(self.sats_per_eur),
        };
        let gas =
            (kb.saturating_mul(u128::from(self.gas_micro_eur_per_kb)).saturating_mul(per_eur) / 1_000_000).min(gross);
        let burned = gas.saturating_mul(u128::from(self.burn_bps.min(10_000))) / 10_000;
        let rest = gas - burned;
        let foundation = rest * 20 / 100;
        let masters = rest * 20 / 100;
        Split { gross, gas, burned, foundation, masters, dapp_fund: rest - foundation - masters, provider: gross - gas }
    }

    pub(crate) fn validate(&self) -> Result<(AccountKey, AccountKey, AccountKey), LedgerError> {
        if self.burn_bps > 10_000 {
            return Err(LedgerError::Invalid("burn_bps must be at most 10000".into()));
        }
        if self.klx_per_eur == 0 || self.sats_per_eur == 0 {
            return Err(LedgerError::Invalid("klx_per_eur and sats_per_eur must be above 0".into()));
        }
        Ok((
            AccountKey::from_hex(&self.foundation)?,
            AccountKey::from_hex(&self.masters)?,
            AccountKey::from_hex(&self.dapp_fund)?,
        ))
    }
}

/// A buyer's purchase of `count` periods of a feed in KLX, signed with the buyer's account key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedPurchase {
    /// Paying account (64 hex); the subscription is this account's.
    pub buyer: String,
    /// Feed id.
    pub feed: String,
    /// Period bought.
    pub period: Period,
    /// Number of periods, 1..=24.
    pub count: u32,
    /// Price × count, in base units (must match the feed's price).
    #[serde(with = "amount")]
    #[schema(value_type = String)]
    pub amount: u128,
    /// SHA-256 (64 hex) of the access token the buyer chose; the token itself never leaves
    /// the buyer until it is used.
    pub token_hash: String,
    /// The account's nonce + 1.
    pub nonce: u64,
    /// Ed25519 signature (128 hex) over the account signing bytes.
    pub signature: String,
}

/// Purchase signing bytes: the account prefix (tag 3), then u16 length + feed id, the
/// period (u8: 1 hour, 2 day, 3 month), count (u32), amount (u128), token hash (32), nonce
/// (u64), all big-endian.
pub(crate) fn purchase_bytes(chain: &str, p: &SignedPurchase) -> Result<(AccountKey, Vec<u8>), LedgerError> {
    let buyer = AccountKey::from_hex(&p.buyer)?;
    let mut b = super::ops::signing_prefix(chain, 3, &buyer);
    b.extend_from_slice(&(p.feed.len() as u16).to_be_bytes());
    b.extend_from_slice(p.feed.as_bytes());
    b.push(p.period.tag());
    b.extend_from_slice(&p.count.to_be_bytes());
    b.extend_from_slice(&p.amount.to_be_bytes());
    b.extend_from_slice(&token_hash(&p.token_hash)?);
    b.extend_from_slice(&p.nonce.to_be_bytes());
    Ok((buyer, b))
}

fn token_hash(s: &str) -> Result<[u8; 32], LedgerError> {
    let mut h = [0u8; 32];
    hex::decode_to_slice(s, &mut h)
        .map_err(|_| LedgerError::Invalid("token_hash must be 64 hex characters (SHA-256 of the token)".into()))?;
    Ok(h)
}

impl SignedPurchase {
    /// A purchase signed with `key` for `chain`, for the access token `token`.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        chain: &str,
        key: &SigningKey,
        feed: &str,
        period: Period,
        count: u32,
        amount: u128,
        token: &str,
        nonce: u64,
    ) -> Self {
        let mut p = Self {
            buyer: AccountKey::of(key).to_hex(),
            feed: feed.to_string(),
            period,
            count,
            amount,
            token_hash: hex::encode(Sha256::digest(token.as_bytes())),
            nonce,
            signature: String::new(),
        };
        if let Ok((_, bytes)) = purchase_bytes(chain, &p) {
            p.signature = hex::encode(key.sign(&bytes).to_bytes());
        }
        p
    }
}

/// The id of `buyer`'s subscription to `feed` (64 hex): one per buyer and feed, extended by
/// every purchase.
pub fn subscription_id(feed: &str, buyer: &str) -> String {
    let mut h = Sha256::new();
    h.update(SUBSCRIPTION_DOMAIN);
    h.update((feed.len() as u16).to_be_bytes());
    h.update(feed.as_bytes());
    h.update((buyer.len() as u16).to_be_bytes());
    h.update(buyer.as_bytes());
    hex::encode(h.finalize())
}

/// A Lightning invoice issued for a purchase, and what it paid for once settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InvoiceRecord {
    /// Payment hash (64 hex).
    pub payment_hash: String,
    /// The BOLT11 payment request.
    pub payment_request: String,
    /// Feed id.
    pub feed: String,
    /// Period bought.
    pub period: Period,
    /// Periods bought.
    pub count: u32,
    /// Buyer (`ln:` + the buyer's chosen id).
    pub buyer: String,
    /// SHA-256 (hex) of the access token the buyer chose.
    pub token_hash: String,
    /// Amount due, in millisatoshis.
    pub amount_msat: u64,
    /// When the invoice expires (ms).
    pub expires_at_ms: i64,
    /// Set once the payment settled (and the subscription was extended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled: Option<Settlement>,
}

/// A settled Lightning payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Settlement {
    /// The payment backend's settle index.
    pub settle_index: u64,
    /// Paid, in millisatoshis.
    pub amt_paid_msat: u64,
    /// When it was recorded (ms).
    pub at_ms: i64,
}

/// The node's report of a settled Lightning invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvoiceSettled {
    /// Payment hash (64 hex).
    pub payment_hash: String,
    /// The payment backend's settle index.
    pub settle_index: u64,
    /// Paid, in millisatoshis.
    pub amt_paid_msat: u64,
}

/// Checks a Lightning buyer's chosen id: 1..=64 of `a-z`, `0-9`, `-`, `_`.
pub fn validate_buyer_id(id: &str) -> Result<(), LedgerError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'));
    if ok { Ok(()) } else { Err(LedgerError::Invalid(format!("buyer {id:?} must be 1..=64 of a-z, 0-9, '-', '_'"))) }
}

/// A buyer's access to a feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Subscription {
    /// Subscription id (64 hex).
    pub id: String,
    /// Feed id.
    pub feed: String,
    /// Buyer: a KLX account (64 hex).
    pub buyer: String,
    /// SHA-256 (hex) of the current access token (the latest purchase's).
    pub token_hash: String,
    /// Access ends at this time (ms).
    pub expires_at_ms: i64,
    /// Purchases and renewals so far.
    pub purchases: u32,
}

impl Subscription {
    /// True when `token` is this subscription's current token (constant-time comparison).
    pub fn token_matches(&self, token: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        let given = hex::encode(Sha256::digest(token.as_bytes()));
        given.as_bytes().ct_eq(self.token_hash.as_bytes()).into()
    }
}

/// One purchase, in the provider's statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PurchaseRecord {
    /// Subscription extended.
    pub subscription: String,
    /// Feed id.
    pub feed: String,
    /// Buyer.
    pub buyer: String,
    /// Period bought.
    pub period: Period,
    /// Periods bought.
    pub count: u32,
    /// Paid in.
    pub currency: Currency,
    /// How the payment was divided.
    pub split: Split,
    /// The subscription's new expiry (ms).
    pub expires_at_ms: i64,
    /// When (ms).
    pub at_ms: i64,
}

/// A provider's running totals, per currency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Statement {
    /// Totals of KLX purchases.
    pub klx: Split,
    /// Totals of Lightning purchases (sats).
    pub sats: Split,
    /// Purchases and renewals.
    pub purchases: u64,
}

impl Split {
    pub(crate) fn add(&mut self, o: &Split) {
        self.gross = self.gross.saturating_add(o.gross);
        self.gas = self.gas.saturating_add(o.gas);
        self.burned = self.burned.saturating_add(o.burned);
        self.foundation = self.foundation.saturating_add(o.foundation);
        self.masters = self.masters.saturating_add(o.masters);
        self.dapp_fund = self.dapp_fund.saturating_add(o.dapp_fund);
        self.provider = self.provider.saturating_add(o.provider);
    }
}

/// Checks a feed id: 1..=64 of `a-z`, `0-9`, `-`, `_`, `.`.
pub fn validate_feed_id(id: &str) -> Result<(), LedgerError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(LedgerError::Invalid(format!("feed id {id:?} must be 1..=64 of a-z, 0-9, '-', '_', '.'")))
    }
}

impl FeedSpec {
    /// Every rule a listing must follow, the first broken one named.
    pub(crate) fn validate(&self) -> Result<(), LedgerError> {
        let bad = |m: String| Err(LedgerError::Invalid(m));
        validate_feed_id(&self.id)?;
        if self.title.trim().is_empty() || self.title.len() > 200 {
            return bad("title must be 1..=200 bytes".into());
        }
        crate::tx::validate_prefix(&self.prefix).map_err(|e| LedgerError::Invalid(format!("prefix: {}", e.reason)))?;
        if self.prefix.starts_with("/_kalima") {
            return bad("prefix must not be under /_kalima".into());
        }
        if self.keys.len() > MAX_FEED_KEYS {
            return bad(format!("at most {MAX_FEED_KEYS} keys"));
        }
        for k in &self.keys {
            crate::tx::validate_key(k).map_err(|e| LedgerError::Invalid(format!("key {k:?}: {}", e.reason)))?;
        }
        if let Aggregation::Window { window_secs, .. } = self.aggregation
            && !(1..=86_400).contains(&window_secs)
        {
            return bad("window_secs must be 1..=86400".into());
        }
        if self.prices.is_empty() {
            return bad("a feed needs at least one price".into());
        }
        for (i, p) in self.prices.iter().enumerate() {
            if p.amount == 0 {
                return bad(format!("price {i} must be above 0"));
            }
            if self.prices[..i].iter().any(|q| q.period == p.period && q.currency == p.currency) {
                return bad(format!("two prices for {:?} in {:?}", p.period, p.currency));
            }
        }
        let sample = serde_json::to_vec(&self.sample).map(|v| v.len()).unwrap_or(usize::MAX);
        if self.licence.trim().is_empty() || self.licence.len() > MAX_FEED_TEXT {
            return bad(format!("licence must be 1..={MAX_FEED_TEXT} bytes"));
        }
        if self.description.len() > MAX_FEED_TEXT || sample > MAX_FEED_TEXT {
            return bad(format!("description and sample must be at most {MAX_FEED_TEXT} bytes"));
        }
        AccountKey::from_hex(&self.payout)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(burn_bps: u32) -> MarketConfig {
        let k = AccountKey([1; 32]).to_hex();
        MarketConfig {
            gas_micro_eur_per_kb: 250,
            klx_per_eur: 100 * super::super::KLX,
            sats_per_eur: 1_000,
            burn_bps,
            foundation: k.clone(),
            masters: k.clone(),
            dapp_fund: k,
        }
    }

    #[test]
    fn gas_is_priced_per_started_kb_and_split_after_the_burn() {
        // 1.5 kB -> 2 kB × 0.00025 EUR × 100 KLX/EUR = 0.05 KLX.
        let s = config(100).split(Currency::Klx, 1536, 10 * super::super::KLX);
        assert_eq!(s.gas, 50_000_000_000_000_000);
        assert_eq!(s.burned, s.gas / 100);
        let rest = s.gas - s.burned;
        assert_eq!((s.foundation, s.masters), (rest / 5, rest / 5));
        assert_eq!(s.burned + s.foundation + s.masters + s.dapp_fund, s.gas, "nothing lost to rounding");
        assert_eq!(s.provider + s.gas, s.gross);
        // The gas never exceeds what was paid.
        let tiny = config(1000).split(Currency::Sats, 100_000, 3);
        assert_eq!((tiny.gas, tiny.provider), (3, 0));
    }
}
