//! LoRaWAN adapter: a Semtech UDP packet-forwarder endpoint for allow-listed gateways,
//! LoRaWAN 1.0.x ABP and OTAA devices, and payload codecs; uplinks heard by several gateways
//! are committed once, with their radio provenance in the transaction props.

pub mod codec;
pub mod config;
pub mod network;
pub mod semtech;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kalima_core::Ingest;
use kalima_core::tx::TxContent;
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;

pub use config::LorawanSection;

use crate::codec::Codec;
use crate::network::{Accepted, Network};
use crate::semtech::{FromGateway, Kind, Rxpk, Txpk};

/// Interface label of LoRaWAN writes in metrics.
pub const INTERFACE: &str = "lorawan";

/// The join-accept window opens this long after the join request (JOIN_ACCEPT_DELAY1).
const JOIN_ACCEPT_DELAY_US: u32 = 5_000_000;

/// RX1 opens this long after an uplink (RECEIVE_DELAY1; join accepts set RxDelay 1).
const RECEIVE_DELAY1_US: u32 = 1_000_000;

/// How long a processed uplink is remembered so late copies count as duplicates.
const SEEN_FOR: Duration = Duration::from_secs(10);

fn count(outcome: &'static str) {
    metrics::counter!("kalima_adapter_frames_total", "adapter" => INTERFACE, "outcome" => outcome).increment(1);
}

/// The running adapter.
#[derive(Debug)]
pub struct LorawanAdapter {
    local_addr: SocketAddr,
    status: Arc<parking_lot::Mutex<status::Status>>,
    task: tokio::task::JoinHandle<()>,
    committer: tokio::task::JoinHandle<()>,
}

impl LorawanAdapter {
    /// Binds `[lorawan] listen` and serves gateways; OTAA sessions persist in `sessions_path`.
    pub async fn start(
        section: &LorawanSection,
        ingest: Ingest,
        sessions_path: Option<PathBuf>,
    ) -> std::io::Result<LorawanAdapter> {
        let socket = Self::bind(section).await?;
        Self::serve(socket, section, ingest, sessions_path)
    }

    /// Binds `[lorawan] listen` (so a port conflict is found before anything else starts).
    pub async fn bind(section: &LorawanSection) -> std::io::Result<UdpSocket> {
        UdpSocket::bind(&section.listen).await
    }

    /// Serves gateways on an already bound socket.
    pub fn serve(
        socket: UdpSocket,
        section: &LorawanSection,
        ingest: Ingest,
        sessions_path: Option<PathBuf>,
    ) -> std::io::Result<LorawanAdapter> {
        let local_addr = socket.local_addr()?;
        let mut network = Network::new(section, sessions_path);
        restore_counters(section, &ingest, &mut network);
        let status = Arc::new(parking_lot::Mutex::new(status::Status {
            devices: section
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| status::DeviceStatus {
                    name: d.name.clone(),
                    dev_eui: d.dev_eui.to_ascii_lowercase(),
                    activation: match d.activation {
                        config::Activation::Abp => "abp".into(),
                        config::Activation::Otaa => "otaa".into(),
                    },
                    address: d.address.clone(),
                    joined: network.session(i).is_some(),
                    dev_addr: network.session(i).map(|s| hex::encode(s.dev_addr)),
                    uplinks: 0,
                    joins: 0,
                    last_fcnt: network.session(i).and_then(|s| s.fcnt_up),
                    fcnt_down: network.session(i).map(|s| s.fcnt_down),
                    last_seen_ms: None,
                    last_gateway: None,
                    last_rssi: None,
                    last_snr: None,
                })
                .collect(),
            gateways: section
                .gateways
                .iter()
                .map(|g| status::GatewayStatus {
                    eui: g.to_ascii_lowercase(),
                    push_data: 0,
                    last_push_ms: None,
                    last_pull_ms: None,
                    downlink_path: false,
                    tx_errors: 0,
                })
                .collect(),
        }));
        let gateways: HashSet<[u8; 8]> = section.gateways.iter().filter_map(|g| config::hex_bytes::<8>(g)).collect();
        let server = Server {
            socket: Arc::new(socket),
            section: Arc::new(section.clone()),
            ingest,
            network,
            gateways,
            pull_addrs: HashMap::new(),
            pending: HashMap::new(),
            seen: HashMap::new(),
            status: status.clone(),
        };
        let (commits, rx) = tokio::sync::mpsc::channel(COMMIT_QUEUE);
        let committer = tokio::spawn(commit_loop(server.ingest.clone(), server.socket.clone(), rx));
        let task = tokio::spawn(server.run(commits));
        tracing::info!(target: "adapter::lorawan", listen = %local_addr, devices = section.devices.len(), "LoRaWAN packet-forwarder endpoint listening.");
        Ok(LorawanAdapter { local_addr, status, task, committer })
    }

    /// What the adapter has seen of each device and gateway.
    pub fn status(&self) -> status::Status {
        self.status.lock().clone()
    }

    /// Where gateways send.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops serving.
    pub fn shutdown(&self) {
        self.task.abort();
        self.committer.abort();
    }
}

impl Drop for LorawanAdapter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Flushes waiting to be committed before new uplinks are dropped (counted as `overloaded`).
const COMMIT_QUEUE: usize = 256;

/// One flush's readings of one Kalima device.
struct CommitBatch {
    who: String,
    items: Vec<TxContent>,
    /// Downlinks acknowledging confirmed uplinks, sent once their readings are committed.
    acks: Vec<AckDownlink>,
}

/// Address of a confirmed uplink's readings, the gateway to send through, the PULL_RESP.
type AckDownlink = (String, SocketAddr, Vec<u8>);

/// Commits batches one at a time, merging whatever queued meanwhile, so a burst becomes a few
/// large group commits instead of many small ones.
async fn commit_loop(ingest: Ingest, socket: Arc<UdpSocket>, mut rx: tokio::sync::mpsc::Receiver<CommitBatch>) {
    type Acks = Vec<AckDownlink>;
    while let Some(first) = rx.recv().await {
        let mut by_who: HashMap<String, (Vec<TxContent>, Acks)> = HashMap::new();
        for b in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            let e = by_who.entry(b.who).or_default();
            e.0.extend(b.items);
            e.1.extend(b.acks);
        }
        for (who, (all, acks)) in by_who {
            let dev = match ingest.device(INTERFACE, &who) {
                Ok(d) => d,
                Err(e) => {
                    readings_outcome("rejected", all.len());
                    tracing::warn!(target: "adapter::lorawan", kalima_device = %who, error = %e, "LoRaWAN readings refused: register the Kalima device and grant it write access.");
                    continue;
                }
            };
            // A missing grant refuses only the readings it covers, not the whole batch.
            let (items, refused): (Vec<_>, Vec<_>) = all.into_iter().partition(|t| dev.can_write(&t.address));
            if let Some(t) = refused.first() {
                readings_outcome("rejected", refused.len());
                tracing::warn!(target: "adapter::lorawan", kalima_device = %who, address = %t.address, "LoRaWAN readings refused: no write grant.");
            }
            let mut all_written = true;
            for chunk in items.chunks(kalima_core::ingest::MAX_BATCH) {
                match ingest.write(INTERFACE, &dev, chunk.to_vec()).await {
                    Ok(_) => readings_outcome("written", chunk.len()),
                    Err(e) => {
                        all_written = false;
                        readings_outcome("rejected", chunk.len());
                        tracing::warn!(target: "adapter::lorawan", kalima_device = %who, error = %e, "LoRaWAN readings not committed.");
                    }
                }
            }
            // A confirmed uplink is acknowledged only once its readings are durable; without
            // the ACK the device sends it again.
            for (address, gateway, datagram) in acks {
                if all_written && dev.can_write(&address) {
                    count("ack_sent");
                    let _ = socket.send_to(&datagram, gateway).await;
                } else {
                    count("ack_withheld");
                }
            }
        }
    }
}

fn readings_outcome(outcome: &'static str, n: usize) {
    metrics::counter!("kalima_adapter_readings_total", "adapter" => INTERFACE, "outcome" => outcome)
        .increment(n as u64);
}

/// Frame counters come back from the chain: the last committed uplink of each session carries
/// its counter, so a replay after a restart is still refused.
fn restore_counters(section: &LorawanSection, ingest: &Ingest, network: &mut Network) {
    for (i, d) in section.devices.iter().enumerate() {
        let Some(s) = network.session(i) else { continue };
        let (eui, addr) = (d.dev_eui.to_ascii_lowercase(), hex::encode(s.dev_addr));
        let last = ingest
            .memcache()
            .values(&d.address)
            .iter()
            .filter(|tx| {
                let p = &tx.tx.content.props;
                p.get("lorawan_dev_eui") == Some(&eui) && p.get("lorawan_dev_addr") == Some(&addr)
            })
            .filter_map(|tx| tx.tx.content.props.get("lorawan_fcnt")?.parse::<u32>().ok())
            .max();
        if let Some(f) = last {
            let dev_addr = s.dev_addr;
            network.restore_fcnt(i, dev_addr, f);
        }
    }
}

struct Pending {
    first: Instant,
    receptions: Vec<([u8; 8], Rxpk)>,
}

struct Server {
    socket: Arc<UdpSocket>,
    section: Arc<LorawanSection>,
    ingest: Ingest,
    network: Network,
    gateways: HashSet<[u8; 8]>,
    pull_addrs: HashMap<[u8; 8], (SocketAddr, u8)>,
    pending: HashMap<Vec<u8>, Pending>,
    seen: HashMap<[u8; 16], Instant>,
    status: Arc<parking_lot::Mutex<status::Status>>,
}

fn digest(phy: &[u8]) -> [u8; 16] {
    let d = Sha256::digest(phy);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

impl Server {
    async fn run(mut self, commits: tokio::sync::mpsc::Sender<CommitBatch>) {
        let window = Duration::from_millis(self.section.dedup_window_ms);
        let mut tick = tokio::time::interval((window / 4).max(Duration::from_millis(5)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; 65_536];
        loop {
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => {
                        let datagram = buf.get(..n).unwrap_or_default().to_vec();
                        self.datagram(&datagram, from).await;
                        if window.is_zero() {
                            self.flush(Duration::ZERO, &commits);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(target: "adapter::lorawan", error = %e, "UDP receive failed.");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = tick.tick() => self.flush(window, &commits),
            }
        }
    }

    async fn datagram(&mut self, b: &[u8], from: SocketAddr) {
        let parsed = match semtech::parse(b) {
            Ok(p) => p,
            Err(e) => {
                count(e.reason());
                tracing::debug!(target: "adapter::lorawan", from = %from, error = %e, "Datagram refused.");
                return;
            }
        };
        match parsed {
            FromGateway::PushData { version, token, gateway, uplinks } => {
                if !self.gateways.contains(&gateway) {
                    // No ACK: an unknown gateway learns nothing from us.
                    count("unknown_gateway");
                    tracing::debug!(target: "adapter::lorawan", from = %from, gateway = %hex::encode(gateway), "PUSH_DATA from a gateway not in [lorawan] gateways.");
                    return;
                }
                let _ = self.socket.send_to(&semtech::ack(version, token, Kind::PushAck), from).await;
                self.gateway_status(&gateway, |g| {
                    g.push_data += 1;
                    g.last_push_ms = Some(status::now_ms());
                });
                for u in uplinks {
                    match u {
                        Err(e) => count(e.reason()),
                        Ok(u) if u.rx.stat != 1 => count("crc_not_ok"),
                        Ok(u) => {
                            if self.seen.contains_key(&digest(&u.phy)) {
                                count("duplicate");
                                continue;
                            }
                            let p = self
                                .pending
                                .entry(u.phy)
                                .or_insert_with(|| Pending { first: Instant::now(), receptions: Vec::new() });
                            if !p.receptions.is_empty() {
                                count("duplicate");
                            }
                            p.receptions.push((gateway, u.rx));
                        }
                    }
                }
            }
            FromGateway::PullData { version, token, gateway } => {
                if !self.gateways.contains(&gateway) {
                    count("unknown_gateway");
                    return;
                }
                self.pull_addrs.insert(gateway, (from, version));
                self.gateway_status(&gateway, |g| {
                    g.last_pull_ms = Some(status::now_ms());
                    g.downlink_path = true;
                });
                let _ = self.socket.send_to(&semtech::ack(version, token, Kind::PullAck), from).await;
            }
            FromGateway::TxAck { error, gateway, .. } => {
                if error == "NONE" {
                    count("tx_ack_ok");
                } else {
                    count("tx_ack_error");
                    self.gateway_status(&gateway, |g| g.tx_errors += 1);
                    tracing::debug!(target: "adapter::lorawan", gateway = %hex::encode(gateway), error = %error, "Gateway could not send a downlink.");
                }
            }
        }
    }

    /// Processes every uplink whose copies have been gathered for `window`.
    fn flush(&mut self, window: Duration, commits: &tokio::sync::mpsc::Sender<CommitBatch>) {
        let now = Instant::now();
        self.seen.retain(|_, t| now.duration_since(*t) < SEEN_FOR);
        let due: Vec<Vec<u8>> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.first) >= window)
            .map(|(k, _)| k.clone())
            .collect();
        let mut writes: HashMap<String, (Vec<TxContent>, Vec<AckDownlink>)> = HashMap::new();
        for phy in due {
            let Some(p) = self.pending.remove(&phy) else { continue };
            self.seen.insert(digest(&phy), now);
            match self.network.handle(&phy) {
                Err(e) => {
                    count(e.reason());
                    tracing::debug!(target: "adapter::lorawan", error = %e, "Uplink refused.");
                }
                Ok(Accepted::Join { device, accept }) => {
                    self.device_seen(device, None, &p.receptions, true);
                    self.send_join_accept(device, &accept, &p.receptions);
                }
                Ok(Accepted::Data { device, fcnt, fport, payload, confirmed }) => {
                    // The section is shared (`Arc`), so a device can be read while the network changes.
                    let section = self.section.clone();
                    let Some(d) = section.devices.get(device) else { continue };
                    let Some(fport) = fport.filter(|f| *f != 0) else {
                        count("mac_only");
                        continue;
                    };
                    count("accepted");
                    let who = d.kalima_device.clone().unwrap_or_else(|| self.section.kalima_device.clone());
                    if confirmed {
                        match self.ack_for(device, &p.receptions) {
                            Some((gw, datagram)) => {
                                writes.entry(who.clone()).or_default().1.push((d.address.clone(), gw, datagram))
                            }
                            None => count("no_downlink_path"),
                        }
                    }
                    self.device_seen(device, Some(fcnt), &p.receptions, false);
                    let dev_addr = self.network.session(device).map(|s| hex::encode(s.dev_addr)).unwrap_or_default();
                    let props = provenance(d, &dev_addr, fcnt, fport, &p.receptions);
                    let txs = readings(d, fport, &payload, props);
                    writes.entry(who).or_default().0.extend(txs);
                }
            }
        }
        for (who, (items, acks)) in writes {
            let n = items.len();
            if commits.try_send(CommitBatch { who, items, acks }).is_err() {
                // The chain is behind by COMMIT_QUEUE flushes: shed load rather than grow without bound.
                readings_outcome("overloaded", n);
                count("overloaded");
            }
        }
    }

    fn gateway_status(&self, eui: &[u8; 8], f: impl FnOnce(&mut status::GatewayStatus)) {
        let e = hex::encode(eui);
        if let Some(g) = self.status.lock().gateways.iter_mut().find(|g| g.eui == e) {
            f(g);
        }
    }

    fn device_seen(&self, device: usize, fcnt: Option<u32>, receptions: &[([u8; 8], Rxpk)], join: bool) {
        let session = self.network.session(device);
        let mut st = self.status.lock();
        let Some(d) = st.devices.get_mut(device) else { return };
        if join {
            d.joins += 1;
        } else {
            d.uplinks += 1;
            d.last_fcnt = fcnt;
        }
        d.joined = session.is_some();
        d.dev_addr = session.map(|s| hex::encode(s.dev_addr));
        d.fcnt_down = session.map(|s| s.fcnt_down);
        d.last_seen_ms = Some(status::now_ms());
        if let Some((gw, rx)) = receptions.iter().max_by_key(|(_, rx)| rx.rssi) {
            d.last_gateway = Some(hex::encode(gw));
            d.last_rssi = Some(rx.rssi);
            d.last_snr = rx.lsnr;
        }
    }

    /// The PULL_RESP that acknowledges a confirmed uplink in RX1, through the best gateway
    /// with a downlink path.
    fn ack_for(&mut self, device: usize, receptions: &[([u8; 8], Rxpk)]) -> Option<(SocketAddr, Vec<u8>)> {
        let ((addr, version), rx) = receptions
            .iter()
            .filter_map(|(gw, rx)| self.pull_addrs.get(gw).map(|a| (*a, rx.clone())))
            .max_by_key(|(_, rx)| rx.rssi)?;
        let phy = self.network.ack_downlink(device)?;
        let txpk = Txpk::rx1(&rx, &phy, RECEIVE_DELAY1_US, self.section.downlink_power_dbm);
        Some((addr, semtech::pull_resp(version, rand::random(), &txpk)))
    }

    fn send_join_accept(&self, device: usize, accept: &[u8], receptions: &[([u8; 8], Rxpk)]) {
        // Answer through the gateway that heard the device best and has a downlink path.
        let best = receptions
            .iter()
            .filter_map(|(gw, rx)| self.pull_addrs.get(gw).map(|a| (a, rx)))
            .max_by_key(|(_, rx)| rx.rssi);
        let Some(((addr, version), rx)) = best else {
            count("no_downlink_path");
            tracing::warn!(target: "adapter::lorawan", device = device, "Join accepted but no gateway has sent PULL_DATA; cannot answer.");
            return;
        };
        count("join");
        let txpk = Txpk::rx1(rx, accept, JOIN_ACCEPT_DELAY_US, self.section.downlink_power_dbm);
        let datagram = semtech::pull_resp(*version, rand::random(), &txpk);
        let socket = self.socket.clone();
        let addr = *addr;
        tokio::spawn(async move {
            let _ = socket.send_to(&datagram, addr).await;
        });
    }
}

fn provenance(
    d: &config::DeviceConfig,
    dev_addr: &str,
    fcnt: u32,
    fport: u8,
    receptions: &[([u8; 8], Rxpk)],
) -> std::collections::BTreeMap<String, String> {
    let mut props = std::collections::BTreeMap::new();
    props.insert("source".to_string(), "lorawan".to_string());
    props.insert("lorawan_device".to_string(), d.name.clone());
    props.insert("lorawan_dev_eui".to_string(), d.dev_eui.to_ascii_lowercase());
    props.insert("lorawan_dev_addr".to_string(), dev_addr.to_string());
    props.insert("lorawan_fcnt".to_string(), fcnt.to_string());
    props.insert("lorawan_fport".to_string(), fport.to_string());
    props.insert("lorawan_gateways".to_string(), receptions.len().to_string());
    if let Some((gw, rx)) = receptions.iter().max_by_key(|(_, rx)| rx.rssi) {
        props.insert("lorawan_gateway".to_string(), hex::encode(gw));
        props.insert("lorawan_rssi".to_string(), rx.rssi.to_string());
        if let Some(snr) = rx.lsnr {
            props.insert("lorawan_snr".to_string(), snr.to_string());
        }
        props.insert("lorawan_freq".to_string(), rx.freq.to_string());
        props.insert("lorawan_datr".to_string(), rx.data_rate());
    }
    props
}

fn body(value: &serde_json::Value, unit: Option<&serde_json::Value>) -> Vec<u8> {
    let mut m = serde_json::Map::new();
    m.insert("value".into(), value.clone());
    if let Some(u) = unit.filter(|u| u.as_str().is_some_and(|s| !s.is_empty())) {
        m.insert("unit".into(), u.clone());
    }
    serde_json::to_vec(&m).unwrap_or_default()
}

/// The transactions of one uplink: one per decoded value, or the raw payload.
fn readings(
    d: &config::DeviceConfig,
    fport: u8,
    payload: &[u8],
    mut props: std::collections::BTreeMap<String, String>,
) -> Vec<TxContent> {
    let tx = |key: String, body: Vec<u8>, props: &std::collections::BTreeMap<String, String>| TxContent {
        address: d.address.clone(),
        key,
        body,
        props: props.clone(),
        ..TxContent::default()
    };
    let raw = |props: &std::collections::BTreeMap<String, String>| {
        let b = serde_json::json!({ "fport": fport, "payload": hex::encode(payload) });
        vec![tx("payload".into(), serde_json::to_vec(&b).unwrap_or_default(), props)]
    };
    match codec::decode(&d.codec, &d.fields, fport, payload) {
        Ok(v) => match d.codec {
            Codec::Raw => raw(&props),
            Codec::CayenneLpp => v["channels"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let key = format!("{}-{}", c["type"].as_str().unwrap_or("value"), c["channel"]);
                    tx(key, body(&c["value"], c.get("unit")), &props)
                })
                .collect(),
            Codec::Fields => v["values"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(name, f)| tx(name.clone(), body(&f["value"], f.get("unit")), &props))
                .collect(),
        },
        Err(e) => {
            // Keep the data: an undecodable payload is stored raw with the reason beside it.
            count("codec_error");
            props.insert("lorawan_codec_error".into(), e.to_string());
            raw(&props)
        }
    }
}
