//! Running `kalima` as a client node (`[cluster] role = "client"`): the `[client]` section,
//! start-up (outbox, links to the masters, adapters) and the client's REST API.

pub mod api;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kalima_core::Ingest;
use kalima_core::client::{ClientConfig, ClientNode};
use kalima_core::cluster::{LINK_KEY_FILE, LinkKey, LinkTuning, parse_public};
use kalima_core::keys::{DATA_KEYS_FILE, DataKeys};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::node::{Adapters, bind_listeners};

/// `[client]`: a client node's identity on the chain and delivery tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientSection {
    /// This client's device id, registered on the masters (`POST /api/v1/devices`); its read
    /// grants are the addresses it keeps in its memcache.
    pub device: String,
    /// That device's token (prefer `KALIMA_CLIENT__TOKEN` or `token_file`).
    pub token: String,
    /// File holding the token, relative to the data directory, read when `token` is empty.
    pub token_file: String,
    /// Source IP of the links to the masters (empty: chosen by the system).
    pub bind: String,
    /// How long a local write waits for the masters' commit before it is answered as queued (ms).
    pub ack_wait_ms: u64,
    /// Most outbox entries in one delivery.
    pub delivery_max_items: usize,
    /// Delivered entries kept in the outbox before pruning.
    pub keep_delivered: u64,
}

impl Default for ClientSection {
    fn default() -> Self {
        let c = ClientConfig::default();
        Self {
            device: String::new(),
            token: String::new(),
            token_file: "client.token".into(),
            bind: String::new(),
            ack_wait_ms: c.ack_wait.as_millis() as u64,
            delivery_max_items: c.delivery_max_items,
            keep_delivered: c.keep_delivered,
        }
    }
}

impl ClientSection {
    /// Problems with this section when the node is a client, all at once.
    pub fn problems(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if let Err(e) = kalima_core::registry::validate_device_id(&self.device) {
            errs.push(format!("[client] device: {e} (the device id this client node has on the chain)"));
        }
        if !self.bind.is_empty() && self.bind.parse::<std::net::IpAddr>().is_err() {
            errs.push(format!("[client] bind = {:?} is not an IP address", self.bind));
        }
        if self.delivery_max_items == 0 {
            errs.push("[client] delivery_max_items must be at least 1".into());
        }
        errs
    }

    fn token(&self, dir: &Path) -> anyhow::Result<String> {
        if !self.token.is_empty() {
            return Ok(self.token.clone());
        }
        let path = dir.join(&self.token_file);
        let t = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} ([client] token_file); set [client] token or KALIMA_CLIENT__TOKEN to the token of device {:?}",
                path.display(),
                self.device
            )
        })?;
        Ok(t.trim().to_string())
    }
}

/// A running client node.
pub struct RunningClient {
    /// The client node.
    pub node: ClientNode,
    /// Where its API listens.
    pub api_addr: SocketAddr,
    /// The HTTP server task.
    pub server: JoinHandle<std::io::Result<()>>,
    adapters: Adapters,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl RunningClient {
    /// Stops the adapters and the API, then saves the synced values and closes the outbox
    /// (what is still in it is delivered at the next start).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.adapters.shutdown();
        let _ = self.stop.send(true);
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(10), &mut server).await.is_err() {
            server.abort();
        }
        self.node.shutdown().await;
        Ok(())
    }
}

/// Starts a client node from `dir` and `config`.
pub async fn start(dir: &Path, config: Config) -> anyhow::Result<RunningClient> {
    let config = Arc::new(config);
    let mut listeners = bind_listeners(&config).await?;
    let api_addr = listeners.api.local_addr()?;
    let keys = Arc::new(DataKeys::load(&dir.join(DATA_KEYS_FILE))?);
    let link_key = LinkKey::load_or_create(&dir.join(LINK_KEY_FILE))?;
    let section = &config.client;
    let masters = config
        .cluster
        .masters
        .iter()
        .map(|m| Ok((m.addr.clone(), parse_public(&m.link_key).map_err(anyhow::Error::msg)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let core = ClientConfig {
        chain: config.node.chain.clone(),
        device: section.device.clone(),
        token: section.token(dir)?,
        masters,
        link: LinkTuning {
            heartbeat: Duration::from_millis(config.cluster.link_heartbeat_ms),
            dead_after: Duration::from_millis(config.cluster.link_dead_after_ms),
            rekey_messages: config.cluster.rekey_messages,
            rekey_interval: Duration::from_secs(config.cluster.rekey_interval_secs),
            bind: section.bind.parse().ok(),
            ..LinkTuning::default()
        },
        ack_wait: Duration::from_millis(section.ack_wait_ms),
        delivery_max_items: section.delivery_max_items,
        keep_delivered: section.keep_delivered,
        bus_capacity: config.chain.bus_capacity,
    };
    let node = ClientNode::start(dir, link_key.clone(), keys, core).await.context("starting the client node")?;
    let ingest = Ingest::client(node.clone(), config.api.max_body_bytes);
    let adapters = Adapters::start(dir, &config, &ingest, &mut listeners, None)?;
    let stop = Arc::new(tokio::sync::watch::channel(false).0);
    let state = api::ClientApi { node: node.clone(), ingest, metrics: crate::api::metrics_handle() };
    let router = api::router(state, &config);
    let mut stopped = stop.subscribe();
    let listener = listeners.api;
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
    });
    tracing::info!(target: "node", api = %api_addr, chain = %config.node.chain, device = %section.device,
        link_key = %link_key.public_hex(), masters = config.cluster.masters.len(), "Client node started.");
    Ok(RunningClient { node, api_addr, server, adapters, stop })
}
