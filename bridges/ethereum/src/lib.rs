//! The bridge between native KLX on the MainChain and the KLX ERC20 on Ethereum and Polygon:
//! the `KlxBridge` contract bindings and the relayer that attests deposits, signs and sends
//! releases, reports them, and halts the bridge when conservation breaks.

pub mod anchor;
pub mod config;
pub mod contracts;
pub mod devtools;
pub mod error;
pub mod identity;
pub mod reconcile;
pub mod worker;

#[cfg(any(test, feature = "test-utils"))]
pub mod anvil;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kalima_core::Chain;
use parking_lot::RwLock;
use tokio::task::JoinHandle;

pub use config::{AnchorSection, AnchorTarget, BridgeSection, ChainSettings};
pub use error::{Error, Result};
pub use identity::Identity;
pub use reconcile::{Conservation, Reconciler};
pub use worker::{ChainStatus, ChainWorker, FoundDeposit, StatusBoard, deposits_in_tx};

/// A running relayer: one worker per chain and the conservation check.
pub struct Relayer {
    /// Its keys.
    pub identity: Arc<Identity>,
    /// Per-chain status.
    pub status: StatusBoard,
    /// The last conservation check.
    pub conservation: Arc<RwLock<Conservation>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: parking_lot::Mutex<Vec<JoinHandle<()>>>,
    /// The chains this relayer serves, as configured.
    pub chains: Vec<ChainSettings>,
}

impl Relayer {
    /// Starts the relayer of `section` (keys relative to `dir`), or `None` when the section
    /// names no relayer device.
    pub fn start(chain: Chain, section: &BridgeSection, dir: &Path) -> Result<Option<Relayer>> {
        let Some(device) = &section.relayer_device else { return Ok(None) };
        let identity = Arc::new(Identity::load_or_create(
            device,
            &dir.join(&section.relayer_key_file),
            &dir.join(&section.eth_key_file),
        )?);
        Ok(Some(Self::start_with(chain, section, identity)?))
    }

    /// Starts a relayer with the given keys.
    pub fn start_with(chain: Chain, section: &BridgeSection, identity: Arc<Identity>) -> Result<Relayer> {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let status: StatusBoard = Arc::default();
        let conservation: Arc<RwLock<Conservation>> = Arc::default();
        let mut tasks = Vec::new();
        for settings in &section.chains {
            let worker = ChainWorker::new(settings.clone(), chain.clone(), identity.clone(), status.clone())?;
            tasks.push(tokio::spawn(worker.run(rx.clone())));
        }
        let reconciler = Reconciler::new(
            chain,
            identity.clone(),
            &section.chains,
            Duration::from_millis(section.reconcile_interval_ms.max(100)),
            conservation.clone(),
        )?;
        tasks.push(tokio::spawn(reconciler.run(rx)));
        tracing::info!(target: "bridge::ethereum", device = %identity.device, eth = %identity.eth.address(), chains = section.chains.len(), "Relayer started.");
        Ok(Relayer {
            identity,
            status,
            conservation,
            stop,
            tasks: parking_lot::Mutex::new(tasks),
            chains: section.chains.clone(),
        })
    }

    /// Stops every task and waits for them.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Stops every task at once, as a crash would (tests).
    pub fn abort(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}
