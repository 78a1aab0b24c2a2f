//! External broker mode: the node is a client of an existing broker (Mosquitto, EMQX,
//! HiveMQ) with a persistent session and manual acknowledgements, so a message is
//! acknowledged to the broker only after it is durably committed; until then the broker
//! keeps it and redelivers it after a reconnect.

use std::time::Duration;

use kalima_core::tx::TxContent;
use kalima_core::{Error as CoreError, Ingest};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use serde::{Deserialize, Serialize};

use crate::count;
use crate::sparkplug::{self, Host, SparkplugSection};
use crate::topic;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn state_payload(online: bool) -> Vec<u8> {
    serde_json::json!({ "online": online, "timestamp": now_ms() }).to_string().into_bytes()
}

/// Interface label of writes from an external broker.
pub const INTERFACE: &str = "mqtt_external";

/// `[mqtt.external]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ExternalSection {
    /// Broker `host:port`; empty disables external mode.
    pub broker: String,
    /// Client id of the node's persistent session (the broker keeps unacknowledged messages under it).
    pub client_id: String,
    /// Broker user name, if it requires one.
    pub username: String,
    /// Broker password.
    pub password: String,
    /// Filters subscribed at QoS 1; topics must still be `kalima/<address>/<key>`.
    pub topics: Vec<String>,
    /// Kalima device the messages are written as (its grants decide where they may go).
    pub kalima_device: String,
    /// Also publish committed data of that device's readable addresses to `kalima/out/...` on the broker.
    pub republish: bool,
    /// Messages the broker may send before the node acknowledges (MQTT receive window).
    pub inflight: u16,
}

impl Default for ExternalSection {
    fn default() -> Self {
        Self {
            broker: String::new(),
            client_id: "kalima-node".into(),
            username: String::new(),
            password: String::new(),
            topics: vec!["kalima/#".into()],
            kalima_device: "mqtt-bridge".into(),
            republish: false,
            inflight: 1000,
        }
    }
}

impl ExternalSection {
    /// Whether external mode runs.
    pub fn enabled(&self) -> bool {
        !self.broker.is_empty()
    }

    /// Every problem in the section.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if !self.enabled() {
            return errs;
        }
        if self.broker.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
            errs.push(format!("[mqtt.external] broker = {:?} is not HOST:PORT", self.broker));
        }
        if self.client_id.is_empty() {
            errs.push("[mqtt.external] client_id must be set (the persistent session is kept under it)".into());
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| !topic::valid_filter(t)) {
            errs.push("[mqtt.external] topics must be valid MQTT filters, e.g. [\"kalima/#\"]".into());
        }
        if kalima_core::registry::validate_device_id(&self.kalima_device).is_err() {
            errs.push(format!("[mqtt.external] kalima_device = {:?} is not a valid device id", self.kalima_device));
        }
        if self.inflight == 0 {
            errs.push("[mqtt.external] inflight must be at least 1".into());
        }
        errs
    }
}

/// The running bridge to an external broker.
#[derive(Debug)]
pub struct ExternalBroker {
    task: tokio::task::JoinHandle<()>,
}

impl ExternalBroker {
    /// Connects to the broker and keeps the session up (reconnecting with backoff).
    pub fn start(section: &ExternalSection, sparkplug: &SparkplugSection, ingest: Ingest) -> ExternalBroker {
        let cfg = section.clone();
        let task = tokio::spawn(run(cfg, sparkplug.clone(), ingest));
        ExternalBroker { task }
    }

    /// Stops the bridge; unacknowledged messages stay with the broker.
    pub fn shutdown(&self) {
        self.task.abort();
    }
}

impl Drop for ExternalBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(cfg: ExternalSection, sp: SparkplugSection, ingest: Ingest) {
    let (host, port) = match cfg.broker.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse::<u16>().unwrap_or(1883)),
        None => (cfg.broker.clone(), 1883),
    };
    let mut opts = MqttOptions::new(cfg.client_id.clone(), host, port);
    opts.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(cfg.inflight)
        .set_max_packet_size(256 * 1024, 256 * 1024);
    if !cfg.username.is_empty() {
        opts.set_credentials(cfg.username.clone(), cfg.password.clone());
    }
    let state_topic = format!("{}/STATE/{}", sparkplug::NAMESPACE, sp.host_id);
    let mut host = sp.enabled.then(|| Host::new(&sp.address_prefix));
    if sp.enabled {
        // Sparkplug 3.0: edge nodes watch the host's STATE; the broker publishes this if we vanish.
        opts.set_last_will(rumqttc::LastWill::new(state_topic.clone(), state_payload(false), QoS::AtLeastOnce, true));
    }
    let (client, mut events) = AsyncClient::new(opts, usize::from(cfg.inflight).max(16));
    if cfg.republish {
        tokio::spawn(republish(client.clone(), ingest.clone(), cfg.kalima_device.clone()));
    }
    let mut backoff = Duration::from_millis(500);
    let mut pending: Vec<Publish> = Vec::new();
    loop {
        // Gather what the broker has sent, then commit it as one batch and acknowledge it.
        let first =
            tokio::time::timeout(Duration::from_millis(if pending.is_empty() { 3_600_000 } else { 2 }), events.poll())
                .await;
        match first {
            Err(_) => {
                commit_and_ack(&client, &ingest, &cfg.kalima_device, host.as_mut(), std::mem::take(&mut pending)).await;
            }
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                backoff = Duration::from_millis(500);
                count("external_connected");
                tracing::info!(target: "adapter::mqtt", broker = %cfg.broker, "Connected to the external broker.");
                // With a persistent session the broker remembers these; subscribing again is harmless.
                for t in &cfg.topics {
                    let _ = client.try_subscribe(t.clone(), QoS::AtLeastOnce);
                }
                if sp.enabled {
                    let _ = client.try_subscribe(format!("{}/#", sparkplug::NAMESPACE), QoS::AtLeastOnce);
                    let _ = client.try_publish(state_topic.clone(), QoS::AtLeastOnce, true, state_payload(true));
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                pending.push(p);
                if pending.len() >= usize::from(cfg.inflight) {
                    commit_and_ack(&client, &ingest, &cfg.kalima_device, host.as_mut(), std::mem::take(&mut pending))
                        .await;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                // Unacknowledged messages are redelivered by the broker after the reconnect.
                pending.clear();
                count("external_disconnected");
                tracing::warn!(target: "adapter::mqtt", broker = %cfg.broker, error = %e, retry_ms = backoff.as_millis() as u64, "External broker connection lost.");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Commits `batch` and acknowledges each message after the commit; a refused message is
/// acknowledged too (a resend would be refused again) and counted.
async fn commit_and_ack(
    client: &AsyncClient,
    ingest: &Ingest,
    who: &str,
    mut host: Option<&mut Host>,
    batch: Vec<Publish>,
) {
    if batch.is_empty() {
        return;
    }
    let device = match ingest.device(INTERFACE, who) {
        Ok(d) => d,
        Err(e) => {
            // Not acknowledged: the broker keeps them until the device is registered.
            tracing::warn!(target: "adapter::mqtt", kalima_device = %who, error = %e, "External broker messages held: register the Kalima device and grant it write access.");
            return;
        }
    };
    let mut items = Vec::new();
    let mut accepted = Vec::new();
    for p in &batch {
        let topic = p.topic.clone();
        if let Some(h) = host.as_deref_mut()
            && topic.starts_with(sparkplug::NAMESPACE)
        {
            match h.handle(&topic, &p.payload, now_ms()) {
                Ok(actions) => {
                    for a in actions {
                        match a {
                            sparkplug::Action::Write(txs) => {
                                for mut c in txs {
                                    c.device_id = device.id.clone();
                                    match ingest.check(&device, &c) {
                                        Ok(()) => items.push(c),
                                        Err(r) => kalima_core::ingest::count_rejection(INTERFACE, &r),
                                    }
                                }
                            }
                            sparkplug::Action::Rebirth { topic, payload } => {
                                count("sparkplug_rebirth_requested");
                                let _ = client.try_publish(topic, QoS::AtMostOnce, false, payload);
                            }
                        }
                    }
                }
                Err(e) => {
                    count(e.reason());
                    tracing::debug!(target: "adapter::mqtt", topic = %topic, error = %e, "Sparkplug message refused.");
                }
            }
            accepted.push(p);
            continue;
        }
        let res = topic::parse_put(&topic).map_err(kalima_core::Rejection::Malformed).and_then(|(address, key)| {
            let c = TxContent {
                device_id: device.id.clone(),
                address,
                key,
                body: p.payload.to_vec(),
                ..TxContent::default()
            };
            ingest.check(&device, &c).map(|()| c)
        });
        match res {
            Ok(c) => {
                items.push(c);
                accepted.push(p);
            }
            Err(r) => {
                kalima_core::ingest::count_rejection(INTERFACE, &r);
                tracing::debug!(target: "adapter::mqtt", topic = %topic, error = %r, "External message refused.");
                let _ = client.ack(p).await;
            }
        }
    }
    if items.is_empty() {
        for p in accepted {
            let _ = client.ack(p).await;
        }
        return;
    }
    match ingest.write(INTERFACE, &device, items).await {
        Ok(_) => {
            for p in accepted {
                let _ = client.ack(p).await;
            }
        }
        Err(CoreError::Rejected(r)) => {
            tracing::warn!(target: "adapter::mqtt", error = %r, "External batch refused; acknowledged so it is not redelivered forever.");
            for p in accepted {
                let _ = client.ack(p).await;
            }
        }
        Err(e) => {
            // Not durable: leave them unacknowledged for the broker to redeliver.
            tracing::warn!(target: "adapter::mqtt", error = %e, "External batch not committed; the broker will redeliver it.");
        }
    }
}

/// Publishes committed data readable by `who` to `kalima/out/...` on the broker.
async fn republish(client: AsyncClient, ingest: Ingest, who: String) {
    let mut sub = ingest.bus().subscribe();
    while let Ok(batch) = sub.next().await {
        let Some(device) = ingest.registry().get(&who).filter(|d| !d.record.revoked) else { continue };
        for c in batch.iter() {
            let content = &c.tx.content;
            if content.body.is_empty() || !device.can_read(&content.address) {
                continue;
            }
            let _ = client.try_publish(
                topic::out_topic(&content.address, &content.key),
                QoS::AtMostOnce,
                false,
                content.body.clone(),
            );
        }
    }
}
