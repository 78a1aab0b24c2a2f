//! `kalima bench klx`: holder-signed KLX transfers over REST against a temporary node, from
//! accounts funded by a one-relayer bridge; measures committed transfers/s and latency.
//! The holder's signature is checked where the transfer is ordered (the sequencer), so this
//! is the ledger's ceiling on one node.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use kalima_core::Chain;
use kalima_core::chain::Guard;
use kalima_core::keys::NodeKey;
use kalima_core::ledger::{
    AccountKey, BridgeChain, Deposit, KLX, LedgerOp, Relayer, SignedTransfer, relayer_instruction,
};
use serde_json::json;

/// Options of `kalima bench klx`.
#[derive(Debug, Args)]
pub struct KlxArgs {
    /// Concurrent clients; each owns its accounts, so nonces never collide.
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// Accounts per client (transfers go round-robin from them).
    #[arg(long, default_value_t = 4)]
    pub(crate) accounts: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration_secs: u64,
}

/// Runs the benchmark and prints one summary line.
pub async fn run(a: KlxArgs) -> anyhow::Result<()> {
    if a.concurrency == 0 || a.accounts == 0 {
        bail!("--concurrency and --accounts must be at least 1");
    }
    let (dir, running, token) = crate::bench::temp_node(None).await?;
    let base = format!("http://{}", running.api_addr);
    let client = reqwest::Client::builder().pool_max_idle_per_host(a.concurrency).tcp_nodelay(true).build()?;
    let chain = running.chain.clone();
    let chain_name = chain.config().chain.clone();

    let total = a.concurrency * a.accounts;
    let keys: Vec<SigningKey> = (0..total).map(|_| SigningKey::generate(&mut rand::rngs::OsRng)).collect();
    fund_accounts(&client, &base, &token, &chain, &keys).await?;

    let deadline = Instant::now() + Duration::from_secs(a.duration_secs);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..a.concurrency {
        let mine: Vec<SigningKey> = keys[w * a.accounts..(w + 1) * a.accounts].to_vec();
        let to = AccountKey::of(&keys[(w * a.accounts + a.accounts) % total]);
        let (client, base, token, chain_name) = (client.clone(), base.clone(), token.clone(), chain_name.clone());
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!());
            let (mut done, mut errors) = (0u64, 0u64);
            let mut nonces = vec![0u64; mine.len()];
            let mut i = 0usize;
            while Instant::now() < deadline {
                let k = i % mine.len();
                i += 1;
                let t = SignedTransfer::sign(&chain_name, &mine[k], &to, 1, nonces[k] + 1);
                let t0 = Instant::now();
                let res = client.post(format!("{base}/api/v1/klx/transfers")).bearer_auth(&token).json(&t).send().await;
                match res {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        nonces[k] += 1;
                        done += 1;
                        let _ = hist.record(t0.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
            }
            (hist, done, errors)
        }));
    }
    let (hist, done, errors) = crate::bench::join_workers(workers).await?;
    let secs = started.elapsed().as_secs_f64();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "klx transfers: {done} committed in {secs:.1} s = {:.0} transfers/s ({} clients, {} accounts); latency p50 {:.2} ms, p99 {:.2} ms; errors {errors}",
        done as f64 / secs,
        a.concurrency,
        total,
        ms(0.5),
        ms(0.99),
    );
    running.stop().await?;
    drop(dir);
    Ok(())
}

/// Funds every account of `keys` with 1,000,000 KLX through a one-relayer bridge: registers
/// the relayer device, configures the bridge, and has the relayer attest one deposit per
/// account (each its own commit).
pub(crate) async fn fund_accounts(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    chain: &Chain,
    keys: &[SigningKey],
) -> anyhow::Result<()> {
    let chain_name = chain.config().chain.clone();
    let relayer = NodeKey::generate();
    let r = client
        .post(format!("{base}/api/v1/devices"))
        .bearer_auth(token)
        .json(&json!({ "id": "bench-relayer", "public_key": relayer.public_hex() }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("registering the relayer: {}", r.text().await.unwrap_or_default());
    }
    let config = BridgeChain {
        chain_id: 31337,
        bridge: "0x00000000000000000000000000000000000000b1".into(),
        token: "0x00000000000000000000000000000000000000b2".into(),
        relayers: vec![Relayer {
            device: "bench-relayer".into(),
            eth_address: "0x00000000000000000000000000000000000000b3".into(),
        }],
        threshold: 1,
        release_ttl_secs: 3600,
        max_withdrawal: 1_000 * KLX,
    };
    let op = LedgerOp::ConfigureBridge { name: "bench".into(), config };
    chain.submit(vec![op.instruction("admin", String::new())], Some(Guard::Ledger)).await?;
    for (nonce, k) in keys.iter().enumerate() {
        let deposit = Deposit {
            nonce: nonce as u64,
            tx_hash: format!("0x{nonce:064x}"),
            log_index: 0,
            block_number: 1,
            from: "0x00000000000000000000000000000000000000b4".into(),
            recipient: AccountKey::of(k).to_hex(),
            amount: 1_000_000 * KLX,
            token: "0x00000000000000000000000000000000000000b2".into(),
        };
        let op = LedgerOp::AttestDeposit { chain: "bench".into(), deposit };
        let instr = relayer_instruction(&chain_name, &op, "bench-relayer", format!("fund-{nonce}"), &relayer);
        chain.submit(vec![instr], Some(Guard::Ledger)).await?;
    }
    Ok(())
}
