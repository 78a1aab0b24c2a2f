//! The KLX commands of the `kalima` binary: holder keys, balances, transfers and withdrawals
//! signed on this machine and sent to a node's REST API (`kalima klx`), the relayer's keys
//! (`kalima keys relayer`), and development tools for the bridge contracts on an EVM node
//! (`kalima bridge`), which go through `kalima_bridge_ethereum::devtools`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ed25519_dalek::SigningKey;
use kalima_bridge_ethereum::devtools::{self, DeployRequest};
use kalima_bridge_ethereum::{BridgeSection, ChainSettings, Identity};
use kalima_core::ledger::{
    AccountKey, BridgeChain, KLX, KLX_DECIMALS, Relayer, SignedTransfer, SignedWithdrawal, validate_bridge_name,
};
use serde::Serialize;
use serde_json::Value;

use crate::config::{self, Config};

/// Longest wait for one answer of the node; transfers are answered after their commit.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// `kalima klx ...`
#[derive(Debug, Subcommand)]
pub enum KlxCommand {
    /// Create a new account key (hex seed, mode 0600) and print the account.
    Keygen {
        /// File to create; an existing file is never replaced.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the account (Ed25519 public key, 64 hex) of a key file.
    Address {
        /// Account key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Print an account's balance and nonce.
    Balance {
        /// The account (64 hex).
        #[arg(long)]
        account: String,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Sign a transfer with a local key and send it.
    Transfer {
        /// Paying account's key file.
        #[arg(long)]
        key: PathBuf,
        /// Receiving account (64 hex).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        amount: AmountArgs,
        #[command(flatten)]
        node: NodeArgs,
        /// Chain name the signature is bound to (default: read from the node).
        #[arg(long)]
        chain: Option<String>,
    },
    /// Sign a withdrawal (burn here, release on a bridged chain) with a local key and send it.
    Withdraw {
        /// Account key file.
        #[arg(long)]
        key: PathBuf,
        /// Bridge name (`ethereum`, `polygon`, ...).
        #[arg(long)]
        bridge: String,
        /// ERC20 recipient (`0x` + 40 hex).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        amount: AmountArgs,
        #[command(flatten)]
        node: NodeArgs,
        /// Chain name the signature is bound to (default: read from the node).
        #[arg(long)]
        chain: Option<String>,
    },
}

/// `kalima bridge ...`: development tools for the bridge contracts on an EVM node.
#[derive(Debug, Subcommand)]
pub enum BridgeCommand {
    /// Deploy KlxToken (unless --token is given) and KlxBridge, and print the configuration
    /// that relayers and the node need.
    Deploy {
        #[command(flatten)]
        evm: EvmArgs,
        /// Relayer Ethereum addresses, comma-separated (`kalima keys relayer` prints them).
        #[arg(long, value_delimiter = ',', required = true)]
        relayers: Vec<String>,
        /// Relayer device ids in the same order (default: relayer-1, relayer-2, ...).
        #[arg(long, value_delimiter = ',')]
        relayer_devices: Option<Vec<String>>,
        /// Relayer signatures a release needs (more than half of the relayers).
        #[arg(long)]
        threshold: u32,
        /// Address allowed to pause the bridge.
        #[arg(long)]
        guardian: String,
        /// Largest single release, in KLX; also the node's largest withdrawal.
        #[arg(long, default_value = "1000000")]
        per_tx_cap: String,
        /// Largest sum released per window, in KLX.
        #[arg(long, default_value = "10000000")]
        window_cap: String,
        /// Window length in seconds.
        #[arg(long, default_value_t = 86_400)]
        window_secs: u64,
        /// An existing KLX ERC20 to bridge instead of deploying a new KlxToken.
        #[arg(long)]
        token: Option<String>,
        /// Bridge name on the chain, for the printed configuration.
        #[arg(long, default_value = "ethereum")]
        name: String,
        /// Seconds a release signature stays valid, for the printed configuration.
        #[arg(long, default_value_t = 86_400)]
        release_ttl_secs: u64,
        /// `confirmations` of the printed configuration: 0 scans up to the `finalized` block,
        /// which trails anvil's head by 64 blocks; 1 suits a local anvil.
        #[arg(long, default_value_t = 0)]
        confirmations: u64,
    },
    /// Mint KlxToken to an address (the token's owner only), for local testing.
    MintTestTokens {
        #[command(flatten)]
        evm: EvmArgs,
        /// The KlxToken.
        #[arg(long)]
        token: String,
        /// Recipient address.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        amount: AmountArgs,
    },
    /// Approve and deposit into a KlxBridge for a native account; prints the deposit nonce.
    Deposit {
        #[command(flatten)]
        evm: EvmArgs,
        /// The KlxBridge.
        #[arg(long)]
        bridge: String,
        /// Native account credited (64 hex).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        amount: AmountArgs,
    },
    /// Print an address's balance of an ERC20.
    Erc20Balance {
        /// JSON-RPC URL of the EVM node.
        #[arg(long, env = "KALIMA_EVM_RPC", default_value = "http://127.0.0.1:8545")]
        rpc: String,
        /// The token.
        #[arg(long)]
        token: String,
        /// The holder.
        #[arg(long)]
        of: String,
    },
}

/// Where the node's API is and how to authenticate to it.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Base URL of the node's API.
    #[arg(long, env = "KALIMA_NODE", default_value = "http://127.0.0.1:8080")]
    pub node: String,
    /// Bearer token (default: --token-file, else $KALIMA_TOKEN, else the admin.token of
    /// $KALIMA_DIR or ./kalima-data if present).
    #[arg(long)]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// An amount, in KLX or in base units.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct AmountArgs {
    /// Amount in KLX, up to 18 decimals (`12.5`).
    #[arg(long)]
    pub amount: Option<String>,
    /// Amount in base units (10^-18 KLX).
    #[arg(long)]
    pub base_units: Option<String>,
}

/// The EVM node and the key that signs.
#[derive(Debug, Clone, Args)]
pub struct EvmArgs {
    /// JSON-RPC URL of the EVM node.
    #[arg(long, env = "KALIMA_EVM_RPC", default_value = "http://127.0.0.1:8545")]
    pub rpc: String,
    /// secp256k1 private key: hex, or a file holding the hex.
    #[arg(long, env = "KALIMA_EVM_KEY", hide_env_values = true)]
    pub key: String,
}

/// Why a KLX amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Nothing given.
    #[error("the amount is empty")]
    Empty,
    /// Not digits with at most one decimal point.
    #[error("amount {0:?} must be digits with an optional decimal point (no sign, exponent or separators)")]
    Invalid(String),
    /// More than 18 decimals.
    #[error("amount {0} has more than 18 decimals")]
    TooManyDecimals(String),
    /// Above 2^128 - 1 base units.
    #[error("amount {0} is too large")]
    Overflow(String),
}

impl AmountArgs {
    /// The amount in base units.
    pub fn base_units(&self) -> anyhow::Result<u128> {
        match (&self.amount, &self.base_units) {
            (Some(klx), _) => Ok(parse_klx(klx)?),
            (None, Some(units)) => kalima_core::ledger::amount::parse(units).map_err(anyhow::Error::msg),
            (None, None) => bail!("give --amount or --base-units"),
        }
    }
}

/// Parses an amount in KLX (`12.5`, up to 18 decimals) into base units, exactly.
pub fn parse_klx(s: &str) -> Result<u128, AmountError> {
    if s.is_empty() {
        return Err(AmountError::Empty);
    }
    let (whole, fraction) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (s.contains('.') && !digits(fraction)) {
        return Err(AmountError::Invalid(s.to_string()));
    }
    if fraction.len() > KLX_DECIMALS as usize {
        return Err(AmountError::TooManyDecimals(s.to_string()));
    }
    let overflow = || AmountError::Overflow(s.to_string());
    // Digits only, so the parse can fail on overflow alone.
    let whole: u128 = whole.parse().map_err(|_| overflow())?;
    let scale = 10u128.pow(KLX_DECIMALS - fraction.len() as u32);
    let fraction: u128 = if fraction.is_empty() { 0 } else { fraction.parse().map_err(|_| overflow())? };
    whole.checked_mul(KLX).and_then(|w| w.checked_add(fraction * scale)).ok_or_else(overflow)
}

/// Base units as KLX, without trailing zeros (`12.5`, `3`).
pub fn format_klx(units: u128) -> String {
    let (whole, fraction) = (units / KLX, units % KLX);
    if fraction == 0 {
        return whole.to_string();
    }
    let fraction = format!("{fraction:0width$}", width = KLX_DECIMALS as usize);
    format!("{whole}.{}", fraction.trim_end_matches('0'))
}

/// Creates a new account key at `path` (hex seed, owner-only), refusing to replace a file.
pub fn create_key_file(path: &Path) -> anyhow::Result<SigningKey> {
    if path.exists() {
        bail!("{} already exists; refusing to overwrite a key", path.display());
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let text = format!("{}\n", hex::encode(key.to_bytes()));
    kalima_core::keys::write_new_private(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// Reads an account key file (the 64-hex seed `kalima klx keygen` writes). Messages never
/// quote the file's content.
pub fn load_key_file(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut seed = [0u8; 32];
    if hex::decode_to_slice(text.trim(), &mut seed).is_err() {
        bail!("{} does not hold an account key (64 hex digits)", path.display());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            eprintln!("warning: {} is readable by other users; chmod 600 it", path.display());
        }
    }
    Ok(SigningKey::from_bytes(&seed))
}

/// The relayer keys of the node in `dir`, created when missing; prints what to register.
pub fn relayer_keys(dir: &Path) -> anyhow::Result<ExitCode> {
    let section = bridge_section(dir)?;
    let Some(device) = section.relayer_device.as_deref() else {
        bail!("[bridge] relayer_device is not set in {}", dir.join(config::CONFIG_FILE).display());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let identity =
        Identity::load_or_create(device, &dir.join(&section.relayer_key_file), &dir.join(&section.eth_key_file))
            .context("loading the relayer keys")?;
    let public_key = identity.device_key.public_hex();
    println!("device {device}");
    println!("public_key {public_key}");
    println!("eth_address {}", devtools::eth_address(&identity));
    eprintln!(
        "Register the device (admin): POST /api/v1/devices {}",
        serde_json::json!({ "id": device, "public_key": public_key })
    );
    eprintln!(
        "List eth_address in the bridge contract (kalima bridge deploy --relayers) and in the bridge configuration."
    );
    Ok(ExitCode::SUCCESS)
}

/// The `[bridge]` section of `dir`. A relayer needs its keys before any chain can be listed
/// (the contract is deployed with the relayers' addresses), while the full configuration
/// refuses a relayer without chains; so on an invalid configuration only `[bridge]` is read.
fn bridge_section(dir: &Path) -> anyhow::Result<BridgeSection> {
    match Config::load(dir) {
        Ok(cfg) => Ok(cfg.bridge),
        Err(errors) => {
            use figment::providers::{Env, Format, Toml};
            let file = dir.join(config::CONFIG_FILE);
            let read = figment::Figment::new()
                .merge(Toml::file(&file))
                .merge(Env::prefixed("KALIMA_").filter(|k| k.as_str().contains("__")).split("__"))
                .extract_inner::<BridgeSection>("bridge");
            let section = match read {
                Ok(section) => section,
                Err(e) if e.missing() => BridgeSection::default(),
                Err(e) => bail!("[bridge] of {}: {e}", file.display()),
            };
            eprintln!("note: the node will not start with this configuration yet: {errors}");
            Ok(section)
        }
    }
}

/// Runs a `kalima klx` command.
pub async fn run_klx(cmd: KlxCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KlxCommand::Keygen { out } => {
            let key = create_key_file(&out)?;
            println!("{}", AccountKey::of(&key).to_hex());
            eprintln!("Key written to {} (keep it secret; it signs for the account).", out.display());
        }
        KlxCommand::Address { key } => println!("{}", AccountKey::of(&load_key_file(&key)?).to_hex()),
        KlxCommand::Balance { account, node } => {
            let account = parse_account(&account)?;
            let mut answer = NodeClient::new(&node)?.get(&format!("/api/v1/klx/accounts/{}", account.to_hex())).await?;
            if let Some(units) = answer.get("balance").and_then(Value::as_str).and_then(|b| b.parse::<u128>().ok())
                && let Some(obj) = answer.as_object_mut()
            {
                obj.insert("balance_klx".into(), Value::String(format_klx(units)));
            }
            print_json(&answer)?;
        }
        KlxCommand::Transfer { key, to, amount, node, chain } => {
            let key = load_key_file(&key)?;
            let to = parse_account(&to)?;
            let amount = amount.base_units()?;
            let client = NodeClient::new(&node)?;
            let chain = client.chain_name(chain, &AccountKey::of(&key)).await?;
            let nonce = client.next_nonce(&AccountKey::of(&key)).await?;
            let transfer = SignedTransfer::sign(&chain, &key, &to, amount, nonce);
            print_json(&client.post("/api/v1/klx/transfers", &transfer).await?)?;
        }
        KlxCommand::Withdraw { key, bridge, to, amount, node, chain } => {
            let key = load_key_file(&key)?;
            validate_bridge_name(&bridge).map_err(anyhow::Error::msg)?;
            check_eth_address(&to)?;
            let amount = amount.base_units()?;
            let client = NodeClient::new(&node)?;
            let chain = client.chain_name(chain, &AccountKey::of(&key)).await?;
            let nonce = client.next_nonce(&AccountKey::of(&key)).await?;
            let withdrawal = SignedWithdrawal::sign(&chain, &key, &bridge, &to, amount, nonce);
            let answer = client.post("/api/v1/bridge/withdrawals", &withdrawal).await?;
            print_json(&answer)?;
            if let Some(id) = answer.pointer("/withdrawal/id").and_then(Value::as_str) {
                eprintln!("withdrawal {id}: relayers now sign its release on {bridge}.");
                eprintln!(
                    "Follow it: curl -H \"Authorization: Bearer $KALIMA_TOKEN\" {}/api/v1/bridge/withdrawals/{bridge}/{id}",
                    client.base
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a `kalima bridge` command.
pub async fn run_bridge(cmd: BridgeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BridgeCommand::Deploy {
            evm,
            relayers,
            relayer_devices,
            threshold,
            guardian,
            per_tx_cap,
            window_cap,
            window_secs,
            token,
            name,
            release_ttl_secs,
            confirmations,
        } => {
            validate_bridge_name(&name).map_err(anyhow::Error::msg)?;
            let devices =
                relayer_devices.unwrap_or_else(|| (1..=relayers.len()).map(|i| format!("relayer-{i}")).collect());
            if devices.len() != relayers.len() {
                bail!("--relayer-devices names {} devices for {} relayers", devices.len(), relayers.len());
            }
            // The node refuses a bridge whose threshold is not a majority: two disjoint
            // groups of relayers could otherwise mint conflicting deposits.
            if threshold as usize * 2 <= relayers.len() || threshold as usize > relayers.len() {
                bail!(
                    "--threshold {threshold} must be more than half of the {} relayers and at most all",
                    relayers.len()
                );
            }
            let per_tx_cap = parse_klx(&per_tx_cap).context("--per-tx-cap")?;
            let window_cap = parse_klx(&window_cap).context("--window-cap")?;
            let request = DeployRequest {
                token,
                relayers: relayers.clone(),
                threshold: threshold.into(),
                guardian,
                per_tx_cap,
                window_cap,
                window_seconds: window_secs,
            };
            let d = devtools::deploy(&evm.rpc, &evm.key, &request).await.context("deploying the bridge")?;
            println!("token {}", d.token);
            println!("bridge {}", d.bridge);
            println!("chain_id {}", d.chain_id);
            println!("block {}", d.block);
            let settings = ChainSettings {
                name: name.clone(),
                chain_id: d.chain_id,
                rpc_url: evm.rpc.clone(),
                bridge: d.bridge.clone(),
                token: d.token.clone(),
                start_block: d.block,
                confirmations,
                ..ChainSettings::default()
            };
            println!();
            println!("# Append to the kalima.toml of each relayer node:");
            print!("{}", chains_toml(settings)?);
            let config = BridgeChain {
                chain_id: d.chain_id,
                bridge: d.bridge,
                token: d.token,
                relayers: devices
                    .into_iter()
                    .zip(relayers)
                    .map(|(device, eth)| Relayer { device, eth_address: eth.to_ascii_lowercase() })
                    .collect(),
                threshold,
                release_ttl_secs,
                max_withdrawal: per_tx_cap,
            };
            println!();
            println!("# PUT /api/v1/bridge/chains/{name} (admin token), body:");
            print_json(&config)?;
        }
        BridgeCommand::MintTestTokens { evm, token, to, amount } => {
            let amount = amount.base_units()?;
            let tx = devtools::mint(&evm.rpc, &evm.key, &token, &to, amount).await.context("minting")?;
            let balance = devtools::erc20_balance(&evm.rpc, &token, &to).await?;
            println!("tx {tx}");
            println!("balance {balance} ({} KLX)", format_klx(balance));
        }
        BridgeCommand::Deposit { evm, bridge, to, amount } => {
            let to = parse_account(&to)?;
            let amount = amount.base_units()?;
            let sent =
                devtools::deposit(&evm.rpc, &evm.key, &bridge, amount, &to.to_hex()).await.context("depositing")?;
            println!("tx {}", sent.tx_hash);
            println!("block {}", sent.block);
            println!("nonce {}", sent.nonce);
            eprintln!(
                "Follow it on the node: GET /api/v1/bridge/deposits/<bridge name>?tx_hash={} or /api/v1/bridge/deposits/<bridge name>/{}",
                sent.tx_hash, sent.nonce
            );
        }
        BridgeCommand::Erc20Balance { rpc, token, of } => {
            let balance = devtools::erc20_balance(&rpc, &token, &of).await?;
            println!("{balance} ({} KLX)", format_klx(balance));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `[[bridge.chains]]` holding `settings`, as TOML.
fn chains_toml(settings: ChainSettings) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Chains {
        chains: Vec<ChainSettings>,
    }
    #[derive(Serialize)]
    struct Root {
        bridge: Chains,
    }
    toml::to_string(&Root { bridge: Chains { chains: vec![settings] } }).context("writing the TOML snippet")
}

fn parse_account(s: &str) -> anyhow::Result<AccountKey> {
    AccountKey::from_hex(&s.to_ascii_lowercase()).map_err(anyhow::Error::msg)
}

fn check_eth_address(s: &str) -> anyhow::Result<()> {
    let hex_part = s.strip_prefix("0x").unwrap_or("");
    let mut b = [0u8; 20];
    if hex::decode_to_slice(hex_part, &mut b).is_err() {
        bail!("recipient {s:?} must be 0x + 40 hex characters");
    }
    if b == [0u8; 20] {
        bail!("the recipient must not be the zero address");
    }
    Ok(())
}

pub(crate) fn print_json(v: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v).context("formatting JSON")?);
    Ok(())
}

/// A refusal from the node: its status and `{"error":{"code","message"}}`.
#[derive(Debug, thiserror::Error)]
#[error("the node answered {status}: {code}: {message}")]
pub struct NodeError {
    /// HTTP status.
    pub status: u16,
    /// The error code.
    pub code: String,
    /// The message.
    pub message: String,
}

/// A client of one node's REST API.
pub(crate) struct NodeClient {
    http: reqwest::Client,
    pub(crate) base: String,
    token: Option<String>,
}

impl NodeClient {
    pub(crate) fn new(args: &NodeArgs) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(HTTP_TIMEOUT).build().context("building the HTTP client")?;
        Ok(Self { http, base: args.node.trim_end_matches('/').to_string(), token: resolve_token(args)? })
    }

    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    pub(crate) async fn post(&self, path: &str, body: &impl Serialize) -> anyhow::Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body)).await
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.with_context(|| format!("calling {}", self.base))?;
        let status = resp.status();
        let body = resp.bytes().await.with_context(|| format!("reading the answer of {}", self.base))?;
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        if status.is_success() {
            return json.with_context(|| format!("{} answered {status} with something that is not JSON", self.base));
        }
        let field =
            |name: &str| json.as_ref().and_then(|j| j.pointer(&format!("/error/{name}"))?.as_str().map(str::to_string));
        let message = field("message").unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(300).collect());
        Err(NodeError { status: status.as_u16(), code: field("code").unwrap_or_else(|| "unknown".into()), message }
            .into())
    }

    /// `given`, else the chain name the node reports with every account (the name holder
    /// signatures are bound to).
    pub(crate) async fn chain_name(&self, given: Option<String>, account: &AccountKey) -> anyhow::Result<String> {
        if let Some(chain) = given {
            return Ok(chain);
        }
        let answer = self
            .get(&format!("/api/v1/klx/accounts/{}", account.to_hex()))
            .await
            .context("reading the chain name from the node (or pass --chain)")?;
        answer.get("chain").and_then(Value::as_str).map(str::to_string).context("the node names no chain; pass --chain")
    }

    /// The nonce the account's next instruction must carry.
    pub(crate) async fn next_nonce(&self, account: &AccountKey) -> anyhow::Result<u64> {
        let answer = self.get(&format!("/api/v1/klx/accounts/{}", account.to_hex())).await?;
        let nonce = answer.get("nonce").and_then(Value::as_u64).context("the node's account answer has no nonce")?;
        nonce.checked_add(1).context("the account's nonce is exhausted")
    }
}

/// `--token`, else `--token-file`, else `$KALIMA_TOKEN`, else the data directory's admin
/// token when there is one; `None` sends no token (the node then answers 401).
fn resolve_token(args: &NodeArgs) -> anyhow::Result<Option<String>> {
    if let Some(t) = &args.token {
        return Ok(Some(t.trim().to_string()));
    }
    if let Some(file) = &args.token_file {
        let t = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        return Ok(Some(t.trim().to_string()));
    }
    if let Some(t) = std::env::var("KALIMA_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        return Ok(Some(t.trim().to_string()));
    }
    let default = config::data_dir(None).join(config::ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&default) {
        Ok(t) => Ok(Some(t.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", default.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn klx_cli_parses_amounts_exactly() {
        struct Case {
            input: &'static str,
            want: Result<u128, AmountError>,
        }
        let cases = [
            Case { input: "1", want: Ok(KLX) },
            Case { input: "0.5", want: Ok(KLX / 2) },
            Case { input: "12.5", want: Ok(12 * KLX + KLX / 2) },
            Case { input: "12.000000000000000001", want: Ok(12 * KLX + 1) },
            Case { input: "0.000000000000000001", want: Ok(1) },
            Case { input: "007.10", want: Ok(7 * KLX + KLX / 10) },
            Case { input: "0", want: Ok(0) },
            Case { input: "340282366920938463463.374607431768211455", want: Ok(u128::MAX) },
            Case { input: "", want: Err(AmountError::Empty) },
            Case {
                input: "1.0000000000000000001",
                want: Err(AmountError::TooManyDecimals("1.0000000000000000001".into())),
            },
            Case { input: "-1", want: Err(AmountError::Invalid("-1".into())) },
            Case { input: "+1", want: Err(AmountError::Invalid("+1".into())) },
            Case { input: ".5", want: Err(AmountError::Invalid(".5".into())) },
            Case { input: "5.", want: Err(AmountError::Invalid("5.".into())) },
            Case { input: "1.2.3", want: Err(AmountError::Invalid("1.2.3".into())) },
            Case { input: "1e18", want: Err(AmountError::Invalid("1e18".into())) },
            Case { input: "1_000", want: Err(AmountError::Invalid("1_000".into())) },
            Case { input: " 1", want: Err(AmountError::Invalid(" 1".into())) },
            Case {
                input: "340282366920938463463.374607431768211456",
                want: Err(AmountError::Overflow("340282366920938463463.374607431768211456".into())),
            },
            Case { input: "340282366920938463464", want: Err(AmountError::Overflow("340282366920938463464".into())) },
            Case {
                input: "99999999999999999999999999999999999999999",
                want: Err(AmountError::Overflow("99999999999999999999999999999999999999999".into())),
            },
        ];
        for c in cases {
            assert_eq!(parse_klx(c.input), c.want, "{:?}", c.input);
        }
    }

    #[test]
    fn klx_cli_formats_and_reparses_amounts() {
        for units in [0, 1, KLX / 2, KLX, 12 * KLX + 1, u128::MAX] {
            assert_eq!(parse_klx(&format_klx(units)), Ok(units), "{units}");
        }
        assert_eq!(format_klx(12 * KLX + KLX / 2), "12.5");
        assert_eq!(format_klx(3 * KLX), "3");
    }

    #[test]
    fn klx_cli_amount_args_take_klx_or_base_units() {
        let klx = AmountArgs { amount: Some("1.5".into()), base_units: None };
        assert_eq!(klx.base_units().unwrap(), KLX + KLX / 2);
        let units = AmountArgs { amount: None, base_units: Some("42".into()) };
        assert_eq!(units.base_units().unwrap(), 42);
        let bad = AmountArgs { amount: None, base_units: Some("1.5".into()) };
        assert!(bad.base_units().is_err());
    }

    #[test]
    fn klx_cli_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.key");
        let key = create_key_file(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let loaded = load_key_file(&path).unwrap();
        assert_eq!(AccountKey::of(&loaded), AccountKey::of(&key));
        // The key the node's own loader reads is the same key.
        let node_key = kalima_core::keys::NodeKey::load(&path).unwrap();
        assert_eq!(node_key.public_hex(), AccountKey::of(&key).to_hex());

        // Never replaced.
        let before = std::fs::read(&path).unwrap();
        assert!(create_key_file(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);

        // Not a key: refused without quoting what the file holds.
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "0123456789abcdef-secret-ish").unwrap();
        let e = format!("{:#}", load_key_file(&bad).unwrap_err());
        assert!(!e.contains("secret-ish"), "{e}");
        assert!(load_key_file(&dir.path().join("missing.key")).is_err());
    }

    #[test]
    fn klx_cli_checks_addresses() {
        assert!(check_eth_address("0x00000000000000000000000000000000000000a1").is_ok());
        assert!(check_eth_address("0x0000000000000000000000000000000000000000").is_err());
        assert!(check_eth_address("00000000000000000000000000000000000000a1").is_err());
        assert!(check_eth_address("0x00a1").is_err());
        let account = AccountKey::of(&SigningKey::from_bytes(&[7; 32])).to_hex();
        assert_eq!(parse_account(&account.to_ascii_uppercase()).unwrap().to_hex(), account);
        assert!(parse_account("12").is_err());
    }

    #[test]
    fn klx_cli_token_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "from-file\n").unwrap();
        let args = |token: Option<&str>, token_file: Option<PathBuf>| NodeArgs {
            node: "http://127.0.0.1:1".into(),
            token: token.map(str::to_string),
            token_file,
        };
        assert_eq!(resolve_token(&args(Some("given"), Some(file.clone()))).unwrap().as_deref(), Some("given"));
        assert_eq!(resolve_token(&args(None, Some(file))).unwrap().as_deref(), Some("from-file"));
        assert!(resolve_token(&args(None, Some(dir.path().join("missing")))).is_err());
    }

    #[test]
    fn klx_cli_chain_snippet_is_a_bridge_section() {
        let settings = ChainSettings {
            name: "ethereum".into(),
            chain_id: 31_337,
            bridge: "0x00000000000000000000000000000000000000b1".into(),
            token: "0x00000000000000000000000000000000000000c1".into(),
            start_block: 7,
            ..ChainSettings::default()
        };
        let text = chains_toml(settings.clone()).unwrap();
        assert!(text.contains("[[bridge.chains]]"), "{text}");
        #[derive(serde::Deserialize)]
        struct Root {
            bridge: BridgeSection,
        }
        let back: Root = toml::from_str(&text).unwrap();
        assert_eq!(back.bridge.chains, vec![settings]);
    }
}
