//! The conservation check, across every bridged chain at once: KLX in circulation on this
//! chain (minted for deposits, minus burned by withdrawals) must never exceed what the
//! bridge contracts hold locked in finalized blocks, and the ledger must agree with itself
//! (balances sum to the supply; the bridges' totals sum to the supply's). Any breach halts
//! every bridge and raises `kalima_bridge_conservation_breaches_total`.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use kalima_core::Chain;
use kalima_core::ledger::{KLX, Ledger};
use parking_lot::RwLock;
use serde::Serialize;

use crate::config::ChainSettings;
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::worker::{halt, locked_at, safe_head};

/// The last conservation check (`GET /api/v1/bridge/status`).
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Conservation {
    /// KLX in circulation on this chain, base units.
    pub circulating: String,
    /// Locked in the bridge contracts at their finalized blocks, base units.
    pub locked: String,
    /// Locked per bridge, base units, as of the last check.
    pub locked_by_chain: std::collections::BTreeMap<String, String>,
    /// True when the last check passed.
    pub ok: bool,
    /// The breach found, or why the check could not run.
    pub problem: Option<String>,
}

/// Runs the conservation check on a schedule.
pub struct Reconciler {
    chain: Chain,
    identity: Arc<Identity>,
    chains: Vec<(ChainSettings, DynProvider, Address, Address)>,
    interval: Duration,
    last: Arc<RwLock<Conservation>>,
    /// When balances were last summed: that walks every account, so it runs on every
    /// [`FULL_EVERY`]th check only.
    last_full: parking_lot::Mutex<Option<std::time::Instant>>,
}

/// Checks between two sums of every account balance.
const FULL_EVERY: u32 = 12;

fn klx(v: u128) -> f64 {
    v as f64 / KLX as f64
}

impl Reconciler {
    /// A reconciler over `chains`, halting as `identity`.
    pub fn new(
        chain: Chain,
        identity: Arc<Identity>,
        chains: &[ChainSettings],
        interval: Duration,
        last: Arc<RwLock<Conservation>>,
    ) -> Result<Self> {
        let mut v = Vec::new();
        for s in chains {
            let url = s.rpc_url.parse().map_err(|e| Error::Config(format!("bridge {}: rpc_url: {e}", s.name)))?;
            let bridge = s.bridge.parse().map_err(|e| Error::Config(format!("bridge {}: bridge: {e}", s.name)))?;
            let token = s.token.parse().map_err(|e| Error::Config(format!("bridge {}: token: {e}", s.name)))?;
            v.push((s.clone(), ProviderBuilder::new().connect_http(url).erased(), bridge, token));
        }
        metrics::counter!("kalima_bridge_conservation_breaches_total").increment(0);
        Ok(Self { chain, identity, chains: v, interval, last, last_full: parking_lot::Mutex::new(None) })
    }

    /// Checks until `stop` fires.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            match self.check().await {
                Ok(None) => {}
                Ok(Some(breach)) => self.breach(&breach).await,
                Err(e) => {
                    tracing::warn!(target: "bridge::ethereum", error = %format!("{e:#}"), "Conservation check could not run.");
                    let mut last = self.last.write();
                    last.ok = false;
                    last.problem = Some(format!("the check could not run: {e:#}"));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }

    /// One check: `Ok(Some(breach))` when conservation does not hold.
    pub async fn check(&self) -> Result<Option<String>> {
        // The ledger first, the contracts after: a deposit minted in between is final on its
        // chain, so it is in the locked balance read later; the other order could see a
        // mint whose lock it has not read yet.
        let (supply, sum, bridges, minted, burned) = {
            let ledger = Ledger::new(self.chain.memcache());
            let supply = ledger.supply();
            let due = {
                let mut last = self.last_full.lock();
                let due = last.is_none_or(|t| t.elapsed() >= self.interval * FULL_EVERY);
                if due {
                    *last = Some(std::time::Instant::now());
                }
                due
            };
            let sum: Option<u128> =
                due.then(|| ledger.accounts().iter().map(|(_, a)| a.balance).fold(0u128, u128::saturating_add));
            let bridges = ledger.bridges();
            let (mut minted, mut burned) = (0u128, 0u128);
            for (name, _) in &bridges {
                let s = ledger.bridge_state(name);
                minted = minted.saturating_add(s.minted);
                burned = burned.saturating_add(s.burned);
            }
            (supply, sum, bridges, minted, burned)
        };
        let circulating = supply.circulating();
        metrics::gauge!("kalima_klx_circulating").set(klx(circulating));
        if let Some(sum) = sum
            && sum != circulating
        {
            return Ok(Some(format!("account balances sum to {sum} but {circulating} is in circulation")));
        }
        if minted != supply.minted || burned != supply.burned {
            return Ok(Some(format!(
                "bridges minted {minted} and burned {burned}, the supply records {} and {}",
                supply.minted, supply.burned
            )));
        }
        let mut locked = U256::ZERO;
        let mut by_chain = std::collections::BTreeMap::new();
        for (name, _) in &bridges {
            let Some((settings, provider, bridge, token)) = self.chains.iter().find(|(s, ..)| &s.name == name) else {
                return Err(Error::Config(format!(
                    "bridge {name} is configured on the chain but not in this node's [bridge.chains]: its locked balance cannot be read"
                )));
            };
            let safe = safe_head(provider, settings).await?;
            let here = locked_at(provider, name, *token, *bridge, safe).await?;
            metrics::gauge!("kalima_bridge_locked_klx", "chain" => name.clone())
                .set(klx(u128::try_from(here).unwrap_or(u128::MAX)));
            locked = locked.saturating_add(here);
            by_chain.insert(name.clone(), here.to_string());
        }
        {
            let mut last = self.last.write();
            last.circulating = circulating.to_string();
            last.locked = locked.to_string();
            last.locked_by_chain = by_chain;
        }
        if U256::from(circulating) > locked {
            return Ok(Some(format!(
                "{circulating} KLX base units circulate but only {locked} are locked in the bridge contracts"
            )));
        }
        let mut last = self.last.write();
        last.ok = true;
        last.problem = None;
        Ok(None)
    }

    async fn breach(&self, breach: &str) {
        metrics::counter!("kalima_bridge_conservation_breaches_total").increment(1);
        tracing::error!(target: "bridge::ethereum", breach, "Conservation breach: halting every bridge.");
        {
            let mut last = self.last.write();
            last.ok = false;
            last.problem = Some(breach.to_string());
        }
        let names: Vec<String> = Ledger::new(self.chain.memcache())
            .bridges()
            .into_iter()
            .filter(|(n, c)| {
                c.relayer(&self.identity.device).is_some()
                    && Ledger::new(self.chain.memcache()).bridge_state(n).halted.is_none()
            })
            .map(|(n, _)| n)
            .collect();
        for name in names {
            if let Err(e) = halt(&self.chain, &self.identity, &name, breach).await {
                tracing::error!(target: "bridge::ethereum", chain = %name, error = %format!("{e:#}"), "Could not halt the bridge.");
            }
        }
    }
}
