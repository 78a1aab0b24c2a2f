//! Throwaway `anvil` chains for tests: spawning the pinned binary on a free port, the
//! test-only RPC calls (mining, reorgs, time travel, storage writes, snapshots) and deploying
//! the bridge contracts on them.

use std::borrow::Cow;
use std::path::PathBuf;

use alloy::eips::BlockNumberOrTag;
use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::TransportResult;
use alloy::transports::http::reqwest::Url;
use serde_json::{Value, json};

use crate::contracts::KlxBridge::KlxBridgeInstance;
use crate::contracts::KlxToken::KlxTokenInstance;
use crate::contracts::{KlxBridge, KlxToken};

/// The command that installs anvil and the other test peers.
const INSTALL_HINT: &str = "scripts/peers/install";

/// The anvil binary: `$KALIMA_ANVIL`, else the one `scripts/peers/install` puts under
/// `$KALIMA_PEERS_DIR/npm` (default `$HOME/.cache/kalima-peers`).
///
/// # Panics
///
/// When the binary does not exist, naming the install command.
pub fn anvil_path() -> PathBuf {
    let path = match std::env::var_os("KALIMA_ANVIL") {
        Some(path) => PathBuf::from(path),
        None => peers_dir().join("npm/node_modules/.bin/anvil"),
    };
    assert!(path.is_file(), "anvil not found at {}; run {INSTALL_HINT} (or set KALIMA_ANVIL)", path.display());
    path
}

/// `$KALIMA_PEERS_DIR`, else `$HOME/.cache/kalima-peers`.
pub fn peers_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KALIMA_PEERS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/kalima-peers")
}

/// Constructor arguments of `KlxBridge`.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// The ERC20 the bridge locks and releases.
    pub token: Address,
    /// The relayer set.
    pub relayers: Vec<Address>,
    /// Signatures a release needs.
    pub threshold: u64,
    /// The key allowed to pause.
    pub guardian: Address,
    /// Largest single release.
    pub per_tx_cap: U256,
    /// Largest sum released per window.
    pub window_cap: U256,
    /// Window length in seconds.
    pub window_seconds: u64,
}

/// A running anvil node, killed when dropped.
#[derive(Debug)]
pub struct TestChain {
    anvil: AnvilInstance,
    // Signs with account 0; the test-only RPC methods go through it too.
    provider: DynProvider,
}

impl TestChain {
    /// Starts anvil with `chain_id` on a free port of 127.0.0.1.
    ///
    /// # Panics
    ///
    /// When anvil is missing or does not start.
    pub fn spawn(chain_id: u64) -> Self {
        let path = anvil_path();
        let anvil = Anvil::at(&path)
            .host("127.0.0.1")
            .chain_id(chain_id)
            .try_spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e:#}; run {INSTALL_HINT}", path.display()));
        let deployer = PrivateKeySigner::from(anvil.first_key().clone());
        let provider = connect(&anvil.endpoint_url(), chain_id, deployer);
        Self { anvil, provider }
    }

    /// The HTTP JSON-RPC endpoint.
    pub fn endpoint(&self) -> Url {
        self.anvil.endpoint_url()
    }

    /// The chain id the node reports.
    pub fn chain_id(&self) -> u64 {
        self.anvil.chain_id()
    }

    /// The funded dev accounts' keys, 10 000 ETH each.
    pub fn signers(&self) -> Vec<PrivateKeySigner> {
        self.anvil.keys().iter().cloned().map(PrivateKeySigner::from).collect()
    }

    /// The `i`-th funded dev key; account 0 deploys the contracts.
    ///
    /// # Panics
    ///
    /// When `i` is not below the number of dev accounts (10 by default).
    pub fn signer(&self, i: usize) -> PrivateKeySigner {
        let key = self.anvil.nth_key(i).unwrap_or_else(|| panic!("anvil has no dev key {i}"));
        PrivateKeySigner::from(key.clone())
    }

    /// A provider that signs transactions with `signer`.
    pub fn provider_for(&self, signer: &PrivateKeySigner) -> DynProvider {
        connect(&self.endpoint(), self.chain_id(), signer.clone())
    }

    /// A provider that signs with dev account 0, the deployer.
    pub fn provider(&self) -> DynProvider {
        self.provider.clone()
    }

    /// Mines `blocks` empty blocks.
    pub async fn mine(&self, blocks: u64) -> TransportResult<()> {
        self.rpc("anvil_mine", json!([blocks])).await.map(drop)
    }

    /// Replaces the last `depth` blocks with as many empty ones; transactions in them are
    /// dropped, not returned to the pool, so the chain keeps its height but loses them.
    pub async fn reorg(&self, depth: u64) -> TransportResult<()> {
        // anvil 1.7 takes `[depth, [[tx, block offset], ...]]` (or the same as an object
        // `{depth, tx_block_pairs}`); a bare `[depth]` is refused.
        self.rpc("anvil_reorg", json!([depth, []])).await.map(drop)
    }

    /// Moves the clock forward by `secs` and mines a block so the next transaction sees it.
    pub async fn increase_time(&self, secs: u64) -> TransportResult<()> {
        self.rpc("evm_increaseTime", json!([secs])).await?;
        self.mine(1).await
    }

    /// Fixes the timestamp of the next block, for tests that need a window boundary to the
    /// second; it must be later than the latest block's.
    pub async fn set_next_block_timestamp(&self, timestamp: u64) -> TransportResult<()> {
        self.rpc("evm_setNextBlockTimestamp", json!([timestamp])).await.map(drop)
    }

    /// Overwrites one storage slot of `contract`.
    pub async fn set_storage_at(&self, contract: Address, slot: U256, value: B256) -> TransportResult<()> {
        self.rpc("anvil_setStorageAt", json!([contract, slot, value])).await.map(drop)
    }

    /// Saves the chain state; [`TestChain::revert`] returns to it.
    pub async fn snapshot(&self) -> TransportResult<U256> {
        self.provider.raw_request(Cow::Borrowed("evm_snapshot"), ()).await
    }

    /// Returns to a snapshot, which is consumed; `false` when it did not exist.
    pub async fn revert(&self, snapshot: U256) -> TransportResult<bool> {
        self.provider.raw_request(Cow::Borrowed("evm_revert"), (snapshot,)).await
    }

    /// The timestamp of the latest block.
    pub async fn latest_timestamp(&self) -> TransportResult<u64> {
        let block = self.provider.get_block_by_number(BlockNumberOrTag::Latest).await?;
        Ok(block.map(|b| b.header.timestamp).unwrap_or_default())
    }

    /// Deploys `KlxToken` from account 0, which becomes its owner.
    pub async fn deploy_token(&self) -> alloy::contract::Result<KlxTokenInstance<DynProvider>> {
        KlxToken::deploy(self.provider()).await
    }

    /// Deploys `KlxBridge` from account 0, which becomes its owner (the admin).
    pub async fn deploy_bridge(
        &self,
        config: &BridgeConfig,
    ) -> alloy::contract::Result<KlxBridgeInstance<DynProvider>> {
        KlxBridge::deploy(
            self.provider(),
            config.token,
            config.relayers.clone(),
            U256::from(config.threshold),
            config.guardian,
            config.per_tx_cap,
            config.window_cap,
            U256::from(config.window_seconds),
        )
        .await
    }

    async fn rpc(&self, method: &'static str, params: Value) -> TransportResult<Value> {
        self.provider.raw_request(Cow::Borrowed(method), params).await
    }
}

/// A provider that signs with `signer` and asks the node for the nonce on every transaction.
///
/// The default cached nonce manager reserves a nonce before gas estimation; when estimation
/// fails (every revert a test provokes) the reserved nonce is never used, the next
/// transaction waits behind the gap forever and `get_receipt` hangs.
fn connect(url: &Url, chain_id: u64, signer: PrivateKeySigner) -> DynProvider {
    ProviderBuilder::new()
        .disable_recommended_fillers()
        .with_gas_estimation()
        .with_simple_nonce_management()
        .with_chain_id(chain_id)
        .wallet(signer)
        .connect_http(url.clone())
        .erased()
}
