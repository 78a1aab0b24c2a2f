//! `kalima bench cluster`: masters as separate processes on this machine (a temporary
//! `kalima dev-cluster`), batches written to the leader, then the leader killed (-9) while a
//! prober writes to the survivors, timing kill to the first commit under the new leader.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::bench::{IngestArgs, Mode, ingest};
use crate::cluster::dev::DevCluster;

/// Options of `kalima bench cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Masters to run.
    #[arg(long, default_value_t = 5)]
    masters: u64,
    /// Readings per batch request.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Send the load to a follower (forwarded to the leader) instead of the leader.
    #[arg(long)]
    via_follower: bool,
    /// Skip the failover measurement.
    #[arg(long)]
    no_failover: bool,
}

fn ports_free(base: u16, n: u16) -> bool {
    (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
}

async fn status(http: &reqwest::Client, url: &str, token: &str) -> Option<Value> {
    let r = http.get(format!("{url}/api/v1/cluster")).bearer_auth(token).timeout(Duration::from_secs(1)).send().await;
    r.ok()?.json().await.ok()
}

/// The leader all running masters agree on, once block 0 exists everywhere.
async fn wait_leader(
    http: &reqwest::Client,
    urls: &[(u64, String)],
    token: &str,
    within: Duration,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    loop {
        let mut leaders = Vec::new();
        for (_, u) in urls {
            leaders.push(status(http, u, token).await.and_then(|s| {
                (s["head_hash"].as_str() != Some(&"0".repeat(64))).then(|| s["leader"].as_u64()).flatten()
            }));
        }
        if let Some(Some(l)) = leaders.first()
            && leaders.iter().all(|x| *x == Some(*l))
            && urls.iter().any(|(id, _)| id == l)
        {
            return Ok(*l);
        }
        if started.elapsed() > within {
            bail!("no leader agreed within {within:?}: {leaders:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the cluster benchmark.
pub async fn run(a: ClusterArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let n = a.masters.max(1);
    let mut base = 20_000u16 + (std::process::id() % 20_000) as u16;
    while !(ports_free(base, n as u16) && ports_free(base + 1000, n as u16)) {
        base += 17;
    }
    let dev = DevCluster {
        dir: tmp.path().join("cluster"),
        chain: "bench".into(),
        masters: n,
        api_port: base,
        link_port: base + 1000,
    };
    let token = dev.init()?;
    let exe = std::env::current_exe().context("locating the kalima binary")?;
    let mut children = Vec::new();
    for id in 1..=n {
        let log = std::fs::File::create(dev.master_dir(id).join("node.log"))?;
        children.push(
            tokio::process::Command::new(&exe)
                .args(["up", "--dir"])
                .arg(dev.master_dir(id))
                .env("KALIMA_CHAIN__CHECKPOINT_INTERVAL_SECS", "0")
                .env("KALIMA_LOG", "warn")
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    let http = reqwest::Client::new();
    let mut urls: Vec<(u64, String)> = (1..=n).map(|id| (id, format!("http://{}", dev.api_addr(id)))).collect();
    let leader = wait_leader(&http, &urls, &token, Duration::from_secs(30)).await?;
    let target = if a.via_follower {
        urls.iter().find(|(id, _)| *id != leader)
    } else {
        urls.iter().find(|(id, _)| *id == leader)
    };
    let (target_id, target_url) = target.cloned().context("no master to send to")?;
    println!(
        "bench cluster: {n} masters (separate processes), load to master {target_id} ({}), leader {leader}",
        if target_id == leader { "the leader" } else { "a follower, forwarded" }
    );
    ingest(IngestArgs {
        url: Some(target_url),
        token: Some(token.clone()),
        storage: None,
        mode: Mode::Batch,
        batch_size: a.batch_size,
        concurrency: a.concurrency,
        duration_secs: a.duration_secs,
        rate: None,
        sse: false,
        keys: 1000,
    })
    .await?;

    let heights: Vec<Option<(u64, u64)>> = {
        let mut h = Vec::new();
        for (_, u) in &urls {
            h.push(status(&http, u, &token).await.and_then(|s| Some((s["height"].as_u64()?, s["term"].as_u64()?))));
        }
        h
    };
    println!("  (height, term) per master after the load: {heights:?}");

    if !a.no_failover && n >= 3 {
        let leader = wait_leader(&http, &urls, &token, Duration::from_secs(30)).await?;
        let survivor = urls.iter().find(|(id, _)| *id != leader).cloned().context("a survivor")?;
        let idx = usize::try_from(leader - 1)?;
        let killed = Instant::now();
        children[idx].start_kill()?;
        let mut attempts = 0u64;
        let mut last: String;
        let first_commit = loop {
            attempts += 1;
            let body = json!({ "address": "/bench/failover", "key": "probe", "body": attempts });
            let r = http
                .post(format!("{}/api/v1/tx", survivor.1))
                .bearer_auth(&token)
                .json(&body)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => break killed.elapsed(),
                Ok(r) => last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => last = e.to_string(),
            }
            if killed.elapsed() > Duration::from_secs(30) {
                let mut logs = String::new();
                for id in 1..=n {
                    let text = std::fs::read_to_string(dev.master_dir(id).join("node.log")).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(8).collect();
                    logs.push_str(&format!(
                        "--- master {id} ---\n{}\n",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    ));
                }
                bail!(
                    "no commit through master {} within 30 s of killing the leader; last answer: {last}\n{logs}",
                    survivor.0
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        urls.retain(|(id, _)| *id != leader);
        let new_leader = wait_leader(&http, &urls, &token, Duration::from_secs(10)).await.ok();
        println!(
            "  failover: kill -9 of leader {leader} to the first commit through master {}: {:.0} ms ({attempts} attempts; new leader {new_leader:?})",
            survivor.0,
            first_commit.as_secs_f64() * 1000.0
        );
    }
    for c in &mut children {
        let _ = c.start_kill();
    }
    for mut c in children {
        let _ = c.wait().await;
    }
    Ok(())
}
