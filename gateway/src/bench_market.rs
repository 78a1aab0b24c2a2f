//! `kalima bench market`: the oracle marketplace under load, against a temporary node.
//! Buyers (accounts funded over a one-relayer bridge) each buy a day of a raw feed and
//! stream it over SSE while a writer commits readings to the feed's address at a fixed
//! rate. Measures readings delivered per second, commit-to-delivery latency, what each
//! buyer missed and why its stream ended, then receipts of the written readings built over
//! REST (one client, then eight) and checked in-process with `Receipt::verify`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use ed25519_dalek::SigningKey;
use futures::StreamExt;
use hdrhistogram::Histogram;
use kalima_core::ledger::market::{Period, SignedPurchase};
use kalima_core::ledger::{AccountKey, KLX};
use kalima_core::merkle::CHUNK_SIZE;
use kalima_core::receipt::Receipt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

/// Options of `kalima bench market`.
#[derive(Debug, Args)]
pub struct MarketArgs {
    /// Buyers, each with its own account, subscription and SSE stream.
    #[arg(long, default_value_t = 8)]
    pub(crate) buyers: usize,
    /// Readings written per second, in batches every 50 ms (0: batches of 1000 back to back).
    #[arg(long, default_value_t = 2000)]
    pub(crate) rate: u64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration_secs: u64,
    /// Receipts of written readings requested (and verified) after the run.
    #[arg(long, default_value_t = 500)]
    pub(crate) receipts: usize,
}

const FEED: &str = "bench-line-1";
const ADDRESS: &str = "/bench/line-1";
const PRICE: u128 = 5 * KLX;
/// The writer's batch interval when pacing.
const TICK: Duration = Duration::from_millis(50);
/// Readings per batch when writing as fast as the node commits.
const MAX_BATCH: u64 = 1000;
/// Buyers that make no progress for this long after the writer stopped are given up on.
const STALL: Duration = Duration::from_secs(10);
/// The longest wait for buyers to catch up after the writer stopped.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// Concurrent clients of the second receipt pass.
const RECEIPT_CLIENTS: usize = 8;

/// What one buyer's stream delivered.
struct Delivery {
    /// Timestamp-to-delivery latency (µs) of readings proven from the in-memory chunk.
    latency: Histogram<u64>,
    /// The same for readings whose chunk was complete when their proof was made, so the
    /// node read its leaf hashes back from the store.
    latency_stored: Histogram<u64>,
    readings: u64,
    last: Option<Instant>,
    /// Why the stream ended, when it did before the bench stopped reading it.
    end: Option<String>,
}

#[derive(Deserialize)]
struct Written {
    receipts: Vec<Ack>,
}

#[derive(Deserialize)]
struct Ack {
    id: String,
    global_sequence: u64,
}

fn wall_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The integer after the first `"field":` in `data[from..]`, and where it ends.
fn int_field(data: &[u8], from: usize, field: &[u8]) -> Option<(i64, usize)> {
    let at = from + find(data.get(from..)?, field)? + field.len();
    let len = data[at..].iter().position(|b| !b.is_ascii_digit() && *b != b'-').unwrap_or(data.len() - at);
    Some((std::str::from_utf8(&data[at..at + len]).ok()?.parse().ok()?, at + len))
}

/// The reading's global sequence, its timestamp and its proof's tree size. The first two
/// come before the reading's value, and the proof is its last field, so a value holding the
/// same names cannot be mistaken for them.
fn reading_fields(event: &[u8]) -> Option<(u64, i64, u64)> {
    let (seq, at) = int_field(event, 0, b"\"global_sequence\":")?;
    let (ts, _) = int_field(event, at, b"\"timestamp_ms\":")?;
    let proof = event.windows(9).rposition(|w| w == b"\"proof\":{")?;
    let (size, _) = int_field(event, proof, b"\"tree_size\":")?;
    Some((u64::try_from(seq).ok()?, ts, u64::try_from(size).ok()?))
}

/// Reads a feed stream until it ends or `stop` fires, looking at each event only as far
/// as the count and the latency need (its kind and the reading's `timestamp_ms`).
async fn read_stream(resp: reqwest::Response, count: Arc<AtomicU64>, mut stop: watch::Receiver<bool>) -> Delivery {
    let mut d = Delivery {
        latency: Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!()),
        latency_stored: Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!()),
        readings: 0,
        last: None,
        end: None,
    };
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    loop {
        let chunk = tokio::select! {
            c = body.next() => c,
            _ = stop.changed() => break,
        };
        let chunk = match chunk {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                d.end = Some(format!("read error: {e}"));
                break;
            }
            None => {
                d.end = Some("connection closed without an end event".into());
                break;
            }
        };
        let (now_us, now) = (wall_us(), Instant::now());
        let scan_from = buf.len().saturating_sub(1);
        buf.extend_from_slice(&chunk);
        let mut consumed = 0;
        let mut search = scan_from;
        while let Some(pos) = find(&buf[search..], b"\n\n") {
            let event = &buf[consumed..search + pos];
            if event.starts_with(b"event: reading") || event.starts_with(b"event:reading") {
                d.readings += 1;
                if let Some((seq, ts, size)) = reading_fields(event) {
                    let us = now_us.saturating_sub(ts * 1000).max(0) as u64;
                    let h = if seq < size - size % CHUNK_SIZE { &mut d.latency_stored } else { &mut d.latency };
                    let _ = h.record(us);
                }
            } else if event.starts_with(b"event: end") || event.starts_with(b"event:end") {
                let reason = find(event, b"\"reason\":\"").map(|at| {
                    let rest = &event[at + 10..];
                    String::from_utf8_lossy(&rest[..rest.iter().position(|b| *b == b'"').unwrap_or(rest.len())])
                        .into_owned()
                });
                d.end = Some(reason.unwrap_or_else(|| "end without a reason".into()));
            }
            consumed = search + pos + 2;
            search = consumed;
        }
        buf.drain(..consumed);
        if d.readings > 0 {
            d.last = Some(now);
        }
        count.store(d.readings, Ordering::Relaxed);
        if d.end.is_some() {
            break;
        }
    }
    d
}

async fn checked(r: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
    let r = r.send().await.with_context(|| what.to_string())?;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{what}: {status} {body}");
    }
    Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Runs the benchmark and prints one line per measure.
pub async fn run(a: MarketArgs) -> anyhow::Result<()> {
    if a.buyers == 0 || a.duration_secs == 0 {
        bail!("--buyers and --duration-secs must be at least 1");
    }
    let (dir, running, admin) = crate::bench::temp_node(None).await?;
    let base = format!("http://{}", running.api_addr);
    let client = reqwest::Client::builder().pool_max_idle_per_host(RECEIPT_CLIENTS * 2).tcp_nodelay(true).build()?;
    let chain = running.chain.clone();
    let chain_name = chain.config().chain.clone();

    let keys: Vec<SigningKey> = (0..a.buyers).map(|_| SigningKey::generate(&mut rand::rngs::OsRng)).collect();
    crate::bench_klx::fund_accounts(&client, &base, &admin, &chain, &keys).await?;
    let account = || AccountKey::of(&SigningKey::generate(&mut rand::rngs::OsRng)).to_hex();
    let economics = json!({
        "klx_per_eur": (1000 * KLX).to_string(), "sats_per_eur": 1000, "burn_bps": 100,
        "foundation": account(), "masters": account(), "dapp_fund": account(),
    });
    checked(client.put(format!("{base}/api/v1/market/config")).bearer_auth(&admin).json(&economics), "market config")
        .await?;
    let provider = checked(
        client.post(format!("{base}/api/v1/devices")).bearer_auth(&admin).json(&json!({ "id": "bench-provider" })),
        "registering the provider",
    )
    .await?["token"]
        .as_str()
        .context("no provider token")?
        .to_string();
    checked(
        client
            .post(format!("{base}/api/v1/devices/bench-provider/grants"))
            .bearer_auth(&admin)
            .json(&json!({ "prefix": "/bench", "read": true, "write": true })),
        "granting the provider /bench",
    )
    .await?;
    let feed = json!({
        "id": FEED, "title": "Line 1 temperature", "prefix": ADDRESS, "keys": ["temp"],
        "prices": [{ "period": "day", "currency": "klx", "amount": PRICE.to_string() }],
        "licence": "Benchmark", "payout": account(),
    });
    checked(client.post(format!("{base}/api/v1/feeds")).bearer_auth(&provider).json(&feed), "listing the feed").await?;

    // Each buyer buys a day and opens its stream before anything is written.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut counts = Vec::new();
    let mut streams = Vec::new();
    for key in &keys {
        let buyer = AccountKey::of(key).to_hex();
        let acct =
            checked(client.get(format!("{base}/api/v1/klx/accounts/{buyer}")).bearer_auth(&admin), "account").await?;
        let nonce = acct["nonce"].as_u64().context("the account answer has no nonce")? + 1;
        let token = kalima_marketplace::new_token(FEED, &buyer);
        let purchase = SignedPurchase::sign(&chain_name, key, FEED, Period::Day, 1, PRICE, &token, nonce);
        checked(
            client.post(format!("{base}/api/v1/feeds/{FEED}/purchases")).bearer_auth(&admin).json(&purchase),
            "purchase",
        )
        .await?;
        let resp = client.get(format!("{base}/api/v1/feeds/{FEED}/stream")).bearer_auth(&token).send().await?;
        if !resp.status().is_success() {
            bail!("opening a buyer's stream: {} {}", resp.status(), resp.text().await.unwrap_or_default());
        }
        let count = Arc::new(AtomicU64::new(0));
        counts.push(count.clone());
        streams.push(tokio::spawn(read_stream(resp, count, stop_rx.clone())));
    }

    // The writer: one batch request at a time, paced to --rate.
    let batch = if a.rate == 0 { MAX_BATCH } else { (a.rate * TICK.as_millis() as u64 / 1000).clamp(1, MAX_BATCH) };
    let period = (a.rate > 0).then(|| Duration::from_secs_f64(batch as f64 / a.rate as f64));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.duration_secs);
    let mut tick = period.map(|p| {
        let mut t = tokio::time::interval(p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut commit = Histogram::<u64>::new(3)?;
    let (mut written, mut errors) = (0u64, 0u64);
    let mut ids: Vec<String> = Vec::new();
    let mut first_seq = u64::MAX;
    while Instant::now() < deadline {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let txs: Vec<Value> = (written..written + batch)
            .map(|i| json!({ "address": ADDRESS, "key": "temp", "body": { "value": i % 1000, "unit": "C" } }))
            .collect();
        let t0 = Instant::now();
        let res = client
            .post(format!("{base}/api/v1/tx/batch"))
            .bearer_auth(&provider)
            .json(&json!({ "transactions": txs }))
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => match r.json::<Written>().await {
                Ok(w) => {
                    let _ = commit.record(t0.elapsed().as_micros() as u64);
                    written += w.receipts.len() as u64;
                    if first_seq == u64::MAX
                        && let Some(a) = w.receipts.first()
                    {
                        first_seq = a.global_sequence;
                    }
                    ids.extend(w.receipts.into_iter().map(|a| a.id));
                }
                Err(_) => errors += 1,
            },
            _ => errors += 1,
        }
    }
    let write_secs = started.elapsed().as_secs_f64();

    // Buyers catch up (or end); the wait stops when none progresses for a while.
    let drain_started = Instant::now();
    let mut last_total = 0u64;
    let mut last_progress = Instant::now();
    loop {
        let total: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let behind = counts
            .iter()
            .zip(&streams)
            .filter(|(c, s)| c.load(Ordering::Relaxed) < written && !s.is_finished())
            .count();
        if behind == 0 {
            break;
        }
        if total != last_total {
            last_total = total;
            last_progress = Instant::now();
        }
        if last_progress.elapsed() > STALL || drain_started.elapsed() > DRAIN_LIMIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let mut latency = Histogram::<u64>::new(3)?;
    let mut stored = Histogram::<u64>::new(3)?;
    let mut per_buyer = Vec::new();
    let mut last_delivery = started;
    for s in streams {
        let d = s.await?;
        latency.add(&d.latency)?;
        latency.add(&d.latency_stored)?;
        stored.add(&d.latency_stored)?;
        if let Some(l) = d.last {
            last_delivery = last_delivery.max(l);
        }
        per_buyer.push(d);
    }
    let delivered: u64 = per_buyer.iter().map(|d| d.readings).sum();
    let deliver_secs = last_delivery.saturating_duration_since(started).as_secs_f64().max(1e-9);
    let rates: Vec<f64> = per_buyer
        .iter()
        .map(|d| {
            let secs = d.last.map(|l| l.saturating_duration_since(started).as_secs_f64()).unwrap_or(0.0);
            if secs > 0.0 { d.readings as f64 / secs } else { 0.0 }
        })
        .collect();
    let (min_rate, max_rate) = rates.iter().fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    println!(
        "market writes: {written} readings committed in {write_secs:.1} s = {:.0} readings/s (batches of {batch}{}); batch commit p50 {:.2} ms, p99 {:.2} ms; errors {errors}",
        written as f64 / write_secs,
        period.map(|p| format!(" every {:.0} ms", p.as_secs_f64() * 1000.0)).unwrap_or_else(|| ", back to back".into()),
        ms(commit.value_at_quantile(0.5)),
        ms(commit.value_at_quantile(0.99)),
    );
    println!(
        "market delivery: {delivered} readings to {} buyers in {deliver_secs:.1} s = {:.0} readings/s in total, {min_rate:.0}-{max_rate:.0} readings/s per buyer (writer stopped at {write_secs:.1} s, last delivery {:.1} s later)",
        a.buyers,
        delivered as f64 / deliver_secs,
        (deliver_secs - write_secs).max(0.0),
    );
    let q = |h: &Histogram<u64>, x: f64| ms(h.value_at_quantile(x));
    println!(
        "market latency, reading timestamp (set when sequenced) to SSE receipt: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} readings",
        q(&latency, 0.5),
        q(&latency, 0.99),
        ms(latency.max()),
        latency.len(),
    );
    println!(
        "market proofs from the store (the reading's chunk no longer in memory): {} of {} deliveries ({:.1}%), their latency p50 {:.1} ms, p99 {:.1} ms",
        stored.len(),
        latency.len(),
        100.0 * stored.len() as f64 / latency.len().max(1) as f64,
        q(&stored, 0.5),
        q(&stored, 0.99),
    );
    // Buyers that got less than was written, grouped by why their stream ended.
    let mut short: std::collections::BTreeMap<String, (usize, u64, u64)> = Default::default();
    for d in per_buyer.iter().filter(|d| d.readings != written) {
        let why = d.end.clone().unwrap_or_else(|| "still open and behind when the bench stopped waiting".into());
        let e = short.entry(why).or_insert((0, u64::MAX, 0));
        *e = (e.0 + 1, e.1.min(d.readings), e.2.max(d.readings));
    }
    if short.is_empty() {
        println!("market loss: none, each of {} buyers got all {written} readings written", a.buyers);
    } else {
        let groups: Vec<String> = short
            .iter()
            .map(|(why, (n, lo, hi))| format!("{n} buyers got {lo}-{hi} of {written} (stream: {why})"))
            .collect();
        println!(
            "market loss: {} readings not delivered in all; {}",
            (written * a.buyers as u64).saturating_sub(delivered),
            groups.join("; ")
        );
    }

    // Streams cut by the bench end on the node at its next send; let them go before timing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    receipts(&client, &base, &admin, &ids, a.receipts).await?;
    proof_cost(&chain, first_seq).await?;
    running.stop().await?;
    drop(dir);
    Ok(())
}

/// Signs a checkpoint over everything written, then fetches receipts of `n` written
/// readings (spread over the run) with one client and with eight, and verifies them.
async fn receipts(client: &reqwest::Client, base: &str, admin: &str, ids: &[String], n: usize) -> anyhow::Result<()> {
    let n = n.min(ids.len());
    if n == 0 {
        return Ok(());
    }
    checked(client.post(format!("{base}/api/v1/checkpoints")).bearer_auth(admin), "signing a checkpoint").await?;
    let picked: Vec<String> = (0..n).map(|i| ids[i * ids.len() / n].clone()).collect();

    let mut seq = Histogram::<u64>::new(3)?;
    let mut got: Vec<Receipt> = Vec::with_capacity(picked.len());
    let mut errors = 0u64;
    let t0 = Instant::now();
    for id in &picked {
        let t = Instant::now();
        let r = client.get(format!("{base}/api/v1/tx/{id}/receipt")).bearer_auth(admin).send().await;
        let body = match r {
            Ok(r) if r.status().is_success() => r.bytes().await.ok(),
            _ => None,
        };
        let _ = seq.record(t.elapsed().as_micros() as u64);
        match body.and_then(|b| serde_json::from_slice::<Receipt>(&b).ok()) {
            Some(r) => got.push(r),
            None => errors += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "market receipts, 1 client: {} built in {secs:.2} s = {:.0} receipts/s; p50 {:.2} ms, p99 {:.2} ms; errors {errors}",
        got.len(),
        got.len() as f64 / secs,
        ms(seq.value_at_quantile(0.5)),
        ms(seq.value_at_quantile(0.99)),
    );

    let t0 = Instant::now();
    let mut workers = Vec::new();
    for w in 0..RECEIPT_CLIENTS {
        let mine: Vec<String> = picked.iter().skip(w).step_by(RECEIPT_CLIENTS).cloned().collect();
        let (client, base, admin) = (client.clone(), base.to_string(), admin.to_string());
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!());
            let (mut done, mut errors) = (0u64, 0u64);
            for id in mine {
                let t = Instant::now();
                let r = client.get(format!("{base}/api/v1/tx/{id}/receipt")).bearer_auth(&admin).send().await;
                let ok = match r {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                let _ = hist.record(t.elapsed().as_micros() as u64);
                if ok { done += 1 } else { errors += 1 }
            }
            (hist, done, errors)
        }));
    }
    let (hist, done, errors) = crate::bench::join_workers(workers).await?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "market receipts, {RECEIPT_CLIENTS} clients: {done} built in {secs:.2} s = {:.0} receipts/s; p50 {:.2} ms, p99 {:.2} ms; errors {errors}",
        done as f64 / secs,
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.99)),
    );

    let (verified, failed, secs) = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let ok = got.iter().filter(|r| r.verify().is_ok()).count();
        (ok, got.len() - ok, t0.elapsed().as_secs_f64())
    })
    .await?;
    println!(
        "market receipt verification, in-process: {verified} verified in {:.1} ms = {:.0} receipts/s; failed {failed}",
        secs * 1000.0,
        verified as f64 / secs.max(1e-9),
    );
    Ok(())
}

/// Times what the node computes for every reading it delivers to every buyer: the reading's
/// inclusion proof at the current tree size. While the reading's 256-leaf chunk is the
/// tree's in-memory tail this is hashing only; once the chunk is complete its leaf hashes
/// (and the reading's own) are read back from the store.
async fn proof_cost(chain: &kalima_core::Chain, first_written: u64) -> anyhow::Result<()> {
    const RUNS: u32 = 200;
    let size = chain.tree_size();
    let tail_start = size - size % CHUNK_SIZE;
    let newest = size.checked_sub(1).filter(|s| *s >= tail_start);
    let stored = (first_written < tail_start).then_some(first_written);
    let mut parts = Vec::new();
    for (what, seq) in [
        ("the newest transaction (its chunk in memory)", newest),
        ("the first reading written (its chunk in the store)", stored),
    ] {
        let Some(seq) = seq else { continue };
        let t0 = Instant::now();
        for _ in 0..RUNS {
            chain.inclusion_proof(seq, None).await?;
        }
        parts.push(format!("{:.0} µs for {what}", t0.elapsed().as_secs_f64() * 1e6 / f64::from(RUNS)));
    }
    println!("market inclusion proof per delivered reading, in-process, tree of {size}: {}", parts.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_fields_are_found_in_a_delivery_as_the_node_serialises_it() {
        let proof = kalima_core::merkle::InclusionProof {
            leaf_index: 300,
            tree_size: 517,
            leaf_hash: "ab".repeat(32),
            audit_path: vec!["cd".repeat(32)],
            root: "ef".repeat(32),
        };
        let reading = kalima_marketplace::Source {
            id: "01".repeat(32),
            global_sequence: 300,
            address: ADDRESS.into(),
            key: "temp".into(),
            timestamp_ms: 1_700_000_000_123,
            value: Some(json!({ "value": 7, "timestamp_ms": 1, "proof": { "tree_size": 1 } })),
            tx_bytes: "AAAA".into(),
            proof,
        };
        let d = kalima_marketplace::Delivered::Reading { feed: FEED.into(), reading };
        let event = format!("event: reading\nid: 300\ndata: {}", serde_json::to_string(&d).expect("JSON"));
        assert_eq!(reading_fields(event.as_bytes()), Some((300, 1_700_000_000_123, 517)));
        assert_eq!(reading_fields(b"event: reading\ndata: {}"), None);
    }
}
