//! Setting up and running a node: `init` writes the data directory, `start` opens storage
//! and the chain (creating genesis on first start), binds the API and serves until asked
//! to stop, then drains the sequencer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use kalima_core::cluster::{Cluster, LINK_KEY_FILE, LinkKey};
use kalima_core::keys::{DATA_KEYS_FILE, DataKeys, NODE_KEY_FILE, NodeKey, write_new_private};
use kalima_core::registry::{ADMIN_ID, DEVICES_ADDRESS, DeviceRecord, NODE_DEVICE_ID, new_token, token_digest};
use kalima_core::tx::TxContent;
use kalima_core::{Chain, Store};

use crate::cluster::Role;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::api::{AppState, app};
use crate::config::{ADMIN_TOKEN_FILE, CONFIG_FILE, Config, default_toml};

/// What `init` created.
#[derive(Debug)]
pub struct Initialized {
    /// The data directory.
    pub dir: PathBuf,
    /// The admin token (also in `DIR/admin.token`).
    pub admin_token: String,
}

/// OTAA sessions of LoRaWAN devices (keys and used DevNonces), beside the chain.
pub const LORAWAN_SESSIONS_FILE: &str = "lorawan-sessions.json";
/// Files that hold a node's identity, keys or data; `init` never writes over any of them.
const STATE_FILES: [&str; 4] = [NODE_KEY_FILE, DATA_KEYS_FILE, ADMIN_TOKEN_FILE, "kalima.db"];

/// What a data directory holds.
#[derive(Debug, PartialEq, Eq)]
pub enum DirState {
    /// Missing or empty: `up` may initialise it.
    Empty,
    /// Holds the keys and admin token of a node (the config file is optional).
    Node,
    /// Holds something else, or a node with files missing: refuse to guess.
    Incomplete(Vec<&'static str>),
}

/// Classifies `dir` before `up` decides whether to initialise it. A directory holding none
/// of the node's key or data files (a pre-written kalima.toml, `lost+found`) may be
/// initialised; one with keys and data key ring is a node (the admin token is only needed
/// for genesis and may have been removed since).
pub fn dir_state(dir: &Path) -> DirState {
    if !STATE_FILES.iter().any(|f| dir.join(f).exists()) {
        return DirState::Empty;
    }
    let missing: Vec<&'static str> =
        [NODE_KEY_FILE, DATA_KEYS_FILE].into_iter().filter(|f| !dir.join(f).exists()).collect();
    if missing.is_empty() { DirState::Node } else { DirState::Incomplete(missing) }
}

/// Writes `kalima.toml`, the node key, the data key ring and the admin token into `dir`.
/// Refuses when any node file is already there: replacing a data key would make every
/// stored record unreadable.
pub fn init(dir: &Path, chain: &str) -> anyhow::Result<Initialized> {
    let present: Vec<&str> = STATE_FILES.into_iter().filter(|f| dir.join(f).exists()).collect();
    if !present.is_empty() {
        bail!("{} already holds node files ({}); refusing to overwrite them", dir.display(), present.join(", "));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    NodeKey::generate().save(&dir.join(NODE_KEY_FILE))?;
    DataKeys::create(&dir.join(DATA_KEYS_FILE))?;
    let admin_token = new_token();
    write_new_private(&dir.join(ADMIN_TOKEN_FILE), format!("{admin_token}\n").as_bytes())?;
    // A config written beforehand (e.g. by provisioning) is kept.
    if !dir.join(CONFIG_FILE).exists() {
        std::fs::write(dir.join(CONFIG_FILE), default_toml(chain)).context("writing kalima.toml")?;
    }
    Ok(Initialized { dir: dir.to_path_buf(), admin_token })
}

/// The admin token written by `init`.
pub fn read_admin_token(dir: &Path) -> anyhow::Result<String> {
    let p = dir.join(ADMIN_TOKEN_FILE);
    Ok(std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
}

/// Opens the store of `dir` with its key ring.
pub async fn open_store(dir: &Path, config: &Config) -> anyhow::Result<Store> {
    let keys = DataKeys::load(&dir.join(DATA_KEYS_FILE))?;
    Store::connect(&config.storage.url, Arc::new(keys))
        .await
        .with_context(|| format!("opening storage {}", redact(&config.storage.url)))
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

fn genesis(dir: &Path, chain: &str, node_id: &str) -> anyhow::Result<Vec<TxContent>> {
    let token = read_admin_token(dir)?;
    let admin = DeviceRecord {
        token_sha256: token_digest(&token),
        public_key: None,
        require_signature: false,
        admin: true,
        revoked: false,
    };
    let info = serde_json::json!({ "chain": chain, "genesis_node": node_id, "version": env!("CARGO_PKG_VERSION") });
    Ok(vec![
        TxContent {
            device_id: NODE_DEVICE_ID.into(),
            address: kalima_core::registry::CHAIN_ADDRESS.into(),
            key: "genesis".into(),
            body: serde_json::to_vec(&info)?,
            ..TxContent::default()
        },
        TxContent {
            device_id: NODE_DEVICE_ID.into(),
            address: DEVICES_ADDRESS.into(),
            key: ADMIN_ID.into(),
            body: serde_json::to_vec(&admin)?,
            ..TxContent::default()
        },
    ])
}

/// A running node.
pub struct Running {
    /// The chain.
    pub chain: Chain,
    /// Where the API listens.
    pub api_addr: SocketAddr,
    /// The HTTP server task; ends after `stop`.
    pub server: JoinHandle<std::io::Result<()>>,
    /// The sequencer task.
    pub sequencer: JoinHandle<kalima_core::Result<()>>,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    tasks: Vec<JoinHandle<()>>,
    adapters: Adapters,
    cluster: Option<Arc<Cluster>>,
    relayer: Option<Arc<kalima_bridge_ethereum::Relayer>>,
    anchors: Option<Arc<kalima_core::anchor::AnchorService>>,
    webhooks: Option<kalima_marketplace::WebhookService>,
    settlements: parking_lot::Mutex<Option<kalima_bridge_lightning::SettlementWatcher>>,
}

/// Listeners of the API and the field protocols, bound before any state is touched so a
/// port conflict leaves nothing behind.
pub(crate) struct Listeners {
    pub(crate) api: TcpListener,
    mqtt: Option<TcpListener>,
    lorawan: Option<tokio::net::UdpSocket>,
}

/// Binds every listener `config` asks for, naming the key to change on a conflict.
pub(crate) async fn bind_listeners(config: &Config) -> anyhow::Result<Listeners> {
    let api = TcpListener::bind(&config.api.listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} ({e}): change [api] listen in kalima.toml or set KALIMA_API__LISTEN",
            config.api.listen
        )
    })?;
    let mqtt = if config.mqtt.enabled() {
        Some(kalima_adapter_mqtt::MqttServer::bind(&config.mqtt).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for MQTT on {} ({e}): change [mqtt] listen in kalima.toml or set KALIMA_MQTT__LISTEN (empty disables MQTT)",
                config.mqtt.listen
            )
        })?)
    } else {
        None
    };
    let lorawan = if config.lorawan.enabled() {
        Some(kalima_adapter_lorawan::LorawanAdapter::bind(&config.lorawan).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for LoRaWAN gateways on {} ({e}): change [lorawan] listen or set KALIMA_LORAWAN__LISTEN",
                config.lorawan.listen
            )
        })?)
    } else {
        None
    };
    Ok(Listeners { api, mqtt, lorawan })
}

/// The field adapters of a node, each writing through the node's ingest.
#[derive(Default)]
pub(crate) struct Adapters {
    pub(crate) modbus: Option<Arc<kalima_adapter_modbus::ModbusAdapter>>,
    pub(crate) lorawan: Option<Arc<kalima_adapter_lorawan::LorawanAdapter>>,
    pub(crate) mqtt: Option<Arc<kalima_adapter_mqtt::MqttServer>>,
    pub(crate) mqtt_external: Option<Arc<kalima_adapter_mqtt::external::ExternalBroker>>,
}

impl Adapters {
    /// Starts the adapters `config` configures on the bound `listeners`.
    pub(crate) fn start(
        dir: &Path,
        config: &Config,
        ingest: &kalima_core::Ingest,
        listeners: &mut Listeners,
        feeds: Option<Arc<dyn kalima_core::feeds::FeedGate>>,
    ) -> anyhow::Result<Self> {
        let modbus = (!config.modbus.devices.is_empty())
            .then(|| Arc::new(kalima_adapter_modbus::ModbusAdapter::start(&config.modbus, ingest.clone())));
        let mqtt = match listeners.mqtt.take() {
            Some(l) => Some(Arc::new(kalima_adapter_mqtt::MqttServer::serve_with_feeds(
                l,
                &config.mqtt,
                ingest.clone(),
                feeds,
            )?)),
            None => None,
        };
        let mqtt_external = config.mqtt.external.enabled().then(|| {
            Arc::new(kalima_adapter_mqtt::external::ExternalBroker::start(
                &config.mqtt.external,
                &config.mqtt.sparkplug,
                ingest.clone(),
            ))
        });
        let lorawan = match listeners.lorawan.take() {
            Some(sock) => Some(Arc::new(kalima_adapter_lorawan::LorawanAdapter::serve(
                sock,
                &config.lorawan,
                ingest.clone(),
                Some(dir.join(LORAWAN_SESSIONS_FILE)),
            )?)),
            None => None,
        };
        Ok(Self { modbus, lorawan, mqtt, mqtt_external })
    }

    /// Stops taking readings.
    pub(crate) fn shutdown(&self) {
        if let Some(m) = &self.modbus {
            m.shutdown();
        }
        if let Some(l) = &self.lorawan {
            l.shutdown();
        }
        if let Some(m) = &self.mqtt {
            m.shutdown();
        }
        if let Some(m) = &self.mqtt_external {
            m.shutdown();
        }
    }
}

impl Running {
    /// Stops the API, drains the sequencer and closes storage.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        // Field devices stop first so no reading is queued behind the final commit.
        self.adapters.shutdown();
        if let Some(r) = &self.relayer {
            r.shutdown().await;
        }
        if let Some(a) = &self.anchors {
            a.shutdown().await;
        }
        if let Some(w) = &self.webhooks {
            w.shutdown().await;
        }
        let settlements = self.settlements.lock().take();
        if let Some(s) = settlements {
            let _ = s.shutdown().await;
        }
        for t in &self.tasks {
            t.abort();
        }
        let mut server = self.server;
        // Connections that do not finish (a client that never reads) must not keep the node up.
        if tokio::time::timeout(std::time::Duration::from_secs(10), &mut server).await.is_err() {
            tracing::warn!(target: "node", "Connections still open after 10 s; closing them.");
            server.abort();
        }
        self.chain.shutdown();
        if let Some(c) = &self.cluster {
            c.shutdown().await;
        }
        match self.sequencer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e).context("sequencer"),
            Err(e) => bail!("sequencer task: {e}"),
        }
        self.chain.store().close().await;
        Ok(())
    }

    /// The cluster, when this node is a master.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The Modbus adapter, when `[modbus]` configures devices.
    pub fn modbus(&self) -> Option<&Arc<kalima_adapter_modbus::ModbusAdapter>> {
        self.adapters.modbus.as_ref()
    }

    /// Where MQTT clients connect, when `[mqtt] listen` is set.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.adapters.mqtt.as_ref().map(|m| m.local_addr())
    }

    /// Where LoRaWAN gateways send, when `[lorawan] listen` is set.
    pub fn lorawan_addr(&self) -> Option<SocketAddr> {
        self.adapters.lorawan.as_ref().map(|l| l.local_addr())
    }

    /// Registers a background task to abort on stop.
    pub fn add_task(&mut self, t: JoinHandle<()>) {
        self.tasks.push(t);
    }
}

/// Binds the API, opens the chain and starts serving.
pub async fn start(dir: &Path, config: Config) -> anyhow::Result<Running> {
    let config = Arc::new(config);
    let mut listeners = bind_listeners(&config).await?;
    let api_addr = listeners.api.local_addr()?;
    let node_key = NodeKey::load(&dir.join(NODE_KEY_FILE))?;
    let store = open_store(dir, &config).await?;
    let store_has_blocks = store.latest_block().await?.is_some();
    let genesis =
        if !store_has_blocks { genesis(dir, &config.node.chain, &node_key.public_hex())? } else { Vec::new() };
    let (chain, sequencer, cluster) = if config.cluster.role == Role::Master {
        if let Some(w) = config.cluster.warning() {
            tracing::warn!(target: "node", "{w}");
        }
        // Any master may be the first leader, which orders genesis: each keeps it ready.
        let link_key = LinkKey::load_or_create(&dir.join(LINK_KEY_FILE))?;
        let mut cluster_config = config.cluster.to_core();
        cluster_config.client_max_body = config.api.max_body_bytes;
        let (chain, cluster) =
            Cluster::start(dir, store, node_key, link_key, config.chain_config(), cluster_config, genesis)
                .await
                .context("starting the cluster")?;
        let cluster = Arc::new(cluster);
        let stopped = cluster.clone();
        let sequencer = tokio::spawn(async move {
            stopped.stopped().await;
            Ok(())
        });
        (chain, sequencer, Some(cluster))
    } else {
        let (chain, sequencer) =
            Chain::open(store, node_key, config.chain_config(), genesis).await.context("restoring the chain")?;
        (chain, sequencer, None)
    };
    let mut tasks = Vec::new();
    if let Some(t) = chain.spawn_checkpoints() {
        tasks.push(t);
    }
    let mut state = AppState::new(chain.clone(), config.clone());
    state.cluster = cluster.clone();
    // Adapters start after the chain and before the API, so the status route sees them.
    // Marketplace buyers log in to the MQTT server with their subscription and token.
    let gate = kalima_marketplace::MarketGate::new(chain.clone(), std::time::Duration::from_secs(30));
    let adapters = Adapters::start(dir, &config, &state.ingest, &mut listeners, Some(Arc::new(gate)))?;
    state.modbus = adapters.modbus.clone();
    state.lorawan = adapters.lorawan.clone();
    // Bridges start after the chain, like adapters: they write through it.
    let relayer = kalima_bridge_ethereum::Relayer::start(chain.clone(), &config.bridge, dir)
        .context("starting the bridge relayer")?
        .map(Arc::new);
    state.relayer = relayer.clone();
    let mut anchorers = kalima_bridge_ethereum::anchor::anchorers(&config.anchor.ethereum(), dir)
        .context("starting checkpoint anchoring")?;
    for t in &config.anchor.tezos {
        let a = kalima_bridge_tezos::TezosAnchorer::new(t, dir)
            .with_context(|| format!("starting checkpoint anchoring on {}", t.name))?;
        tracing::info!(target: "bridge::tezos", anchor = %t.name, from = %a.address(), contract = %t.contract, "Anchoring checkpoints.");
        anchorers.push((Arc::new(a), std::time::Duration::from_secs(t.interval_secs)));
    }
    let anchors =
        (!anchorers.is_empty()).then(|| Arc::new(kalima_core::anchor::AnchorService::start(chain.clone(), anchorers)));
    state.anchors = anchors.clone();
    let webhooks = config
        .marketplace
        .webhooks
        .then(|| kalima_marketplace::WebhookService::start(chain.clone(), config.marketplace.options()));
    let mut settlements = None;
    if config.lightning.enabled {
        let lnd = kalima_bridge_lightning::LndRest::from_section(&config.lightning, dir)
            .context("[lightning]: connecting to LND")?;
        let backend: Arc<dyn kalima_bridge_lightning::InvoiceBackend> = Arc::new(lnd);
        let options = kalima_bridge_lightning::WatcherOptions::from_section(&config.lightning);
        settlements = Some(
            kalima_marketplace::lightning::watch_settlements(chain.clone(), backend.clone(), options)
                .await
                .context("following Lightning settlements")?,
        );
        state.invoices = Some(backend);
    }
    let stop = state.shutdown.clone();
    let mut stopped = stop.subscribe();
    let router = app(state);
    let server = tokio::spawn(async move {
        axum::serve(listeners.api, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
    });
    tracing::info!(target: "node", api = %api_addr, chain = %config.node.chain, node = %chain.node_id(), storage = %redact(&config.storage.url), "Node started.");
    Ok(Running {
        chain,
        api_addr,
        server,
        sequencer,
        stop,
        tasks,
        adapters,
        cluster,
        relayer,
        anchors,
        webhooks,
        settlements: parking_lot::Mutex::new(settlements),
    })
}

/// Resolves when SIGINT or SIGTERM arrives.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    // The handlers are installed here, not when the future is first polled: a SIGTERM that
    // arrives while the node is still starting must stop it cleanly, not kill it.
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::terminate()).ok(), signal(SignalKind::interrupt()).ok())
    };
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => {},
                _ = int => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
