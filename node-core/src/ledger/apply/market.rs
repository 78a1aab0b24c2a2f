//! The marketplace's instructions: listing and delisting feeds, KLX purchases, and the
//! node's reports of settled Lightning invoices, each turned into the records it changes.

use super::super::market::{
    Currency, FEEDS_ADDRESS, Feed, FeedSpec, INVOICES_ADDRESS, InvoiceRecord, InvoiceSettled, MARKET_CONFIG_ADDRESS,
    MARKET_CONFIG_KEY, MAX_PERIODS, MarketConfig, PURCHASES_ADDRESS, Period, PurchaseRecord, STATEMENTS_ADDRESS,
    SUBSCRIPTIONS_ADDRESS, Settlement, SignedPurchase, Split, Statement, Subscription, subscription_id,
};
use super::super::ops::AccountKey;
use super::super::{FINISHED_RECORD_TTL_SECS, LedgerError, SUPPLY_ADDRESS, SUPPLY_KEY};
use super::Draft;
use crate::registry::Device;

/// Lists a feed, or updates one of `device`'s own: the device must be allowed to write the
/// prefix it sells.
pub(super) fn list_feed(d: &mut Draft<'_>, device: &Device, feed: &FeedSpec) -> Result<(), LedgerError> {
    feed.validate()?;
    if !device.can_write(&feed.prefix) {
        return Err(LedgerError::Invalid(format!(
            "device {} needs a write grant on {} to sell it",
            device.id, feed.prefix
        )));
    }
    let now = d.timestamp_ms;
    let record = match d.get::<Feed>(FEEDS_ADDRESS, &feed.id)? {
        Some(old) if old.provider != device.id => {
            return Err(LedgerError::NotProvider { feed: feed.id.clone(), provider: old.provider });
        }
        Some(old) => Feed { spec: feed.clone(), listed: true, updated_at_ms: now, ..old },
        None => Feed {
            spec: feed.clone(),
            provider: device.id.clone(),
            listed: true,
            listed_at_ms: now,
            updated_at_ms: now,
        },
    };
    d.put(FEEDS_ADDRESS, &feed.id, &record, 0);
    Ok(())
}

/// Delists a feed (its provider or the admin).
pub(super) fn delist_feed(d: &mut Draft<'_>, device: &Device, feed: &str) -> Result<(), LedgerError> {
    let mut f: Feed = d.get(FEEDS_ADDRESS, feed)?.ok_or_else(|| LedgerError::UnknownFeed(feed.to_string()))?;
    if f.provider != device.id && !device.is_admin() {
        return Err(LedgerError::NotProvider { feed: feed.to_string(), provider: f.provider });
    }
    f.listed = false;
    f.updated_at_ms = d.timestamp_ms;
    d.put(FEEDS_ADDRESS, feed, &f, 0);
    Ok(())
}

/// A settled Lightning invoice: once per payment hash, and only for the full amount, it
/// extends the buyer's subscription and adds the sats to the provider's statement (the gas
/// split is computed in sats at `sats_per_eur`; the sats themselves stay with the node's
/// Lightning wallet, owed to the provider).
pub(super) fn settle_invoice(d: &mut Draft<'_>, s: &InvoiceSettled, bytes: usize) -> Result<(), LedgerError> {
    let mut inv: InvoiceRecord = d
        .get(INVOICES_ADDRESS, &s.payment_hash)?
        .ok_or_else(|| LedgerError::Invalid(format!("no invoice {} was issued for a purchase", s.payment_hash)))?;
    if inv.settled.is_some() {
        return Err(LedgerError::AlreadySettled(s.payment_hash.clone()));
    }
    if s.amt_paid_msat < inv.amount_msat {
        return Err(LedgerError::Invalid(format!(
            "invoice {} was paid {} msat of {}",
            s.payment_hash, s.amt_paid_msat, inv.amount_msat
        )));
    }
    let feed: Feed = d.get(FEEDS_ADDRESS, &inv.feed)?.ok_or_else(|| LedgerError::UnknownFeed(inv.feed.clone()))?;
    let config: MarketConfig =
        d.get(MARKET_CONFIG_ADDRESS, MARKET_CONFIG_KEY)?.ok_or(LedgerError::MarketNotConfigured)?;
    let split = config.split(Currency::Sats, bytes, u128::from(inv.amount_msat / 1000));
    let now = d.timestamp_ms;
    inv.settled = Some(Settlement { settle_index: s.settle_index, amt_paid_msat: s.amt_paid_msat, at_ms: now });
    d.put(INVOICES_ADDRESS, &s.payment_hash, &inv, FINISHED_RECORD_TTL_SECS);
    // Paid is paid: a delisting between the invoice and its payment still grants the period.
    let what =
        Bought { feed: &feed, buyer: &inv.buyer, period: inv.period, count: inv.count, token_hash: &inv.token_hash };
    grant(d, &what, Currency::Sats, split)
}

/// What one purchase buys.
struct Bought<'a> {
    feed: &'a Feed,
    buyer: &'a str,
    period: Period,
    count: u32,
    token_hash: &'a str,
}

/// Extends the buyer's subscription from its current expiry (or from now) with the new token,
/// and records the purchase in the provider's statement.
fn grant(d: &mut Draft<'_>, b: &Bought<'_>, currency: Currency, split: Split) -> Result<(), LedgerError> {
    let (feed_id, provider) = (&b.feed.spec.id, &b.feed.provider);
    let id = subscription_id(feed_id, b.buyer);
    let now = d.timestamp_ms;
    let mut sub = d.get::<Subscription>(SUBSCRIPTIONS_ADDRESS, &id)?.unwrap_or(Subscription {
        id: id.clone(),
        feed: feed_id.clone(),
        buyer: b.buyer.to_string(),
        token_hash: String::new(),
        expires_at_ms: now,
        purchases: 0,
    });
    sub.expires_at_ms = sub.expires_at_ms.max(now).saturating_add(b.period.millis().saturating_mul(i64::from(b.count)));
    sub.token_hash = b.token_hash.to_ascii_lowercase();
    sub.purchases += 1;
    d.put(SUBSCRIPTIONS_ADDRESS, &id, &sub, 0);
    let record = PurchaseRecord {
        subscription: id,
        feed: feed_id.clone(),
        buyer: b.buyer.to_string(),
        period: b.period,
        count: b.count,
        currency,
        split: split.clone(),
        expires_at_ms: sub.expires_at_ms,
        at_ms: now,
    };
    d.put(PURCHASES_ADDRESS, provider, &record, 0);
    let mut st: Statement = d.get(STATEMENTS_ADDRESS, provider)?.unwrap_or_default();
    match currency {
        Currency::Klx => st.klx.add(&split),
        Currency::Sats => st.sats.add(&split),
    }
    st.purchases += 1;
    d.put(STATEMENTS_ADDRESS, provider, &st, 0);
    Ok(())
}

/// A KLX purchase: the buyer pays the feed's price; the gas of the instruction is burned in
/// part and split, the rest credited to the provider; the subscription is extended from its
/// current expiry (or from now) and takes the new token.
pub(super) fn purchase(
    d: &mut Draft<'_>,
    buyer: &AccountKey,
    p: &SignedPurchase,
    bytes: usize,
) -> Result<(), LedgerError> {
    let feed: Feed = d.get(FEEDS_ADDRESS, &p.feed)?.ok_or_else(|| LedgerError::UnknownFeed(p.feed.clone()))?;
    if !feed.listed {
        return Err(LedgerError::UnknownFeed(p.feed.clone()));
    }
    if p.count == 0 || p.count > MAX_PERIODS {
        return Err(LedgerError::Invalid(format!("count must be 1..={MAX_PERIODS}")));
    }
    let price = feed.price(p.period, Currency::Klx).ok_or_else(|| {
        LedgerError::Invalid(format!("feed {} has no KLX price per {:?}", p.feed, p.period).to_lowercase())
    })?;
    let due = price.saturating_mul(u128::from(p.count));
    if p.amount != due {
        return Err(LedgerError::PriceMismatch {
            feed: p.feed.clone(),
            due: due.to_string(),
            got: p.amount.to_string(),
        });
    }
    let config: MarketConfig =
        d.get(MARKET_CONFIG_ADDRESS, MARKET_CONFIG_KEY)?.ok_or(LedgerError::MarketNotConfigured)?;
    let (foundation, masters, dapp) = config.validate()?;
    let split = config.split(Currency::Klx, bytes, p.amount);
    let payout = AccountKey::from_hex(&feed.spec.payout)?;
    d.debit(buyer, p.amount, p.nonce)?;
    for (to, amount) in [
        (&payout, split.provider),
        (&foundation, split.foundation),
        (&masters, split.masters),
        (&dapp, split.dapp_fund),
    ] {
        if amount > 0 {
            d.credit(to, amount)?;
        }
    }
    if split.burned > 0 {
        let mut supply = d.supply()?;
        supply.fees_burned = supply.fees_burned.saturating_add(split.burned);
        d.put(SUPPLY_ADDRESS, SUPPLY_KEY, &supply, 0);
    }
    let what = Bought { feed: &feed, buyer: &p.buyer, period: p.period, count: p.count, token_hash: &p.token_hash };
    grant(d, &what, Currency::Klx, split)
}
