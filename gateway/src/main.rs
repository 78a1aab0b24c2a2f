//! The `kalima` binary.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use kalima_core::keys::{DATA_KEYS_FILE, DataKeys};
use kalima_gateway::config::{self, Config};
use kalima_gateway::{bench, demo, klx_cli, node};

/// Kalima node: collects, protects and serves industrial IoT data on a permissioned chain.
#[derive(Debug, Parser)]
#[command(name = "kalima", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a node: kalima.toml, node key, data keys and an admin token in DIR.
    Init {
        /// Data directory (default: $KALIMA_DIR or ./kalima-data).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Chain name signed into checkpoints.
        #[arg(long, default_value = "kalima-dev")]
        chain: String,
    },
    /// Run the node (initialises DIR first if it is empty).
    Up {
        /// Data directory (default: $KALIMA_DIR or ./kalima-data).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also run simulated sensors writing under /demo.
        #[arg(long)]
        demo: bool,
    },
    /// Verify the whole chain; exits non-zero and names the height on any fault.
    Verify {
        /// Data directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Data-key management.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Run a cluster of masters on this machine (each in DIR/master-N), until Ctrl-C.
    DevCluster {
        /// Parent directory of the masters' directories.
        #[arg(long, default_value = "kalima-cluster")]
        dir: PathBuf,
        /// Number of masters (5 or more runs in production mode).
        #[arg(long, default_value_t = 5)]
        masters: u64,
        /// Chain name.
        #[arg(long, default_value = "kalima-dev")]
        chain: String,
        /// API port of master 1; master N uses this + N - 1.
        #[arg(long, default_value_t = 18081)]
        api_port: u16,
        /// Node-link port of master 1; master N uses this + N - 1.
        #[arg(long, default_value_t = 7701)]
        link_port: u16,
        /// Only write the directories and configs; do not start the masters.
        #[arg(long)]
        init_only: bool,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Native KLX: account keys, balances, and transfers and withdrawals signed on this machine.
    Klx {
        #[command(subcommand)]
        action: klx_cli::KlxCommand,
    },
    /// Oracle marketplace, buyer side: buy a feed with a local account key.
    Market {
        #[command(subcommand)]
        action: kalima_gateway::market_cli::MarketCommand,
    },
    /// Check a transaction receipt (from GET /api/v1/tx/{id}/receipt) with no node running:
    /// proofs, checkpoint signatures, and its anchors on their public chains (--rpc).
    VerifyReceipt(kalima_gateway::receipt_cli::VerifyReceiptArgs),
    /// Bridge contracts on an EVM node (development, e.g. a local anvil): deploy, mint, deposit.
    Bridge {
        #[command(subcommand)]
        action: klx_cli::BridgeCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Add a new data key and make it active; records under older keys stay readable.
    /// Restart the node to start encrypting with it.
    Rotate {
        /// Data directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print this node's link public key (creating `link.key` if missing): what masters
    /// list in `[cluster] clients` (for a client node) or `[[cluster.masters]] link_key`.
    Link {
        /// Data directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print this node's relayer identity (creating its keys if missing): the device and
    /// public key to register, and the Ethereum address to list in the bridge.
    Relayer {
        /// Data directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KALIMA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

// glibc malloc's arena locks showed up as a quarter of ingest CPU time under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init { dir, chain } => {
            let dir = config::data_dir(dir);
            let done = node::init(&dir, &chain)?;
            println!("Initialised a Kalima node in {}", done.dir.display());
            println!(
                "Admin token (also in {}): {}",
                done.dir.join(config::ADMIN_TOKEN_FILE).display(),
                done.admin_token
            );
            println!("Start it with: kalima up --dir {}", done.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Up { dir, demo } => {
            let dir = config::data_dir(dir);
            match node::dir_state(&dir) {
                node::DirState::Empty => {
                    node::init(&dir, "kalima-dev")?;
                    tracing::info!(target: "node", dir = %dir.display(), token_file = %dir.join(config::ADMIN_TOKEN_FILE).display(), "Initialised a new node.");
                }
                node::DirState::Node => {}
                node::DirState::Incomplete(missing) => anyhow::bail!(
                    "{} is not empty but lacks {}: restore them, or point --dir at an empty directory",
                    dir.display(),
                    missing.join(", ")
                ),
            }
            let cfg = Config::load(&dir)?;
            tracing::info!(target: "node", version = env!("CARGO_PKG_VERSION"), dir = %dir.display(), "Starting Kalima node.");
            let demo_cfg = cfg.demo.clone();
            let stop_signal = node::shutdown_signal();
            if cfg.cluster.role == kalima_gateway::cluster::Role::Client {
                anyhow::ensure!(!demo, "--demo runs on a node that holds the chain, not on a client node");
                let mut running = kalima_gateway::client::start(&dir, cfg).await?;
                println!("Kalima client node listening on http://{}", running.api_addr);
                tokio::select! {
                    _ = stop_signal => tracing::info!(target: "node", "Stopping."),
                    r = &mut running.server => anyhow::bail!("API server stopped: {:?}", r),
                }
                running.stop().await?;
                tracing::info!(target: "node", "Stopped.");
                return Ok(ExitCode::SUCCESS);
            }
            let mut running = node::start(&dir, cfg).await?;
            if demo {
                let chain = running.chain.clone();
                let ingest = kalima_core::Ingest::new(chain.clone(), kalima_core::tx::MAX_BODY);
                running.add_task(tokio::spawn(async move {
                    if let Err(e) =
                        demo::run(chain, ingest, demo_cfg.sensors, Duration::from_millis(demo_cfg.interval_ms.max(10)))
                            .await
                    {
                        tracing::error!(target: "demo", error = %e, "Demo stopped.");
                    }
                }));
            }
            println!(
                "Kalima node listening on http://{} (Swagger UI: /docs, admin token: {})",
                running.api_addr,
                dir.join(config::ADMIN_TOKEN_FILE).display()
            );
            tokio::select! {
                _ = stop_signal => tracing::info!(target: "node", "Stopping."),
                r = &mut running.server => {
                    // The server stopping on its own is fatal: report it rather than linger.
                    anyhow::bail!("API server stopped: {:?}", r);
                }
                r = &mut running.sequencer => {
                    // Without its sequencer the node would answer every write with an error:
                    // stop, so the supervisor restarts it from what is stored.
                    anyhow::bail!("the chain sequencer stopped: {:?}", r);
                }
            }
            running.stop().await?;
            tracing::info!(target: "node", "Stopped.");
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { dir } => verify(config::data_dir(dir)).await,
        Command::DevCluster { dir, masters, chain, api_port, link_port, init_only } => {
            anyhow::ensure!(masters >= 1, "--masters must be at least 1");
            let dev = kalima_gateway::cluster::dev::DevCluster { dir, chain, masters, api_port, link_port };
            if init_only {
                let token = dev.init()?;
                println!("{} masters written under {}; admin token {token}", masters, dev.dir.display());
            } else {
                dev.run().await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { action: KeysAction::Rotate { dir } } => {
            let dir = config::data_dir(dir);
            let id = DataKeys::rotate(&dir.join(DATA_KEYS_FILE)).context("rotating the data key")?;
            println!(
                "Data key {id} is now active; restart the node to encrypt new records with it. Older records stay readable."
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { action: KeysAction::Link { dir } } => {
            let dir = config::data_dir(dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let key = kalima_core::cluster::LinkKey::load_or_create(&dir.join(kalima_core::cluster::LINK_KEY_FILE))?;
            println!("{}", key.public_hex());
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { action: KeysAction::Relayer { dir } } => klx_cli::relayer_keys(&config::data_dir(dir)),
        Command::Klx { action } => klx_cli::run_klx(action).await,
        Command::Bridge { action } => klx_cli::run_bridge(action).await,
        Command::Bench { what } => bench::run(what).await.map(|_| ExitCode::SUCCESS),
        Command::Market { action } => kalima_gateway::market_cli::run_market(action).await,
        Command::VerifyReceipt(args) => kalima_gateway::receipt_cli::verify_receipt(args).await,
        Command::Openapi => {
            print!("{}", kalima_gateway::api::openapi_json());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn verify(dir: PathBuf) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(&dir)?;
    let store = node::open_store(&dir, &cfg).await?;
    let total = store.latest_block().await?.map(|b| b.header.height + 1).unwrap_or(0);
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} verifying [{bar:40}] {pos}/{len} blocks ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let started = Instant::now();
    // Only this node leads blocks and signs checkpoints on a single-node chain; on a master,
    // so do the masters configured and those the cluster's membership records.
    let node_key = kalima_core::keys::NodeKey::load(&dir.join(kalima_core::keys::NODE_KEY_FILE))?;
    let mut trusted = vec![node_key.public_hex()];
    trusted.extend(cfg.cluster.masters.iter().map(|m| m.node_key.to_lowercase()));
    trusted.extend(kalima_core::cluster::recorded_masters(&store).await?.into_values().map(|m| m.node_key));
    // Checkpoints are signed under the name recorded at genesis, whatever the config says now.
    let genesis = store.history(kalima_core::registry::CHAIN_ADDRESS, "genesis", u64::MAX >> 1, 1).await.ok();
    let recorded = genesis
        .and_then(|g| g.into_iter().next())
        .and_then(|g| serde_json::from_slice::<serde_json::Value>(&g.tx.content.body).ok())
        .and_then(|v| v.get("chain").and_then(|c| c.as_str()).map(str::to_string));
    let chain = match recorded {
        Some(name) if name != cfg.node.chain => {
            eprintln!("note: the chain was created as {name:?}; [node] chain says {:?}", cfg.node.chain);
            name
        }
        Some(name) => name,
        None => cfg.node.chain.clone(),
    };
    let res = kalima_core::verify::verify_chain_with(&store, &chain, &trusted, |h| {
        if let Some(b) = &bar {
            b.set_position(h + 1);
        }
    })
    .await;
    store.close().await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let secs = started.elapsed().as_secs_f64();
    match res {
        Ok(r) => {
            println!(
                "chain OK: {} blocks, {} transactions, {} device signatures, {} checkpoints, {:.1} MB in {:.2} s ({:.1} MB/s)",
                r.blocks,
                r.transactions,
                r.signatures,
                r.checkpoints,
                r.bytes as f64 / 1e6,
                secs,
                r.bytes as f64 / 1e6 / secs.max(1e-9)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(kalima_core::Error::Corrupt { height, reason }) => {
            eprintln!("chain CORRUPT at height {height}: {reason}");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e).context("verifying"),
    }
}
