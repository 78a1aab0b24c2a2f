//! One relayer's work on one bridged chain, in rounds:
//!
//! 1. read the finalized head (or latest - confirmations); nothing above it is ever acted on,
//!    so a deposit reorged away before finality is never attested;
//! 2. scan `Deposit` and `Released` logs of the bridge contract from the stored cursor (minus
//!    an overlap after a restart), checking each log's emitter and token;
//! 3. attest deposits strictly in nonce order, from the chain's next nonce to mint; the chain
//!    mints once a majority of relayers attested the same event;
//! 4. sign the release of every pending withdrawal (EIP-712, bound to chain id, contract,
//!    token, recipient, amount, withdrawal id and expiry);
//! 5. send the release of withdrawals with enough signatures (the designated relayer first,
//!    the others after a delay per rank), after checking every signature as the contract will;
//! 6. report releases seen in finalized blocks, and halt the bridge on a release that matches
//!    no burn;
//! 7. store the cursor.
//!
//! Every instruction carries an idempotency key derived from what it says, so a relayer
//! killed at any point and restarted repeats instructions harmlessly: the chain refuses the
//! repeats, and nothing is minted, signed or reported twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{Filter, Log};
use alloy::sol_types::SolEvent;
use kalima_core::chain::Guard;
use kalima_core::ledger::{
    BridgeChain, Deposit, Ledger, LedgerError, LedgerOp, WithdrawalRecord, WithdrawalStatus, bridge_address,
    relayer_instruction,
};
use kalima_core::{Chain, Error as CoreError, Rejection};
use parking_lot::RwLock;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::ChainSettings;
use crate::contracts::{KlxBridge, recover_signer, release_digest, sign_release, sort_signatures};
use crate::error::{Error, Result};
use crate::identity::Identity;

/// Longest wait for a sent release to be mined.
const RECEIPT_WAIT: Duration = Duration::from_secs(120);

/// What a relayer reports about one chain (`GET /api/v1/bridge/status`).
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ChainStatus {
    /// Bridge name.
    pub name: String,
    /// EVM chain id.
    pub chain_id: u64,
    /// Last block this relayer treats as final.
    pub safe_block: Option<u64>,
    /// Blocks scanned up to here.
    pub cursor: Option<u64>,
    /// Deposits seen and not yet minted.
    pub deposits_waiting: usize,
    /// Attestations, release signatures, releases sent and reports made since start.
    pub attested: u64,
    /// Release signatures made since start.
    pub signed: u64,
    /// Release transactions sent since start.
    pub releases_sent: u64,
    /// Releases reported since start.
    pub reported: u64,
    /// Last error of a round, if the last round failed.
    pub last_error: Option<String>,
    /// Why the bridge is halted, if it is.
    pub halted: Option<String>,
}

/// The shared status of every chain of a relayer.
pub type StatusBoard = Arc<RwLock<BTreeMap<String, ChainStatus>>>;

/// One chain's relayer loop.
pub struct ChainWorker {
    settings: ChainSettings,
    chain: Chain,
    identity: Arc<Identity>,
    provider: DynProvider,
    bridge: Address,
    token: Address,
    cursor: Option<u64>,
    /// Deposits seen in final blocks and not yet minted, by nonce.
    seen: BTreeMap<u64, Deposit>,
    /// When this relayer first saw each withdrawal ready to send.
    ready_since: HashMap<String, Instant>,
    status: StatusBoard,
}

fn cursor_key(name: &str) -> String {
    format!("bridge/{name}/cursor")
}

/// A short digest of what an instruction says, so a corrected vote gets a new key.
fn digest8(v: &impl Serialize) -> String {
    hex::encode(&Sha256::digest(serde_json::to_vec(v).unwrap_or_default())[..8])
}

impl ChainWorker {
    /// A worker for `settings`, signing with `identity`.
    pub fn new(settings: ChainSettings, chain: Chain, identity: Arc<Identity>, status: StatusBoard) -> Result<Self> {
        let url = settings
            .rpc_url
            .parse()
            .map_err(|e| Error::Config(format!("bridge {}: rpc_url {}: {e}", settings.name, settings.rpc_url)))?;
        let bridge: Address = settings
            .bridge
            .parse()
            .map_err(|e| Error::Config(format!("bridge {}: bridge address: {e}", settings.name)))?;
        let token: Address = settings
            .token
            .parse()
            .map_err(|e| Error::Config(format!("bridge {}: token address: {e}", settings.name)))?;
        // The account nonce is read from the node for every transaction: the default cached
        // nonce is consumed by a send that reverts at gas estimation (a release another relayer
        // already made), and every later send from this key would then wait forever.
        let provider = ProviderBuilder::new()
            .disable_recommended_fillers()
            .with_gas_estimation()
            .with_simple_nonce_management()
            .with_chain_id(settings.chain_id)
            .wallet(identity.eth.clone())
            .connect_http(url)
            .erased();
        // Series exist from the start, so dashboards and alerts see zeros, not gaps.
        let chain_label = settings.name.clone();
        for name in [
            "kalima_bridge_deposits_attested_total",
            "kalima_bridge_release_signatures_total",
            "kalima_bridge_halts_total",
            "kalima_bridge_bad_signatures_total",
        ] {
            metrics::counter!(name, "chain" => chain_label.clone()).increment(0);
        }
        for kind in ["rpc", "config"] {
            metrics::counter!("kalima_bridge_round_errors_total", "chain" => chain_label.clone(), "kind" => kind)
                .increment(0);
        }
        metrics::gauge!("kalima_bridge_halted", "chain" => chain_label).set(0.0);
        status.write().insert(
            settings.name.clone(),
            ChainStatus { name: settings.name.clone(), chain_id: settings.chain_id, ..Default::default() },
        );
        Ok(Self {
            settings,
            chain,
            identity,
            provider,
            bridge,
            token,
            cursor: None,
            seen: BTreeMap::new(),
            ready_since: HashMap::new(),
            status,
        })
    }

    /// Runs rounds until `stop` fires.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let name = self.settings.name.clone();
        let interval = Duration::from_millis(self.settings.poll_interval_ms);
        let mut failures = 0u32;
        loop {
            let outcome = self.round().await;
            let wait = match &outcome {
                Ok(()) => {
                    failures = 0;
                    interval
                }
                Err(e) => {
                    let kind = if matches!(e, Error::Rpc { .. }) { "rpc" } else { "config" };
                    metrics::counter!("kalima_bridge_round_errors_total", "chain" => name.clone(), "kind" => kind)
                        .increment(1);
                    tracing::warn!(target: "bridge::ethereum", chain = %name, error = %format!("{e:#}"), "Relayer round failed.");
                    if matches!(e, Error::Rpc { .. }) {
                        // Back off on a failing RPC node, up to a minute.
                        failures = failures.saturating_add(1);
                        (interval * 2u32.saturating_pow(failures.min(5))).min(Duration::from_secs(60))
                    } else {
                        // Configuration being completed (device, bridge): look again soon.
                        failures = 0;
                        interval
                    }
                }
            };
            if let Some(s) = self.status.write().get_mut(&name) {
                s.last_error = outcome.err().map(|e| format!("{e:#}"));
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut ChainStatus)) {
        if let Some(s) = self.status.write().get_mut(&self.settings.name) {
            f(s);
        }
    }

    /// One round; see the module documentation.
    pub async fn round(&mut self) -> Result<()> {
        let name = self.settings.name.clone();
        let Some(cfg) = Ledger::new(self.chain.memcache()).bridge(&name) else {
            return Err(Error::Config(format!(
                "bridge {name} is not configured on the chain yet (PUT /api/v1/bridge/chains/{name})"
            )));
        };
        self.check_config(&cfg).await?;
        let safe = self.safe_head().await?;
        self.update(|s| s.safe_block = Some(safe));
        metrics::gauge!("kalima_bridge_safe_block", "chain" => name.clone()).set(safe as f64);

        let state = Ledger::new(self.chain.memcache()).bridge_state(&name);
        if let Some(h) = &state.halted {
            self.update(|s| s.halted = Some(h.reason.clone()));
            metrics::gauge!("kalima_bridge_halted", "chain" => name.clone()).set(1.0);
            return Ok(());
        }
        self.update(|s| s.halted = None);
        metrics::gauge!("kalima_bridge_halted", "chain" => name.clone()).set(0.0);

        let from = match self.cursor {
            Some(c) => c + 1,
            None => {
                let stored = self.chain.store().node_state(&cursor_key(&name)).await?;
                let stored = stored.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok()).map(u64::from_be_bytes);
                // After a restart, look again below the cursor: what was seen there but not
                // yet on the chain when the process stopped is found again.
                match stored {
                    Some(c) => c.saturating_sub(self.settings.rescan_blocks).max(self.settings.start_block),
                    None => self.settings.start_block,
                }
            }
        };
        let mut releases = Vec::new();
        let mut start = from;
        while start <= safe {
            let end = safe.min(start + self.settings.max_block_range - 1);
            self.scan(start, end, &mut releases).await?;
            start = end + 1;
        }
        self.attest_in_order().await?;
        self.report_releases(releases).await?;
        self.expire_withdrawals(safe).await?;
        self.sign_withdrawals().await?;
        if self.settings.submit_releases {
            self.send_releases(&cfg).await?;
        }
        if safe >= from || self.cursor.is_none() {
            // Never move the cursor past a deposit this relayer has seen but not attested
            // (one waiting behind a gap): a restart must find it again.
            let me = self.identity.device.clone();
            let ledger = Ledger::new(self.chain.memcache());
            let unattested = self
                .seen
                .values()
                .filter(|d| ledger.deposit(&name, d.nonce).and_then(|r| r.votes.get(&me).cloned()).as_ref() != Some(*d))
                .map(|d| d.block_number)
                .min();
            let mut cursor = safe.max(from.saturating_sub(1));
            if let Some(b) = unattested {
                cursor = cursor.min(b.saturating_sub(1));
            }
            self.chain.store().put_node_state(&[(&cursor_key(&name), cursor.to_be_bytes().to_vec())]).await?;
            self.cursor = Some(cursor);
            self.update(|s| s.cursor = Some(cursor));
        }
        let waiting = self.seen.len();
        self.update(|s| s.deposits_waiting = waiting);
        Ok(())
    }

    /// The local settings, the RPC node and the chain's bridge configuration must agree.
    async fn check_config(&self, cfg: &BridgeChain) -> Result<()> {
        let name = &self.settings.name;
        let rpc_chain = self.provider.get_chain_id().await.map_err(|e| Error::rpc(name, e))?;
        if rpc_chain != self.settings.chain_id || cfg.chain_id != self.settings.chain_id {
            return Err(Error::Config(format!(
                "bridge {name}: chain id {} configured, the RPC node says {rpc_chain}, the chain's bridge configuration says {}",
                self.settings.chain_id, cfg.chain_id
            )));
        }
        let same = |a: &str, b: &Address| a.parse::<Address>().ok().as_ref() == Some(b);
        if !same(&cfg.bridge, &self.bridge) || !same(&cfg.token, &self.token) {
            return Err(Error::Config(format!(
                "bridge {name}: the chain's configuration names contract {} and token {}, this relayer {} and {}",
                cfg.bridge, cfg.token, self.bridge, self.token
            )));
        }
        match cfg.relayer(&self.identity.device) {
            Some(r) if same(&r.eth_address, &self.identity.eth.address()) => Ok(()),
            Some(r) => Err(Error::Config(format!(
                "bridge {name}: relayer {} is registered with Ethereum address {}, but this node's key is {}",
                self.identity.device,
                r.eth_address,
                self.identity.eth.address()
            ))),
            None => {
                Err(Error::Config(format!("bridge {name}: device {} is not one of its relayers", self.identity.device)))
            }
        }
    }

    async fn safe_head(&self) -> Result<u64> {
        safe_head(&self.provider, &self.settings).await
    }

    /// Reads `Deposit` and `Released` logs of the bridge in `[from, to]`.
    async fn scan(&mut self, from: u64, to: u64, releases: &mut Vec<(B256, Address, U256, B256, u64)>) -> Result<()> {
        let name = self.settings.name.clone();
        let filter = Filter::new()
            .address(self.bridge)
            .event_signature(vec![KlxBridge::Deposit::SIGNATURE_HASH, KlxBridge::Released::SIGNATURE_HASH])
            .from_block(from)
            .to_block(to);
        let logs = self.provider.get_logs(&filter).await.map_err(|e| Error::rpc(&name, e))?;
        let next = Ledger::new(self.chain.memcache()).bridge_state(&name).next_deposit;
        for log in logs {
            if log.removed || log.address() != self.bridge {
                // A node that returns other contracts' logs for this filter is not trusted.
                metrics::counter!("kalima_bridge_logs_ignored_total", "chain" => name.clone(), "reason" => "emitter")
                    .increment(1);
                continue;
            }
            let (Some(tx_hash), Some(block_number), Some(log_index)) =
                (log.transaction_hash, log.block_number, log.log_index)
            else {
                continue;
            };
            if block_number > to {
                continue;
            }
            match log.topic0() {
                Some(t) if *t == KlxBridge::Deposit::SIGNATURE_HASH => {
                    if let Some(d) = self.deposit_of(&log, tx_hash, block_number, log_index)
                        && d.nonce >= next
                    {
                        self.seen.insert(d.nonce, d);
                    }
                }
                Some(t) if *t == KlxBridge::Released::SIGNATURE_HASH => {
                    if let Ok(r) = log.log_decode::<KlxBridge::Released>() {
                        let e = r.inner.data;
                        releases.push((e.withdrawalId, e.recipient, e.amount, tx_hash, block_number));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn deposit_of(&self, log: &Log, tx_hash: B256, block_number: u64, log_index: u64) -> Option<Deposit> {
        let name = &self.settings.name;
        let ignored = |reason: &'static str| {
            metrics::counter!("kalima_bridge_logs_ignored_total", "chain" => name.clone(), "reason" => reason)
                .increment(1);
            tracing::warn!(target: "bridge::ethereum", chain = %name, tx = %tx_hash, reason, "Deposit log ignored.");
            None
        };
        match decode_deposit(log, self.token, tx_hash, block_number, log_index) {
            Ok(d) => Some(d),
            Err(reason) => ignored(reason),
        }
    }

    /// Submits one instruction; a refusal saying it is already done counts as done.
    async fn submit(&self, op: &LedgerOp, idempotency_key: String) -> Result<bool> {
        let chain_name = self.chain.config().chain.clone();
        let instr =
            relayer_instruction(&chain_name, op, &self.identity.device, idempotency_key, &self.identity.device_key);
        match self.chain.submit(vec![instr], Some(Guard::Ledger)).await {
            Ok(_) => Ok(true),
            Err(CoreError::Rejected(Rejection::DuplicateIdempotencyKey { .. }))
            | Err(CoreError::Rejected(Rejection::Ledger(
                LedgerError::AlreadyMinted { .. } | LedgerError::AlreadyAttested { .. },
            ))) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn attest_in_order(&mut self) -> Result<()> {
        let name = self.settings.name.clone();
        let me = self.identity.device.clone();
        loop {
            let ledger = Ledger::new(self.chain.memcache());
            let next = ledger.bridge_state(&name).next_deposit;
            self.seen = self.seen.split_off(&next);
            // Strict nonce order: attest the next nonces this relayer has seen, stopping at
            // the first gap (a later nonce without the one before it waits).
            let mut todo = Vec::new();
            for (i, (nonce, d)) in self.seen.iter().enumerate() {
                if *nonce != next + i as u64 {
                    break;
                }
                let mine = ledger.deposit(&name, *nonce).and_then(|r| r.votes.get(&me).cloned());
                if mine.as_ref() != Some(d) {
                    todo.push(d.clone());
                }
            }
            if todo.is_empty() {
                return Ok(());
            }
            for d in todo {
                let key = format!("attest:{name}:{}:{}", d.nonce, digest8(&d));
                let op = LedgerOp::AttestDeposit { chain: name.clone(), deposit: d.clone() };
                if self.submit(&op, key).await? {
                    metrics::counter!("kalima_bridge_deposits_attested_total", "chain" => name.clone()).increment(1);
                    tracing::info!(target: "bridge::ethereum", chain = %name, nonce = d.nonce, tx = %d.tx_hash, amount = %d.amount, "Attested deposit.");
                    self.update(|s| s.attested += 1);
                }
            }
            // Attesting may have minted; go round again only if the cursor moved.
            if Ledger::new(self.chain.memcache()).bridge_state(&name).next_deposit == next {
                return Ok(());
            }
        }
    }

    fn digest_of(&self, w: &WithdrawalRecord) -> Result<(B256, Address, U256, B256, U256)> {
        let name = &self.settings.name;
        let bad = |what: &str| Error::Config(format!("bridge {name}: withdrawal {}: {what}", w.id));
        let bridge: Address = w.bridge.parse().map_err(|_| bad("bridge address"))?;
        let token: Address = w.token.parse().map_err(|_| bad("token address"))?;
        if w.chain_id != self.settings.chain_id || bridge != self.bridge || token != self.token {
            return Err(bad("made for another chain, contract or token"));
        }
        let recipient: Address = w.recipient.parse().map_err(|_| bad("recipient"))?;
        let id: B256 = format!("0x{}", w.id).parse().map_err(|_| bad("id"))?;
        let amount = U256::from(w.amount);
        let expiry = U256::from(w.expiry);
        let digest = release_digest(w.chain_id, bridge, token, recipient, amount, id, expiry);
        Ok((digest, recipient, amount, id, expiry))
    }

    /// Votes to refund withdrawals whose expiry passed in a final block without a release:
    /// from then on no block can hold their release (its signatures have expired).
    async fn expire_withdrawals(&mut self, safe: u64) -> Result<()> {
        let name = self.settings.name.clone();
        let pending = Ledger::new(self.chain.memcache()).pending_withdrawals(&name);
        if pending.is_empty() {
            return Ok(());
        }
        let final_time = self
            .provider
            .get_block_by_number(BlockNumberOrTag::Number(safe))
            .await
            .map_err(|e| Error::rpc(&name, e))?
            .map(|b| b.header.timestamp)
            .unwrap_or_default();
        let bridge = KlxBridge::new(self.bridge, self.provider.clone());
        for w in pending {
            if final_time <= w.expiry || w.expired_votes.contains(&self.identity.device) {
                continue;
            }
            let (_, _, _, id, _) = self.digest_of(&w)?;
            let released =
                bridge.released(id).block(BlockId::number(safe)).call().await.map_err(|e| Error::rpc(&name, e))?;
            if released {
                // Its release is final; the report comes from the log scan.
                continue;
            }
            let op = LedgerOp::ExpireWithdrawal { chain: name.clone(), withdrawal: w.id.clone() };
            if self.submit(&op, format!("expire:{name}:{}", w.id)).await? {
                tracing::info!(target: "bridge::ethereum", chain = %name, withdrawal = %w.id, "Withdrawal expired unreleased; voted to refund it.");
            }
        }
        Ok(())
    }

    async fn sign_withdrawals(&mut self) -> Result<()> {
        let name = self.settings.name.clone();
        let pending = Ledger::new(self.chain.memcache()).pending_withdrawals(&name);
        for w in pending {
            if w.signatures.contains_key(&self.identity.device) {
                continue;
            }
            let (digest, ..) = self.digest_of(&w)?;
            let signature = sign_release(&self.identity.eth, &digest)?;
            let op = LedgerOp::SignRelease {
                chain: name.clone(),
                withdrawal: w.id.clone(),
                signature: format!("0x{}", hex::encode(&signature)),
            };
            if self.submit(&op, format!("sign:{name}:{}", w.id)).await? {
                metrics::counter!("kalima_bridge_release_signatures_total", "chain" => name.clone()).increment(1);
                tracing::info!(target: "bridge::ethereum", chain = %name, withdrawal = %w.id, "Signed release.");
                self.update(|s| s.signed += 1);
            }
        }
        Ok(())
    }

    async fn send_releases(&mut self, cfg: &BridgeChain) -> Result<()> {
        let name = self.settings.name.clone();
        let ready: Vec<WithdrawalRecord> = Ledger::new(self.chain.memcache())
            .pending_withdrawals(&name)
            .into_iter()
            .filter(|w| w.status == WithdrawalStatus::Ready)
            .collect();
        self.ready_since.retain(|id, _| ready.iter().any(|w| &w.id == id));
        let n = cfg.relayers.len().max(1);
        let my_index = cfg.relayers.iter().position(|r| r.device == self.identity.device).unwrap_or(0);
        for w in ready {
            // The designated relayer sends at once; the next in line after one delay, and so on.
            let rank = (my_index + n - (w.seq as usize % n)) % n;
            let since = *self.ready_since.entry(w.id.clone()).or_insert_with(Instant::now);
            if since.elapsed() < Duration::from_millis(self.settings.submit_delay_ms) * rank as u32 {
                continue;
            }
            self.send_release(cfg, &w).await?;
        }
        Ok(())
    }

    async fn send_release(&mut self, cfg: &BridgeChain, w: &WithdrawalRecord) -> Result<()> {
        let name = self.settings.name.clone();
        let (digest, recipient, amount, id, expiry) = self.digest_of(w)?;
        let bridge = KlxBridge::new(self.bridge, self.provider.clone());
        let released = bridge.released(id).call().await.map_err(|e| Error::rpc(&name, e))?;
        if released {
            return Ok(());
        }
        let now = self
            .provider
            .get_block_by_number(BlockNumberOrTag::Latest)
            .await
            .map_err(|e| Error::rpc(&name, e))?
            .map(|b| b.header.timestamp)
            .unwrap_or_default();
        if now >= w.expiry {
            tracing::warn!(target: "bridge::ethereum", chain = %name, withdrawal = %w.id, "Release expired before it was sent.");
            return Ok(());
        }
        // Check every signature exactly as the contract will, so one bad signature costs a
        // log line, not a reverted transaction.
        let mut good = Vec::new();
        for (relayer, sig) in &w.signatures {
            let Some(r) = cfg.relayer(relayer) else { continue };
            let Ok(expected) = r.eth_address.parse::<Address>() else { continue };
            let Ok(bytes) = hex::decode(sig.trim_start_matches("0x")) else { continue };
            match recover_signer(&digest, &bytes) {
                Ok(signer) if signer == expected => good.push((signer, Bytes::from(bytes))),
                _ => {
                    metrics::counter!("kalima_bridge_bad_signatures_total", "chain" => name.clone()).increment(1);
                    tracing::warn!(target: "bridge::ethereum", chain = %name, withdrawal = %w.id, relayer = %relayer, "Release signature does not recover to the relayer's address.");
                }
            }
        }
        if good.len() < cfg.threshold as usize {
            return Ok(());
        }
        let signatures = sort_signatures(good);
        let pending = bridge
            .release(recipient, amount, id, expiry, signatures)
            .send()
            .await
            .map_err(|e| Error::rpc(&name, format!("release {}: {e}", w.id)))?;
        // A release that does not mine in time is looked at again next round: `released`
        // tells whether it landed, and the chain refuses a second release of the same id.
        let receipt = tokio::time::timeout(RECEIPT_WAIT, pending.get_receipt())
            .await
            .map_err(|_| Error::rpc(&name, format!("release {} not mined within {RECEIPT_WAIT:?}", w.id)))?
            .map_err(|e| Error::rpc(&name, e))?;
        let outcome = if receipt.status() { "mined" } else { "reverted" };
        metrics::counter!("kalima_bridge_releases_sent_total", "chain" => name.clone(), "outcome" => outcome)
            .increment(1);
        tracing::info!(target: "bridge::ethereum", chain = %name, withdrawal = %w.id, tx = %receipt.transaction_hash, outcome, "Sent release.");
        self.update(|s| s.releases_sent += 1);
        Ok(())
    }

    async fn report_releases(&mut self, releases: Vec<(B256, Address, U256, B256, u64)>) -> Result<()> {
        let name = self.settings.name.clone();
        let address = bridge_address(&name, "withdrawals");
        for (id, recipient, amount, tx_hash, block_number) in releases {
            let id_hex = hex::encode(id);
            let record = match Ledger::new(self.chain.memcache()).withdrawal(&name, &id_hex) {
                Some(r) => Some(r),
                None => self
                    .chain
                    .store()
                    .history(&address, &id_hex, u64::MAX, 1)
                    .await?
                    .first()
                    .and_then(|c| serde_json::from_slice::<WithdrawalRecord>(&c.tx.content.body).ok()),
            };
            let matches = record.as_ref().is_some_and(|w| {
                w.recipient.parse::<Address>().ok() == Some(recipient) && U256::from(w.amount) == amount
            });
            if !matches {
                // Money left the bridge without a burn behind it: stop everything.
                let reason = format!(
                    "release {id_hex} in {tx_hash:#x} ({amount} to {recipient:#x}) matches no withdrawal of this chain"
                );
                self.halt(&reason).await?;
                return Ok(());
            }
            match record.map(|w| w.status) {
                Some(WithdrawalStatus::Released) => continue,
                Some(WithdrawalStatus::Refunded) => {
                    let reason = format!("withdrawal {id_hex} was refunded and then released in {tx_hash:#x}");
                    self.halt(&reason).await?;
                    return Ok(());
                }
                _ => {}
            }
            let op = LedgerOp::ReportRelease {
                chain: name.clone(),
                withdrawal: id_hex.clone(),
                tx_hash: format!("{tx_hash:#x}"),
                block_number,
            };
            if self.submit(&op, format!("released:{name}:{id_hex}")).await? {
                tracing::info!(target: "bridge::ethereum", chain = %name, withdrawal = %id_hex, "Reported release.");
                self.update(|s| s.reported += 1);
            }
        }
        Ok(())
    }

    /// Halts this bridge on the chain.
    pub async fn halt(&self, reason: &str) -> Result<()> {
        halt(&self.chain, &self.identity, &self.settings.name, reason).await
    }
}

/// Halts bridge `name` on the chain, as relayer `identity`.
pub async fn halt(chain: &Chain, identity: &Identity, name: &str, reason: &str) -> Result<()> {
    tracing::error!(target: "bridge::ethereum", chain = %name, reason, "Halting the bridge.");
    metrics::counter!("kalima_bridge_halts_total", "chain" => name.to_string()).increment(1);
    metrics::gauge!("kalima_bridge_halted", "chain" => name.to_string()).set(1.0);
    let op = LedgerOp::Halt { chain: name.to_string(), reason: reason.to_string() };
    let key = format!("halt:{name}:{}", digest8(&reason));
    let instr = relayer_instruction(&chain.config().chain, &op, &identity.device, key, &identity.device_key);
    match chain.submit(vec![instr], Some(Guard::Ledger)).await {
        Ok(_)
        | Err(CoreError::Rejected(Rejection::DuplicateIdempotencyKey { .. }))
        | Err(CoreError::Rejected(Rejection::Ledger(LedgerError::AlreadyAttested { .. }))) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The last block treated as final on a chain: `finalized`, or latest - confirmations.
pub(crate) async fn safe_head(provider: &DynProvider, settings: &ChainSettings) -> Result<u64> {
    let name = &settings.name;
    if settings.confirmations == 0 {
        let block = provider
            .get_block_by_number(BlockNumberOrTag::Finalized)
            .await
            .map_err(|e| Error::rpc(name, e))?
            .ok_or_else(|| Error::rpc(name, "the node has no finalized block"))?;
        Ok(block.header.number)
    } else {
        let latest = provider.get_block_number().await.map_err(|e| Error::rpc(name, e))?;
        Ok(latest.saturating_sub(settings.confirmations))
    }
}

/// Reads the locked balance of a bridge at a block.
pub(crate) async fn locked_at(
    provider: &DynProvider,
    chain: &str,
    token: Address,
    bridge: Address,
    block: u64,
) -> Result<U256> {
    let token = crate::contracts::KlxToken::new(token, provider.clone());
    token.balanceOf(bridge).block(BlockId::number(block)).call().await.map_err(|e| Error::rpc(chain, e))
}

/// The deposit a `Deposit` log of the bridge says, or why it is not one to mint (a metrics
/// label): undecodable, another token, an amount over 128 bits.
fn decode_deposit(
    log: &Log,
    token: Address,
    tx_hash: B256,
    block_number: u64,
    log_index: u64,
) -> std::result::Result<Deposit, &'static str> {
    let e = log.log_decode::<KlxBridge::Deposit>().map_err(|_| "undecodable")?.inner.data;
    if e.token != token {
        return Err("token");
    }
    let amount = u128::try_from(e.amount).map_err(|_| "amount")?;
    Ok(Deposit {
        nonce: e.nonce,
        tx_hash: format!("{tx_hash:#x}"),
        log_index,
        block_number,
        from: format!("{:#x}", e.from),
        recipient: hex::encode(e.mainchainRecipient),
        amount,
        token: format!("{:#x}", e.token),
    })
}

/// A deposit found in a source transaction, and whether it is final yet.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FoundDeposit {
    /// The deposit as the relayers will attest it.
    pub deposit: Deposit,
    /// True once its block is at or below the final block.
    pub finalized: bool,
    /// The last final block now.
    pub safe_block: u64,
}

/// The deposits of the bridge in transaction `tx_hash`, read from the chain's RPC node
/// (empty when the transaction holds none or is unknown).
pub async fn deposits_in_tx(settings: &ChainSettings, tx_hash: &str) -> Result<Vec<FoundDeposit>> {
    let name = &settings.name;
    let hash: B256 =
        tx_hash.parse().map_err(|_| Error::Config(format!("{tx_hash:?} is not a transaction hash (0x + 64 hex)")))?;
    let url = settings.rpc_url.parse().map_err(|e| Error::Config(format!("bridge {name}: rpc_url: {e}")))?;
    let bridge: Address = settings.bridge.parse().map_err(|e| Error::Config(format!("bridge {name}: bridge: {e}")))?;
    let token: Address = settings.token.parse().map_err(|e| Error::Config(format!("bridge {name}: token: {e}")))?;
    let provider = ProviderBuilder::new().connect_http(url).erased();
    let Some(receipt) = provider.get_transaction_receipt(hash).await.map_err(|e| Error::rpc(name, e))? else {
        return Ok(Vec::new());
    };
    let safe = safe_head(&provider, settings).await?;
    let mut found = Vec::new();
    for log in receipt.inner.logs() {
        if log.address() != bridge || log.topic0() != Some(&KlxBridge::Deposit::SIGNATURE_HASH) || log.removed {
            continue;
        }
        let (Some(block_number), Some(log_index)) = (log.block_number, log.log_index) else { continue };
        let Ok(deposit) = decode_deposit(log, token, hash, block_number, log_index) else { continue };
        found.push(FoundDeposit { deposit, finalized: block_number <= safe, safe_block: safe });
    }
    Ok(found)
}
