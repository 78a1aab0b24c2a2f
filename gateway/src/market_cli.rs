//! `kalima market ...`: a buyer's side of the oracle marketplace from the command line. The
//! purchase is signed with a local account key, and the access token is made here and kept
//! in a file: the node only ever sees its hash.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use kalima_core::ledger::AccountKey;
use kalima_core::ledger::market::{Period, SignedPurchase};
use serde_json::Value;

use crate::klx_cli::{NodeArgs, NodeClient, load_key_file, print_json};

/// `kalima market ...`.
#[derive(Debug, Subcommand)]
pub enum MarketCommand {
    /// Buy (or renew) periods of a feed in KLX, signed with a local account key; writes the
    /// new access token to a file (mode 0600) and prints how to stream the feed.
    Buy {
        /// Paying account's key file (`kalima klx keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Feed id.
        #[arg(long)]
        feed: String,
        /// Period bought: hour, day or month.
        #[arg(long, value_parser = parse_period)]
        period: Period,
        /// Number of periods (1..=24).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Where to write the access token (default: ./<feed>.token).
        #[arg(long)]
        token_out: Option<PathBuf>,
        #[command(flatten)]
        node: NodeArgs,
        /// Chain name the signature is bound to (default: read from the node).
        #[arg(long)]
        chain: Option<String>,
    },
    /// Ask for a Lightning invoice for periods of a feed: makes the access token here (written
    /// to a 0600 file; only its hash is sent) and prints the BOLT11 request to pay.
    Invoice {
        /// Feed id.
        #[arg(long)]
        feed: String,
        /// Period bought: hour, day or month.
        #[arg(long, value_parser = parse_period)]
        period: Period,
        /// Number of periods (1..=24).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Your buyer id (1..=64 of a-z, 0-9, '-', '_'); your subscription is this id's.
        #[arg(long)]
        buyer: String,
        /// To renew a running subscription: the file holding its current access token.
        #[arg(long)]
        renew: Option<PathBuf>,
        /// Where to write the new access token (default: ./<feed>.token).
        #[arg(long)]
        token_out: Option<PathBuf>,
        #[command(flatten)]
        node: NodeArgs,
    },
}

fn parse_period(s: &str) -> Result<Period, String> {
    match s {
        "hour" => Ok(Period::Hour),
        "day" => Ok(Period::Day),
        "month" => Ok(Period::Month),
        other => Err(format!("{other:?} is not a period (hour, day, month)")),
    }
}

fn write_secret(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(format!("{text}\n").as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Runs a `kalima market` command.
pub async fn run_market(cmd: MarketCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        MarketCommand::Buy { key, feed, period, count, token_out, node, chain } => {
            let key = load_key_file(&key)?;
            let buyer = AccountKey::of(&key);
            let client = NodeClient::new(&node)?;
            let view = client.get(&format!("/api/v1/feeds/{feed}")).await?;
            let period_name = serde_json::to_value(period)?.as_str().unwrap_or_default().to_string();
            let price = view
                .get("prices")
                .and_then(Value::as_array)
                .and_then(|ps| {
                    ps.iter().find(|p| {
                        p.get("period").and_then(Value::as_str) == Some(period_name.as_str())
                            && p.get("currency").and_then(Value::as_str) == Some("klx")
                    })
                })
                .and_then(|p| p.get("amount")?.as_str()?.parse::<u128>().ok())
                .with_context(|| format!("feed {feed} has no KLX price per {period_name}"))?;
            let amount = price.checked_mul(u128::from(count)).context("the price overflows")?;
            let chain = client.chain_name(chain, &buyer).await?;
            let nonce = client.next_nonce(&buyer).await?;
            let token = kalima_marketplace::new_token(&feed, &buyer.to_hex());
            let path = token_out.unwrap_or_else(|| PathBuf::from(format!("{feed}.token")));
            // Written before the purchase: a purchase whose token was lost would pay for
            // access nobody can use.
            write_secret(&path, &token)?;
            let purchase = SignedPurchase::sign(&chain, &key, &feed, period, count, amount, &token, nonce);
            let answer = client.post(&format!("/api/v1/feeds/{feed}/purchases"), &purchase).await?;
            print_json(&answer)?;
            eprintln!("Access token written to {} (keep it secret).", path.display());
            eprintln!(
                "Stream it: curl -N -H \"Authorization: Bearer $(cat {})\" {}/api/v1/feeds/{feed}/stream",
                path.display(),
                client.base
            );
        }
        MarketCommand::Invoice { feed, period, count, buyer, renew, token_out, node } => {
            let client = NodeClient::new(&node)?;
            let current = match renew {
                Some(f) => Some(
                    std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?.trim().to_string(),
                ),
                None => None,
            };
            let lightning_buyer = format!("{}{buyer}", kalima_core::ledger::market::LIGHTNING_BUYER_PREFIX);
            let token = kalima_marketplace::new_token(&feed, &lightning_buyer);
            let path = token_out.unwrap_or_else(|| PathBuf::from(format!("{feed}.token")));
            let token_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
            let body = serde_json::json!({
                "period": period, "count": count, "buyer": buyer, "token_hash": token_hash, "current_token": current,
            });
            let answer = client.post(&format!("/api/v1/feeds/{feed}/invoices"), &body).await?;
            // Written only once the node accepted the request, so a refused one keeps the old token.
            write_secret(&path, &token)?;
            print_json(&answer)?;
            if let Some(req) = answer.get("payment_request").and_then(Value::as_str) {
                eprintln!("Pay this BOLT11 invoice with your Lightning wallet:\n{req}");
            }
            eprintln!("Access token written to {} (valid once the payment is seen).", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
