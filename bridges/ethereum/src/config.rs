//! The `[bridge]` section: which relayer this node is, and one entry per bridged chain.
//! Ethereum and Polygon are two entries of the same list.

use serde::{Deserialize, Serialize};

/// `[bridge]`: the relayer run by this node. Off unless `relayer_device` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeSection {
    /// Device id of this node's relayer (registered with the public key of `relayer_key_file`).
    pub relayer_device: Option<String>,
    /// Ed25519 key the relayer signs its chain instructions with (created if missing).
    pub relayer_key_file: String,
    /// secp256k1 key (hex) the relayer signs releases and pays gas with (created if missing).
    pub eth_key_file: String,
    /// How often the conservation check runs across every chain, in ms.
    pub reconcile_interval_ms: u64,
    /// The bridged chains.
    pub chains: Vec<ChainSettings>,
}

impl Default for BridgeSection {
    fn default() -> Self {
        Self {
            relayer_device: None,
            relayer_key_file: "relayer.key".into(),
            eth_key_file: "relayer-eth.key".into(),
            reconcile_interval_ms: 5_000,
            chains: Vec::new(),
        }
    }
}

/// One bridged chain, as this relayer reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChainSettings {
    /// Bridge name on this chain (`ethereum`, `polygon`): the name of its on-chain
    /// configuration (`PUT /api/v1/bridge/chains/{name}`).
    pub name: String,
    /// EVM chain id; checked against the RPC node and the on-chain configuration.
    pub chain_id: u64,
    /// JSON-RPC URL.
    pub rpc_url: String,
    /// `KlxBridge` address.
    pub bridge: String,
    /// KLX ERC20 address.
    pub token: String,
    /// 0: scan up to the `finalized` block; N: up to latest - N (chains without finality).
    pub confirmations: u64,
    /// Polling interval in ms.
    pub poll_interval_ms: u64,
    /// First block to scan (the bridge's deployment block).
    pub start_block: u64,
    /// Blocks scanned again below the stored cursor after a restart.
    pub rescan_blocks: u64,
    /// Most blocks per `eth_getLogs` call.
    pub max_block_range: u64,
    /// Whether this relayer sends `release` transactions (it always signs them).
    pub submit_releases: bool,
    /// Delay per rank before a relayer other than the designated one sends a release, in ms.
    pub submit_delay_ms: u64,
}

impl Default for ChainSettings {
    fn default() -> Self {
        Self {
            name: "ethereum".into(),
            chain_id: 1,
            rpc_url: "http://127.0.0.1:8545".into(),
            bridge: String::new(),
            token: String::new(),
            confirmations: 0,
            poll_interval_ms: 2_000,
            start_block: 0,
            rescan_blocks: 64,
            max_block_range: 2_000,
            submit_releases: true,
            submit_delay_ms: 15_000,
        }
    }
}

impl BridgeSection {
    /// Every problem with the section, one message each.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.relayer_device.is_none() {
            return errors;
        }
        if self.chains.is_empty() {
            errors.push("[bridge] chains: a relayer needs at least one chain".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.chains.iter().enumerate() {
            let at = format!("[bridge] chains[{i}]");
            if kalima_core::ledger::validate_bridge_name(&c.name).is_err() {
                errors.push(format!("{at}.name: {:?} must be 1..=32 of a-z, 0-9, '-'", c.name));
            }
            if !names.insert(c.name.clone()) {
                errors.push(format!("{at}.name: {} is listed twice", c.name));
            }
            if c.chain_id == 0 {
                errors.push(format!("{at}.chain_id: must be above 0"));
            }
            for (field, v) in [("bridge", &c.bridge), ("token", &c.token)] {
                if v.parse::<alloy::primitives::Address>().is_err() {
                    errors.push(format!("{at}.{field}: {v:?} is not an address (0x + 40 hex)"));
                }
            }
            if c.rpc_url.parse::<alloy::transports::http::reqwest::Url>().is_err() {
                errors.push(format!("{at}.rpc_url: {:?} is not a URL", c.rpc_url));
            }
            if c.poll_interval_ms == 0 || c.max_block_range == 0 {
                errors.push(format!("{at}: poll_interval_ms and max_block_range must be above 0"));
            }
        }
        errors
    }
}

/// `[anchor]`: where this node anchors its checkpoints. Off while `targets` is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnchorSection {
    /// Public chains to anchor on.
    pub targets: Vec<AnchorTarget>,
}

/// One public chain with a `KlxAnchor` contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnchorTarget {
    /// Name of the target (`ethereum`, `polygon`), the key of its anchor records.
    pub name: String,
    /// JSON-RPC URL.
    pub rpc_url: String,
    /// `KlxAnchor` address.
    pub contract: String,
    /// secp256k1 key (hex) allowed to anchor (created if missing; fund it).
    pub key_file: String,
    /// Blocks on top of the anchor before it is recorded.
    pub confirmations: u64,
    /// Seconds between anchors (the latest checkpoint, when it is newer than the last anchor).
    pub interval_secs: u64,
}

impl Default for AnchorTarget {
    fn default() -> Self {
        Self {
            name: "ethereum".into(),
            rpc_url: "http://127.0.0.1:8545".into(),
            contract: String::new(),
            key_file: "anchor-eth.key".into(),
            confirmations: 12,
            interval_secs: 3600,
        }
    }
}

impl AnchorSection {
    /// Every problem with the section, one message each.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = format!("[anchor] targets[{i}]");
            if kalima_core::ledger::validate_bridge_name(&t.name).is_err() {
                errors.push(format!("{at}.name: {:?} must be 1..=32 of a-z, 0-9, '-'", t.name));
            }
            if !names.insert(t.name.clone()) {
                errors.push(format!("{at}.name: {} is listed twice", t.name));
            }
            if t.contract.parse::<alloy::primitives::Address>().is_err() {
                errors.push(format!("{at}.contract: {:?} is not an address (0x + 40 hex)", t.contract));
            }
            if t.rpc_url.parse::<alloy::transports::http::reqwest::Url>().is_err() {
                errors.push(format!("{at}.rpc_url: {:?} is not a URL", t.rpc_url));
            }
            if t.interval_secs == 0 {
                errors.push(format!("{at}.interval_secs: must be above 0"));
            }
        }
        errors
    }
}
