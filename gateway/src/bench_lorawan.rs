//! `kalima bench lorawan`: a simulated gateway sends PUSH_DATA datagrams of valid uplinks
//! (built with the `lorawan` crate from the devices' ABP keys) to a node, and the bench reports
//! uplinks decoded, verified and committed per second.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use clap::Args;
use lorawan::creator::DataPayloadCreator;
use lorawan::keys::{AppSKey, NewSKey};

use crate::config::Config;
use crate::node;

/// Options of `kalima bench lorawan`.
#[derive(Debug, Args)]
pub struct LorawanArgs {
    /// ABP devices simulated.
    #[arg(long, default_value_t = 1000)]
    devices: u32,
    /// Uplinks per PUSH_DATA datagram (a busy gateway batches several).
    #[arg(long, default_value_t = 20)]
    per_datagram: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Uplinks per second to offer (0: as fast as the node acknowledges).
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

const GATEWAY: &str = "aa555a0000000001";

fn key(i: u32, salt: u8) -> [u8; 16] {
    let mut k = [salt; 16];
    k[..4].copy_from_slice(&i.to_be_bytes());
    k
}

fn uplink(i: u32, fcnt: u32) -> anyhow::Result<Vec<u8>> {
    let mut c = DataPayloadCreator::new();
    c.set_uplink(true)
        .set_confirmed(false)
        .set_dev_addr(&(0x2600_0000u32 + i).to_le_bytes())
        .set_fcnt(fcnt)
        .set_f_port(1);
    // Cayenne LPP: temperature on channel 1, humidity on channel 2.
    let t = (200 + (fcnt % 50)) as u16;
    let payload = [1, 103, (t >> 8) as u8, t as u8, 2, 104, 100];
    let phy = c
        .build(&payload, &[], &NewSKey::from(key(i, 0x11)), &AppSKey::from(key(i, 0x22)))
        .map_err(|e| anyhow::anyhow!("building an uplink: {e:?}"))?;
    Ok(phy.to_vec())
}

/// Runs the benchmark and prints its figures.
pub async fn run(a: LorawanArgs) -> anyhow::Result<()> {
    if a.devices == 0 || a.per_datagram == 0 {
        bail!("--devices and --per-datagram must be positive");
    }
    let dir = tempfile::tempdir()?;
    node::init(dir.path(), "bench")?;
    let mut cfg = Config::load(dir.path())?;
    cfg.api.listen = "127.0.0.1:0".into();
    cfg.mqtt.listen = String::new();
    cfg.chain.checkpoint_interval_secs = 0;
    cfg.lorawan.listen = "127.0.0.1:0".into();
    cfg.lorawan.kalima_device = "admin".into();
    cfg.lorawan.gateways = vec![GATEWAY.into()];
    cfg.lorawan.dedup_window_ms = 50;
    for i in 0..a.devices {
        cfg.lorawan.devices.push(kalima_adapter_lorawan::config::DeviceConfig {
            name: format!("dev-{i}"),
            dev_eui: format!("{:016x}", 0x0004_a30b_0000_0000u64 + u64::from(i)),
            dev_addr: format!("{:08x}", 0x2600_0000u32 + i),
            nwk_skey: hex::encode(key(i, 0x11)),
            app_skey: hex::encode(key(i, 0x22)),
            address: format!("/bench/lora/dev-{i}"),
            codec: kalima_adapter_lorawan::codec::Codec::CayenneLpp,
            ..Default::default()
        });
    }
    if let Err(e) = cfg.validate() {
        bail!("{e}");
    }
    let running = node::start(dir.path(), cfg).await?;
    let target = running.lorawan_addr().context("LoRaWAN adapter not started")?;
    let chain = running.chain.clone();
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(target).await?;
    let gw = hex::decode(GATEWAY)?;
    let b64 = base64::engine::general_purpose::STANDARD;

    let start_size = chain.tree_size();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.duration_secs);
    let (mut sent, mut fcnt, mut token) = (0u64, 0u32, 0u16);
    let mut ack = [0u8; 64];
    'load: while Instant::now() < deadline {
        // One datagram per `per_datagram` devices, each device once per round.
        for i in (0..a.devices).step_by(a.per_datagram) {
            if a.rate > 0 && sent > 0 {
                let due = started + Duration::from_secs_f64(sent as f64 / a.rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            if Instant::now() >= deadline {
                break 'load;
            }
            let end = i.saturating_add(a.per_datagram as u32).min(a.devices);
            let mut rxpk = Vec::new();
            for d in i..end {
                let phy = uplink(d, fcnt)?;
                rxpk.push(serde_json::json!({
                    "tmst": 1000u32.wrapping_add(fcnt), "freq": 868.1, "chan": 0, "rfch": 0, "stat": 1,
                    "modu": "LORA", "datr": "SF7BW125", "codr": "4/5", "rssi": -60, "lsnr": 9.5,
                    "size": phy.len(), "data": b64.encode(&phy)
                }));
            }
            token = token.wrapping_add(1);
            let mut datagram = vec![2, (token >> 8) as u8, token as u8, 0];
            datagram.extend_from_slice(&gw);
            datagram.extend_from_slice(serde_json::json!({ "rxpk": rxpk }).to_string().as_bytes());
            socket.send(&datagram).await?;
            // Wait for PUSH_ACK so the load follows the node instead of overflowing the socket.
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut ack)).await;
            sent += u64::from(end - i);
        }
        fcnt += 1;
    }
    let offered_secs = started.elapsed().as_secs_f64();
    // Each uplink commits two readings (two LPP channels); wait for the tail to commit.
    let want = start_size + 2 * sent;
    let settle = Instant::now();
    while chain.tree_size() < want && settle.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let committed = (chain.tree_size() - start_size) / 2;
    println!(
        "bench lorawan: devices={} per_datagram={} rate={} duration={:.1}s",
        a.devices,
        a.per_datagram,
        if a.rate == 0 { "max".to_string() } else { a.rate.to_string() },
        offered_secs
    );
    println!(
        "  uplinks sent: {sent} ({:.0}/s), committed: {committed} ({:.0}/s until the last commit, {:.1}s)",
        sent as f64 / offered_secs,
        committed as f64 / secs,
        secs
    );
    if committed < sent {
        println!("  {} uplinks not committed (see kalima_adapter_frames_total in /metrics)", sent - committed);
    }
    running.stop().await?;
    Ok(())
}
