//! `kalima bench mqtt`: QoS 1 publishes from one pipelining client, acknowledged only after
//! the durable commit, compared in the same run with bare Mosquitto (which acknowledges from
//! memory); then publish-to-`kalima/out` delivery latency at a fixed rate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Options of `kalima bench mqtt`.
#[derive(Debug, Args)]
pub struct MqttArgs {
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Unacknowledged publishes the client keeps in flight: one throughput run per value
    /// (comma-separated), against each server. A durable commit takes milliseconds, so a
    /// window too small to cover it measures the round trip rather than the server.
    #[arg(long, value_delimiter = ',', default_values_t = [1000u16, 10_000])]
    inflight: Vec<u16>,
    /// Messages per second of the latency run.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Skip the Mosquitto baseline (when `mosquitto` is not installed).
    #[arg(long)]
    no_mosquitto: bool,
    /// Start each run (the latency run included) while the node still checkpoints the
    /// previous run's WAL.
    #[arg(long)]
    after_burst: bool,
}

/// Acknowledged publishes per second from one client keeping `inflight` publishes unacknowledged.
async fn throughput(
    port: u16,
    login: Option<(&str, &str)>,
    topic: &str,
    inflight: u16,
    a: &MqttArgs,
) -> anyhow::Result<f64> {
    let mut opts = MqttOptions::new(format!("bench-{}", rand::random::<u32>()), "127.0.0.1", port);
    opts.set_inflight(inflight).set_keep_alive(Duration::from_secs(30)).set_request_channel_capacity(10_000);
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (client, mut events) = AsyncClient::new(opts, 10_000);
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acks = acked.clone();
    let poller = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => return Err::<(), _>(anyhow::anyhow!("MQTT connection: {e}")),
            }
        }
    });
    let payload = br#"{"value":21.5,"unit":"C"}"#.to_vec();
    let topics: Vec<String> = (0..1000).map(|k| format!("{topic}/k{k}")).collect();
    let deadline = Instant::now() + Duration::from_secs(a.duration_secs);
    // Warm-up, then measure acknowledgements over the window.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start_acks = acked.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    for topic in topics.iter().cycle() {
        if Instant::now() >= deadline || poller.is_finished() {
            break;
        }
        // A full request queue (10,000 publishes ahead of the window) is topped up every
        // millisecond rather than one publish per wake-up: the generator then costs little
        // of the CPU the server it measures runs on.
        if client.try_publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone()).is_err() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let n = acked.load(std::sync::atomic::Ordering::Relaxed) - start_acks;
    let _ = client.disconnect().await;
    poller.abort();
    if n == 0 {
        bail!("no PUBACK from 127.0.0.1:{port}");
    }
    Ok(n as f64 / secs)
}

/// One window's figures on the node.
struct KalimaRun {
    inflight: u16,
    rate: f64,
    /// Transactions the lookup indexes were behind at the end, and seconds to catch up.
    lag: usize,
    drained: f64,
    /// Seconds to checkpoint the run's WAL afterwards.
    settled: f64,
}

/// Runs the benchmark and prints its figures.
pub async fn run(a: MqttArgs) -> anyhow::Result<()> {
    if a.inflight.is_empty() || a.inflight.contains(&0) {
        bail!("--inflight needs one or more windows of at least 1");
    }
    let mut mosquitto_rates = Vec::new();
    if !a.no_mosquitto {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let mut m = tokio::process::Command::new("mosquitto")
            .args(["-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting mosquitto (apt install mosquitto, or pass --no-mosquitto)")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        for &w in &a.inflight {
            mosquitto_rates.push(throughput(port, None, "bench/m", w, &a).await?);
        }
        let _ = m.kill().await;
    }

    // The directory lives until the end: the node's files are in it.
    let (_dir, running, token) = crate::bench::temp_node(None).await?;
    let port = running.mqtt_addr().context("MQTT server not started")?.port();
    let store = running.chain.store().clone();
    let mut runs = Vec::new();
    for &inflight in &a.inflight {
        let rate = throughput(port, Some(("admin", &token)), "kalima/bench/mqtt", inflight, &a).await?;
        // Lookup indexes are written behind the chain: how far behind the run left them, and
        // the rate at which a longer run would settle once they must keep up.
        let lag = store.index_lag();
        let drain = Instant::now();
        store.flush_index().await;
        let drained = drain.elapsed().as_secs_f64();
        // The next run (and the latency run) starts from a settled node, not one digesting the
        // burst above: its WAL (hundreds of MB) is copied into the database first.
        let settle = Instant::now();
        if !a.after_burst {
            store.checkpoint_wal().await?;
        }
        let settled = settle.elapsed().as_secs_f64();
        runs.push(KalimaRun { inflight, rate, lag, drained, settled });
    }
    let latency_window = a.inflight[0];

    // Delivery latency: a subscriber on kalima/out sees each publish, paced at --rate.
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let mut sub_opts = MqttOptions::new("bench-sub", "127.0.0.1", port);
    sub_opts.set_credentials("admin", &token).set_keep_alive(Duration::from_secs(30));
    let (sub, mut sub_events) = AsyncClient::new(sub_opts, 100);
    sub.subscribe("kalima/out/bench/lat/#", QoS::AtMostOnce).await?;
    let (s2, h2) = (sent.clone(), hist.clone());
    let sub_task = tokio::spawn(async move {
        while let Ok(ev) = sub_events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let id = String::from_utf8_lossy(&p.payload).to_string();
                if let Some(t) = s2.lock().remove(&id) {
                    let _ = h2.lock().record(t.elapsed().as_micros() as u64);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut opts = MqttOptions::new("bench-lat", "127.0.0.1", port);
    opts.set_credentials("admin", &token).set_inflight(latency_window).set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 10_000);
    let poller = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let started = Instant::now();
    let total = a.rate * a.duration_secs.min(5);
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / a.rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let id = format!("m{i}");
        sent.lock().insert(id.clone(), Instant::now());
        client.publish(format!("kalima/bench/lat/k{}", i % 100), QoS::AtLeastOnce, false, id.into_bytes()).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let h = hist.lock().clone();
    let missing = sent.lock().len();
    sub_task.abort();
    poller.abort();

    println!("bench mqtt: QoS 1, one client, {} s per run", a.duration_secs);
    for (i, r) in runs.iter().enumerate() {
        let mosquitto = mosquitto_rates.get(i).copied();
        match mosquitto {
            Some(m) => println!(
                "  {} in flight: mosquitto (acks from memory) {m:.0} msg/s; kalima (acks after durable commit) {:.0} msg/s; ratio {:.2}",
                r.inflight,
                r.rate,
                r.rate / m
            ),
            None => println!("  {} in flight: kalima (acks after durable commit) {:.0} msg/s", r.inflight, r.rate),
        }
        let sustained = r.rate * a.duration_secs as f64 / (a.duration_secs as f64 + r.drained);
        println!(
            "    lookup indexes {} transactions behind at the end, written {:.2} s later: \
             {sustained:.0} msg/s with the indexes caught up{}",
            r.lag,
            r.drained,
            mosquitto.map(|m| format!(" (ratio {:.2})", sustained / m)).unwrap_or_default()
        );
        if !a.after_burst {
            println!("    WAL of the run checkpointed in {:.2} s before the next run (--after-burst: not)", r.settled);
        }
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "  publish -> kalima/out delivery at {} msg/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} delivered, {missing} not seen)",
        a.rate,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        h.len()
    );
    running.stop().await?;
    Ok(())
}
