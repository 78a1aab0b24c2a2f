//! Configuration: one root `Config` loaded from `DIR/kalima.toml`, then overridden by
//! `KALIMA_<SECTION>__<KEY>` environment variables, then validated with every error
//! reported at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Name of the config file inside the data directory.
pub const CONFIG_FILE: &str = "kalima.toml";
/// Name of the admin token file inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The whole node configuration.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Identity of the chain.
    pub node: NodeSection,
    /// REST/OpenAPI server.
    pub api: ApiSection,
    /// Where the chain is stored.
    pub storage: StorageSection,
    /// Sequencer and checkpoint tunables.
    pub chain: ChainSection,
    /// Simulated sensors of `kalima up --demo`.
    pub demo: DemoSection,
    /// The MQTT server.
    pub mqtt: kalima_adapter_mqtt::MqttSection,
    /// Modbus TCP/RTU devices to poll.
    pub modbus: kalima_adapter_modbus::ModbusSection,
    /// LoRaWAN gateways (Semtech UDP) and devices.
    pub lorawan: kalima_adapter_lorawan::LorawanSection,
    /// Role in a multi-node chain, masters and link timing.
    pub cluster: crate::cluster::ClusterSection,
    /// A client node's device and delivery settings (`[cluster] role = "client"`).
    pub client: crate::client::ClientSection,
    /// The relayer of the Ethereum/Polygon bridge run by this node.
    pub bridge: kalima_bridge_ethereum::BridgeSection,
    /// Public chains this node anchors its checkpoints on.
    pub anchor: AnchorConfig,
    /// The oracle marketplace (webhook delivery).
    pub marketplace: kalima_marketplace::MarketplaceSection,
    /// The LND node that issues Lightning invoices for feed purchases.
    pub lightning: kalima_bridge_lightning::LightningSection,
}

/// `[anchor]`: the public chains this node anchors its checkpoints on; off while both lists
/// are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnchorConfig {
    /// `[[anchor.targets]]`: EVM chains (Ethereum, Polygon) with a `KlxAnchor` contract.
    pub targets: Vec<kalima_bridge_ethereum::AnchorTarget>,
    /// `[[anchor.tezos]]`: Tezos with the anchoring contract.
    pub tezos: Vec<kalima_bridge_tezos::TezosTarget>,
}

impl AnchorConfig {
    /// The EVM part, as the Ethereum crate reads it.
    pub fn ethereum(&self) -> kalima_bridge_ethereum::AnchorSection {
        kalima_bridge_ethereum::AnchorSection { targets: self.targets.clone() }
    }

    /// Every problem with the section, one message each; target names are unique across
    /// chains (they key the anchor records).
    pub fn validate(&self) -> Vec<String> {
        let mut errs = self.ethereum().validate();
        for t in &self.tezos {
            errs.extend(t.validate());
            if self.targets.iter().any(|e| e.name == t.name)
                || self.tezos.iter().filter(|x| x.name == t.name).count() > 1
            {
                errs.push(format!("[anchor] target name {} is used twice", t.name));
            }
        }
        errs
    }
}

/// `[node]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Chain name, signed into every checkpoint.
    pub chain: String,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self { chain: "kalima-dev".into() }
    }
}

/// `[api]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSection {
    /// Listen address of the REST server.
    pub listen: String,
    /// Largest transaction body accepted from clients, in bytes.
    pub max_body_bytes: usize,
    /// Largest HTTP request body (batches), in bytes.
    pub max_request_bytes: usize,
    /// Requests taking longer are answered 408.
    pub request_timeout_secs: u64,
    /// Keep-alive comment interval on SSE streams.
    pub stream_keepalive_secs: u64,
    /// Live streams (SSE and WebSocket) one device may hold open at once.
    pub max_streams_per_device: usize,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            max_body_bytes: kalima_core::tx::MAX_BODY,
            max_request_bytes: 32 * 1024 * 1024,
            request_timeout_secs: 30,
            stream_keepalive_secs: 15,
            max_streams_per_device: 16,
        }
    }
}

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// `sqlite://PATH` or `postgres://...`; empty means `sqlite://DIR/kalima.db`.
    pub url: String,
}

/// `[chain]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChainSection {
    /// Seconds between automatic checkpoints; 0 disables them.
    pub checkpoint_interval_secs: u64,
    /// Most transactions per group commit.
    pub max_commit_txs: usize,
    /// Commits a live subscriber may fall behind before it is dropped.
    pub bus_capacity: usize,
    /// Idempotency keys remembered in memory; older ones are checked in the store.
    pub idempotency_window: usize,
}

impl Default for ChainSection {
    fn default() -> Self {
        Self { checkpoint_interval_secs: 60, max_commit_txs: 20_000, bus_capacity: 1024, idempotency_window: 1_000_000 }
    }
}

/// `[demo]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoSection {
    /// Simulated sensors.
    pub sensors: usize,
    /// Milliseconds between readings of each sensor.
    pub interval_ms: u64,
}

impl Default for DemoSection {
    fn default() -> Self {
        Self { sensors: 4, interval_ms: 1000 }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// Loads `DIR/kalima.toml` (if present) and the environment overrides, then validates.
    pub fn load(dir: &Path) -> Result<Config, ConfigErrors> {
        let file = dir.join(CONFIG_FILE);
        let fig = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(&file))
            .merge(Env::prefixed("KALIMA_").filter(|k| k.as_str().contains("__")).split("__"));
        // One extraction per section, so a bad value in one section does not hide the others.
        let mut errs: Vec<String> = Vec::new();
        fn section<T: serde::de::DeserializeOwned + Default>(fig: &Figment, name: &str, errs: &mut Vec<String>) -> T {
            match fig.extract_inner::<T>(name) {
                Ok(v) => v,
                Err(e) => {
                    errs.extend(e.into_iter().map(|e| e.to_string()));
                    T::default()
                }
            }
        }
        const SECTIONS: [&str; 14] = [
            "node",
            "api",
            "storage",
            "chain",
            "demo",
            "mqtt",
            "modbus",
            "lorawan",
            "cluster",
            "client",
            "bridge",
            "anchor",
            "marketplace",
            "lightning",
        ];
        if let Ok(data) = figment::Provider::data(&fig) {
            for dict in data.values() {
                for k in dict.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
                    errs.push(format!("unknown section or key `{k}`"));
                }
            }
        }
        let mut cfg = Config {
            node: section(&fig, "node", &mut errs),
            api: section(&fig, "api", &mut errs),
            storage: section(&fig, "storage", &mut errs),
            chain: section(&fig, "chain", &mut errs),
            demo: section(&fig, "demo", &mut errs),
            mqtt: section(&fig, "mqtt", &mut errs),
            modbus: section(&fig, "modbus", &mut errs),
            lorawan: section(&fig, "lorawan", &mut errs),
            cluster: section(&fig, "cluster", &mut errs),
            client: section(&fig, "client", &mut errs),
            bridge: section(&fig, "bridge", &mut errs),
            anchor: section(&fig, "anchor", &mut errs),
            marketplace: section(&fig, "marketplace", &mut errs),
            lightning: section(&fig, "lightning", &mut errs),
        };
        if cfg.storage.url.is_empty() {
            cfg.storage.url = format!("sqlite://{}", dir.join("kalima.db").display());
        }
        if let Err(ConfigErrors(v)) = cfg.validate() {
            errs.extend(v);
        }
        if errs.is_empty() { Ok(cfg) } else { Err(ConfigErrors(errs)) }
    }

    /// Reports every invalid value at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errs = self.cluster.problems();
        if self.cluster.role == crate::cluster::Role::Client {
            errs.extend(self.client.problems());
        }
        if self.api.listen.parse::<SocketAddr>().is_err() {
            errs.push(format!("[api] listen = {:?} is not an IP:port address", self.api.listen));
        }
        if self.api.max_body_bytes == 0 || self.api.max_body_bytes > kalima_core::tx::MAX_BODY {
            errs.push(format!("[api] max_body_bytes must be 1..={}", kalima_core::tx::MAX_BODY));
        }
        if let Err(e) = kalima_core::store::backend_of(&self.storage.url) {
            errs.push(e.to_string());
        }
        if self.node.chain.is_empty() || self.node.chain.contains('\n') {
            errs.push("[node] chain must be a non-empty single line".into());
        }
        if self.chain.max_commit_txs == 0 {
            errs.push("[chain] max_commit_txs must be at least 1".into());
        }
        if self.chain.idempotency_window == 0 {
            errs.push("[chain] idempotency_window must be at least 1".into());
        }
        if self.chain.bus_capacity == 0 {
            errs.push("[chain] bus_capacity must be at least 1".into());
        }
        errs.extend(self.mqtt.validate());
        errs.extend(self.modbus.validate());
        errs.extend(self.lorawan.validate());
        errs.extend(self.bridge.validate());
        errs.extend(self.anchor.validate());
        errs.extend(self.marketplace.validate());
        errs.extend(self.lightning.validate());
        if self.cluster.role == crate::cluster::Role::Client && self.bridge.relayer_device.is_some() {
            errs.push("[bridge] relayer_device: a client node cannot run a relayer; run it on a master".into());
        }
        if self.api.request_timeout_secs == 0 {
            errs.push("[api] request_timeout_secs must be at least 1".into());
        }
        if errs.is_empty() { Ok(()) } else { Err(ConfigErrors(errs)) }
    }

    /// The engine settings this config describes.
    pub fn chain_config(&self) -> kalima_core::ChainConfig {
        kalima_core::ChainConfig {
            chain: self.node.chain.clone(),
            max_commit_txs: self.chain.max_commit_txs,
            queue_capacity: 4096,
            bus_capacity: self.chain.bus_capacity,
            idempotency_window: self.chain.idempotency_window,
            checkpoint_interval: (self.chain.checkpoint_interval_secs > 0)
                .then(|| std::time::Duration::from_secs(self.chain.checkpoint_interval_secs)),
        }
    }
}

/// The commented default config that `kalima init` writes.
pub fn default_toml(chain: &str) -> String {
    format!(
        r#"# Kalima node configuration. Every key can be overridden by an environment variable
# KALIMA_<SECTION>__<KEY>, e.g. KALIMA_API__LISTEN=127.0.0.1:18080.

[node]
# Chain name, signed into every checkpoint.
chain = "{chain}"

[api]
# REST/OpenAPI server (Swagger UI at /docs).
listen = "0.0.0.0:8080"
# Largest transaction body accepted from clients (bytes, at most 8192).
max_body_bytes = 8192
# Largest HTTP request (batches), bytes.
max_request_bytes = 33554432
request_timeout_secs = 30
stream_keepalive_secs = 15
# Live streams (SSE and WebSocket) one device may hold open at once.
max_streams_per_device = 16

[storage]
# sqlite://PATH (embedded, default: kalima.db in this directory) or postgres://USER:PASS@HOST/DB
url = ""

[chain]
# Seconds between automatic signed checkpoints (0 disables them).
checkpoint_interval_secs = 60
# Most transactions per durable group commit.
max_commit_txs = 20000
# Commits a live subscriber may fall behind before it is dropped.
bus_capacity = 1024
# Idempotency keys remembered in memory (older ones are checked in the store).
idempotency_window = 1000000

[demo]
# Simulated sensors started by `kalima up --demo`.
sensors = 4
interval_ms = 1000

[mqtt]
# MQTT 3.1.1/5 server: user name = device id, password = its token; publish to
# kalima/<address>/<key>; PUBACK comes after the durable commit. Empty disables it.
listen = "0.0.0.0:1883"
max_packet_bytes = 65536
max_connections = 10000
max_inflight = 4096
connect_timeout_secs = 10

[mqtt.external]
# An existing broker (Mosquitto, EMQX, HiveMQ) to take kalima/<address>/<key> messages from:
# persistent session, acknowledged only after the durable commit. Empty disables it.
broker = ""
client_id = "kalima-node"
topics = ["kalima/#"]
# Kalima device the messages are written as.
kalima_device = "mqtt-bridge"
republish = false

[mqtt.sparkplug]
# Act as a Sparkplug B host application on the external broker: NBIRTH/NDATA/DBIRTH/DDATA
# metrics are written under address_prefix/<group>/<edge node>[/<device>].
enabled = false
host_id = "kalima"
address_prefix = "/sparkplug"

# Field adapters. Modbus TCP/RTU devices are listed as [[modbus.devices]] with their
# [[modbus.devices.points]]; see adapters/modbus/README.md and adapters/modbus/example.toml.
[modbus]
kalima_device = "modbus"

# LoRaWAN: set listen (e.g. "0.0.0.0:1700") to accept Semtech UDP packet forwarders from the
# gateways listed in `gateways`; devices are [[lorawan.devices]]. See adapters/lorawan/README.md.
[lorawan]
listen = ""
kalima_device = "lorawan"
gateways = []

# Multi-node chains: role = "master" makes this node one of the masters that replicate the
# chain with Raft over Noise-encrypted links (port 7700). List every master, this one
# included, as [[cluster.masters]] with id, addr and link_key (the "public" of its link.key).
# mode = "production" refuses to start with fewer than 5 masters. See `kalima dev-cluster`.
[cluster]
role = "single"
mode = "dev"
id = 1
listen = "0.0.0.0:7700"
bootstrap = true
clients = []
"#
    )
}

/// Resolves the data directory (`--dir`, else `KALIMA_DIR`, else `./kalima-data`).
pub fn data_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("KALIMA_DIR").map(PathBuf::from)).unwrap_or_else(|| PathBuf::from("kalima-data"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_default_parses_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), default_toml("test")).unwrap();
        let cfg = Config::load(dir.path()).unwrap();
        assert_eq!(cfg.node.chain, "test");
        assert!(cfg.storage.url.starts_with("sqlite://"));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let mut cfg = Config::default();
        cfg.api.listen = "nowhere".into();
        cfg.storage.url = "mysql://x".into();
        cfg.chain.max_commit_txs = 0;
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(err.to_string().contains("[api] listen"));
    }
}
