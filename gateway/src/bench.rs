//! `kalima bench ingest`: drives a node through its real front door (HTTP keep-alive, the
//! same routes clients use) and reports committed readings/s and commit latency
//! percentiles, optionally the delay until an SSE subscriber sees each write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::json;

use crate::config::Config;
use crate::node;

/// What to benchmark.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Write readings over REST and measure throughput and commit latency.
    Ingest(IngestArgs),
    /// Poll simulated Modbus TCP devices and measure points/s and the node's CPU use.
    Modbus(crate::bench_modbus::ModbusArgs),
    /// QoS 1 MQTT throughput against bare Mosquitto, and publish-to-delivery latency.
    Mqtt(crate::bench_mqtt::MqttArgs),
    /// Send LoRaWAN uplinks through the Semtech UDP endpoint and measure committed uplinks/s.
    Lorawan(crate::bench_lorawan::LorawanArgs),
    /// Masters on this machine: committed transactions/s, commit latency, leader failover.
    Cluster(crate::bench_cluster::ClusterArgs),
    /// Holder-signed KLX transfers over REST: committed transfers/s and latency.
    Klx(crate::bench_klx::KlxArgs),
    /// Oracle marketplace: feed readings delivered over SSE to buyers, latency, receipts/s.
    Market(crate::bench_market::MarketArgs),
    /// The simulated Modbus devices of `bench modbus` (run in their own process).
    #[command(hide = true)]
    ModbusSim(crate::bench_modbus::SimArgs),
}

/// Single writes or batches.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Mode {
    /// `POST /api/v1/tx`, one reading per request.
    Single,
    /// `POST /api/v1/tx/batch`, `--batch-size` readings per request.
    Batch,
}

/// Options of `kalima bench ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Node to drive (default: start one in a temporary directory).
    #[arg(long)]
    pub(crate) url: Option<String>,
    /// Token with a write grant on /bench (default: the temporary node's admin token).
    #[arg(long)]
    pub(crate) token: Option<String>,
    /// Storage URL of the temporary node (default: SQLite in the temporary directory).
    #[arg(long)]
    pub(crate) storage: Option<String>,
    /// Request shape.
    #[arg(long, value_enum, default_value = "batch")]
    pub(crate) mode: Mode,
    /// Readings per batch request.
    #[arg(long, default_value_t = 1000)]
    pub(crate) batch_size: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration_secs: u64,
    /// Total requests per second to pace to (default: as fast as possible).
    #[arg(long)]
    pub(crate) rate: Option<u64>,
    /// Also subscribe over SSE and measure commit-to-delivery delay.
    #[arg(long)]
    pub(crate) sse: bool,
    /// Distinct keys written (readings cycle over them).
    #[arg(long, default_value_t = 1000)]
    pub(crate) keys: usize,
}

/// Runs a benchmark.
pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Ingest(a) => ingest(a).await,
        BenchCommand::Modbus(a) => crate::bench_modbus::run(a).await,
        BenchCommand::Lorawan(a) => crate::bench_lorawan::run(a).await,
        BenchCommand::Mqtt(a) => crate::bench_mqtt::run(a).await,
        BenchCommand::Cluster(a) => crate::bench_cluster::run(a).await,
        BenchCommand::Klx(a) => crate::bench_klx::run(a).await,
        BenchCommand::Market(a) => crate::bench_market::run(a).await,
        BenchCommand::ModbusSim(a) => crate::bench_modbus::serve(a).await,
    }
}

/// What a load worker measured: latencies (µs), completed operations, errors.
pub(crate) type WorkerResult = (Histogram<u64>, u64, u64);

/// Waits for every load worker and adds up what they measured.
pub(crate) async fn join_workers(workers: Vec<tokio::task::JoinHandle<WorkerResult>>) -> anyhow::Result<WorkerResult> {
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut done, mut errors) = (0u64, 0u64);
    for w in workers {
        let (h, d, e) = w.await?;
        hist.add(h)?;
        done += d;
        errors += e;
    }
    Ok((hist, done, errors))
}

/// A node in a temporary directory on free ports, with no periodic checkpoints (they would
/// add commits to what is measured); `storage` overrides its SQLite default. Returns the
/// directory (the node's files live as long as it does), the node and its admin token.
pub(crate) async fn temp_node(storage: Option<&str>) -> anyhow::Result<(tempfile::TempDir, node::Running, String)> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    node::init(dir.path(), "bench")?;
    let mut cfg = Config::load(dir.path())?;
    cfg.api.listen = "127.0.0.1:0".into();
    cfg.mqtt.listen = "127.0.0.1:0".into();
    cfg.chain.checkpoint_interval_secs = 0;
    if let Some(s) = storage {
        cfg.storage.url = s.to_string();
    }
    let running = node::start(dir.path(), cfg).await?;
    let token = node::read_admin_token(dir.path())?;
    Ok((dir, running, token))
}

fn reading(worker: usize, i: u64, keys: usize) -> serde_json::Value {
    let k = (i as usize + worker * 7919) % keys.max(1);
    json!({ "address": format!("/bench/line-{}", k % 16), "key": format!("sensor-{k}"), "body": { "value": i % 1000, "unit": "C" } })
}

pub(crate) async fn ingest(a: IngestArgs) -> anyhow::Result<()> {
    let mut tmp = None;
    let mut running = None;
    let (base, token) = match &a.url {
        Some(u) => (u.trim_end_matches('/').to_string(), a.token.clone().context("--token is required with --url")?),
        None => {
            let (dir, r, token) = temp_node(a.storage.as_deref()).await?;
            let base = format!("http://{}", r.api_addr);
            running = Some(r);
            tmp = Some(dir);
            (base, token)
        }
    };
    let client = reqwest::Client::builder().pool_max_idle_per_host(a.concurrency).tcp_nodelay(true).build()?;
    let acks: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();

    let sse_task = if a.sse {
        let resp = client.get(format!("{base}/api/v1/stream?address=/bench")).bearer_auth(&token).send().await?;
        if !resp.status().is_success() {
            bail!("SSE subscribe failed: {}", resp.status());
        }
        let seen = seen.clone();
        Some(tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                let now = Instant::now();
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(pos) = buf.find("\n\n") {
                    let ev: String = buf.drain(..pos + 2).collect();
                    let v = ev
                        .lines()
                        .find_map(|l| l.strip_prefix("data:"))
                        .and_then(|d| serde_json::from_str::<serde_json::Value>(d.trim()).ok());
                    if let Some(id) = v.as_ref().and_then(|v| v.get("id")).and_then(|x| x.as_str()) {
                        seen.lock().insert(id.to_string(), now);
                    }
                }
            }
        }))
    } else {
        None
    };

    let deadline = Instant::now() + Duration::from_secs(a.duration_secs);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..a.concurrency {
        let client = client.clone();
        let base = base.clone();
        let token = token.clone();
        let acks = acks.clone();
        let (mode, batch, keys, sse) = (a.mode, a.batch_size.max(1), a.keys, a.sse);
        let period = a.rate.map(|r| Duration::from_secs_f64(a.concurrency as f64 / r.max(1) as f64));
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!());
            let (mut readings, mut errors) = (0u64, 0u64);
            let mut i = 0u64;
            let mut tick = period.map(|p| {
                let mut t = tokio::time::interval(p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            while Instant::now() < deadline {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let (url, body, n) = match mode {
                    Mode::Single => (format!("{base}/api/v1/tx"), reading(w, i, keys), 1),
                    Mode::Batch => {
                        let txs: Vec<_> = (0..batch as u64).map(|j| reading(w, i + j, keys)).collect();
                        (format!("{base}/api/v1/tx/batch"), json!({ "transactions": txs }), batch as u64)
                    }
                };
                i += n;
                let t0 = Instant::now();
                let res = client.post(url).bearer_auth(&token).json(&body).send().await;
                let ok = match res {
                    Ok(r) if r.status().is_success() => {
                        let done = Instant::now();
                        if sse {
                            if let Ok(v) = r.json::<serde_json::Value>().await {
                                let mut acks = acks.lock();
                                let list = v
                                    .get("receipts")
                                    .and_then(|x| x.as_array())
                                    .cloned()
                                    .unwrap_or_else(|| vec![v.clone()]);
                                for r in list {
                                    if let Some(id) = r.get("id").and_then(|x| x.as_str()) {
                                        acks.insert(id.to_string(), done);
                                    }
                                }
                            }
                        } else {
                            let _ = r.bytes().await;
                        }
                        true
                    }
                    _ => false,
                };
                let _ = hist.record(t0.elapsed().as_micros() as u64);
                if ok {
                    readings += n;
                } else {
                    errors += 1;
                }
            }
            (hist, readings, errors)
        }));
    }
    let (hist, readings, errors) = join_workers(workers).await?;
    let secs = started.elapsed().as_secs_f64();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "bench ingest: mode={:?} batch={} concurrency={} rate={} duration={:.1}s",
        a.mode,
        if matches!(a.mode, Mode::Batch) { a.batch_size } else { 1 },
        a.concurrency,
        a.rate.map(|r| r.to_string()).unwrap_or_else(|| "max".into()),
        secs
    );
    println!(
        "  committed readings: {readings} ({:.0} readings/s), requests: {} ({:.0}/s), errors: {errors}",
        readings as f64 / secs,
        hist.len(),
        hist.len() as f64 / secs
    );
    println!(
        "  commit latency per request: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        hist.max() as f64 / 1000.0
    );
    if let Some(t) = sse_task {
        tokio::time::sleep(Duration::from_millis(500)).await;
        t.abort();
        let acks = acks.lock();
        let seen = seen.lock();
        let mut h = Histogram::<u64>::new(3)?;
        for (id, ack) in acks.iter() {
            if let Some(s) = seen.get(id) {
                let _ = h.record(s.saturating_duration_since(*ack).as_micros() as u64);
            }
        }
        let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
        println!(
            "  SSE delivery after the writer's ack: {} of {} seen, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            h.len(),
            acks.len(),
            q(0.5),
            q(0.99),
            h.max() as f64 / 1000.0
        );
    }
    if let Some(r) = running {
        r.stop().await?;
    }
    drop(tmp);
    Ok(())
}
