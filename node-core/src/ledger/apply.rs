//! Turning one ledger instruction into the node-written records it changes. Runs inside the
//! applier, so it sees the chain exactly as every other master sees it at that point of the
//! batch (the memcache plus what earlier instructions of the same batch wrote), and its
//! output depends on nothing else: the same batch yields the same records everywhere.

use std::collections::HashMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::market::{MARKET_CONFIG_ADDRESS, MARKET_CONFIG_KEY};
use super::ops::{AccountKey, LedgerOp, eth_address, eth_bytes, withdrawal_id};
use super::records::{
    Account, BridgeChain, BridgeState, Deposit, DepositRecord, DepositStatus, Exchange, Halt, ReleaseReport, Supply,
    WithdrawalRecord, WithdrawalStatus,
};
use super::{
    ACCOUNTS_ADDRESS, BRIDGES_ADDRESS, EXCHANGE_OF_ADDRESS, EXCHANGES_ADDRESS, FINISHED_RECORD_TTL_SECS,
    KLX_SUPPLY_CAP, LedgerError, MAX_ADDRESSES_PER_CALL, MAX_EXCHANGE_ADDRESSES, MAX_EXCHANGES, MAX_PENDING_DEPOSITS,
    STATE_KEY, SUPPLY_ADDRESS, SUPPLY_KEY, bridge_address, validate_bridge_name,
};
use crate::error::Rejection;
use crate::memcache::Memcache;
use crate::registry::{NODE_DEVICE_ID, Registry};
use crate::tx::TxContent;

mod market;

/// Most relayers a bridge may have.
const MAX_RELAYERS: usize = 32;
/// Longest halt reason kept.
const MAX_REASON: usize = 512;

type Slot = (String, String);

/// Ledger records written earlier in the batch being applied, over the memcache.
#[derive(Default)]
pub(crate) struct Overlay {
    values: HashMap<Slot, Vec<u8>>,
    /// Exchanges registered earlier in the batch (not in the memcache yet).
    new_exchanges: usize,
}

impl Overlay {
    fn body<'a>(&'a self, cache: &Memcache, address: &str, key: &str) -> Option<std::borrow::Cow<'a, [u8]>> {
        if let Some(b) = self.values.get(&(address.to_string(), key.to_string())) {
            return Some(std::borrow::Cow::Borrowed(b));
        }
        cache.get(address, key).map(|c| std::borrow::Cow::Owned(c.tx.content.body.clone()))
    }
}

/// The chain as one instruction sees it, and what it writes.
struct Draft<'a> {
    cache: &'a Memcache,
    base: &'a Overlay,
    order: Vec<Slot>,
    writes: HashMap<Slot, (Vec<u8>, u32)>,
    timestamp_ms: i64,
    new_exchanges: usize,
}

impl Draft<'_> {
    fn get<T: DeserializeOwned>(&self, address: &str, key: &str) -> Result<Option<T>, LedgerError> {
        let slot = (address.to_string(), key.to_string());
        let body = match self.writes.get(&slot) {
            Some((b, _)) => std::borrow::Cow::Borrowed(b.as_slice()),
            None => match self.base.body(self.cache, address, key) {
                Some(b) => b,
                None => return Ok(None),
            },
        };
        if body.is_empty() {
            return Ok(None);
        }
        // Records are written only by this module: one that does not parse means the chain
        // holds something this version cannot read, and guessing a balance is not an option.
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| LedgerError::Invalid(format!("the stored record {address} {key} does not parse: {e}")))
    }

    fn put<T: Serialize>(&mut self, address: &str, key: &str, value: &T, ttl_secs: u32) {
        let slot = (address.to_string(), key.to_string());
        let body = serde_json::to_vec(value).unwrap_or_default();
        if self.writes.insert(slot.clone(), (body, ttl_secs)).is_none() {
            self.order.push(slot);
        }
    }

    fn account(&self, key: &AccountKey) -> Result<Account, LedgerError> {
        Ok(self.get(ACCOUNTS_ADDRESS, &key.to_hex())?.unwrap_or_default())
    }

    fn supply(&self) -> Result<Supply, LedgerError> {
        Ok(self.get(SUPPLY_ADDRESS, SUPPLY_KEY)?.unwrap_or_default())
    }

    fn bridge(&self, name: &str) -> Result<BridgeChain, LedgerError> {
        validate_bridge_name(name)?;
        self.get(BRIDGES_ADDRESS, name)?.ok_or_else(|| LedgerError::UnknownBridge(name.to_string()))
    }

    fn state(&self, name: &str) -> Result<BridgeState, LedgerError> {
        Ok(self.get(&bridge_address(name, "state"), STATE_KEY)?.unwrap_or_default())
    }

    fn put_state(&mut self, name: &str, s: &BridgeState) {
        self.put(&bridge_address(name, "state"), STATE_KEY, s, 0);
    }

    /// Debits `from` after checking its nonce and balance.
    fn debit(&mut self, from: &AccountKey, amount: u128, nonce: u64) -> Result<(), LedgerError> {
        let mut a = self.account(from)?;
        if nonce != a.nonce + 1 {
            return Err(LedgerError::BadNonce { account: from.to_hex(), expected: a.nonce + 1, got: nonce });
        }
        if a.balance < amount {
            return Err(LedgerError::InsufficientFunds {
                account: from.to_hex(),
                balance: a.balance.to_string(),
                needed: amount.to_string(),
            });
        }
        a.balance -= amount;
        a.nonce = nonce;
        self.put(ACCOUNTS_ADDRESS, &from.to_hex(), &a, 0);
        Ok(())
    }

    /// Adds to the totals of the exchange `account` is registered to, if any.
    fn exchange_flow(&mut self, account: &AccountKey, deposited: u128, withdrawn: u128) -> Result<(), LedgerError> {
        let Some(id) = self.get::<String>(EXCHANGE_OF_ADDRESS, &account.to_hex())? else { return Ok(()) };
        let Some(mut ex) = self.get::<Exchange>(EXCHANGES_ADDRESS, &id)? else { return Ok(()) };
        ex.deposited = ex.deposited.saturating_add(deposited);
        ex.withdrawn = ex.withdrawn.saturating_add(withdrawn);
        self.put(EXCHANGES_ADDRESS, &id, &ex, 0);
        Ok(())
    }

    fn credit(&mut self, to: &AccountKey, amount: u128) -> Result<(), LedgerError> {
        let mut a = self.account(to)?;
        // Unreachable under the supply cap, but a wrap here would create money.
        a.balance =
            a.balance.checked_add(amount).ok_or_else(|| LedgerError::SupplyCap { amount: amount.to_string() })?;
        self.put(ACCOUNTS_ADDRESS, &to.to_hex(), &a, 0);
        Ok(())
    }

    /// The records written, in first-write order, and the values for the overlay.
    fn finish(mut self) -> (Vec<TxContent>, Vec<(Slot, Vec<u8>)>) {
        let mut items = Vec::with_capacity(self.order.len());
        let mut values = Vec::with_capacity(self.order.len());
        for slot in self.order {
            let Some((body, ttl_secs)) = self.writes.remove(&slot) else { continue };
            values.push((slot.clone(), body.clone()));
            items.push(TxContent {
                device_id: NODE_DEVICE_ID.into(),
                address: slot.0,
                key: slot.1,
                body,
                ttl_secs,
                ..TxContent::default()
            });
        }
        (items, values)
    }
}

/// What an instruction needs from the chain.
pub(crate) struct Context<'a> {
    /// Chain name (holder and relayer signatures are bound to it).
    pub(crate) chain: &'a str,
    /// Leader timestamp of the batch.
    pub(crate) timestamp_ms: i64,
    /// Devices as of this commit.
    pub(crate) registry: &'a Registry,
    /// Committed values.
    pub(crate) cache: &'a Memcache,
}

/// Checks one instruction and returns it followed by the records it writes; on success the
/// records also go into `overlay` for the rest of the batch. Nothing is written on refusal.
pub(crate) fn expand(instr: &TxContent, ctx: &Context<'_>, overlay: &mut Overlay) -> Result<Vec<TxContent>, Rejection> {
    let op: LedgerOp = serde_json::from_slice(&instr.body)
        .map_err(|e| Rejection::Malformed(format!("ledger instruction does not parse: {e}")))?;
    if op.placement(&instr.device_id) != (instr.address.clone(), instr.key.clone()) {
        return Err(LedgerError::Invalid("instruction written at the wrong address or key".into()).into());
    }
    if let LedgerOp::SettleInvoice(settled) = &op {
        // The node's own report of its payment backend; no device may write one.
        if instr.device_id != NODE_DEVICE_ID {
            return Err(LedgerError::Invalid("only the node reports invoice settlements".into()).into());
        }
        let mut d = Draft {
            cache: ctx.cache,
            base: overlay,
            order: Vec::new(),
            writes: HashMap::new(),
            timestamp_ms: ctx.timestamp_ms,
            new_exchanges: 0,
        };
        market::settle_invoice(&mut d, settled, instr.body.len())?;
        let (written, values) = d.finish();
        overlay.values.extend(values);
        let mut items = Vec::with_capacity(written.len() + 1);
        items.push(instr.clone());
        items.extend(written);
        return Ok(items);
    }
    let device = ctx.registry.get(&instr.device_id).ok_or(Rejection::UnknownDevice)?;
    if device.record.revoked {
        return Err(Rejection::Revoked(device.id.clone()));
    }
    let mut d = Draft {
        cache: ctx.cache,
        base: overlay,
        order: Vec::new(),
        writes: HashMap::new(),
        timestamp_ms: ctx.timestamp_ms,
        new_exchanges: 0,
    };
    match &op {
        LedgerOp::Transfer(t) => {
            let from = op.verify_holder(ctx.chain)?;
            let to = AccountKey::from_hex(&t.to)?;
            if t.amount == 0 {
                return Err(LedgerError::Invalid("amount must be above 0".into()).into());
            }
            if from == to {
                return Err(LedgerError::Invalid("from and to are the same account".into()).into());
            }
            d.debit(&from, t.amount, t.nonce)?;
            d.credit(&to, t.amount)?;
        }
        LedgerOp::Withdraw(w) => {
            let from = op.verify_holder(ctx.chain)?;
            withdraw(&mut d, ctx.chain, &from, w)?;
        }
        LedgerOp::ConfigureBridge { name, config } => {
            if !device.is_admin() {
                return Err(LedgerError::AdminOnly.into());
            }
            configure(&mut d, ctx.registry, name, config)?;
        }
        LedgerOp::ResumeBridge { name } => {
            if !device.is_admin() {
                return Err(LedgerError::AdminOnly.into());
            }
            d.bridge(name)?;
            let mut s = d.state(name)?;
            s.halted = None;
            d.put_state(name, &s);
        }
        LedgerOp::AttestDeposit { chain, deposit } => {
            let cfg = relayer_checks(&d, ctx, instr, &device, chain)?;
            attest(&mut d, chain, &cfg, &instr.device_id, deposit)?;
        }
        LedgerOp::SignRelease { chain, withdrawal, signature } => {
            let cfg = relayer_checks(&d, ctx, instr, &device, chain)?;
            let s = d.state(chain)?;
            if let Some(h) = &s.halted {
                return Err(LedgerError::Halted { name: chain.clone(), reason: h.reason.clone() }.into());
            }
            let address = bridge_address(chain, "withdrawals");
            let mut w: WithdrawalRecord = d
                .get(&address, withdrawal)?
                .filter(WithdrawalRecord::is_pending)
                .ok_or_else(|| LedgerError::UnknownWithdrawal(withdrawal.clone()))?;
            if w.signatures.contains_key(&instr.device_id) {
                return Err(LedgerError::AlreadyAttested {
                    relayer: instr.device_id.clone(),
                    what: withdrawal.clone(),
                }
                .into());
            }
            let sig = eth_bytes::<65>(signature, "signature")?;
            w.signatures.insert(instr.device_id.clone(), format!("0x{}", hex::encode(sig)));
            let signed = w.signatures.keys().filter(|r| cfg.relayer(r).is_some()).count();
            if signed >= cfg.threshold as usize {
                w.status = WithdrawalStatus::Ready;
            }
            d.put(&address, withdrawal, &w, 0);
        }
        LedgerOp::ReportRelease { chain, withdrawal, tx_hash, block_number } => {
            relayer_checks(&d, ctx, instr, &device, chain)?;
            let address = bridge_address(chain, "withdrawals");
            let mut w: WithdrawalRecord =
                d.get(&address, withdrawal)?.ok_or_else(|| LedgerError::UnknownWithdrawal(withdrawal.clone()))?;
            if w.status == WithdrawalStatus::Released {
                return Err(LedgerError::AlreadyAttested {
                    relayer: instr.device_id.clone(),
                    what: withdrawal.clone(),
                }
                .into());
            }
            if w.status == WithdrawalStatus::Refunded {
                // Refunds wait for the expiry in a final block, after which the contract
                // refuses the release: a release after a refund means money was made twice.
                return Err(LedgerError::Invalid(format!(
                    "withdrawal {withdrawal} was refunded; a release of it is a breach"
                ))
                .into());
            }
            let hash = eth_bytes::<32>(tx_hash, "tx_hash")?;
            w.status = WithdrawalStatus::Released;
            w.release = Some(ReleaseReport {
                tx_hash: format!("0x{}", hex::encode(hash)),
                block_number: *block_number,
                reported_by: instr.device_id.clone(),
                at_ms: d.timestamp_ms,
            });
            let mut s = d.state(chain)?;
            s.released = s.released.saturating_add(w.amount);
            d.put_state(chain, &s);
            d.put(&address, withdrawal, &w, FINISHED_RECORD_TTL_SECS);
        }
        LedgerOp::ExpireWithdrawal { chain, withdrawal } => {
            let cfg = relayer_checks(&d, ctx, instr, &device, chain)?;
            let address = bridge_address(chain, "withdrawals");
            let mut w: WithdrawalRecord = d
                .get(&address, withdrawal)?
                .filter(WithdrawalRecord::is_pending)
                .ok_or_else(|| LedgerError::UnknownWithdrawal(withdrawal.clone()))?;
            if (d.timestamp_ms.max(0) as u64) / 1000 <= w.expiry {
                return Err(LedgerError::Invalid(format!("withdrawal {withdrawal} has not expired yet")).into());
            }
            if !w.expired_votes.insert(instr.device_id.clone()) {
                return Err(LedgerError::AlreadyAttested {
                    relayer: instr.device_id.clone(),
                    what: withdrawal.clone(),
                }
                .into());
            }
            let votes = w.expired_votes.iter().filter(|r| cfg.relayer(r).is_some()).count();
            if votes >= cfg.threshold as usize {
                let from = AccountKey::from_hex_unchecked(&w.from)?;
                d.credit(&from, w.amount)?;
                let mut supply = d.supply()?;
                supply.burned = supply.burned.saturating_sub(w.amount);
                d.put(SUPPLY_ADDRESS, SUPPLY_KEY, &supply, 0);
                let mut s = d.state(chain)?;
                s.burned = s.burned.saturating_sub(w.amount);
                d.put_state(chain, &s);
                w.status = WithdrawalStatus::Refunded;
                d.put(&address, withdrawal, &w, FINISHED_RECORD_TTL_SECS);
            } else {
                d.put(&address, withdrawal, &w, 0);
            }
        }
        LedgerOp::RegisterExchange { id, device: manager } => {
            if !device.is_admin() {
                return Err(LedgerError::AdminOnly.into());
            }
            crate::registry::validate_device_id(id)
                .map_err(|e| LedgerError::Invalid(format!("exchange id: {}", e.reason)))?;
            if d.get::<Exchange>(EXCHANGES_ADDRESS, id)?.is_some() {
                return Err(LedgerError::Invalid(format!("exchange {id} is already registered")).into());
            }
            let count = d.cache.keys(EXCHANGES_ADDRESS).len() + d.base.new_exchanges;
            if count >= MAX_EXCHANGES {
                return Err(LedgerError::Invalid(format!("at most {MAX_EXCHANGES} exchanges may register")).into());
            }
            match ctx.registry.get(manager) {
                Some(dev) if !dev.record.revoked => {}
                _ => return Err(LedgerError::Invalid(format!("device {manager} is not registered")).into()),
            }
            let ex = Exchange {
                device: manager.clone(),
                addresses: 0,
                deposited: 0,
                withdrawn: 0,
                registered_at_ms: d.timestamp_ms,
            };
            d.put(EXCHANGES_ADDRESS, id, &ex, 0);
            d.new_exchanges += 1;
        }
        LedgerOp::AddExchangeAddresses { exchange, accounts } => {
            let mut ex: Exchange = d
                .get(EXCHANGES_ADDRESS, exchange)?
                .ok_or_else(|| LedgerError::Invalid(format!("no exchange named {exchange}")))?;
            if !device.is_admin() && device.id != ex.device {
                return Err(
                    LedgerError::Invalid(format!("only device {} manages exchange {exchange}", ex.device)).into()
                );
            }
            if accounts.is_empty() || accounts.len() > MAX_ADDRESSES_PER_CALL {
                return Err(LedgerError::Invalid(format!("send 1..={MAX_ADDRESSES_PER_CALL} accounts per call")).into());
            }
            for a in accounts {
                let key = AccountKey::from_hex(a)?.to_hex();
                match d.get::<String>(EXCHANGE_OF_ADDRESS, &key)? {
                    Some(owner) if &owner == exchange => continue,
                    Some(owner) => {
                        return Err(
                            LedgerError::Invalid(format!("account {key} is registered to exchange {owner}")).into()
                        );
                    }
                    None => {}
                }
                if ex.addresses >= MAX_EXCHANGE_ADDRESSES {
                    return Err(LedgerError::Invalid(format!(
                        "exchange {exchange} holds the most addresses allowed ({MAX_EXCHANGE_ADDRESSES})"
                    ))
                    .into());
                }
                d.put(EXCHANGE_OF_ADDRESS, &key, exchange, 0);
                ex.addresses += 1;
            }
            d.put(EXCHANGES_ADDRESS, exchange, &ex, 0);
        }
        LedgerOp::Halt { chain, reason } => {
            relayer_checks(&d, ctx, instr, &device, chain)?;
            let mut s = d.state(chain)?;
            if s.halted.is_some() {
                return Err(
                    LedgerError::AlreadyAttested { relayer: instr.device_id.clone(), what: "halt".into() }.into()
                );
            }
            let reason: String = reason.chars().take(MAX_REASON).collect();
            s.halted = Some(Halt { reason, by: instr.device_id.clone(), at_ms: d.timestamp_ms });
            d.put_state(chain, &s);
        }
        LedgerOp::ConfigureMarket { config } => {
            if !device.is_admin() {
                return Err(LedgerError::AdminOnly.into());
            }
            config.validate()?;
            d.put(MARKET_CONFIG_ADDRESS, MARKET_CONFIG_KEY, config, 0);
        }
        LedgerOp::ListFeed { feed } => market::list_feed(&mut d, &device, feed)?,
        LedgerOp::DelistFeed { feed } => market::delist_feed(&mut d, &device, feed)?,
        LedgerOp::Purchase(p) => {
            let buyer = op.verify_holder(ctx.chain)?;
            market::purchase(&mut d, &buyer, p, instr.body.len())?;
        }
        LedgerOp::SettleInvoice(_) => {
            return Err(LedgerError::Invalid("only the node reports invoice settlements".into()).into());
        }
    }
    let new_exchanges = d.new_exchanges;
    let (written, values) = d.finish();
    overlay.values.extend(values);
    overlay.new_exchanges += new_exchanges;
    let mut items = Vec::with_capacity(written.len() + 1);
    items.push(instr.clone());
    items.extend(written);
    Ok(items)
}

/// A relayer instruction must come from a relayer of the bridge, signed with its device key.
fn relayer_checks(
    d: &Draft<'_>,
    ctx: &Context<'_>,
    instr: &TxContent,
    device: &crate::registry::Device,
    chain: &str,
) -> Result<BridgeChain, LedgerError> {
    let cfg = d.bridge(chain)?;
    let not_relayer = || LedgerError::NotRelayer { device: instr.device_id.clone(), bridge: chain.to_string() };
    cfg.relayer(&instr.device_id).ok_or_else(not_relayer)?;
    // Checked here as well as at ingest: a relayer's word moves money, so no master takes
    // another's word for it.
    match &device.public_key {
        Some(pk) if instr.verify_signature(ctx.chain, pk) => Ok(cfg),
        _ => Err(not_relayer()),
    }
}

fn configure(d: &mut Draft<'_>, registry: &Registry, name: &str, c: &BridgeChain) -> Result<(), LedgerError> {
    validate_bridge_name(name)?;
    let invalid = |m: String| Err(LedgerError::Invalid(m));
    if c.chain_id == 0 {
        return invalid("chain_id must be above 0".into());
    }
    let mut c = c.clone();
    c.bridge = eth_address(&c.bridge, "bridge")?;
    c.token = eth_address(&c.token, "token")?;
    let n = c.relayers.len();
    if n == 0 || n > MAX_RELAYERS {
        return invalid(format!("a bridge needs 1..={MAX_RELAYERS} relayers, got {n}"));
    }
    // A majority threshold: two disjoint groups of relayers can never both reach it, so two
    // conflicting versions of one deposit can never both be minted.
    if (c.threshold as usize) * 2 <= n || c.threshold as usize > n {
        return invalid(format!(
            "threshold {} must be more than half of the {n} relayers and at most {n}",
            c.threshold
        ));
    }
    let mut devices = std::collections::HashSet::new();
    let mut addresses = std::collections::HashSet::new();
    for r in &mut c.relayers {
        r.eth_address = eth_address(&r.eth_address, "relayer eth_address")?;
        if !devices.insert(r.device.clone()) || !addresses.insert(r.eth_address.clone()) {
            return invalid(format!("relayer {} ({}) is listed twice", r.device, r.eth_address));
        }
        match registry.get(&r.device) {
            Some(dev) if !dev.record.revoked && dev.public_key.is_some() => {}
            _ => return invalid(format!("relayer {} must be a registered device with a public key", r.device)),
        }
    }
    if !(1..=30 * 24 * 3600).contains(&c.release_ttl_secs) {
        return invalid("release_ttl_secs must be between 1 and 2592000".into());
    }
    if c.max_withdrawal == 0 {
        return invalid("max_withdrawal must be above 0".into());
    }
    if let Some(old) = d.get::<BridgeChain>(BRIDGES_ADDRESS, name)? {
        let s = d.state(name)?;
        let moved = s.next_deposit > 0 || s.next_withdrawal > 0;
        if moved && (old.chain_id != c.chain_id || old.bridge != c.bridge || old.token != c.token) {
            // Deposit nonces and withdrawal ids belong to one contract: another contract is
            // another bridge.
            return invalid(format!(
                "bridge {name} has moved funds: its chain id, contract and token cannot change (configure a new bridge name)"
            ));
        }
    }
    d.put(BRIDGES_ADDRESS, name, &c, 0);
    Ok(())
}

fn withdraw(
    d: &mut Draft<'_>,
    chain: &str,
    from: &AccountKey,
    w: &super::ops::SignedWithdrawal,
) -> Result<(), LedgerError> {
    let cfg = d.bridge(&w.chain)?;
    let mut s = d.state(&w.chain)?;
    if let Some(h) = &s.halted {
        return Err(LedgerError::Halted { name: w.chain.clone(), reason: h.reason.clone() });
    }
    let recipient = eth_address(&w.recipient, "recipient")?;
    if w.amount == 0 {
        return Err(LedgerError::Invalid("amount must be above 0".into()));
    }
    if w.amount > cfg.max_withdrawal {
        return Err(LedgerError::OverCap { amount: w.amount.to_string(), cap: cfg.max_withdrawal.to_string() });
    }
    d.debit(from, w.amount, w.nonce)?;
    d.exchange_flow(from, 0, w.amount)?;
    let mut supply = d.supply()?;
    supply.burned = supply.burned.saturating_add(w.amount);
    d.put(SUPPLY_ADDRESS, SUPPLY_KEY, &supply, 0);
    let seq = s.next_withdrawal;
    s.next_withdrawal += 1;
    s.burned = s.burned.saturating_add(w.amount);
    d.put_state(&w.chain, &s);
    let id = withdrawal_id(chain, &w.chain, seq);
    let record = WithdrawalRecord {
        id: id.clone(),
        seq,
        chain: w.chain.clone(),
        chain_id: cfg.chain_id,
        bridge: cfg.bridge.clone(),
        token: cfg.token.clone(),
        from: from.to_hex(),
        recipient,
        amount: w.amount,
        expiry: (d.timestamp_ms.max(0) as u64) / 1000 + cfg.release_ttl_secs,
        requested_at_ms: d.timestamp_ms,
        signatures: Default::default(),
        status: WithdrawalStatus::Signing,
        release: None,
        expired_votes: Default::default(),
    };
    d.put(&bridge_address(&w.chain, "withdrawals"), &id, &record, 0);
    Ok(())
}

fn attest(d: &mut Draft<'_>, name: &str, cfg: &BridgeChain, relayer: &str, dep: &Deposit) -> Result<(), LedgerError> {
    let mut s = d.state(name)?;
    if let Some(h) = &s.halted {
        return Err(LedgerError::Halted { name: name.to_string(), reason: h.reason.clone() });
    }
    let mut dep = dep.clone();
    dep.tx_hash = format!("0x{}", hex::encode(eth_bytes::<32>(&dep.tx_hash, "tx_hash")?));
    dep.from = eth_address(&dep.from, "from")?;
    dep.token = eth_address(&dep.token, "token")?;
    dep.recipient = AccountKey::from_hex_unchecked(&dep.recipient)?.to_hex();
    if dep.amount == 0 {
        return Err(LedgerError::Invalid("amount must be above 0".into()));
    }
    if dep.token != cfg.token {
        return Err(LedgerError::Invalid(format!("token {} is not the bridge's token {}", dep.token, cfg.token)));
    }
    if dep.nonce < s.next_deposit {
        return Err(LedgerError::AlreadyMinted { bridge: name.to_string(), nonce: dep.nonce });
    }
    if dep.nonce >= s.next_deposit.saturating_add(MAX_PENDING_DEPOSITS) {
        return Err(LedgerError::OutOfWindow { nonce: dep.nonce, next: s.next_deposit, window: MAX_PENDING_DEPOSITS });
    }
    let address = bridge_address(name, "deposits");
    let key = dep.nonce.to_string();
    let mut rec: DepositRecord = d.get(&address, &key)?.unwrap_or(DepositRecord {
        nonce: dep.nonce,
        status: DepositStatus::Pending,
        votes: Default::default(),
        minted: None,
        minted_at_ms: None,
    });
    if rec.votes.get(relayer) == Some(&dep) {
        return Err(LedgerError::AlreadyAttested { relayer: relayer.to_string(), what: format!("deposit {key}") });
    }
    // A relayer may correct its own vote while the deposit is pending; only agreeing votes
    // of current relayers count.
    rec.votes.insert(relayer.to_string(), dep);
    d.put(&address, &key, &rec, 0);

    // Mint every deposit that now has a quorum, strictly in nonce order.
    loop {
        let key = s.next_deposit.to_string();
        let Some(mut rec) = d.get::<DepositRecord>(&address, &key)? else { break };
        let Some(winner) = quorum(&rec, cfg) else { break };
        let mut supply = d.supply()?;
        let after = supply.circulating().checked_add(winner.amount).filter(|v| *v <= KLX_SUPPLY_CAP);
        if after.is_none() {
            // Refusing the attestation would leave the deposit unmintable without a trace:
            // keep the vote, halt the bridge, and let the operators look.
            s.halted = Some(Halt {
                reason: format!("minting deposit {key} ({}) would pass the supply cap", winner.amount),
                by: NODE_DEVICE_ID.into(),
                at_ms: d.timestamp_ms,
            });
            break;
        }
        let to = AccountKey::from_hex_unchecked(&winner.recipient)?;
        d.credit(&to, winner.amount)?;
        d.exchange_flow(&to, winner.amount, 0)?;
        supply.minted += winner.amount;
        d.put(SUPPLY_ADDRESS, SUPPLY_KEY, &supply, 0);
        s.minted = s.minted.saturating_add(winner.amount);
        s.next_deposit += 1;
        rec.status = DepositStatus::Minted;
        rec.minted = Some(winner);
        rec.minted_at_ms = Some(d.timestamp_ms);
        d.put(&address, &key, &rec, FINISHED_RECORD_TTL_SECS);
    }
    d.put_state(name, &s);
    Ok(())
}

/// The deposit that at least `threshold` current relayers attested identically.
fn quorum(rec: &DepositRecord, cfg: &BridgeChain) -> Option<Deposit> {
    let mut counts: Vec<(&Deposit, u32)> = Vec::new();
    for (relayer, dep) in &rec.votes {
        if cfg.relayer(relayer).is_none() {
            continue;
        }
        match counts.iter_mut().find(|(d, _)| *d == dep) {
            Some((_, n)) => *n += 1,
            None => counts.push((dep, 1)),
        }
    }
    counts.into_iter().find(|(_, n)| *n >= cfg.threshold).map(|(d, _)| d.clone())
}
