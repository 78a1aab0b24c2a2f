//! `kalima verify-receipt FILE`: checks a receipt from `GET /api/v1/tx/{id}/receipt` with
//! no node running. The proofs and signatures are checked from the file alone; each anchor
//! is read back from its public chain when an RPC endpoint is given for its target.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use kalima_core::anchor::{AnchorKind, AnchorRecord};
use kalima_core::receipt::{Receipt, VerifiedReceipt};

/// Options of `kalima verify-receipt`.
#[derive(Debug, clap::Args)]
pub struct VerifyReceiptArgs {
    /// The receipt (JSON), or `-` for standard input.
    pub file: std::path::PathBuf,
    /// RPC endpoint of an anchor's public chain, as TARGET=URL (e.g.
    /// `ethereum=https://eth.example`); an anchor without one is reported as not checked.
    #[arg(long = "rpc", value_name = "TARGET=URL")]
    pub rpc: Vec<String>,
    /// A checkpoint signer's public key (hex) to trust; repeat for each master. Without any,
    /// every valid signature counts, and the output says the signers were not pinned.
    #[arg(long = "trust", value_name = "PUBLIC_KEY")]
    pub trust: Vec<String>,
    /// Trusted signatures required on the checkpoint (default: a majority of --trust keys).
    #[arg(long)]
    pub min_signers: Option<usize>,
    /// Fail unless at least one anchor was checked on its public chain.
    #[arg(long)]
    pub require_anchor: bool,
    /// Blocks required on top of an anchor on its public chain.
    #[arg(long, default_value_t = 1)]
    pub min_confirmations: u64,
}

fn read(file: &Path) -> anyhow::Result<Receipt> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the receipt from standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not a receipt", file.display()))
}

fn show_body(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(s) if !s.chars().any(char::is_control) => {
            let mut s = s.to_string();
            if s.len() > 200 {
                let cut = (0..=200).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
                s.truncate(cut);
                s.push('…');
            }
            s
        }
        _ => format!("{} bytes (binary)", body.len()),
    }
}

/// Checks one anchor on its public chain; `Ok(None)` when no endpoint was given for it.
async fn check_anchor(
    a: &AnchorRecord,
    v: &VerifiedReceipt,
    rpc: &[(String, String)],
    min_confirmations: u64,
) -> anyhow::Result<Option<String>> {
    let Some((_, url)) = rpc.iter().find(|(t, _)| *t == a.target) else { return Ok(None) };
    match a.kind {
        AnchorKind::Ethereum => {
            let found = kalima_bridge_ethereum::anchor::read_anchor(url, &a.contract, &a.tx_hash)
                .await
                .with_context(|| format!("reading {} on {url}", a.tx_hash))?
                .with_context(|| {
                    format!(
                        "{url} knows no successful transaction {} with an Anchored event of {}",
                        a.tx_hash, a.contract
                    )
                })?;
            anyhow::ensure!(
                found.chain_id.to_string() == a.network,
                "{url} is chain {}, the anchor is on chain {}",
                found.chain_id,
                a.network
            );
            anyhow::ensure!(
                (found.chain.as_str(), found.tree_size, found.root.0, found.height)
                    == (v.chain.as_str(), v.tree_size, v.root, a.height),
                "the event holds chain {} size {} root {} height {}, not the checkpoint",
                found.chain,
                found.tree_size,
                hex::encode(found.root),
                found.height
            );
            anyhow::ensure!(
                found.confirmations >= min_confirmations,
                "block {} has {} confirmations, fewer than {min_confirmations}",
                found.block_number,
                found.confirmations
            );
            Ok(Some(format!(
                "block {} ({} confirmations), anchored by {:#x}",
                found.block_number, found.confirmations, found.anchorer
            )))
        }
        AnchorKind::Tezos => {
            let found = kalima_bridge_tezos::read_anchor(url, &a.tx_hash, a.block_number)
                .await
                .with_context(|| format!("reading {} at level {} on {url}", a.tx_hash, a.block_number))?
                .with_context(|| format!("block {} on {url} holds no operation {}", a.block_number, a.tx_hash))?;
            anyhow::ensure!(
                found.network == a.network,
                "{url} is chain {}, the anchor is on {}",
                found.network,
                a.network
            );
            anyhow::ensure!(
                found.contract == a.contract,
                "the operation called {}, not {}",
                found.contract,
                a.contract
            );
            anyhow::ensure!(
                (found.chain.as_str(), found.tree_size, found.root, found.height)
                    == (v.chain.as_str(), v.tree_size, v.root, a.height),
                "the operation holds chain {} size {} root {} height {}, not the checkpoint",
                found.chain,
                found.tree_size,
                hex::encode(found.root),
                found.height
            );
            Ok(Some(format!("level {}, anchored by {}", a.block_number, found.source)))
        }
    }
}

/// Runs the check and prints the report; the exit code says whether the receipt holds.
pub async fn verify_receipt(args: VerifyReceiptArgs) -> anyhow::Result<ExitCode> {
    let receipt = read(&args.file)?;
    let mut rpc = Vec::new();
    for r in &args.rpc {
        let (t, u) = r.split_once('=').with_context(|| format!("--rpc {r}: expected TARGET=URL"))?;
        rpc.push((t.to_string(), u.to_string()));
    }
    let v = match receipt.verify() {
        Ok(v) => v,
        Err(e) => {
            println!("FAILED: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let c = &v.tx.content;
    println!("transaction {} (leaf {} of chain {})", receipt.id, v.tx.global_sequence, v.chain);
    println!("  address {} key {} by device {}", c.address, c.key, c.device_id);
    println!("  body: {}", show_body(&c.body));
    println!("  committed at {} ms since the Unix epoch", v.tx.timestamp_ms);
    println!("inclusion: ok (tree size {}, root {})", receipt.inclusion.tree_size, receipt.inclusion.root);
    println!("consistency: ok ({} -> {})", receipt.consistency.first, receipt.consistency.second);
    println!("checkpoint: size {} height {} root {}", v.tree_size, receipt.checkpoint.height, hex::encode(v.root));
    let trusted: Vec<String> = args.trust.iter().map(|k| k.to_lowercase()).collect();
    let mut failures = Vec::new();
    let counted = if trusted.is_empty() {
        println!("  {} valid signature(s), signers not pinned (pass --trust KEY for each master):", v.signers.len());
        for s in &v.signers {
            println!("    {s}");
        }
        v.signers.len()
    } else {
        let ok: Vec<&String> = v.signers.iter().filter(|s| trusted.contains(s)).collect();
        for s in &v.signers {
            println!("    {s} {}", if trusted.contains(s) { "(trusted)" } else { "(not trusted, ignored)" });
        }
        ok.len()
    };
    let needed = args.min_signers.unwrap_or(if trusted.is_empty() { 1 } else { trusted.len() / 2 + 1 });
    if counted < needed {
        failures.push(format!("{counted} trusted signature(s) on the checkpoint, {needed} required"));
    } else {
        println!("  signatures: ok ({counted} of {needed} required)");
    }
    let mut checked = 0;
    if receipt.anchors.is_empty() {
        println!("anchors: none (the checkpoint is not anchored on a public chain yet)");
    }
    for a in &receipt.anchors {
        let what =
            format!("anchor {} ({:?} {}, contract {}, tx {})", a.target, a.kind, a.network, a.contract, a.tx_hash);
        match check_anchor(a, &v, &rpc, args.min_confirmations).await {
            Ok(Some(detail)) => {
                checked += 1;
                println!("{what}: verified on the public chain, {detail}");
            }
            Ok(None) => println!("{what}: not checked (pass --rpc {}=URL)", a.target),
            Err(e) => {
                println!("{what}: FAILED: {e:#}");
                failures.push(format!("anchor {}: {e:#}", a.target));
            }
        }
    }
    if args.require_anchor && checked == 0 {
        failures.push("no anchor was checked on its public chain (--require-anchor)".into());
    }
    if failures.is_empty() {
        println!("VERIFIED");
        Ok(ExitCode::SUCCESS)
    } else {
        for f in &failures {
            println!("FAILED: {f}");
        }
        Ok(ExitCode::FAILURE)
    }
}
