//! The ledger's part of `kalima verify`: replaying the stored balance, supply and bridge
//! records, it checks that only the node wrote them and that they add up at the head:
//! balances sum to the KLX in circulation, the bridges' totals sum to the supply's, and the
//! supply stays under the cap.

use std::sync::Arc;

use super::{ACCOUNTS_ADDRESS, BRIDGES_ADDRESS, KLX_SUPPLY_CAP, Ledger, SUPPLY_ADDRESS};
use crate::memcache::Memcache;
use crate::registry::NODE_DEVICE_ID;
use crate::store::CommittedTx;

/// Replays ledger records in chain order.
#[derive(Default)]
pub(crate) struct Audit {
    cache: Memcache,
}

fn is_record(address: &str) -> bool {
    address == ACCOUNTS_ADDRESS
        || address == SUPPLY_ADDRESS
        || address == BRIDGES_ADDRESS
        || (address.starts_with("/_kalima/bridge/") && address.ends_with("/state"))
        || (address.starts_with("/_kalima/market/") && address != super::market::MARKET_OPS_ADDRESS)
}

impl Audit {
    /// Takes one stored transaction; refuses a ledger record written by anyone but the node.
    pub(crate) fn observe(&mut self, c: &CommittedTx) -> Result<(), String> {
        let content = &c.tx.content;
        if !is_record(&content.address) {
            return Ok(());
        }
        if content.device_id != NODE_DEVICE_ID {
            return Err(format!(
                "ledger record {} {} written by device {}, not by the node",
                content.address, content.key, content.device_id
            ));
        }
        self.cache.apply([&Arc::new(c.clone())]);
        Ok(())
    }

    /// The checks at the head.
    pub(crate) fn check(&self) -> Result<(), String> {
        let ledger = Ledger::new(&self.cache);
        let supply = ledger.supply();
        let circulating = supply.circulating();
        if supply.burned.saturating_add(supply.fees_burned) > supply.minted || circulating > KLX_SUPPLY_CAP {
            return Err(format!("the KLX supply record is impossible: {supply:?}"));
        }
        let sum = ledger.accounts().iter().try_fold(0u128, |acc, (_, a)| acc.checked_add(a.balance));
        if sum != Some(circulating) {
            return Err(format!("account balances sum to {sum:?}, but {circulating} KLX base units circulate"));
        }
        let (mut minted, mut burned) = (0u128, 0u128);
        for (name, _) in ledger.bridges() {
            let s = ledger.bridge_state(&name);
            minted = minted.saturating_add(s.minted);
            burned = burned.saturating_add(s.burned);
        }
        if minted != supply.minted || burned != supply.burned {
            return Err(format!(
                "bridges minted {minted} and burned {burned}, the supply record says {} and {}",
                supply.minted, supply.burned
            ));
        }
        Ok(())
    }
}
