//! The MQTT front door: an MQTT 3.1.1 and 5 server on `[mqtt] listen`. Devices log in with
//! their id and token, publish to `kalima/<address>/<key>`, and get PUBACK (QoS 1) or PUBREC
//! (QoS 2) only after the reading is durably committed; committed data is republished on
//! `kalima/out/<address>/<key>` to subscribers holding a read grant. Marketplace buyers log in
//! with their subscription and token and receive their feed on `kalima/feeds/<feed>/...`.

pub mod buyer;
pub mod codec;
mod connection;
pub mod external;
pub mod sparkplug;
pub mod topic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use kalima_core::Ingest;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// Interface label of MQTT writes in metrics.
pub const INTERFACE: &str = "mqtt";

/// `[mqtt]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSection {
    /// Listen address of the MQTT server; empty disables it.
    pub listen: String,
    /// Largest MQTT packet accepted, bytes.
    pub max_packet_bytes: usize,
    /// Most simultaneous client connections.
    pub max_connections: usize,
    /// Packets a connection may have waiting to be sent (unacknowledged puts included)
    /// before the node stops reading from it.
    pub max_inflight: usize,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout_secs: u64,
    /// An existing broker to take messages from.
    pub external: external::ExternalSection,
    /// Sparkplug B host application (on the external broker).
    pub sparkplug: sparkplug::SparkplugSection,
}

impl Default for MqttSection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1883".into(),
            max_packet_bytes: 64 * 1024,
            max_connections: 10_000,
            max_inflight: 4096,
            connect_timeout_secs: 10,
            external: external::ExternalSection::default(),
            sparkplug: sparkplug::SparkplugSection::default(),
        }
    }
}

impl MqttSection {
    /// Whether the server runs.
    pub fn enabled(&self) -> bool {
        !self.listen.is_empty()
    }

    /// Every problem in the section.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.enabled() && self.listen.parse::<SocketAddr>().is_err() {
            errs.push(format!("[mqtt] listen = {:?} is not an IP:port address (empty disables MQTT)", self.listen));
        }
        if self.max_packet_bytes < 1024 || self.max_packet_bytes > 16 * 1024 * 1024 {
            errs.push("[mqtt] max_packet_bytes must be 1024..=16777216".into());
        }
        if self.max_connections == 0 {
            errs.push("[mqtt] max_connections must be at least 1".into());
        }
        if self.max_inflight == 0 {
            errs.push("[mqtt] max_inflight must be at least 1".into());
        }
        if self.connect_timeout_secs == 0 {
            errs.push("[mqtt] connect_timeout_secs must be at least 1".into());
        }
        errs.extend(self.external.validate());
        if self.sparkplug.enabled {
            if !self.external.enabled() {
                errs.push("[mqtt.sparkplug] needs [mqtt.external] broker: edge nodes publish to a broker".into());
            }
            if self.sparkplug.host_id.is_empty() || self.sparkplug.host_id.contains(['/', '+', '#']) {
                errs.push("[mqtt.sparkplug] host_id must be a non-empty topic level".into());
            }
            if kalima_core::tx::validate_address(&self.sparkplug.address_prefix).is_err() {
                errs.push(format!(
                    "[mqtt.sparkplug] address_prefix = {:?} is not an address",
                    self.sparkplug.address_prefix
                ));
            }
        }
        errs
    }
}

pub(crate) fn count(outcome: &'static str) {
    metrics::counter!("kalima_mqtt_events_total", "outcome" => outcome).increment(1);
}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) ingest: Ingest,
    pub(crate) config: MqttSection,
    pub(crate) connections: AtomicUsize,
    /// Refusals, by device, for `kalima/errors/<device>` subscribers.
    pub(crate) errors: tokio::sync::broadcast::Sender<(String, Bytes)>,
    /// Marketplace buyers' logins and feeds, when the node sells feeds.
    pub(crate) feeds: Option<Arc<dyn kalima_core::feeds::FeedGate>>,
}

/// The running MQTT server.
#[derive(Debug)]
pub struct MqttServer {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MqttServer {
    /// Binds `[mqtt] listen` and serves clients.
    pub async fn start(section: &MqttSection, ingest: Ingest) -> std::io::Result<MqttServer> {
        let listener = Self::bind(section).await?;
        Self::serve(listener, section, ingest)
    }

    /// Binds `[mqtt] listen` (so a port conflict is found before anything else starts).
    pub async fn bind(section: &MqttSection) -> std::io::Result<TcpListener> {
        TcpListener::bind(&section.listen).await
    }

    /// Serves clients on an already bound listener.
    pub fn serve(listener: TcpListener, section: &MqttSection, ingest: Ingest) -> std::io::Result<MqttServer> {
        Self::serve_with_feeds(listener, section, ingest, None)
    }

    /// Serves clients, and marketplace buyers through `feeds` (see `kalima/feeds/...`).
    pub fn serve_with_feeds(
        listener: TcpListener,
        section: &MqttSection,
        ingest: Ingest,
        feeds: Option<Arc<dyn kalima_core::feeds::FeedGate>>,
    ) -> std::io::Result<MqttServer> {
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            ingest,
            config: section.clone(),
            connections: AtomicUsize::new(0),
            errors: tokio::sync::broadcast::channel(1024).0,
            feeds,
        });
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(connection::serve(stream, shared.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(target: "adapter::mqtt", error = %e, "Accept failed.");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tracing::info!(target: "adapter::mqtt", listen = %local_addr, "MQTT server listening.");
        Ok(MqttServer { local_addr, task })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting connections (open ones end with the process).
    pub fn shutdown(&self) {
        self.task.abort();
    }
}

impl Drop for MqttServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
